"""Full-size SDXL base parity: the release's every tensor name and shape, random weights, fp32.

A full-size fp32 SDXL is 13.9 GB (the U-Net 10.3 GB) and this machine has 24 GB, so the weights
exist once: a random file with the exact tensor set of sd_xl_base_1.0 (its float16 stored as
float32 here, so that the comparison is exact) is written tensor by tensor, `ldm.load(...,
mmap=True)` maps it, and each reference network is assigned the same mapped tensors through
diffusers' own converters (`load_state_dict(assign=True)`): one copy of the weights, in the page
cache. One network is compared at a time. The reduced-width tests (test_parity_sdxl.py) cover
the pipelines end to end.
"""
import pytest
import torch

import ldm

from helpers import (fresh_seed, large_temporary_file, read_manifest, rel_error,
                     write_random_safetensors)

pytestmark = pytest.mark.slow
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers.loaders import single_file_utils as convert  # noqa: E402

from test_parity_sdxl import random_ids  # noqa: E402

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    manifest = read_manifest("sdxl_base")
    path = tmp_path_factory.mktemp("sdxl-full") / "sd_xl_base_random.safetensors"
    nbytes = sum(4 * int(torch.tensor(s).prod()) for s, _ in manifest.values())
    seed = fresh_seed()
    with large_temporary_file(path, lambda p: write_random_safetensors(p, manifest, seed),
                              nbytes):
        yield path


@pytest.fixture(scope="module")
def pipe(sdxl_file):
    pipe = ldm.load(sdxl_file, mmap=True)  # float32 views of the mapped file: no copy
    assert pipe.config == ldm.PRESETS["sdxl"]
    return pipe


def original(pipe, component):
    """The original-layout tensors of one network: ours, renamed (the same mapped storage)."""
    rows = ldm.checkpoint.name_map({component: pipe.networks()[component]}, family="sdxl")
    state = pipe.networks()[component].state_dict()
    return {orig: state[ours.split(".", 1)[1]] for ours, orig in rows.items()}


def assigned(model, weights):
    model.load_state_dict(weights, strict=True, assign=True)  # shares the tensors
    for module in model.modules():  # transformers' position ids: a buffer, not a weight
        if getattr(module, "position_ids", None) is not None and module.position_ids.is_meta:
            module.position_ids = torch.arange(module.position_ids.shape[-1])[None]
    leftover = [name for name, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    assert not leftover, f"not assigned: {leftover[:5]}"
    return model.eval()


UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


@torch.no_grad()
def test_full_size_unet_matches_diffusers(pipe):
    with torch.device("meta"):
        reference = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    reference = assigned(reference, convert.convert_ldm_unet_checkpoint(
        original(pipe, "unet"), UNET_CONFIG))
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(1, 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (1,), generator=g)
    context = torch.randn(1, 77, 2048, generator=g)
    pooled = torch.randn(1, 1280, generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    y = torch.cat([pooled, ldm.sdxl.size_embedding(time_ids)], dim=-1)
    ours = pipe.unet(x, t, context, y=y)
    expected = reference(x, t, encoder_hidden_states=context, added_cond_kwargs=dict(
        text_embeds=pooled, time_ids=time_ids)).sample
    error = rel_error(ours, expected)
    print(f"full-size SDXL U-Net relative error vs diffusers: {error:.2e}")
    assert error <= TOLERANCE


@torch.no_grad()
def test_full_size_text_encoders_match_transformers(pipe):
    g = torch.Generator().manual_seed(fresh_seed())
    ids = random_ids(g)
    clip_config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        eos_token_id=49407, pad_token_id=49407)
    with torch.device("meta"):
        clip = transformers.CLIPTextModel(clip_config)
    weights = convert.convert_ldm_clip_checkpoint(original(pipe, "text_encoder"))
    if not hasattr(clip, "text_model"):
        weights = {n.removeprefix("text_model."): w for n, w in weights.items()}
    clip = assigned(clip, {n: w for n, w in weights.items() if not n.endswith("position_ids")})
    clip_error = rel_error(pipe.text_encoder.hidden_states(ids)[-2],
                           clip(ids, output_hidden_states=True).hidden_states[-2])
    del clip
    bigg_config = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu",
        projection_dim=1280, eos_token_id=49407, pad_token_id=0)
    with torch.device("meta"):
        bigg = transformers.CLIPTextModelWithProjection(bigg_config)
    prefix = "conditioner.embedders.1.model."
    weights = convert.convert_open_clip_checkpoint(bigg, original(pipe, "text_encoder_2"), prefix)
    if not hasattr(bigg, "text_model"):
        weights = {n.removeprefix("text_model."): w for n, w in weights.items()}
    bigg = assigned(bigg, weights)
    theirs = bigg(ids, output_hidden_states=True)
    states = pipe.text_encoder_2.hidden_states(ids)
    bigg_error = rel_error(states[-2], theirs.hidden_states[-2])
    pooled_error = rel_error(pipe.text_encoder_2.pooled(states[-1], ids), theirs.text_embeds)
    print(f"full-size SDXL text relative errors: CLIP-L {clip_error:.2e}, bigG "
          f"{bigg_error:.2e}, pooled {pooled_error:.2e}")
    assert max(clip_error, bigg_error, pooled_error) <= TOLERANCE


@torch.no_grad()
def test_full_size_vae_matches_diffusers(pipe):
    config = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                  block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025)
    with torch.device("meta"):
        reference = diffusers.AutoencoderKL(**config)
    reference = assigned(reference, convert.convert_ldm_vae_checkpoint(original(pipe, "vae"),
                                                                       config))
    g = torch.Generator().manual_seed(fresh_seed())
    latents = torch.randn(1, 4, 8, 8, generator=g)
    error = rel_error(pipe.decode_latents(latents),
                      reference.decode(latents / 0.13025).sample)
    print(f"full-size SDXL VAE decode relative error vs diffusers: {error:.2e}")
    assert error <= TOLERANCE
