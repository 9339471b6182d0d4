"""SDXL without references: telling the files apart, the conditioning's rules, the fp16 VAE, the
file round trip. Parity with diffusers is test_parity_sdxl.py; the name map against the release
manifests, test_checkpoint.py."""
import dataclasses

import pytest
import torch
from safetensors import safe_open

import ldm
from ldm import checkpoint
from ldm.config import PRESETS, check
from ldm.loader import detect_config
from ldm.models.clip_text import CLIPTextConfig
from ldm.models.open_clip_text import OpenCLIPTextConfig
from ldm.models.vae import VAE_TINY
from ldm.sdxl import StableDiffusionXL, size_embedding

from helpers import fresh_seed, randomize_, read_manifest

UNET = checkpoint.PREFIXES["unet"]


def tiny(preset, numbers):
    """SDXL's layout at toy size: 3 (refiner 4) levels, depths kept small but per level."""
    config = PRESETS[preset]
    context = (16 if config.text is not None else 0) + 24
    depths = (0, 2, 1) if preset == "sdxl" else (0, 1, 1, 0)
    unet = dataclasses.replace(config.unet, model_channels=16, head_dim=8, norm_groups=8,
                               context_dim=context, transformer_depth=depths,
                               middle_transformer_depth=1, adm_in_channels=24 + numbers * 256)
    text = None if config.text is None else CLIPTextConfig(width=16, layers=2, heads=2)
    config = dataclasses.replace(config, unet=unet, vae=VAE_TINY, text=text, image_size=32,
                                 text_2=OpenCLIPTextConfig(width=24, layers=2, heads=2))
    check(config)
    return config


@pytest.fixture(scope="module")
def base():
    pipe = StableDiffusionXL(tiny("sdxl", 6)).eval()
    return randomize_(pipe, seed=fresh_seed())


@pytest.fixture(scope="module")
def refiner(base):
    pipe = StableDiffusionXL(tiny("sdxl-refiner", 5)).eval()
    randomize_(pipe, seed=fresh_seed())
    pipe.vae.load_state_dict(base.vae.state_dict())
    return pipe


def manifest_checkpoint(name, **changed_shapes):
    shapes = {n: shape for n, (shape, _) in read_manifest(name).items()}
    shapes.update(changed_shapes)
    return checkpoint.Checkpoint("sd_xl_file.safetensors", shapes, read=None)


@pytest.mark.parametrize("manifest, preset", [("sdxl_base", "sdxl"),
                                              ("sdxl_refiner", "sdxl-refiner")])
def test_the_release_files_are_told_apart_by_shapes(manifest, preset):
    assert detect_config(manifest_checkpoint(manifest)) == PRESETS[preset]


@pytest.mark.parametrize("change, message", [
    ({UNET + "input_blocks.0.0.weight": (320, 9, 3, 3)}, "9 input channels"),
    ({UNET + "label_emb.0.0.weight": (1280, 2560)}, "[1280, 2560]"),
])
def test_unknown_sdxl_variants_are_refused_by_name(change, message):
    with pytest.raises(ldm.CheckpointError, match="SDXL-like U-Net") as error:
        detect_config(manifest_checkpoint("sdxl_base", **change))
    assert message in str(error.value) and "sd_xl_file.safetensors" in str(error.value)


def test_a_file_without_its_second_text_encoder_is_refused():
    ckpt = manifest_checkpoint("sdxl_base")
    ckpt.shapes = {n: s for n, s in ckpt.shapes.items()
                   if not n.startswith("conditioner.embedders.1.")}
    with pytest.raises(ldm.CheckpointError, match="text_encoder_2.*conditioner.embedders.1"):
        detect_config(ckpt)


def test_save_writes_the_original_layout_and_loads_back_exactly(base, tmp_path):
    path = tmp_path / "xl.safetensors"
    ldm.save(base, path)
    rows = checkpoint.name_map(base.networks(), family="sdxl")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        position_ids = f.get_tensor("conditioner.embedders.0.transformer.text_model."
                                    "embeddings.position_ids")
    # as the release: the networks, CLIP-L's position ids, no schedule buffers
    assert keys == set(rows.values()) | {"conditioner.embedders.0.transformer.text_model."
                                         "embeddings.position_ids"}
    assert torch.equal(position_ids, torch.arange(77)[None])
    loaded = ldm.load(path)
    assert type(loaded) is StableDiffusionXL and loaded.config == base.config
    theirs = loaded.state_dict()
    assert all(torch.equal(t, theirs[n]) for n, t in base.state_dict().items())


def test_size_embedding_is_the_timestep_embedding_of_each_number():
    numbers = torch.tensor([[1024.0, 768.0, 0.0], [512.0, 512.0, 64.0]])
    embedded = size_embedding(numbers)
    assert embedded.shape == (2, 3 * 256)
    for i in range(3):
        half = torch.arange(128) / 128
        args = numbers[:, i:i + 1] * torch.exp(-torch.log(torch.tensor(10000.0)) * half)
        expected = torch.cat([args.cos(), args.sin()], dim=1)
        torch.testing.assert_close(embedded[:, 256 * i:256 * (i + 1)], expected)


@torch.no_grad()
def test_conditioning_shapes_and_the_empty_negative_prompt(base, refiner):
    cond, uncond = base.encode_prompt(["a cat", "a dog"], ["", "blurry"], num_images=2)
    assert cond["context"].shape == (4, 77, 40) and cond["y"].shape == (4, 24 + 6 * 256)
    # the base: an empty negative prompt is zeros (context and pooled), a non-empty one is not
    assert uncond["context"][:2].abs().max() == 0 and uncond["y"][:2, :24].abs().max() == 0
    assert uncond["context"][2:].abs().min() >= 0 and uncond["context"][2:].abs().max() > 0
    # the sizes are there all the same
    assert torch.equal(uncond["y"][:, 24:], cond["y"][:, 24:])
    # the refiner encodes it, and conditions on its aesthetic scores
    cond, uncond = refiner.encode_prompt("a cat", aesthetic_score=7.0,
                                         negative_aesthetic_score=2.0)
    assert cond["context"].shape == (1, 77, 24) and uncond["context"].abs().max() > 0
    assert torch.equal(cond["y"][:, 24 + 4 * 256:],
                       size_embedding(torch.tensor([[7.0]])).to(cond["y"].dtype))
    assert torch.equal(uncond["y"][:, 24 + 4 * 256:],
                       size_embedding(torch.tensor([[2.0]])).to(cond["y"].dtype))


def test_each_model_takes_only_its_own_numbers(base, refiner):
    with pytest.raises(TypeError, match="base takes no aesthetic_score"):
        base.encode_prompt("a cat", aesthetic_score=6.0)
    with pytest.raises(TypeError, match="refiner takes no target_size"):
        refiner.encode_prompt("a cat", target_size=(1024, 1024))
    with pytest.raises(TypeError, match="original_size"):
        base.encode_prompt("a cat", original_size=(1024,))
    with pytest.raises(ValueError, match="aesthetic_score"):
        refiner.encode_prompt("a cat", aesthetic_score=float("nan"))
    with pytest.raises(TypeError, match="aesthetic_score"):
        base.txt2img("a cat", steps=1, aesthetic_score=6.0)  # and no refiner to take it
    sd = StableDiffusionXL.__mro__[1](PRESETS["tiny"])
    with pytest.raises(TypeError, match="original_size"):
        sd.txt2img("a cat", steps=1, original_size=(64, 64))


@torch.no_grad()
def test_the_handoff_switches_model_at_the_boundary(base, refiner):
    """refiner_start = 0.5 with 4 DDIM steps (t = 751, 501, 251, 1): the base predicts at 751
    and 501, the refiner at 251 and 1, each with its own conditioning."""
    seen = []

    def spy(pipe, name):
        forward = pipe.unet.forward

        def record(x, t, context, y=None, concat=None):
            seen.append((name, int(t[0]), context.shape[-1]))
            return forward(x, t, context, y=y, concat=concat)
        return record

    base.unet.forward, refiner.unet.forward = spy(base, "base"), spy(refiner, "refiner")
    try:
        base.txt2img("a cat", steps=4, sampler="ddim", refiner=refiner, refiner_start=0.5,
                     aesthetic_score=7.0, output_type="latent", seed=0, progress=False)
    finally:
        del base.unet.forward, refiner.unet.forward
    assert seen == [("base", 751, 40), ("base", 501, 40), ("refiner", 251, 24),
                    ("refiner", 1, 24)]
    for bad, error in [(0.0, ValueError), (1.5, ValueError), ("0.5", TypeError)]:
        with pytest.raises(error, match="refiner_start"):
            base.txt2img("a cat", steps=1, refiner=refiner, refiner_start=bad)
    with pytest.raises(TypeError, match="refiner must be a loaded model"):
        base.txt2img("a cat", steps=1, refiner="sd_xl_refiner_1.0.safetensors")


@torch.no_grad()
def test_fp16_vae_overflow_is_decoded_again_in_float32(base):
    """A latent whose decoder activations pass float16's 65504 (as SDXL's VAE does at full
    resolution) comes out finite, as the float32 decode of the same weights; the model's VAE
    stays float16."""
    vae = base.vae
    try:
        vae.half()
        with torch.no_grad():
            vae.decoder.conv_in.weight.mul_(3000.0)  # activations ~1e5 before the first norm
        g = torch.Generator().manual_seed(fresh_seed())
        latents = torch.randn(1, 4, 8, 8, generator=g).half()
        assert not torch.isfinite(vae.decode(latents / base.scale_factor)).all()  # it overflows
        images = base.decode_latents(latents)
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
        expected = vae.float().decode(latents.float() / base.scale_factor)
        torch.testing.assert_close(images, expected, rtol=0, atol=1e-5)
        vae.half()
    finally:
        vae.float()
        with torch.no_grad():
            vae.decoder.conv_in.weight.div_(3000.0)


def test_the_command_line_makes_an_sdxl_png_with_its_parameters(base, refiner, tmp_path):
    from PIL import Image

    from ldm import cli
    ldm.save(base, tmp_path / "base.safetensors")
    ldm.save(refiner, tmp_path / "refiner.safetensors")
    out = tmp_path / "xl.png"
    cli.main(["txt2img", "a (red:1.2) circle", "--ckpt", str(tmp_path / "base.safetensors"),
              "--refiner", str(tmp_path / "refiner.safetensors"), "--refiner-start", "0.5",
              "--steps", "2", "--seed", "7", "--out", str(out), "--no-progress"])
    with Image.open(out) as image:
        assert image.size == (32, 32)
        parameters = image.text["parameters"]
    assert parameters.startswith("a (red:1.2) circle\n")
    assert "Seed: 7" in parameters and "Size: 32x32" in parameters
    assert "Refiner: refiner.safetensors, Refiner switch at: 0.5" in parameters


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_pad_conds_false_keeps_each_chunk_count(kind, request):
    pipe = request.getfixturevalue(kind)
    prompt, negative = "a castle" + ", on a hill" * 30, "fog"
    cond, uncond = pipe.encode_prompt(prompt, negative, pad_conds=False)
    padded, padded_uncond = pipe.encode_prompt(prompt, negative)
    assert cond["context"].shape[1] == 154 and uncond["context"].shape[1] == 77
    assert torch.equal(cond["context"], padded["context"])
    assert torch.equal(uncond["context"], padded_uncond["context"][:, :77])
    assert torch.equal(uncond["y"], padded_uncond["y"])  # pooled from the first chunk
    run = dict(steps=2, seed=3, output_type="latent", height=64, width=64)
    a = pipe.txt2img(prompt, negative_prompt=negative, pad_conds=False, **run)
    b = pipe.txt2img(prompt, negative_prompt=negative, **run)
    assert a.shape == b.shape and not torch.equal(a, b)
