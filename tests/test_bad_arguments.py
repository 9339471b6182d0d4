"""Hostile input, honest failure: every bad argument of the pipeline is refused before any work,
with TypeError (wrong kind) or ValueError (out of range) naming it and the value; what a Python
user reasonably passes (NumPy scalars, any integer seed, NumPy latents, any PIL mode) works;
requests too large for the machine are refused before anything is allocated.

On the tiny preset with random weights (as test_pipeline.py): these check the checks.
"""
import io
import math
import resource

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import ldm
from ldm import arguments
from ldm.config import PRESETS
from ldm.images import mask_to_tensor, to_tensor

from helpers import randomize_

SIZE = 32  # pixels; the tiny VAE downsamples by 2, so 16×16 latents


@pytest.fixture(scope="module")
def pipe():
    pipe = ldm.StableDiffusion(PRESETS["tiny"])
    for i, module in enumerate(pipe.networks().values()):
        randomize_(module, 100 + i)
    return pipe.eval()


@pytest.fixture
def untouched(pipe, monkeypatch):
    """Makes any network call fail the test: a refused request must run none of them."""
    def boom(*args, **kwargs):
        raise AssertionError("a network ran for a request that should have been refused")
    for module in (pipe.text_encoder, pipe.unet, pipe.vae.encoder, pipe.vae.decoder):
        monkeypatch.setattr(module, "forward", boom)
    return pipe


def gen(pipe, prompt="a red circle", **kwargs):
    kwargs = {"steps": 2, "height": SIZE, "width": SIZE, "progress": False,
              "output_type": "latent", "seed": 0, **kwargs}
    return pipe.txt2img(prompt, **kwargs)


# ---------------------------------------------------------------- numbers and types
@pytest.mark.parametrize("kwargs, error, message", [
    ({"cfg_scale": float("nan")}, ValueError, r"cfg_scale must be in \[-100, 100\].*got nan"),
    ({"cfg_scale": float("inf")}, ValueError, r"cfg_scale must be in .*got inf"),
    ({"cfg_scale": -math.inf}, ValueError, r"cfg_scale must be in .*got -inf"),
    ({"cfg_scale": 1e30}, ValueError, r"cfg_scale must be in .*got 1e\+30"),
    ({"cfg_scale": "7"}, TypeError, r"cfg_scale must be a number, got '7' \(str\)"),
    ({"cfg_scale": True}, TypeError, r"cfg_scale must be a number, got True \(bool\)"),
    ({"eta": float("nan")}, ValueError, r"eta must be in \[0, 1\].*got nan"),
    ({"eta": math.inf}, ValueError, r"eta must be in \[0, 1\].*got inf"),
    ({"eta": 1.5}, ValueError, r"eta must be in \[0, 1\].*got 1.5"),
    ({"eta": "0"}, TypeError, r"eta must be a number, got '0' \(str\)"),
    ({"eta": None}, TypeError, r"eta must be a number, got None \(NoneType\)"),
    ({"seed": 1.5}, TypeError, r"seed must be an integer .*got 1.5 \(float\)"),
    ({"seed": "abc"}, TypeError, r"seed must be an integer .*got 'abc' \(str\)"),
    ({"seed": np.float64(3)}, TypeError, r"seed must be an integer .*\(float64\)"),
    ({"steps": "4"}, TypeError, r"steps must be an integer, got '4' \(str\)"),
    ({"steps": 4.0}, TypeError, r"steps must be an integer, got 4.0 \(float\)"),
    ({"height": 32.0}, TypeError, r"height must be an integer, got 32.0 \(float\)"),
    ({"width": None, "height": "32"}, TypeError, r"height must be an integer, got '32'"),
    ({"num_images": 2.0}, TypeError, r"num_images must be an integer, got 2.0 \(float\)"),
    ({"num_images": -1}, ValueError, r"num_images must be a positive integer, got -1"),
    ({"sampler": 3}, TypeError, r"sampler must be a sampler name .*got 3 \(int\)"),
    ({"schedule": 3}, TypeError, r"schedule must be one of .*got 3 \(int\)"),
    ({"negative_prompt": None}, TypeError, r"negative_prompt must be a string or a list of "
                                           r"strings, got None"),
    ({"negative_prompt": ["a", "b"]}, ValueError, r"negative_prompt has 2 entries for 1"),
    ({"latents": "noise"}, TypeError, r"latents must be a tensor, a NumPy array .*'noise'"),
    ({"latents": torch.full((1, 4, 16, 16), math.nan)}, ValueError, "latents hold NaN"),
    ({"callback": "print"}, TypeError, r"callback must be a function .*got 'print' \(str\)"),
    ({"progress": "yes"}, TypeError, r"progress must be True or False or None, got 'yes'"),
])
def test_txt2img_refuses_bad_arguments_before_any_work(untouched, kwargs, error, message):
    with pytest.raises(error, match=message):
        gen(untouched, **kwargs)


@pytest.mark.parametrize("prompt, error, message", [
    (None, TypeError, r"prompt must be a string or a list of strings, got None \(NoneType\)"),
    (42, TypeError, r"prompt must be a string or a list of strings, got 42 \(int\)"),
    (["a", 3], TypeError, r"prompt must be a string or a list of strings, got \['a', 3\]"),
    ([], ValueError, "prompt is an empty list"),
])
def test_prompts_must_be_strings(untouched, prompt, error, message):
    with pytest.raises(error, match=message):
        gen(untouched, prompt)
    with pytest.raises(error, match=message):
        untouched.encode_prompt(prompt)


def test_img2img_and_inpaint_refuse_bad_arguments(untouched):
    image = Image.new("RGB", (SIZE, SIZE))
    for strength, error, message in [
            ("0.5", TypeError, r"strength must be a number, got '0.5' \(str\)"),
            (None, TypeError, r"strength must be a number, got None"),
            (math.nan, ValueError, r"strength must be in \(0, 1\].*got nan"),
            (0, ValueError, r"strength must be in \(0, 1\].*got 0.0")]:
        with pytest.raises(error, match=message):
            untouched.img2img(image, "x", strength=strength, steps=2, progress=False)
    with pytest.raises(TypeError, match=r"image must be a PIL image, a list of them, or a "
                                        r"tensor, got str"):
        untouched.img2img("photo.png", "x", steps=2, progress=False)
    with pytest.raises(TypeError, match=r"image tensor must be floating point .*torch.uint8"):
        untouched.img2img(torch.zeros(1, 3, SIZE, SIZE, dtype=torch.uint8), "x", steps=2)
    with pytest.raises(ValueError, match=r"image list mixes sizes"):
        untouched.img2img([image, Image.new("RGB", (SIZE, 2 * SIZE))], "x", steps=2)
    with pytest.raises(TypeError, match=r"mask must be a PIL image, .*got NoneType"):
        untouched.inpaint(image, None, "x", steps=2, progress=False)
    with pytest.raises(ValueError, match=r"cfg_scale must be in .*got nan"):
        untouched.inpaint(image, image, "x", cfg_scale=math.nan, steps=2, progress=False)
    with pytest.raises(TypeError, match=r"seed must be an integer .*got 1.5"):
        untouched.inpaint(image, image, "x", seed=1.5, steps=2, progress=False)


def test_denoise_checks_its_own_arguments(untouched):
    x = torch.zeros(1, 4, 16, 16)
    with pytest.raises(ValueError, match=r"cfg_scale must be in .*got inf"):
        untouched.denoise(x, {}, {}, torch.tensor([1]), cfg_scale=math.inf)
    with pytest.raises(ValueError, match=r"eta must be in .*got nan"):
        untouched.denoise(x, {}, {}, torch.tensor([1]), eta=math.nan)
    with pytest.raises(TypeError, match=r"sampler must be a name .*got None"):
        untouched.denoise(x, {}, {}, torch.tensor([1]), sampler=None)


def test_numpy_scalars_are_the_python_numbers(pipe):
    plain = gen(pipe, steps=2, height=SIZE, num_images=1, cfg_scale=3.0, eta=0.5, seed=7)
    numpy = gen(pipe, steps=np.int64(2), height=np.int32(SIZE), width=np.uint16(SIZE),
                num_images=np.int8(1), cfg_scale=np.float32(3.0), eta=np.float64(0.5),
                seed=np.uint64(7), prompt=np.str_("a red circle"))
    assert torch.equal(plain, numpy)


def test_any_integer_seed_is_taken_mod_2_to_the_64(pipe):
    assert torch.equal(gen(pipe, seed=2**64 + 5), gen(pipe, seed=5))
    assert torch.equal(gen(pipe, seed=-1), gen(pipe, seed=2**64 - 1))  # torch's reading of -1
    assert torch.equal(gen(pipe, seed=10**30), gen(pipe, seed=10**30 % 2**64))
    assert arguments.check_seed(np.int64(-2)) == 2**64 - 2


def test_latents_may_be_numpy_or_lists(pipe):
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    from_tensor = gen(pipe, latents=noise)
    assert torch.equal(gen(pipe, latents=noise.numpy()), from_tensor)
    assert torch.equal(gen(pipe, latents=noise.tolist()), from_tensor)


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**40, 10**40),
                 st.text(max_size=3), st.none(), st.booleans()))
def test_check_float_accepts_exactly_finite_numbers_in_range(value):
    good = (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and -100 <= value <= 100)
    if good:
        assert arguments.check_cfg_scale(value) == float(value)
    else:
        with pytest.raises((TypeError, ValueError), match="cfg_scale"):
            arguments.check_cfg_scale(value)


@settings(max_examples=60, deadline=None)
@given(st.integers(-2**70, 2**70))
def test_every_integer_seed_lands_in_torchs_range(seed):
    reduced = arguments.check_seed(seed)
    assert 0 <= reduced < 2**64 and reduced % 2**32 == seed % 2**32
    torch.Generator().manual_seed(reduced)  # never "Overflow when unpacking long"


# ---------------------------------------------------------------- every PIL mode
def _png(image):
    """The image as it comes back from a PNG file."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


GREY_8BIT = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)


@pytest.mark.parametrize("mode, pixels", [
    ("I;16", GREY_8BIT.astype(np.uint16) * 257),   # 16-bit: v·257 is the 8-bit v exactly
    ("I", GREY_8BIT.astype(np.int32) * 257),       # how Pillow opens some 16-bit PNGs
    ("F", GREY_8BIT.astype(np.float32)),           # Pillow's float grey, 0..255
])
def test_high_depth_grey_reads_as_the_same_8_bit_grey(mode, pixels):
    image = Image.fromarray(pixels, mode=None if mode != "I" else "I")
    image = _png(image) if mode == "I;16" else image  # the file: a 16-bit PNG
    assert image.mode == mode
    expected = to_tensor(Image.fromarray(GREY_8BIT))
    assert torch.equal(to_tensor(image), expected)
    assert torch.equal(mask_to_tensor(image), mask_to_tensor(Image.fromarray(GREY_8BIT)))


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_16_bit_variants_scale_65535_to_white(mode):
    dark, white = Image.new(mode, (4, 4), 200), Image.new(mode, (4, 4), 65535)
    assert torch.allclose(to_tensor(dark), torch.tensor(200 / 65535 * 2 - 1))
    assert torch.equal(to_tensor(white), torch.ones(1, 3, 4, 4))
    assert mask_to_tensor(dark).sum() == 0  # 200 of 65535 is dark: keep (not white, repaint)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 65535))
def test_any_16_bit_grey_maps_linearly(value):
    x = to_tensor(Image.new("I;16", (2, 2), value))
    assert torch.allclose(x, torch.tensor(value / 65535 * 2 - 1), atol=1e-6)
    assert mask_to_tensor(Image.new("I;16", (2, 2), value)).unique().item() == (value >= 32767.5)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"])
def test_8_bit_modes_read_as_pillows_rgb(mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    image = rgb.convert(mode)
    expected = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1
    assert torch.equal(to_tensor(image)[0].permute(1, 2, 0), torch.from_numpy(expected))


@pytest.mark.parametrize("mode", ["RGBA", "RGBa", "LA", "La", "PA"])
def test_alpha_is_composited_on_white_for_images_and_black_for_masks(mode):
    # Left half transparent (over a black colour), right half an opaque grey 200.
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:, 2:] = (200, 200, 200, 255)
    image = Image.fromarray(rgba, "RGBA")
    # Pillow's RGBA -> La drops the alpha; through LA it keeps it.
    image = (image.convert("LA") if mode == "La" else image).convert(mode)
    x = to_tensor(image)
    assert torch.equal(x[..., :2], torch.ones(1, 3, 4, 2))            # transparent: white
    assert torch.allclose(x[..., 2:], torch.tensor(200 / 127.5 - 1))  # opaque: itself
    m = mask_to_tensor(image)
    assert m[..., :2].sum() == 0 and m[..., 2:].eq(1).all()  # transparent: keep


def test_palette_and_colour_key_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0  # index 0 (black) is transparent
    assert torch.equal(to_tensor(p)[0, :, 0, 0], torch.ones(3))  # white
    assert torch.equal(to_tensor(p)[0, :, 0, 1], torch.tensor([1.0, -1.0, -1.0]))  # red
    keyed = _png(Image.new("RGB", (2, 2), (0, 0, 0)).copy())
    keyed.info["transparency"] = (0, 0, 0)
    assert torch.equal(to_tensor(keyed), torch.ones(1, 3, 2, 2))


@pytest.mark.parametrize("mode, values, message", [
    ("I", np.array([[-1, 70000]], dtype=np.int32), r"image has PIL mode 'I' with values in "
                                                    r"\[-1, 70000\]; .* \[0, 65535\]"),
    ("F", np.array([[0.5, np.nan]], dtype=np.float32), r"image has PIL mode 'F'"),
    ("F", np.array([[0.0, 1000.0]], dtype=np.float32), r"mode 'F' with values in \[0, 1000\]"),
])
def test_out_of_scale_high_depth_values_are_refused(mode, values, message):
    with pytest.raises(ValueError, match=message):
        to_tensor(Image.fromarray(values, mode))


def test_a_16_bit_png_goes_through_img2img_as_its_8_bit_twin(pipe):
    """The issue's case: a 16-bit grey PNG came out pure white."""
    grey = np.tile(np.linspace(0, 255, SIZE).astype(np.uint8), (SIZE, 1))
    sixteen = _png(Image.fromarray(grey.astype(np.uint16) * 257))
    assert sixteen.mode == "I;16"
    run = dict(prompt="x", steps=2, seed=3, output_type="latent", progress=False)
    assert torch.equal(pipe.img2img(sixteen, **run), pipe.img2img(Image.fromarray(grey), **run))


# ---------------------------------------------------------------- memory
def _peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


@pytest.mark.parametrize("kwargs", [
    {"height": 100_000, "width": 100_000},
    {"height": 8192, "width": 8192},
    {"num_images": 10**6},
    {"num_images": 10**4, "height": 256, "width": 256},
])
def test_txt2img_refuses_requests_larger_than_the_machine(untouched, kwargs):
    before = _peak_rss()
    with pytest.raises(ValueError, match=r"needs about [\d.]+ GB on cpu, more than the "
                                         r"[\d.]+ GB available.*pipe.memory_limit"):
        gen(untouched, **kwargs)
    assert _peak_rss() - before < 50e6  # nothing large was allocated on the way


def test_img2img_and_inpaint_refuse_huge_images_before_converting_them(untouched):
    # A 100-megapixel image as a stride-0 view: it costs no memory, converting it would.
    huge = torch.zeros(1, 3, 1, 1).expand(1, 3, 10_240, 10_240)
    before = _peak_rss()
    with pytest.raises(ValueError, match=r"height=10240, width=10240"):
        untouched.img2img(huge, "x", steps=2, progress=False)
    with pytest.raises(ValueError, match=r"height=10240, width=10240"):
        untouched.inpaint(huge, huge[:, :1], "x", steps=2, progress=False)
    assert _peak_rss() - before < 50e6


def test_memory_limit_overrides_what_the_device_has(pipe, untouched):
    pipe.memory_limit = 1e6
    try:
        with pytest.raises(ValueError, match=r"more than memory_limit \(0.00 GB\)"):
            gen(untouched)
        with pytest.raises(ValueError, match=r"memory_limit"):
            untouched.img2img(Image.new("I;16", (SIZE, SIZE)), "x", steps=2)
    finally:
        pipe.memory_limit = None


def test_memory_limit_inf_never_refuses(pipe):
    pipe.memory_limit = math.inf
    try:
        assert gen(pipe).shape == (1, 4, 16, 16)
    finally:
        pipe.memory_limit = None
    with pytest.raises(ValueError, match="never refuse"):
        arguments.check_memory("it", 2, "cpu", limit=1)


def test_estimate_grows_as_the_request_does():
    config = PRESETS["tiny-shapes"]
    one = arguments.estimate_memory(config, 1, 256, 256)
    assert arguments.estimate_memory(config, 4, 256, 256) == pytest.approx(4 * one, rel=0.01)
    assert arguments.estimate_memory(config, 1, 256, 256, torch.float16) == pytest.approx(
        one / 2, rel=0.01)
    # The least the request runs in (the VAE in tiles): below what the first shipped model (half
    # the VAE's width) was measured to use decoding whole (CPU, float32): 73 MB at 256 px,
    # 154 MB at 384 px. Growing with the size, if less than the pixels (2.25×) at this VAE's
    # width.
    assert 5e6 < one < 73e6
    assert 1.2 * one < arguments.estimate_memory(config, 1, 384, 384) < 154e6
    # 1024 px on the 64-px model once asked for a 17 GB attention map; tiles need far less.
    assert arguments.estimate_memory(config, 1, 1024, 1024) < 1e9
    assert arguments.available_memory("cpu") > 0
