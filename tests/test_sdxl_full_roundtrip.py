"""Full-size SDXL base and refiner as released: float16 files in the original layout.

Random weights with every tensor name, shape and dtype of sd_xl_base_1.0 and sd_xl_refiner_1.0
(6.9 and 6.1 GB) are loaded the way a user loads the real files, float16 and mapped (no copy),
generate (txt2img, the refiner on the base's image, the base → refiner hand-off), are saved and
load again: the saved tensors equal the file's bit for bit, and the saved files load back to
the same models. Numerics against diffusers at full size are test_parity_sdxl_full.py's.
"""
import pytest
import torch
from safetensors import safe_open

import ldm

from helpers import fresh_seed, large_temporary_file, read_manifest, write_random_safetensors

pytestmark = pytest.mark.slow

SIZE, STEPS = 128, 2  # 16² latents: every layer of the full-size networks runs, in seconds


def release_file(tmp_path_factory, manifest_name):
    manifest = read_manifest(manifest_name)
    path = tmp_path_factory.mktemp(manifest_name) / f"{manifest_name}-random.safetensors"
    nbytes = sum(2 * int(torch.tensor(shape).prod()) for shape, _ in manifest.values())
    seed = fresh_seed()
    return large_temporary_file(
        path, lambda p: write_random_safetensors(p, manifest, seed, torch.float16), nbytes)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    with release_file(tmp_path_factory, "sdxl_base") as path:
        yield path


@pytest.fixture(scope="module")
def refiner_file(tmp_path_factory):
    with release_file(tmp_path_factory, "sdxl_refiner") as path:
        yield path


def load_mapped(path, preset):
    pipe = ldm.load(path, dtype=torch.float16, mmap=True)
    assert pipe.config == ldm.PRESETS[preset]
    assert {t.dtype for t in pipe.state_dict().values()} == {torch.float16}
    return pipe


def assert_image(images, what):
    """A real picture (B, 3, H, W) in about [-1, 1]: finite, not black, not one flat colour."""
    assert images.isfinite().all(), f"{what}: non-finite pixels"
    assert images.amax() > -0.9 and images.std() > 0.01, f"{what}: black or flat"


def assert_saved_losslessly(pipe, original, tmp_path, manifest_name, preset):
    """Save `pipe`: every tensor equals the original file's, and the saved file loads back to
    the same model (config and every weight)."""
    saved = tmp_path / "saved.safetensors"
    ldm.save(pipe, saved)
    with safe_open(original, "pt") as theirs, safe_open(saved, "pt") as ours:
        assert set(ours.keys()) == set(read_manifest(manifest_name))
        for name in theirs.keys():
            a, b = theirs.get_tensor(name), ours.get_tensor(name)
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} changed by the round trip"
    reloaded = load_mapped(saved, preset).state_dict()
    for name, tensor in pipe.state_dict().items():
        assert torch.equal(reloaded[name], tensor), f"{name} differs after reloading"


@torch.no_grad()
def test_base_generates_saves_and_reloads(base_file, tmp_path):
    pipe = load_mapped(base_file, "sdxl")
    images = pipe.txt2img("a red cube on a blue table", negative_prompt="blurry", height=SIZE,
                          width=SIZE, steps=STEPS, seed=fresh_seed(),
                          output_type="tensor")
    assert images.shape == (1, 3, SIZE, SIZE)
    assert_image(images, "SDXL base txt2img")
    assert_saved_losslessly(pipe, base_file, tmp_path, "sdxl_base", "sdxl")


@torch.no_grad()
def test_refiner_refines_saves_and_reloads(base_file, refiner_file, tmp_path):
    seed = fresh_seed()
    base, refiner = load_mapped(base_file, "sdxl"), load_mapped(refiner_file, "sdxl-refiner")
    image = base.txt2img("a red cube", steps=2 * STEPS, refiner=refiner, refiner_start=0.5,
                         height=SIZE, width=SIZE, seed=seed, output_type="tensor")
    assert_image(image, "base → refiner hand-off")
    refined = refiner.img2img(image, "a red cube", strength=0.5, steps=STEPS, seed=seed,
                              output_type="tensor")
    assert refined.shape == image.shape
    assert_image(refined, "refiner img2img")
    assert_saved_losslessly(refiner, refiner_file, tmp_path, "sdxl_refiner", "sdxl-refiner")
