"""SDXL parity: ldm's SDXL base and refiner against diffusers / transformers at the same weights.

The models have SDXL's exact structure (levels, blocks, transformer depths 0/2/10 and 0/4/4/0,
both text towers at full depth, every tensor name of the release) at reduced width, so that
fp32 comparisons are exact and fast; the names and shapes at full width are checked against the
release manifests in test_checkpoint.py. Weights are random, written in the original layout
(`ldm.save`), and reach the references only through diffusers' own single-file converters, so
the name map is checked by code nobody here wrote. fp32 on CPU, random inputs, fresh seeds.
"""
import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ldm
from ldm.config import PRESETS, check
from ldm.models.clip_text import CLIPTextConfig
from ldm.models.open_clip_text import OpenCLIPTextConfig
from ldm.models.vae import VAEConfig
from ldm.sdxl import StableDiffusionXL

from helpers import fresh_seed, randomize_, rel_error, write_clip_vocab_files

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as convert  # noqa: E402

TOLERANCE = 1e-5
CLIP_WIDTH, BIGG_WIDTH = 32, 48   # SDXL: 768 and 1280
VAE = VAEConfig(ch=16, ch_mult=(1, 2, 4, 4), norm_groups=8)  # SD's four levels, narrow


def narrow(preset, adm_numbers):
    """The preset's SDXL at reduced width: every block, depth and name kept."""
    config = PRESETS[preset]
    context = (CLIP_WIDTH if config.text is not None else 0) + BIGG_WIDTH
    unet = dataclasses.replace(config.unet, model_channels=32, head_dim=16, norm_groups=8,
                               context_dim=context,
                               adm_in_channels=BIGG_WIDTH + adm_numbers * 256)
    text = None if config.text is None else CLIPTextConfig(width=CLIP_WIDTH, heads=2)
    narrowed = dataclasses.replace(config, unet=unet, vae=VAE, text=text, image_size=128,
                                   text_2=OpenCLIPTextConfig(width=BIGG_WIDTH, layers=32, heads=2))
    check(narrowed)
    return narrowed


def random_model(config):
    torch.manual_seed(fresh_seed())
    pipe = StableDiffusionXL(config).eval()
    for module in pipe.networks().values():
        randomize_(module, seed=fresh_seed())
    return pipe


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random base and refiner in the original layout (one VAE, as the releases share it)."""
    folder = tmp_path_factory.mktemp("sdxl")
    base, refiner = random_model(narrow("sdxl", 6)), random_model(narrow("sdxl-refiner", 5))
    refiner.vae.load_state_dict(base.vae.state_dict())
    paths = {"base": folder / "base.safetensors", "refiner": folder / "refiner.safetensors"}
    ldm.save(base, paths["base"])
    ldm.save(refiner, paths["refiner"])
    return paths


@pytest.fixture(scope="module")
def base(files):
    pipe = ldm.load(files["base"])
    assert isinstance(pipe, StableDiffusionXL) and not pipe.is_refiner
    return pipe


@pytest.fixture(scope="module")
def refiner(files):
    pipe = ldm.load(files["refiner"])
    assert isinstance(pipe, StableDiffusionXL) and pipe.is_refiner
    return pipe


def with_prefix(tensors, prefix):
    return {name: t for name, t in tensors.items() if name.startswith(prefix)}


def reference_unet(tensors, config):
    """diffusers' UNet2DConditionModel in SDXL's configuration (its "text_time" addition)."""
    c = config.unet
    attention = [c.depth(level) > 0 for level in range(c.num_levels)]
    diffusers_config = dict(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=c.num_res_blocks,
        block_out_channels=tuple(c.level_channels(i) for i in range(c.num_levels)),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D"
                             for a in reversed(attention)),
        transformer_layers_per_block=tuple(max(c.depth(level), 1) for level in
                                           range(c.num_levels - 1)) + (c.depth("middle"),),
        attention_head_dim=tuple(c.level_channels(i) // c.head_dim for i in range(c.num_levels)),
        cross_attention_dim=c.context_dim, use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=c.adm_in_channels)
    model = diffusers.UNet2DConditionModel(**diffusers_config)
    weights = convert.convert_ldm_unet_checkpoint(with_prefix(tensors, "model.diffusion_model."),
                                                  diffusers_config)
    model.load_state_dict(weights, strict=True)
    return model.eval()


def reference_vae(tensors):
    config = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                  block_out_channels=(16, 32, 64, 64), norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025)
    model = diffusers.AutoencoderKL(**config)
    model.load_state_dict(convert.convert_ldm_vae_checkpoint(
        with_prefix(tensors, "first_stage_model."), config), strict=True)
    return model.eval()


def reference_clip_l(tensors):
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=CLIP_WIDTH, intermediate_size=4 * CLIP_WIDTH,
        num_hidden_layers=12, num_attention_heads=2, max_position_embeddings=77,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407, pad_token_id=49407)
    model = transformers.CLIPTextModel(config)
    weights = convert.convert_ldm_clip_checkpoint(
        with_prefix(tensors, "conditioner.embedders.0.transformer."))
    if not hasattr(model, "text_model"):  # transformers 5 dropped the `text_model.` level
        weights = {name.removeprefix("text_model."): w for name, w in weights.items()}
    weights = {name: w for name, w in weights.items() if not name.endswith("position_ids")}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def reference_bigg(tensors, prefix):
    """transformers' CLIPTextModelWithProjection: hidden states and the projected pooled text."""
    config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=BIGG_WIDTH, intermediate_size=4 * BIGG_WIDTH,
        num_hidden_layers=32, num_attention_heads=2, max_position_embeddings=77,
        hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=BIGG_WIDTH,
        eos_token_id=49407, pad_token_id=0)
    model = transformers.CLIPTextModelWithProjection(config)
    weights = convert.convert_open_clip_checkpoint(model, with_prefix(tensors, prefix), prefix)
    if not hasattr(model, "text_model"):
        weights = {name.removeprefix("text_model."): w for name, w in weights.items()}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def random_ids(g, batch=2):
    """Token ids as a tokenizer makes them: start, words, end-of-text, then padding."""
    ids = torch.randint(0, 49406, (batch, 77), generator=g)
    ids[:, 0] = 49406
    for row, length in enumerate(torch.randint(3, 70, (batch,), generator=g).tolist()):
        ids[row, length] = 49407
        ids[row, length + 1:] = 0
    return ids


@torch.no_grad()
@pytest.mark.parametrize("which", ["base", "refiner"])
def test_unet_matches_diffusers(files, base, refiner, which):
    pipe = {"base": base, "refiner": refiner}[which]
    reference = reference_unet(load_file(str(files[which])), pipe.config)
    g = torch.Generator().manual_seed(fresh_seed())
    c = pipe.unet.config
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    context = torch.randn(2, 77, c.context_dim, generator=g)
    pooled = torch.randn(2, BIGG_WIDTH, generator=g)
    time_ids = torch.randint(0, 1024, (2, (c.adm_in_channels - BIGG_WIDTH) // 256),
                             generator=g).float()
    y = torch.cat([pooled, ldm.sdxl.size_embedding(time_ids)], dim=-1)
    ours = pipe.unet(x, t, context, y=y)
    expected = reference(x, t, encoder_hidden_states=context, added_cond_kwargs=dict(
        text_embeds=pooled, time_ids=time_ids)).sample
    error = rel_error(ours, expected)
    print(f"SDXL {which} U-Net relative error vs diffusers: {error:.2e}")
    assert error <= TOLERANCE


@torch.no_grad()
def test_text_encoders_match_transformers(files, base, refiner):
    """CLIP-L's state after 11 blocks; bigG's after 31 and its projected pooled output."""
    tensors = load_file(str(files["base"]))
    g = torch.Generator().manual_seed(fresh_seed())
    ids = random_ids(g)
    clip = reference_clip_l(tensors)(ids, output_hidden_states=True)
    error = rel_error(base.text_encoder.hidden_states(ids)[-2], clip.hidden_states[-2])
    bigg = reference_bigg(tensors, "conditioner.embedders.1.model.")(ids,
                                                                      output_hidden_states=True)
    states = base.text_encoder_2.hidden_states(ids)
    penultimate = rel_error(states[-2], bigg.hidden_states[-2])
    pooled = rel_error(base.text_encoder_2.pooled(states[-1], ids), bigg.text_embeds)
    print(f"SDXL text relative errors: CLIP-L {error:.2e}, bigG {penultimate:.2e}, "
          f"pooled {pooled:.2e}")
    assert max(error, penultimate, pooled) <= TOLERANCE
    refiner_bigg = reference_bigg(load_file(str(files["refiner"])),
                                  "conditioner.embedders.0.model.")(ids)
    assert rel_error(refiner.text_encoder_2.pooled(refiner.text_encoder_2.hidden_states(ids)[-1],
                                                   ids), refiner_bigg.text_embeds) <= TOLERANCE


@torch.no_grad()
def test_vae_matches_diffusers(files, base):
    reference = reference_vae(load_file(str(files["base"])))
    g = torch.Generator().manual_seed(fresh_seed())
    images = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    latents = torch.randn(1, 4, 8, 8, generator=g)
    encode = rel_error(base.vae.encode(images).mean, reference.encode(images).latent_dist.mean)
    decode = rel_error(base.decode_latents(latents),
                       reference.decode(latents / reference.config.scaling_factor).sample)
    print(f"SDXL VAE relative error vs diffusers: encode {encode:.2e}, decode {decode:.2e}")
    assert encode <= TOLERANCE and decode <= TOLERANCE


def tokenizers(folder):
    vocab = write_clip_vocab_files(folder)
    clip = transformers.CLIPTokenizer.from_pretrained(vocab, pad_token="<|endoftext|>",
                                                      model_max_length=77)
    bigg = transformers.CLIPTokenizer.from_pretrained(vocab, pad_token="!", model_max_length=77)
    return clip, bigg


def ddim():
    """DDIM as the original samples: SD's betas, timesteps 1 + k·T/n."""
    return diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


@pytest.fixture(scope="module")
def reference_pipelines(files, tmp_path_factory):
    base_tensors, refiner_tensors = (load_file(str(files[k])) for k in ("base", "refiner"))
    clip_tokenizer, bigg_tokenizer = tokenizers(tmp_path_factory.mktemp("vocab"))
    vae = reference_vae(base_tensors)
    base = diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=reference_clip_l(base_tensors),
        text_encoder_2=reference_bigg(base_tensors, "conditioner.embedders.1.model."),
        tokenizer=clip_tokenizer, tokenizer_2=bigg_tokenizer,
        unet=reference_unet(base_tensors, narrow("sdxl", 6)), scheduler=ddim(),
        force_zeros_for_empty_prompt=True)
    refiner = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=vae, text_encoder=None,
        text_encoder_2=reference_bigg(refiner_tensors, "conditioner.embedders.0.model."),
        tokenizer=None, tokenizer_2=bigg_tokenizer,
        unet=reference_unet(refiner_tensors, narrow("sdxl-refiner", 5)), scheduler=ddim(),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    return base, refiner


PROMPT = "a watercolor painting of a lighthouse at dawn"


@torch.no_grad()
@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_txt2img_matches_diffusers(base, reference_pipelines, negative):
    """The same starting latents through 4 DDIM steps at guidance 5, 128×96 (not square, so
    that height and width cannot be swapped unnoticed): an empty negative prompt is zeros
    (diffusers: negative_prompt=None with force_zeros_for_empty_prompt), a non-empty one is
    encoded."""
    reference, _ = reference_pipelines
    g = torch.Generator().manual_seed(fresh_seed())
    latents = torch.randn(1, 4, 16, 12, generator=g)
    common = dict(height=128, width=96, latents=latents, guidance_scale=5.0)
    theirs = reference(PROMPT, negative_prompt=negative or None, num_inference_steps=4,
                       output_type="latent", **common).images
    ours = base.txt2img(PROMPT, negative_prompt=negative, steps=4, sampler="ddim",
                        cfg_scale=5.0, height=128, width=96, latents=latents,
                        output_type="latent", progress=False)
    error = rel_error(ours, theirs)
    print(f"SDXL txt2img (negative {negative!r}) vs diffusers: latents relative error "
          f"{error:.2e}")
    assert error <= TOLERANCE


@torch.no_grad()
def test_size_conditioning_matches_diffusers(base, reference_pipelines):
    reference, _ = reference_pipelines
    g = torch.Generator().manual_seed(fresh_seed())
    latents = torch.randn(1, 4, 16, 16, generator=g)
    sizes = dict(original_size=(512, 768), crops_coords_top_left=(32, 16),
                 target_size=(1024, 1024))
    theirs = reference(PROMPT, num_inference_steps=3, output_type="latent", latents=latents,
                       height=128, width=128, **sizes).images
    ours = base.txt2img(PROMPT, steps=3, sampler="ddim", cfg_scale=5.0, latents=latents,
                        height=128, width=128, output_type="latent", progress=False, **sizes)
    default = base.txt2img(PROMPT, steps=3, sampler="ddim", cfg_scale=5.0, latents=latents,
                           height=128, width=128, output_type="latent", progress=False)
    assert rel_error(ours, theirs) <= TOLERANCE
    assert rel_error(default, theirs) > 1e-3  # the numbers do reach the U-Net


@torch.no_grad()
def test_base_to_refiner_handoff_matches_diffusers(base, refiner, reference_pipelines):
    """The ensemble of experts: diffusers' base with denoising_end=0.8 hands its latents to the
    refiner with denoising_start=0.8; ours switches model inside one DDIM loop. 10 steps: the
    base runs t = 901 … 201, the refiner 101 and 1. Final latents and the decoded image."""
    reference_base, reference_refiner = reference_pipelines
    g = torch.Generator().manual_seed(fresh_seed())
    latents = torch.randn(1, 4, 16, 16, generator=g)
    handed = reference_base(PROMPT, num_inference_steps=10, denoising_end=0.8, latents=latents,
                            height=128, width=128, guidance_scale=5.0,
                            output_type="latent").images
    results = {}
    for output_type in ("latent", "np"):
        theirs = reference_refiner(PROMPT, image=handed, num_inference_steps=10,
                                   denoising_start=0.8, guidance_scale=5.0,
                                   output_type=output_type).images
        ours = base.txt2img(PROMPT, steps=10, sampler="ddim", cfg_scale=5.0, latents=latents,
                            height=128, width=128, refiner=refiner, refiner_start=0.8,
                            output_type="latent" if output_type == "latent" else "tensor",
                            progress=False)
        results[output_type] = ours, theirs
    error = rel_error(*results["latent"])
    ours, theirs = results["np"]
    pixels = np.abs((ours[0].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1) - theirs[0]).max()
    print(f"SDXL base→refiner vs diffusers: latents relative error {error:.2e}, "
          f"max pixel difference {pixels * 255:.4f} / 255")
    assert error <= TOLERANCE and pixels * 255 <= 0.01
