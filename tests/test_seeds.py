"""Seeds that reproduce: image i of a batch made with seed s is exactly the image of seed s + i
made alone (AUTOMATIC1111's rule), for every sampler and task.

Every noise an image gets comes from a generator of its own (pipeline._generators), so what
the rule needs of the noise is exact. The networks' float arithmetic is another matter: a
batched matrix product or convolution rounds differently for different batch sizes (on the
CPU, a batch of one takes another kernel), so the same image computed in a batch of 2 and of
6 differs in the last bits. The exact tests below therefore run each network one image at a
time (`one_image_at_a_time`), which leaves only the noise to tell the images apart; one test
on the plain pipeline shows how close the images are without that.

On the tiny preset with random weights, as test_pipeline.py.
"""
import inspect
import math
from dataclasses import replace

import pytest
import torch

import ldm
from ldm import schedule
from ldm.config import PRESETS
from ldm.models.unet import UNET_TINY
from ldm.samplers import SAMPLERS, sample_ddim, timesteps

from helpers import randomize_

SIZE = 32  # pixels; the tiny VAE downsamples by 2, so 16×16 latents
AC = schedule.alphas_cumprod()
NOISY = [name for name, entry in SAMPLERS.items() if entry.noisy]
# Every sampler; DDIM with η > 0, so that it draws noise at every step.
SAMPLER_OPTIONS = [(name, {"eta": 0.5} if name == "ddim" else {}) for name in SAMPLERS]


def one_image_at_a_time(module):
    """Make `module` run on one image at a time: every tensor argument whose first axis is the
    batch is cut into (1, …) slices, and the outputs are concatenated back."""
    forward = module.forward

    def per_image(*args, **kwargs):
        batch = args[0].shape[0]

        def pick(value, i):
            is_batched = torch.is_tensor(value) and value.ndim and value.shape[0] == batch
            return value[i:i + 1] if is_batched else value
        return torch.cat([forward(*(pick(a, i) for a in args),
                                  **{k: pick(v, i) for k, v in kwargs.items()})
                          for i in range(batch)])
    module.forward = per_image
    return module


def batch_invariant_pipe(config, seed):
    pipe = ldm.StableDiffusion(config)
    for i, module in enumerate(pipe.networks().values()):
        randomize_(module, seed + i)
    for module in (pipe.unet, pipe.vae.encoder, pipe.vae.quant_conv):
        one_image_at_a_time(module)
    return pipe.eval()


@pytest.fixture(scope="module")
def pipe():
    return batch_invariant_pipe(PRESETS["tiny"], seed=int(torch.randint(1 << 20, ())))


@pytest.fixture(scope="module")
def inpainting_pipe():
    config = replace(PRESETS["tiny"], unet=replace(UNET_TINY, in_channels=9))
    return batch_invariant_pipe(config, seed=int(torch.randint(1 << 20, ())))


def latents(task, *args, **kwargs):
    kwargs = {"steps": 3, "progress": False, "output_type": "latent", **kwargs}
    return task(*args, **kwargs)


def assert_images_are_their_seeds(batch, single, seed):
    """batch: (B, 4, h, w) made with `seed`; single(s) -> (1, 4, h, w), the image of seed s."""
    for i in range(len(batch)):
        assert torch.equal(batch[i:i + 1], single(seed + i)), f"image {i} is not seed {seed + i}"


def source_image():
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5)) * 2 - 1


def right_half_mask():
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., SIZE // 2:] = 1
    return mask


@pytest.mark.parametrize("sampler, options", SAMPLER_OPTIONS)
def test_txt2img_image_i_is_seed_plus_i(pipe, sampler, options):
    def make(seed, num_images=1):
        return latents(pipe.txt2img, "a red circle", height=SIZE, width=SIZE, sampler=sampler,
                       seed=seed, num_images=num_images, **options)
    assert_images_are_their_seeds(make(7, num_images=3), make, 7)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a", "dpmpp_sde"])
def test_several_prompts_count_images_prompt_major(pipe, sampler):
    """2 prompts × 2 images: the batch is [p0 s7, p0 s8, p1 s9, p1 s10]."""
    prompts = ["a red circle", "a blue square"]
    kwargs = {"height": SIZE, "width": SIZE, "sampler": sampler}
    batch = latents(pipe.txt2img, prompts, seed=7, num_images=2, **kwargs)
    for k in range(4):
        alone = latents(pipe.txt2img, prompts[k // 2], seed=7 + k, **kwargs)
        assert torch.equal(batch[k:k + 1], alone), f"image {k}"


@pytest.mark.parametrize("sampler, options", [("ddpm", {}), ("euler_a", {}), ("dpmpp_2m", {}),
                                              ("ddim", {"eta": 1.0})])
def test_img2img_image_i_is_seed_plus_i(pipe, sampler, options):
    """The posterior sample, the noising of the source and every step's noise, per image."""
    def make(seed, num_images=1):
        return latents(pipe.img2img, source_image(), "a red circle", strength=0.7,
                       sampler=sampler, seed=seed, num_images=num_images, **options)
    assert_images_are_their_seeds(make(7, num_images=3), make, 7)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_a", "unipc"])
def test_inpaint_image_i_is_seed_plus_i(pipe, inpainting_pipe, sampler):
    """An ordinary model (latent blending draws fresh noise at every step) and a 9-channel
    inpainting model (the masked image's posterior sample)."""
    for model in (pipe, inpainting_pipe):
        def make(seed, num_images=1):
            return latents(model.inpaint, source_image(), right_half_mask(), "a red circle",
                           sampler=sampler, seed=seed, num_images=num_images)
        assert_images_are_their_seeds(make(7, num_images=3), make, 7)


def test_a_generator_stands_for_the_seed_drawn_from_it(pipe):
    """generator=g: s is drawn from g, so one state of g gives one batch, and g used again gives
    the next one; a list of generators is one per image, used as given."""
    kwargs = {"height": SIZE, "width": SIZE, "sampler": "ddpm", "num_images": 2}
    s = int(torch.randint(2**63 - 1, (), generator=torch.Generator().manual_seed(9)))
    g = torch.Generator().manual_seed(9)
    first = latents(pipe.txt2img, "a red circle", generator=g, **kwargs)
    assert torch.equal(first, latents(pipe.txt2img, "a red circle", seed=s, **kwargs))
    assert not torch.allclose(first, latents(pipe.txt2img, "a red circle", generator=g, **kwargs))
    per_image = [torch.Generator().manual_seed(s), torch.Generator().manual_seed(s + 1)]
    assert torch.equal(first, latents(pipe.txt2img, "a red circle", generator=per_image,
                                      **kwargs))
    with pytest.raises(ValueError, match="generator is a list of 1 for 2 images"):
        latents(pipe.txt2img, "a red circle", generator=per_image[:1], **kwargs)
    with pytest.raises(ValueError, match="generator must be a CPU torch.Generator"):
        latents(pipe.txt2img, "a red circle", generator=9, **kwargs)


def test_seeds_wrap_modulo_2_to_the_64(pipe):
    """seed + i past 2**64 − 1 wraps to 0, as torch's manual_seed reads −1 as 2**64 − 1."""
    kwargs = {"height": SIZE, "width": SIZE, "sampler": "euler_a"}
    batch = latents(pipe.txt2img, "a red circle", seed=-1, num_images=2, **kwargs)
    assert torch.equal(batch[1:], latents(pipe.txt2img, "a red circle", seed=0, **kwargs))


def test_the_plain_pipeline_agrees_up_to_batched_rounding():
    """Without one_image_at_a_time the noise is still the same; the images differ only by the
    rounding of batched products (about 1e-5 here), not by different noise (order 1)."""
    pipe = ldm.StableDiffusion(PRESETS["tiny"])
    for i, module in enumerate(pipe.networks().values()):
        randomize_(module, 3 + i)
    pipe.eval()
    kwargs = {"height": SIZE, "width": SIZE, "sampler": "ddpm"}
    batch = latents(pipe.txt2img, "a red circle", seed=7, num_images=2, **kwargs)
    for i in range(2):
        alone = latents(pipe.txt2img, "a red circle", seed=7 + i, **kwargs)
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-3)


@pytest.mark.parametrize("name", NOISY)
def test_samplers_draw_image_i_from_generator_i(name):
    """A list of generators, one per image: row i of a batch run equals the run of image i
    alone with generator i (the toy ε-model is elementwise, hence batch-invariant)."""
    entry = SAMPLERS[name]
    x = torch.randn(3, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = timesteps(entry, entry.schedules[0], 5, AC)

    def eps_fn(x, t):
        return 0.3 * x + torch.sin(t.double() / 100)[:, None, None, None]

    def run(x, seeds, **options):
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        return entry.sample(eps_fn, x, ts, AC, generator=generators, **options)
    variants = [{"eta": 0.5}] if name == "ddim" else [{}]
    if "noise" in inspect.signature(entry.sample).parameters:  # 2M and 3M SDE's Brownian option
        variants.append({"noise": "brownian"})
    for options in variants:
        batch = run(x, [7, 8, 9], **options)
        for i in range(3):
            assert torch.equal(batch[i:i + 1], run(x[i:i + 1], [7 + i], **options)), options
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        run(x, [7, 8], **variants[0])


@pytest.mark.parametrize("eta", [1.5, -0.1, math.nan, math.inf])
def test_ddim_refuses_eta_outside_0_1(eta):
    """η > 1 would make σ_t² exceed 1 − ᾱ_t' and the direction term's root imaginary."""
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        sample_ddim(lambda x, t: x, x, [501, 1], AC, eta=eta)


def test_ddim_eta_1_runs_and_the_pipeline_refuses_more(pipe):
    kwargs = {"height": SIZE, "width": SIZE, "sampler": "ddim", "seed": 1}
    assert torch.isfinite(latents(pipe.txt2img, "a red circle", eta=1.0, **kwargs)).all()
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        latents(pipe.txt2img, "a red circle", eta=1.5, **kwargs)
