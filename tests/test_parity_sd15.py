"""Full-size SD 1.5 parity: `ldm.load` on an original-layout checkpoint vs diffusers / transformers.

A random checkpoint has exactly the tensor names, shapes and dtypes of the released
v1-5-pruned-emaonly (from tests/data/manifests); it is loaded from memory, and written as
.safetensors and as a Lightning-style .ckpt to show the files load the same (one 4.3 GB file on
disk at a time). The references get the same tensors through diffusers' own original-to-diffusers
converters, so the name map is checked by code nobody here wrote. fp32 on CPU, random inputs,
fresh seeds.
"""
import numpy as np

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ldm
from ldm import schedule
from ldm.samplers import ddim_timesteps

from helpers import (fresh_seed, large_temporary_file, random_tensor, read_manifest, rel_error,
                     tensor_bytes, write_clip_vocab_files)

pytestmark = pytest.mark.slow
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as convert  # noqa: E402

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sd15_tensors():
    """A random state dict with the release's names, shapes and dtypes, kept in memory (4.3 GB):
    the tests that need it on disk write it themselves and delete it, one file at a time."""
    g = torch.Generator().manual_seed(fresh_seed())
    tensors = {name: random_tensor(name, shape, dtype, g)
               for name, (shape, dtype) in read_manifest("sd15_emaonly").items()}
    tensors.update(schedule.checkpoint_buffers())
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77).unsqueeze(0)
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    return tensors


@pytest.fixture(scope="module")
def pipe(sd15_tensors):
    pipe = ldm.load(sd15_tensors)  # the tensors are used as they are: no second copy
    assert pipe.config == ldm.PRESETS["sd15"]
    return pipe


def original_tensors(tensors, prefix):
    return {name: t for name, t in tensors.items() if name.startswith(prefix)}


def reference_unet(tensors):
    config = dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
        attention_head_dim=8,  # diffusers' name for the number of heads
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    model = diffusers.UNet2DConditionModel(**config)
    weights = convert.convert_ldm_unet_checkpoint(
        original_tensors(tensors, "model.diffusion_model."), config)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def reference_vae(tensors):
    config = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    model = diffusers.AutoencoderKL(**config)
    weights = convert.convert_ldm_vae_checkpoint(
        original_tensors(tensors, "first_stage_model."), config)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def reference_text_encoder(tensors):
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    model = transformers.CLIPTextModel(config)
    weights = convert.convert_ldm_clip_checkpoint(original_tensors(tensors, "cond_stage_model."))
    if not hasattr(model, "text_model"):  # transformers 5 dropped the `text_model.` level
        weights = {name.removeprefix("text_model."): w for name, w in weights.items()}
    # position_ids is a non-persistent buffer in transformers: not a weight.
    weights = {name: w for name, w in weights.items() if not name.endswith("position_ids")}
    model.load_state_dict(weights, strict=True)
    return model.eval()


@torch.no_grad()
def test_unet_matches_diffusers(pipe, sd15_tensors):
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(2, 4, 32, 32, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    ours = pipe.unet(x, t, context)
    reference = reference_unet(sd15_tensors)
    expected = reference(x, t, encoder_hidden_states=context).sample
    error = rel_error(ours, expected)
    print(f"U-Net relative error vs diffusers: {error:.2e}")
    assert error <= TOLERANCE


@torch.no_grad()
def test_vae_matches_diffusers(pipe, sd15_tensors):
    g = torch.Generator().manual_seed(fresh_seed())
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latents = torch.randn(1, 4, 8, 8, generator=g)
    reference = reference_vae(sd15_tensors)
    mean_error = rel_error(pipe.vae.encode(images).mean,
                           reference.encode(images).latent_dist.mean)
    decode_error = rel_error(pipe.vae.decode(latents), reference.decode(latents).sample)
    print(f"VAE relative error vs diffusers: encode mean {mean_error:.2e}, "
          f"decode {decode_error:.2e}")
    assert mean_error <= TOLERANCE and decode_error <= TOLERANCE


@torch.no_grad()
def test_text_encoder_matches_transformers(pipe, sd15_tensors):
    ids = pipe.tokenizer(["a photo of an astronaut riding a horse on mars",
                          "Ölgemälde einer Katze, 4k, trending on artstation 🐈"])
    g = torch.Generator().manual_seed(fresh_seed())
    random_ids = torch.randint(0, 49406, (1, 77), generator=g)
    ids = torch.cat([ids, random_ids])
    reference = reference_text_encoder(sd15_tensors)
    error = rel_error(pipe.text_encoder(ids), reference(ids).last_hidden_state)
    print(f"text encoder relative error vs transformers: {error:.2e}")
    assert error <= TOLERANCE


WRITERS = {
    "safetensors": lambda tensors, path: save_file(tensors, str(path), metadata={"format": "pt"}),
    # A Lightning checkpoint: the weights under "state_dict", training counters beside them.
    "ckpt": lambda tensors, path: torch.save(
        {"state_dict": tensors, "global_step": 470000, "epoch": 5}, path),
}


@pytest.mark.parametrize("suffix", WRITERS)
def test_full_size_file_loads_the_same_tensors(pipe, sd15_tensors, tmp_path, suffix):
    path = tmp_path / f"v1-5-random.{suffix}"
    write = WRITERS[suffix]
    with large_temporary_file(path, lambda p: write(sd15_tensors, p), tensor_bytes(sd15_tensors)):
        from_file = ldm.load(path)
        assert from_file.config == pipe.config
        ours, theirs = pipe.state_dict(), from_file.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[name], theirs[name]) for name in ours)
        del from_file, theirs  # the file stays memory-mapped, its disk space taken, until then


def test_full_size_save_round_trip(pipe, sd15_tensors, tmp_path):
    path = tmp_path / "resaved.safetensors"
    with large_temporary_file(path, lambda p: ldm.save(pipe, p), tensor_bytes(sd15_tensors)), \
            safe_open(str(path), "pt") as resaved:
        assert set(sd15_tensors) - set(resaved.keys()) == {"model_ema.decay",
                                                           "model_ema.num_updates"}
        for name in resaved.keys():
            assert torch.equal(sd15_tensors[name], resaved.get_tensor(name)), name


SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
# diffusers' scheduler for each of our samplers, set to visit the original's DDIM timesteps
# (DPMSolverMultistep's own "leading" spacing differs: it is handed the timesteps instead).
REFERENCE_SCHEDULERS = {
    "ddim": lambda: diffusers.DDIMScheduler(
        **SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="leading"),
    "euler": lambda: diffusers.EulerDiscreteScheduler(
        **SD_BETAS, steps_offset=1, timestep_spacing="leading"),
    "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(
        **SD_BETAS, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"),
    "lms": lambda: diffusers.LMSDiscreteScheduler(
        **SD_BETAS, steps_offset=1, timestep_spacing="leading"),
    "dpm2": lambda: diffusers.KDPM2DiscreteScheduler(
        **SD_BETAS, steps_offset=1, timestep_spacing="leading"),
    # UniPC takes no explicit timesteps; its "trailing" spacing is ComfyUI's "simple" schedule.
    "unipc_simple": lambda: diffusers.UniPCMultistepScheduler(
        **SD_BETAS, solver_type="bh2", solver_order=2, final_sigmas_type="zero",
        timestep_spacing="trailing"),
}


@pytest.fixture(scope="module")
def reference_pipeline(sd15_tensors, tmp_path_factory):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        write_clip_vocab_files(tmp_path_factory.mktemp("vocab")), pad_token="<|endoftext|>",
        model_max_length=77)
    reference = diffusers.StableDiffusionPipeline(
        vae=reference_vae(sd15_tensors), text_encoder=reference_text_encoder(sd15_tensors),
        tokenizer=tokenizer, unet=reference_unet(sd15_tensors),
        scheduler=REFERENCE_SCHEDULERS["ddim"](), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    return reference


@torch.no_grad()
@pytest.mark.parametrize("sampler", REFERENCE_SCHEDULERS)
def test_txt2img_matches_diffusers_pipeline(pipe, reference_pipeline, sampler):
    """Issue 3's end-to-end check, for DDIM and the deterministic σ samplers: the same latents
    through our txt2img and diffusers' StableDiffusionPipeline with the matching scheduler;
    final latents within 1e-5 (relative), mean absolute pixel difference at most 1 of 255."""
    reference_pipeline.scheduler = REFERENCE_SCHEDULERS[sampler]()
    steps = (dict(timesteps=ddim_timesteps(4).tolist()) if sampler == "dpmpp_2m"
             else dict(num_inference_steps=4))
    error, difference = compare_txt2img(pipe, reference_pipeline, sampler, steps)
    print(f"{sampler} txt2img vs diffusers: latents relative error {error:.2e}, "
          f"mean absolute pixel difference {difference:.4f} / 255")
    assert error <= 1e-5 and difference <= 1.0


def compare_txt2img(ours, reference, sampler, reference_steps):
    """The same random starting latents, a prompt and a negative prompt through our txt2img
    (4 steps of `sampler`) and diffusers' pipeline (`reference_steps`), 256×256, guidance 7.5.
    Returns the final latents' relative error and the images' mean absolute difference (of 255)."""
    g = torch.Generator().manual_seed(fresh_seed())
    latents = torch.randn(1, 4, 32, 32, generator=g)
    # No "!": with SD 2's pad token "!", transformers' tokenizer reads every "!" as padding.
    prompt, negative = "a watercolor painting of a lighthouse", "blurry, low quality"
    common = dict(negative_prompt=negative, height=256, width=256, latents=latents)
    results = {}
    for output_type in ("latent", "pil"):
        theirs = reference(prompt, guidance_scale=7.5, output_type=output_type,
                           **reference_steps, **common).images
        mine = ours.txt2img(prompt, steps=4, sampler=sampler, cfg_scale=7.5,
                            output_type=output_type, progress=False, **common)
        results[output_type] = mine, theirs
    mine, theirs = (np.asarray(image[0], dtype=np.float64) for image in results["pil"])
    return rel_error(*results["latent"]), np.abs(mine - theirs).mean()
