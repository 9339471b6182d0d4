"""Generation at scale (ldm/generate.py): a prompts file -> a folder of PNGs and manifests.

What must hold: every image's seed follows the documented rule; the set of files and their
bytes do not depend on how many processes shared the work or on an interruption; a restart
makes only what is missing; each line's settings reach txt2img; a bad line fails naming the
file, the line and the key, before any model loads.

On the shipped model (64×64) with few steps, one CPU thread (the machine is shared: two
threads only wait for each other) so that every run computes with the same kernels.
"""
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image, PngImagePlugin

import ldm
from ldm import generate as gen

PROMPTS = ["a red circle", "a blue square in the top left", "a green triangle",
           "a yellow circle on a black background", "a white square"]
FAST = dict(steps=3, sampler="euler_a")  # a noisy sampler: its per-step noise is seeded too
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pipe():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield ldm.load()
    torch.set_num_threads(threads)


def files(folder):
    """{name: bytes} of the PNGs in `folder`."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


def manifest(folder):
    return [json.loads(line) for line in (Path(folder) / "manifest.jsonl").read_text().splitlines()]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_line_keys_are_txt2img_keywords():
    parameters = inspect.signature(ldm.StableDiffusion.txt2img).parameters
    for key in gen.LINE_KEYS:  # its own keywords, or the prompt's, which **conditioning takes
        assert (key in ldm.pipeline.PROMPT_OPTIONS
                or parameters[key].kind == inspect.Parameter.KEYWORD_ONLY), key
    # a record without one of the later keys was made with txt2img's default (hires: off)
    encode = inspect.signature(ldm.StableDiffusion.encode_prompt).parameters
    assert gen.RECORD_DEFAULTS == {"rng": parameters["rng"].default,
                                   **{key: encode[key].default for key in gen.PROMPT_KEYS},
                                   **dict.fromkeys(gen.HIRES_KEYS), "cfg_interval": None}
    assert parameters["hires_scale"].default is None
    assert ldm.config.SamplingDefaults().cfg_interval is None  # None: guidance at every step


def test_a1111_settings_and_hires_lines_reach_txt2img(pipe, tmp_path):
    """rng, clip skip, prompt syntax, emphasis, pad conds and the hires fix, given by a line
    or by every line's defaults: each image is txt2img's with them, its record and A1111 line
    carry them, and a record written before these keys existed still counts as the image."""
    lines = [{"prompt": "a (red:1.3) circle", "rng": "nv", "clip_skip": 2, "seed": 7,
              "emphasis": "no_norm", "pad_conds": False,
              "negative_prompt": ("a blue " * 40).strip()},  # 2 chunks: pad_conds matters
             {"prompt": "a green (square:1.2)", "prompt_syntax": "plain", "hires_scale": 1.5,
              "hires_upscale": "pixel", "seed": 8},
             {"prompt": "a white triangle", "seed": 9}]
    out = tmp_path / "out"
    gen.generate(pipe, lines, out, hires_steps=2, **FAST)
    own = [{key: v for key, v in line.items() if key != "prompt"} for line in lines]
    own[1].update(hires_steps=2)
    rows = manifest(out)
    for line, options, row in zip(lines, own, rows):
        assert {key: row[key] for key in options} == options
        alone = pipe.txt2img(line["prompt"], **options, **FAST)[0]
        made = pixels(out / row["file"])
        assert made.shape[:2] == (alone.height, alone.width)
        assert np.abs(made - np.asarray(alone, dtype=np.int16)).max() <= 1
        read = ldm.parse_parameters(Image.open(out / row["file"]).info["parameters"]).kwargs
        assert {key: read.get(key) for key in options} == options
    assert rows[1]["hires_strength"] == ldm.hires.DEFAULT_STRENGTH and rows[1]["height"] == 64
    assert pixels(out / rows[1]["file"]).shape[:2] == (96, 96)  # the second pass's size
    assert pixels(out / rows[2]["file"]).shape[:2] == (64, 64)  # the --hires-steps default unused
    assert (rows[2]["rng"], rows[2]["clip_skip"], rows[2]["pad_conds"], rows[2]["hires_scale"],
            rows[2]["hires_steps"]) == ("cpu", None, True, None, None)
    # the first release's record of image 2 held none of these keys but cfg_interval, which
    # the shipped model's default now sets (test_a_line_s_cfg_interval_reaches_txt2img)
    record = json.loads(Image.open(out / rows[2]["file"]).info[gen.RECORD_KEY])
    old = {key: v for key, v in record.items()
           if key not in gen.RECORD_DEFAULTS or key == "cfg_interval"}
    info = PngImagePlugin.PngInfo()
    info.add_text(gen.RECORD_KEY, json.dumps(old))
    Image.open(out / rows[2]["file"]).save(out / rows[2]["file"], pnginfo=info)
    summary = gen.generate(pipe, lines, out, hires_steps=2, **FAST)
    assert (summary.made, summary.skipped) == (0, 3)


def test_a_line_s_cfg_interval_reaches_txt2img(pipe, tmp_path):
    """cfg_interval from a line, from every line's default, and from the model's config (the
    shipped model's (200, 1000)): each image is txt2img's, the record holds the interval used
    and the A1111 line reads back to it; a record without the key meant guidance at every step,
    so an image made so is another image now."""
    lines = [{"prompt": "a red circle", "cfg_interval": [0, 500], "seed": 3},
             {"prompt": "a blue square", "seed": 4}]
    for defaults, second in (({}, [200.0, 1000.0]), ({"cfg_interval": (100, 900)},
                                                     [100.0, 900.0])):
        out = tmp_path / f"out{len(defaults)}"
        gen.generate(pipe, lines, out, **defaults, **FAST)
        rows = manifest(out)
        assert [row["cfg_interval"] for row in rows] == [[0.0, 500.0], second]
        for line, row in zip(lines, rows):
            alone = pipe.txt2img(line["prompt"], seed=line["seed"], cfg_interval=row["cfg_interval"],
                                 **FAST)[0]
            assert np.abs(pixels(out / row["file"]) - np.asarray(alone, dtype=np.int16)).max() <= 1
            read = ldm.parse_parameters(Image.open(out / row["file"]).info["parameters"]).kwargs
            assert list(read["cfg_interval"]) == row["cfg_interval"]
    record = json.loads(Image.open(out / rows[1]["file"]).info[gen.RECORD_KEY])
    del record["cfg_interval"]
    info = PngImagePlugin.PngInfo()
    info.add_text(gen.RECORD_KEY, json.dumps(record))
    Image.open(out / rows[1]["file"]).save(out / rows[1]["file"], pnginfo=info)
    with pytest.raises(ValueError, match=r"other settings \(cfg_interval None, now \[100.0, 900.0\]"):
        gen.generate(pipe, lines, out, cfg_interval=(100, 900), **FAST)


@pytest.mark.parametrize("lines, defaults, message", [
    ([{"prompt": "a", "hires_steps": 2}], {}, r"prompts\[0\]: hires_steps without hires_scale"),
    ([{"prompt": "a"}], {"hires_strength": 0.5}, r"hires_strength given, but no prompt has a "
                                                 r"hires_scale"),
    ([{"prompt": "a", "clip_skip": 99}], {}, r"prompts\[0\]: clip_skip must be in \[1, "),
])
def test_hires_and_clip_skip_mistakes_fail_before_any_image(pipe, tmp_path, lines, defaults,
                                                            message):
    with pytest.raises(ValueError, match=message):
        gen.generate(pipe, lines, tmp_path / "out", **defaults, **FAST)
    assert not (tmp_path / "out").exists()


def test_shards_make_the_single_process_set_byte_for_byte(pipe, tmp_path):
    """Ranks of 2 and of 3 (in-process, as torchrun would start them), each writing its own
    manifest, make exactly the files one process makes, with the same bytes."""
    options = dict(num_images=2, seed=100, batch_size=3, **FAST)
    single = gen.generate(pipe, PROMPTS, tmp_path / "one", **options)
    assert (single.made, single.skipped, single.complete) == (10, 0, True)
    expected = files(tmp_path / "one")
    assert sorted(expected) == [f"{k:06d}-{i:03d}.png" for k in range(5) for i in range(2)]
    for world in (2, 3):
        out = tmp_path / f"world{world}"
        summaries = [gen.generate(pipe, PROMPTS, out, rank=r, world_size=world, **options)
                     for r in range(world)]
        assert sum(s.made for s in summaries) == 10
        assert [s.complete for s in summaries] == [False] * (world - 1) + [True]  # the last one
        assert files(out) == expected
        assert manifest(out) == manifest(tmp_path / "one")
        rank_files = [{row["file"] for row in map(json.loads, (out / f"manifest-rank{r}.jsonl")
                                                                .read_text().splitlines())}
                      for r in range(world)]
        assert sum(map(len, rank_files)) == 10 and set().union(*rank_files) == set(expected)
        merged = gen.read_manifest(out)  # the rank files read together: the same records
        assert [{k: v for k, v in row.items() if k not in gen.RUN_KEYS} for row in merged] == \
            manifest(out)
        assert sorted({row["rank"] for row in merged}) == list(range(world))
    # The seed rule: base + k·N + i.
    assert [(r["prompt_index"], r["image"], r["seed"]) for r in manifest(tmp_path / "one")] == [
        (k, i, 100 + 2 * k + i) for k in range(5) for i in range(2)]


def test_rank_comes_from_the_environment(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert gen.shard() == (1, 2, 1)
    summary = gen.generate(pipe, PROMPTS[:3], tmp_path, batch_size=1, **FAST)
    assert summary.made == 1 and sorted(files(tmp_path)) == ["000001-000.png"]
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK=2, WORLD_SIZE=2"):
        gen.shard()


def test_an_image_is_the_image_of_its_seed_alone(pipe, tmp_path):
    """Batched with other prompts and seeds, an image is what txt2img makes of its prompt and
    seed alone, up to the last bits of the batched arithmetic (at most one level of 255)."""
    gen.generate(pipe, PROMPTS, tmp_path, num_images=2, seed=7, batch_size=4, **FAST)
    alone = pipe.txt2img(PROMPTS[2], seed=7 + 2 * 2 + 1, **FAST)[0]
    made = pixels(tmp_path / "000002-001.png")
    assert np.abs(made - np.asarray(alone, dtype=np.int16)).max() <= 1
    other_seed = np.asarray(pipe.txt2img(PROMPTS[2], seed=7 + 2 * 2, **FAST)[0], dtype=np.int16)
    assert np.abs(made - other_seed).mean() > 5  # the test can tell seeds apart


def test_restart_after_an_interruption_gives_the_same_set(pipe, tmp_path, monkeypatch):
    options = dict(num_images=2, batch_size=3, **FAST)
    gen.generate(pipe, PROMPTS, tmp_path / "whole", **options)
    calls, txt2img = [], pipe.txt2img

    def interrupted(*args, **kwargs):  # Ctrl-C during the second batch
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return txt2img(*args, **kwargs)
    monkeypatch.setattr(pipe, "txt2img", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gen.generate(pipe, PROMPTS, tmp_path / "resumed", **options)
    monkeypatch.undo()
    partial = files(tmp_path / "resumed")
    assert len(partial) == 3 and not list((tmp_path / "resumed").glob(".*"))  # no temporaries
    assert not (tmp_path / "resumed" / "manifest.jsonl").exists()
    summary = gen.generate(pipe, PROMPTS, tmp_path / "resumed", **options)
    assert (summary.made, summary.skipped, summary.complete) == (7, 3, True)
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")
    assert manifest(tmp_path / "resumed") == manifest(tmp_path / "whole")

    # One image removed from the middle of a batch: its batch is computed again, the same bytes
    # come out, and nothing else is rewritten.
    (tmp_path / "resumed" / "000002-000.png").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").glob("*.png")}
    summary = gen.generate(pipe, PROMPTS, tmp_path / "resumed", **options)
    assert (summary.made, summary.skipped) == (1, 9)
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")
    assert all(p.stat().st_mtime_ns == before[p.name]
               for p in (tmp_path / "resumed").glob("*.png") if p.name in before)


def test_a_folder_of_other_images_is_refused(pipe, tmp_path):
    gen.generate(pipe, PROMPTS[:2], tmp_path, **FAST)
    with pytest.raises(ValueError, match=r"000000-000.png is there but was made with other "
                                         r"settings \(steps 3, now 4\)"):
        gen.generate(pipe, PROMPTS[:2], tmp_path, steps=4, sampler="euler_a")
    with pytest.raises(ValueError, match="prompt 'a red circle', now 'a blue circle'"):
        gen.generate(pipe, ["a blue circle"], tmp_path, **FAST)
    Image.new("RGB", (64, 64)).save(tmp_path / "000001-000.png")  # no record in it
    with pytest.raises(ValueError, match="000001-000.png is there but is no image of"):
        gen.generate(pipe, PROMPTS[:2], tmp_path, **FAST)


def test_jsonl_lines_carry_their_own_settings(pipe, tmp_path):
    lines = [{"prompt": "a red circle", "sampler": "ddim", "steps": 4, "cfg_scale": 5.0,
              "seed": 1234, "num_images": 2},
             {"prompt": "a blue square", "negative_prompt": "a red square", "height": 48,
              "width": 32},
             {"prompt": "a green triangle"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(map(json.dumps, lines[:2])) + "\n\n" + json.dumps(lines[2]) + "\n")
    gen.generate(pipe, path, tmp_path / "out", seed=50, **FAST)
    rows = manifest(tmp_path / "out")
    assert [(r["file"], r["line"], r["seed"], r["sampler"], r["steps"], r["cfg_scale"])
            for r in rows] == [
        ("000000-000.png", 1, 1234, "ddim", 4, 5.0), ("000000-001.png", 1, 1235, "ddim", 4, 5.0),
        ("000001-000.png", 2, 51, "euler_a", 3, 5.0), ("000002-000.png", 4, 52, "euler_a", 3, 5.0)]
    assert rows[1]["negative_prompt"] == "" and rows[2]["negative_prompt"] == "a red square"
    image = Image.open(tmp_path / "out" / "000001-000.png")
    assert image.size == (32, 48)
    assert "Negative prompt: a red square" in image.info["parameters"]
    assert "Sampler: DDIM, CFG scale: 5.0, CFG interval: 200-1000, Seed: 1235" in Image.open(
        tmp_path / "out" / "000000-001.png").info["parameters"]
    for row in rows:  # each PNG's A1111 line reads back to the settings that made it
        line = Image.open(tmp_path / "out" / row["file"]).info["parameters"]
        settings = ldm.parse_parameters(line).kwargs
        assert {key: settings[key] for key in ("prompt", "negative_prompt", "seed", "sampler",
                                               "steps", "cfg_scale", "width", "height")} == {
            key: row[key] for key in ("prompt", "negative_prompt", "seed", "sampler", "steps",
                                      "cfg_scale", "width", "height")}
        assert settings["rng"] == "cpu"
    alone = pipe.txt2img("a red circle", sampler="ddim", steps=4, cfg_scale=5.0, seed=1235)[0]
    made = pixels(tmp_path / "out" / "000000-001.png")
    assert np.abs(made - np.asarray(alone, dtype=np.int16)).max() <= 1
    default = np.asarray(pipe.txt2img("a red circle", seed=1235, **FAST)[0], dtype=np.int16)
    assert np.abs(made - default).mean() > 5  # the line's settings did change the image


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "stepz": 3}', r"p.jsonl:2: unknown key 'stepz'; a prompt takes"),
    ('{"prompt": "a", "generator": 3}', r"p.jsonl:2: unknown key 'generator' \(an object"),
    ('{"prompt": "a", "steps": "3"}', r"p.jsonl:2: steps: steps must be an integer, got '3'"),
    ('{"prompt": "a", "steps": 0}', r"p.jsonl:2: steps: steps must be a positive integer"),
    ('{"prompt": "a", "cfg_scale": 1e9}', r"p.jsonl:2: cfg_scale: cfg_scale must be in"),
    ('{"prompt": "a", "cfg_interval": 200}', r"p.jsonl:2: cfg_interval: cfg_interval must be "
                                             r"None or a pair"),
    ('{"prompt": "a", "cfg_interval": [900, 100]}', r"p.jsonl:2: cfg_interval: cfg_interval "
                                                    r"must be \(low, high\) with low < high"),
    ('{"prompt": "a", "sampler": "eulr"}', r"p.jsonl:2: sampler: must be one of ddim"),
    ('{"prompt": "a", "height": 30}', r"p.jsonl:2: height: must be a multiple of 8, got 30"),
    ('{"prompt": "a", "seed": -1}', r"p.jsonl:2: seed: seed must be an integer >= 0"),
    ('{"prompt": "a", "seed": 18446744073709551616}', r"p.jsonl:2: seed: must be below 2\*\*64"),
    ('{"prompt": "a", "rng": "gpu"}', r"p.jsonl:2: rng: must be one of cpu, nv, got 'gpu'"),
    ('{"prompt": "a", "pad_conds": 1}', r"p.jsonl:2: pad_conds: must be true or false, got 1"),
    ('{"prompt": "a", "emphasis": "x"}', r"p.jsonl:2: emphasis: must be one of original, "),
    ('{"prompt": "a", "clip_skip": 0}', r"p.jsonl:2: clip_skip: clip_skip must be a positive"),
    ('{"prompt": "a", "hires_scale": 1}', r"p.jsonl:2: hires_scale: hires_scale must be a "
                                          r"finite number > 1"),
    ('{"prompt": "a", "hires_strength": 0}', r"p.jsonl:2: hires_strength: hires_strength must "
                                             r"be in \(0, 1\]"),
    ('{"prompt": "a", "hires_upscale": "esrgan"}', r"p.jsonl:2: hires_upscale: must be one of "
                                                   r"latent"),
    ('{"text": "a"}', r"p.jsonl:2: unknown key 'text'"),
    ('{"steps": 3}', r'p.jsonl:2: has no "prompt"'),
    ('{"prompt": 3}', r'p.jsonl:2: needs a string as its "prompt"'),
    ('["a red circle"]', r'p.jsonl:2: a prompt is a string or an object'),
    ('{"prompt": "a",', r"p.jsonl:2: not JSON \(Expecting property name"),
])
def test_a_bad_line_is_named_with_its_key(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red circle"}\n' + line + "\n")
    with pytest.raises((ValueError, TypeError), match=message):
        gen.read_prompts(path)


def test_lora_tags_merge_their_lora_for_their_prompts(pipe, tmp_path):
    """<lora:name:m> tags merge the file of lora_dir for their prompts' images only (each image
    as txt2img makes it with the LoRA loaded), batch apart from other LoRAs and multipliers,
    and are recorded with A1111's hash in the manifest and the PNG's parameters."""
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    shutil.copy(ROOT / "weights" / "tiny-shapes-purple-star.safetensors",
                lora_dir / "ps.safetensors")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    prompts = ["a purple circle <lora:ps:1>", "a red circle", "a purple <lora:ps:0.5> star",
               "a purple square <lora:ps:1>"]
    jobs = gen.plan(pipe, gen._prompts(prompts), lora_dir=lora_dir, **FAST)
    assert [[job.prompt_index for job in batch] for batch in gen.batches(jobs, 8)] == [
        [0, 3], [1], [2]]
    gen.generate(pipe, prompts, tmp_path / "out", lora_dir=lora_dir, seed=30, **FAST)
    assert pipe.lora_dir is None and all(torch.equal(v, before[k])
                                         for k, v in pipe.unet.state_dict().items())
    digest = ldm.lora.file_hash(lora_dir / "ps.safetensors")
    rows = manifest(tmp_path / "out")
    assert [r["lora_hashes"] for r in rows] == [f"ps: {digest}", None, f"ps: {digest}",
                                                f"ps: {digest}"]
    assert rows[2]["prompt"] == "a purple <lora:ps:0.5> star"
    loaded = pipe.load_lora(lora_dir / "ps.safetensors", 0.5)
    try:
        alone = pipe.txt2img("a purple  star", seed=32, **FAST)[0]
    finally:
        pipe.unload_lora(loaded)
    without = pipe.txt2img("a purple  star", seed=32, **FAST)[0]
    made = pixels(tmp_path / "out" / "000002-000.png")
    assert np.abs(made - np.asarray(alone, dtype=np.int16)).max() <= 1
    assert np.abs(made - np.asarray(without, dtype=np.int16)).mean() > 1  # the LoRA acted
    line = Image.open(tmp_path / "out" / "000002-000.png").info["parameters"]
    read = ldm.parse_parameters(line)
    assert read.kwargs["prompt"] == "a purple  star" and read.info["Lora hashes"] == f"ps: {digest}"
    assert [(t.name, t.multiplier) for t in read.loras] == [("ps", 0.5)]
    # another file under the same name is another setting: refused, not skipped or mixed
    tensors = safetensors.torch.load_file(lora_dir / "ps.safetensors")
    name = sorted(tensors)[0]
    safetensors.torch.save_file({**tensors, name: tensors[name] * 2}, lora_dir / "ps.safetensors")
    with pytest.raises(ValueError, match=r"000000-000.png is there but was made with other "
                                         r"settings \(lora_hashes"):
        gen.generate(pipe, prompts, tmp_path / "out", lora_dir=lora_dir, seed=30, **FAST)


@pytest.mark.parametrize("prompt, lora_dir, error, message", [
    ({"prompt": "a <lora:ink:1> circle"}, None, ValueError,
     r"prompts\[1\]: <lora:…> tags name ink: give the folder of LoRA files \(--lora-dir"),
    ({"prompt": "a <lora:ink:1> circle"}, "loras", FileNotFoundError,
     r"prompts\[1\]: LoRA 'ink' not found in .*loras \(tried ink, ink.safetensors"),
    ({"prompt": "a <lora:ink:x> circle"}, "loras", ValueError,
     r"prompts\[1\]: <lora:ink:x>: multipliers must be numbers"),
    ({"prompt": "a circle", "negative_prompt": "<lora:ink:1>"}, "loras", ValueError,
     r"prompts\[1\]: negative_prompt: <lora:…> tags are read in the prompt only"),
])
def test_lora_tags_that_cannot_be_read_fail_before_any_image(pipe, tmp_path, prompt, lora_dir,
                                                             error, message):
    (tmp_path / "loras").mkdir()
    lora_dir = None if lora_dir is None else tmp_path / lora_dir
    with pytest.raises(error, match=message):
        gen.generate(pipe, ["a red circle", prompt], tmp_path / "out", lora_dir=lora_dir, **FAST)
    assert not (tmp_path / "out").exists()


def test_settings_that_need_the_model_are_checked_before_any_image(pipe, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "sampler": "ddim", "steps": 2000}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: steps must be .* for sampler 'ddim'"):
        gen.generate(pipe, path, tmp_path / "out")
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "num_images": 3}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: num_images 3 is more than the 2 images"):
        gen.generate(pipe, path, tmp_path / "out", num_images=2)
    assert not (tmp_path / "out").exists()
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        gen.read_prompts(path)
    with pytest.raises(FileNotFoundError, match="prompts file a red circle does not exist"):
        gen.generate(pipe, "a red circle", tmp_path / "out")  # a prompt where a file goes
    with pytest.raises(ValueError, match="rank must be in"):
        gen.generate(pipe, ["a red circle"], tmp_path / "out", rank=2, world_size=2)
    assert not (tmp_path / "out").exists()


def test_command_line(pipe, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    out = tmp_path / "out"
    args = ["--prompts", str(prompts), "--out", str(out), "--steps", "3", "--sampler",
            "euler_a", "--num-images", "2", "--seed", "9", "--batch-size", "4", "--no-progress"]
    monkeypatch.setattr(gen, "load", lambda *a, **k: pipe)  # the fixture's, already loaded
    assert gen.run(args) == 0
    assert capsys.readouterr().out.startswith("rank 0/1: 6 images made, 0 already there")
    assert files(out) == files(_api_run(pipe, tmp_path / "api", PROMPTS[:3]))
    record = manifest(out)[0]
    assert record["model"] == "tiny-shapes.safetensors" and len(record["model_sha256"]) == 64
    assert gen.run(args) == 0
    assert "0 images made, 6 already there" in capsys.readouterr().out


def test_command_line_a1111_and_hires_flags(pipe, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a (red:1.2) circle\n")
    settings = dict(rng="nv", pad_conds=False, clip_skip=2, emphasis="no_norm",
                    prompt_syntax="plain", hires_scale=1.5, hires_strength=0.6, hires_steps=2,
                    hires_upscale="pixel", cfg_interval=[150.0, 700.0])
    flags = ["--cfg-interval", "150", "700", "--rng", "nv", "--no-pad-conds", "--clip-skip", "2", "--emphasis", "no_norm",
             "--prompt-syntax", "plain", "--hires-scale", "1.5", "--hires-strength", "0.6",
             "--hires-steps", "2", "--hires-upscaler", "pixel"]
    monkeypatch.setattr(gen, "load", lambda *a, **k: pipe)
    assert gen.run(["--prompts", str(prompts), "--out", str(tmp_path / "cli"), "--steps", "3",
                    "--sampler", "euler_a", "--no-progress", *flags]) == 0
    gen.generate(pipe, prompts, tmp_path / "api", model=ldm.loader.DEFAULT_CHECKPOINT,
                 **settings, **FAST)
    assert files(tmp_path / "cli") == files(tmp_path / "api")
    assert {key: manifest(tmp_path / "cli")[0][key] for key in settings} == settings


def _api_run(pipe, out, prompts):
    gen.generate(pipe, prompts, out, num_images=2, seed=9, batch_size=4,
                 model=ldm.loader.DEFAULT_CHECKPOINT, **FAST)
    return out


@pytest.mark.parametrize("argument, message", [
    (["--steps", "0"], "argument --steps: steps must be a positive integer"),
    (["--num-images", "0"], "argument --num-images: num_images must be a positive integer"),
    (["--seed", "-3"], "argument --seed: seed must be an integer >= 0"),
    (["--height", "20"], "argument --height: must be a multiple of 8"),
    (["--cfg-scale", "nan"], "argument --cfg-scale: cfg_scale must be in"),
    (["--cfg-interval", "700", "150"], "argument --cfg-interval: cfg_interval must be "
                                       "(low, high) with low < high"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["--ckpt", "nowhere.safetensors"], "argument --ckpt: nowhere.safetensors is not a file"),
    (["--prompts", "nowhere.txt"], "argument --prompts: nowhere.txt is not a file"),
    (["--out", "prompts.txt"], "argument --out: prompts.txt is not a folder"),
    (["--lora-dir", "nowhere"], "argument --lora-dir: nowhere is not a folder"),
    (["--hires-steps", "2"], "arguments --hires-*: hires_steps given, but no prompt has a "
                             "hires_scale"),
    (["--hires-scale", "0.5"], "argument --hires-scale: hires_scale must be a finite number > 1"),
    (["--prompts", "tagged.txt"], "tagged.txt:2: <lora:…> tags name ink: give the folder"),
    (["--prompts", "tagged.txt", "--lora-dir", "."], "tagged.txt:2: LoRA 'ink' not found in ."),
])
def test_command_line_errors_come_before_the_load(tmp_path, monkeypatch, capsys, argument,
                                                  message):
    monkeypatch.chdir(tmp_path)
    Path("prompts.txt").write_text("a red circle\n")
    Path("tagged.txt").write_text("a red circle\na <lora:ink:1> circle\n")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(gen, "load", no_load)
    code = gen.run(["--prompts", "prompts.txt", "--out", "out", *argument])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"python -m ldm.generate: error: {message}")
    assert not Path("out").exists()


@pytest.mark.slow  # two fresh processes importing torch: ~25 s on a shared 2-core machine
def test_torchrun_with_two_cpu_processes(pipe, tmp_path):
    """Two processes under torchrun (no process group: they never talk) make the files one
    process makes, byte for byte."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:3]) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "ldm.generate",
               "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--steps", "3",
               "--sampler", "euler_a", "--num-images", "2", "--seed", "9", "--batch-size", "4",
               "--no-progress", "--device", "cpu", "--threads", "1",
               "--dtype", "float32"]  # a subprocess: "auto" would be bf16 on a CPU with AMX
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0/2: 4 images made" in done.stdout and "rank 1/2: 2 images made" in done.stdout
    assert files(tmp_path / "out") == files(_api_run(pipe, tmp_path / "api", PROMPTS[:3]))
    assert manifest(tmp_path / "out") == manifest(tmp_path / "api")
