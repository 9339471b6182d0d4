"""The hires fix (ldm/hires.py, txt2img's hires_*): what it makes equals the two passes done by
hand through the public API (txt2img, an upscaler, img2img or the sampling loop), for every
sampler, SD and SDXL; its arguments are checked; the CLI writes A1111's fields.

On the shipped model (its VAE is KL-f4), drawing 32×32 (8×8 latents) for speed, and a random
toy SDXL.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import ldm
from ldm import cli, hires, samplers
from ldm.samplers.registry import sampler_names
from ldm.sdxl import StableDiffusionXL

from helpers import fresh_seed, randomize_
from test_sdxl import tiny

PROMPT = "a red circle in the top left"


@pytest.fixture(scope="module")
def pipe():
    return ldm.load(dtype=torch.float32)  # weights/tiny-shapes.safetensors


def run(pipe, **kwargs):
    kwargs = {"steps": 2, "seed": 3, "progress": False, "output_type": "latent", "height": 32,
              "width": 32, **kwargs}
    return pipe.txt2img(PROMPT, **kwargs)


def by_hand(pipe, first, size, strength, steps, seeds, sampler="ddpm", schedule=None):
    """The second pass through the public API: A1111's schedule of steps / strength, its last
    `steps` run from the upscaled latents noised with a fresh generator per seed."""
    entry, schedule = samplers.resolve(sampler, schedule)
    total, run_steps = hires.second_pass_steps(steps, strength)
    ts = samplers.timesteps(entry, schedule, total, pipe.alphas_cumprod)[total - run_steps:]
    z0 = hires.upscale_latents(first, size)
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = samplers.add_noise(z0, samplers.randn(z0.shape, generators), ts[0], pipe.alphas_cumprod)
    cond, uncond = pipe.encode_prompt(PROMPT, num_images=len(seeds))
    return pipe.denoise(x, cond, uncond, ts, sampler=entry, generator=generators,
                        cfg_scale=pipe.config.sampling.cfg_scale,
                        cfg_interval=pipe.config.sampling.cfg_interval, progress=False)


@pytest.mark.parametrize("upscaler", hires.UPSCALERS)
def test_sizes(pipe, upscaler):
    images = run(pipe, hires_scale=2, hires_upscale=upscaler, output_type="pil", num_images=2,
                 hires_steps=1)
    assert [im.size for im in images] == [(64, 64)] * 2
    # int(32 · 1.3) = 41 and int(16 · 1.3) = 20, rounded down to the VAE's factor (4 here,
    # 8 for SD): 40 × 20 pixels, 10 × 5 latents
    latents = run(pipe, hires_scale=1.3, hires_upscale=upscaler, width=16, hires_steps=1)
    assert latents.shape == (1, 4, 10, 5)


def test_latent_upscaler_is_a1111s_interpolation():
    z = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(0))
    modes = {"latent": ("bilinear", False), "latent-bicubic-antialiased": ("bicubic", True),
             "latent-nearest-exact": ("nearest-exact", False)}
    for name, (mode, antialias) in modes.items():
        expected = torch.nn.functional.interpolate(z, size=(16, 12), mode=mode,
                                                   antialias=antialias)
        assert torch.equal(hires.upscale_latents(z, (16, 12), name), expected)
    half = hires.upscale_latents(z.half(), (16, 12))
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match="upscales pixels"):
        hires.upscale_latents(z, (16, 12), "pixel")


def test_second_pass_steps_are_a1111s():
    # setup_img2img_steps with its steps given: int(steps / min(strength, 0.999)), the last run
    assert hires.second_pass_steps(10, 0.5) == (20, 10)
    assert hires.second_pass_steps(10, 0.3) == (33, 10)
    assert hires.second_pass_steps(20, 1.0) == (20, 20)
    assert hires.second_pass_steps(7, 0.7) == (int(7 / 0.7), 7)


def test_same_seed_same_image_and_per_image_seeds(pipe):
    a = run(pipe, hires_scale=2, num_images=2, sampler="euler_a")
    assert torch.equal(a, run(pipe, hires_scale=2, num_images=2, sampler="euler_a"))
    # image i of a batch seeded s is the image of seed s + i alone, through both passes
    alone = run(pipe, hires_scale=2, seed=4, sampler="euler_a")
    assert torch.allclose(a[1:], alone, atol=1e-5) and not torch.allclose(a[:1], alone)
    # and the batch is the two passes by hand with seeds 3 and 4
    expected = by_hand(pipe, run(pipe, num_images=2, sampler="euler_a"), (16, 16), 0.7, 2,
                       [3, 4], sampler="euler_a")
    assert torch.allclose(a, expected, atol=1e-5)


@pytest.mark.parametrize("sampler", sampler_names())
def test_latent_hires_is_txt2img_upscale_then_the_sampling_loop(pipe, sampler):
    steps, strength = (2, 0.6)  # 2 steps of 3
    out = run(pipe, sampler=sampler, hires_scale=2, hires_strength=strength, hires_steps=steps)
    first = run(pipe, sampler=sampler)
    expected = by_hand(pipe, first, (16, 16), strength, steps, [3], sampler=sampler)
    assert torch.equal(out, expected)


def test_hires_steps_default_to_steps_and_callback_sees_both_passes(pipe):
    seen = []
    out = run(pipe, steps=3, hires_scale=2, hires_strength=0.5, callback=lambda i, t, x, x0:
              seen.append((i, tuple(x.shape))))
    assert seen == [(i, (1, 4, 8, 8)) for i in range(3)] + [(i, (1, 4, 16, 16)) for i in range(3)]
    assert torch.equal(out, by_hand(pipe, run(pipe, steps=3), (16, 16), 0.5, 3, [3]))


def test_pixel_hires_is_txt2img_lanczos_then_img2img(pipe):
    # steps 2 at strength 0.5: the second pass runs 2 of 4, as img2img(steps=4, strength=0.5)
    out = run(pipe, hires_scale=2, hires_strength=0.5, hires_upscale="pixel", num_images=2,
              sampler="dpmpp_2m")
    images = run(pipe, output_type="pil", num_images=2, sampler="dpmpp_2m")
    upscaled = [im.resize((64, 64), Image.LANCZOS) for im in images]
    expected = pipe.img2img(upscaled, PROMPT, strength=0.5, steps=4, seed=3, num_images=2,
                            output_type="latent", progress=False, sampler="dpmpp_2m")
    assert torch.equal(out, expected)
    # and not what the latent upscaler gives
    assert not torch.allclose(out, run(pipe, hires_scale=2, hires_strength=0.5, num_images=2,
                                       sampler="dpmpp_2m"), atol=1e-2)


def test_sdxl_second_pass_is_conditioned_on_the_target_size():
    pipe = StableDiffusionXL(tiny("sdxl", 6)).eval()  # its VAE downsamples by 2
    randomize_(pipe, seed=fresh_seed())
    calls = []
    encode = pipe.encode_prompt

    def spy(*args, **kwargs):
        calls.append((kwargs.get("image_size"), kwargs.get("original_size")))
        return encode(*args, **kwargs)
    pipe.encode_prompt = spy
    kwargs = dict(steps=3, seed=1, progress=False, output_type="latent", sampler="euler",
                  height=16, width=16)
    out = pipe.txt2img(PROMPT, hires_scale=2, hires_strength=0.5, **kwargs)
    assert calls == [((16, 16), None), ((32, 32), None)] and out.shape == (1, 4, 16, 16)
    calls.clear()  # sizes given explicitly are kept in both passes
    pipe.txt2img(PROMPT, hires_scale=2, original_size=(128, 128), **kwargs)
    assert calls == [((16, 16), (128, 128)), ((32, 32), (128, 128))]
    del pipe.encode_prompt
    # by hand: the second pass's conditioning built at 32 × 32, and not at 16 × 16
    first = pipe.txt2img(PROMPT, **kwargs)
    entry, schedule = samplers.resolve("euler")
    ts = samplers.timesteps(entry, schedule, 6, pipe.alphas_cumprod)[3:]
    z0 = hires.upscale_latents(first, (16, 16))
    g = [torch.Generator().manual_seed(1)]
    x = samplers.add_noise(z0, samplers.randn(z0.shape, g), ts[0], pipe.alphas_cumprod)
    for size, equal in [((32, 32), True), ((16, 16), False)]:
        cond, uncond = pipe.encode_prompt(PROMPT, image_size=size)
        z = pipe.denoise(x, cond, uncond, ts, sampler=entry, progress=False,
                         cfg_scale=pipe.config.sampling.cfg_scale)
        assert torch.equal(z, out) == equal


@pytest.mark.parametrize("kwargs, error, message", [
    ({"hires_scale": 1}, ValueError, "hires_scale must be a finite number > 1"),
    ({"hires_scale": 0.5}, ValueError, "hires_scale"),
    ({"hires_scale": math.nan}, ValueError, "hires_scale"),
    ({"hires_scale": math.inf}, ValueError, "hires_scale"),
    ({"hires_scale": "2"}, TypeError, "hires_scale must be a number"),
    ({"hires_scale": True}, TypeError, "hires_scale"),
    ({"hires_scale": 2, "hires_strength": 0}, ValueError, r"hires_strength must be in \(0, 1\]"),
    ({"hires_scale": 2, "hires_strength": 1.5}, ValueError, "hires_strength"),
    ({"hires_scale": 2, "hires_strength": math.nan}, ValueError, "hires_strength"),
    ({"hires_scale": 2, "hires_strength": "0.5"}, TypeError, "hires_strength"),
    ({"hires_scale": 2, "hires_steps": 0}, ValueError, "hires_steps must be a positive"),
    ({"hires_scale": 2, "hires_steps": 2.5}, TypeError, "hires_steps must be an integer"),
    ({"hires_scale": 2, "hires_upscale": "esrgan"}, ValueError, "hires_upscale must be one of"),
    ({"hires_scale": 2, "hires_upscale": None}, ValueError, "hires_upscale"),
    # LCM takes at most 50 steps: 40 at strength 0.5 is a schedule of 80
    ({"hires_scale": 2, "hires_steps": 40, "hires_strength": 0.5, "sampler": "lcm"},
     ValueError, "hires_steps / hires_strength: .* schedule of 80"),
])
def test_bad_arguments_are_named(pipe, kwargs, error, message):
    with pytest.raises(error, match=message):
        run(pipe, **kwargs)


def test_hires_with_a_refiner_is_refused(pipe):
    with pytest.raises(ValueError, match="hires_scale with a refiner"):
        run(pipe, hires_scale=2, refiner=pipe)


def test_cli_writes_a1111s_hires_fields(tmp_path):
    out = tmp_path / "out.png"
    common = [PROMPT, "--steps", "3", "--seed", "5", "--no-progress", "--sampler", "euler",
              "--height", "32", "--width", "32"]
    assert cli.main(["txt2img", *common, "--out", str(out), "--hires-scale", "2",
                     "--hires-strength", "0.5", "--hires-steps", "2"]) == 0
    image = Image.open(out)
    assert image.size == (64, 64)
    parameters = image.text["parameters"]
    assert ("Steps: 3, Sampler: Euler, Schedule type: DDIM, CFG scale: 5.0, "
            "CFG interval: 200-1000, Seed: 5, "
            "Size: 32x32, ") in parameters  # A1111's Size is the first pass's
    assert ("Model: tiny-shapes.safetensors, Denoising strength: 0.5, RNG: CPU, "
            "Hires upscale: 2, Hires steps: 2, Hires upscaler: Latent, Version: ldm ") in parameters
    assert image.text["hires_upscaler"] == "latent" and image.text["size"] == "64x64"

    assert cli.main(["txt2img", *common, "--out", str(tmp_path / "b.png"), "--hires-scale",
                     "1.5", "--hires-upscaler", "pixel"]) == 0
    parameters = Image.open(tmp_path / "b.png").text["parameters"]
    assert ("Denoising strength: 0.7, RNG: CPU, Hires upscale: 1.5, Hires upscaler: Lanczos, "
            "Version") in parameters  # no "Hires steps" when not given, as A1111



def test_cli_regenerates_a_hires_png(tmp_path, capsys):
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert cli.main(["txt2img", PROMPT, "--steps", "3", "--seed", "8", "--no-progress",
                     "--sampler", "euler_a", "--height", "32", "--width", "48", "--out",
                     str(first), "--hires-scale", "1.5", "--hires-strength", "0.6",
                     "--hires-steps", "2", "--hires-upscaler", "latent-bicubic"]) == 0
    assert cli.main(["txt2img", "--from-png", str(first), "--out", str(again),
                     "--no-progress"]) == 0
    a, b = Image.open(first), Image.open(again)
    assert b.size == (72, 48) and b.text["parameters"] == a.text["parameters"]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert cli.run(["img2img", "--image", str(first), "--from-png", str(first), "--out",
                    str(tmp_path / "c.png")]) == cli.EXIT_USAGE
    assert "made by txt2img with the hires fix" in capsys.readouterr().err

@pytest.mark.parametrize("flags, message", [
    (["--hires-scale", "1"], "argument --hires-scale: must be a finite number > 1"),
    (["--hires-scale", "2", "--hires-strength", "0"], "argument --hires-strength"),
    (["--hires-scale", "2", "--hires-steps", "0"], "argument --hires-steps"),
    (["--hires-steps", "4"], "argument --hires-steps: applies to the hires pass"),
    (["--hires-scale", "2", "--hires-upscaler", "esrgan"], "argument --hires-upscaler"),
])
def test_cli_refuses_bad_hires_flags_before_loading(tmp_path, capsys, flags, message):
    assert cli.run(["txt2img", PROMPT, "--out", str(tmp_path / "x.png"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
