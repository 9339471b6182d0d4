"""The command line's model options: --lora, --embedding, --clip-skip, --prompt-syntax, each
reaching the model and A1111's parameters line."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ldm
from ldm import cli, embeddings, lora

from helpers import fresh_seed


@pytest.fixture(scope="module")
def shipped():
    return ldm.load()


def random_lora(pipe, path, layers=3):
    """A kohya LoRA of rank 2 on the first Linear layers of the name map."""
    g = torch.Generator().manual_seed(fresh_seed())
    tensors = {}
    params = {n: dict(m.named_parameters()) for n, m in pipe.networks().items()}
    linear = [(name, t) for name, t in lora.original_name_map(pipe.networks()).items()
              if params[t.network][t.param].ndim == 2 and t.rows is None][:layers]
    for name, target in linear:
        out, inner = params[target.network][target.param].shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, inner, generator=g)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 2, generator=g)
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))
    return path


def make(tmp_path, *options):
    out = tmp_path / "out.png"
    cli.main(["txt2img", "a red circle", "--steps", "2", "--seed", "3", "--out", str(out),
              "--no-progress", "--overwrite", *options])
    with Image.open(out) as image:
        return torch.tensor(np.asarray(image), dtype=torch.float32), image.text


def test_lora_changes_the_image_and_is_written_as_a1111_does(shipped, tmp_path):
    path = random_lora(shipped, tmp_path / "style.safetensors")
    plain, _ = make(tmp_path)
    with_lora, text = make(tmp_path, "--lora", f"{path}:0.7")
    assert (plain - with_lora).abs().mean() > 0.5
    assert text["parameters"].startswith("a red circle <lora:style:0.7>\n")
    assert f'Lora hashes: "style: {lora.file_hash(path)}"' in text["parameters"]



def test_lora_tags_in_the_prompt_read_from_lora_dir(shipped, tmp_path, capsys):
    path = random_lora(shipped, tmp_path / "style.safetensors")
    by_flag, text = make(tmp_path, "--lora", f"{path}:0.7")
    out = tmp_path / "tagged.png"
    tagged = ["txt2img", "a red <lora:style:0.7>circle", "--steps", "2", "--seed", "3",
              "--out", str(out), "--no-progress"]
    cli.main(tagged + ["--lora-dir", str(tmp_path)])
    with Image.open(out) as image:
        assert torch.equal(torch.tensor(np.asarray(image), dtype=torch.float32), by_flag)
        assert image.text["parameters"] == text["parameters"]
    assert cli.run(tagged + ["--overwrite"]) == cli.EXIT_USAGE
    assert "the prompt: uses LoRA(s) style in <lora:…> tags: give --lora-dir" in \
        capsys.readouterr().err
    assert cli.run(tagged + ["--lora-dir", str(tmp_path / "none"), "--overwrite"]) == \
        cli.EXIT_USAGE
    assert "argument --lora-dir: LoRA 'style' not found" in capsys.readouterr().err


def test_from_png_finds_its_loras_in_lora_dir(shipped, tmp_path, capsys):
    path = random_lora(shipped, tmp_path / "style.safetensors")
    first, text = make(tmp_path, "--lora", f"{path}:0.7")
    again = ["txt2img", "--from-png", str(tmp_path / "out.png"), "--out",
             str(tmp_path / "again.png"), "--no-progress"]
    assert cli.run(again) == cli.EXIT_USAGE
    assert "out.png: uses LoRA(s) style in <lora:…> tags: give --lora-dir" in \
        capsys.readouterr().err
    cli.main(again + ["--lora-dir", str(tmp_path)])
    with Image.open(tmp_path / "again.png") as image:
        assert torch.equal(torch.tensor(np.asarray(image), dtype=torch.float32), first)
        assert image.text["parameters"] == text["parameters"]

def test_lora_argument_keeps_colons_that_are_not_a_multiplier():
    assert cli._lora_argument("C:/loras/x.safetensors") == (cli.Path("C:/loras/x.safetensors"),
                                                            1.0)
    assert cli._lora_argument("x.safetensors:-0.5") == (cli.Path("x.safetensors"), -0.5)


def test_embedding_clip_skip_and_syntax_reach_the_model(shipped, tmp_path):
    width = shipped.text_encoder.cfg.width
    embeddings.save_embedding(tmp_path / "redness.safetensors", torch.randn(2, width))
    plain, _ = make(tmp_path)
    skipped, text = make(tmp_path, "--clip-skip", "2")
    assert "Clip skip: 2" in text["parameters"] and (plain - skipped).abs().mean() > 0
    literal, text = make(tmp_path, "--prompt-syntax", "plain")
    assert "Emphasis: None" in text["parameters"] and torch.equal(literal, plain)
    images = {}
    for name, options in (("plain", []), ("emb", ["--embedding",
                                                  str(tmp_path / "redness.safetensors")])):
        out = tmp_path / f"{name}.png"
        cli.main(["txt2img", "a redness circle", "--steps", "2", "--seed", "3", "--out",
                  str(out), "--no-progress", *options])
        with Image.open(out) as image:
            images[name] = np.asarray(image, dtype=np.float32)
            text = image.text
    assert text["embeddings"] == "redness.safetensors"
    assert np.abs(images["plain"] - images["emb"]).mean() > 0  # the vectors replaced the word


def test_a_missing_lora_file_is_a_usage_error(tmp_path, capsys):
    assert cli.run(["txt2img", "x", "--lora", str(tmp_path / "none.safetensors"),
                    "--out", str(tmp_path / "o.png")]) == cli.EXIT_USAGE
    assert "argument --lora" in capsys.readouterr().err


def test_pad_conds_flag_reaches_the_model_and_the_png(tmp_path):
    long = "a red circle" + ", on a blue background" * 20  # two chunks; the negative one
    common = ["txt2img", long, "--negative-prompt", "a green square", "--steps", "2", "--seed",
              "4", "--no-progress", "--sampler", "euler_a"]
    cli.main(common + ["--out", str(tmp_path / "pad.png")])
    cli.main(common + ["--no-pad-conds", "--out", str(tmp_path / "nopad.png")])
    cli.main(["txt2img", "--from-png", str(tmp_path / "nopad.png"), "--no-progress", "--out",
              str(tmp_path / "again.png")])
    pad, nopad, again = (Image.open(tmp_path / f"{n}.png") for n in ("pad", "nopad", "again"))
    assert "Pad conds" not in pad.text["parameters"]
    assert "Pad conds: False" in nopad.text["parameters"]
    assert not np.array_equal(np.asarray(pad), np.asarray(nopad))
    assert np.array_equal(np.asarray(nopad), np.asarray(again))
    assert again.text["parameters"] == nopad.text["parameters"]
