"""U-Net tests: checkpoint names and shapes, the block table, parity with diffusers, inputs."""
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from ldm.models.transformer import GroupNorm32, SpatialTransformer
from ldm.models.unet import (UNET_SD15_INPAINTING, UNET_SD21, UNET_TINY, Downsample, ResBlock,
                             UNet, UNetConfig, Upsample, timestep_embedding)

from helpers import MANIFESTS, fresh_seed, randomize_

PREFIX = "model.diffusion_model."


def manifest_unet_shapes(name):
    """{name without PREFIX: shape} of the U-Net rows of a manifest."""
    shapes = {}
    for line in (MANIFESTS / f"{name}.tsv").read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        if key.startswith(PREFIX):
            shapes[key[len(PREFIX):]] = tuple(int(s) for s in shape.split(",") if s)
    return shapes


@pytest.mark.parametrize("config, manifest", [
    (UNetConfig(), "sd15_emaonly"),
    (UNET_SD15_INPAINTING, "sd15_inpainting"),
    (UNET_SD21, "sd21_768v"),
])
def test_state_dict_matches_checkpoint_manifest(config, manifest):
    with torch.device("meta"):  # no memory, no init: names and shapes only
        model = UNet(config)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = manifest_unet_shapes(manifest)
    assert len(expected) == 686
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: s for k, s in ours.items() if s != expected[k]} == {}


# The module docstring's table of SD 1.5: (layer kinds, channels in, channels out).
SD15_INPUT_BLOCKS = [
    ("Conv2d", 4, 320),
    ("Res Attn", 320, 320), ("Res Attn", 320, 320), ("Down", 320, 320),
    ("Res Attn", 320, 640), ("Res Attn", 640, 640), ("Down", 640, 640),
    ("Res Attn", 640, 1280), ("Res Attn", 1280, 1280), ("Down", 1280, 1280),
    ("Res", 1280, 1280), ("Res", 1280, 1280),
]
SD15_OUTPUT_BLOCKS = [
    ("Res", 2560, 1280), ("Res", 2560, 1280), ("Res Up", 2560, 1280),
    ("Res Attn", 2560, 1280), ("Res Attn", 2560, 1280), ("Res Attn Up", 1920, 1280),
    ("Res Attn", 1920, 640), ("Res Attn", 1280, 640), ("Res Attn Up", 960, 640),
    ("Res Attn", 960, 320), ("Res Attn", 640, 320), ("Res Attn", 640, 320),
]
KIND = {ResBlock: "Res", SpatialTransformer: "Attn", Downsample: "Down", Upsample: "Up",
        nn.Conv2d: "Conv2d"}


def describe(block):
    """(layer kinds, channels in, channels out) of one UNetBlock, read off its weights."""
    kinds = " ".join(KIND[type(layer)] for layer in block)
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    first = block[0].in_layers[2] if isinstance(block[0], ResBlock) else convs[0]
    return kinds, first.in_channels, convs[-1].out_channels


def test_built_model_matches_block_table():
    with torch.device("meta"):
        model = UNet(UNetConfig())
    assert [describe(b) for b in model.input_blocks] == SD15_INPUT_BLOCKS
    assert [describe(b) for b in model.output_blocks] == SD15_OUTPUT_BLOCKS
    assert describe(model.middle_block) == ("Res Attn Res", 1280, 1280)
    heads = {m.attn1.heads for m in model.modules() if hasattr(m, "attn1")}
    assert heads == {8}  # SD 1: 8 heads at every width (head size 40, 80, 160)


def test_sd21_heads_are_64_wide():
    with torch.device("meta"):
        model = UNet(UNET_SD21)
    heads = [b[1].transformer_blocks[0].attn1.heads for b in model.input_blocks if len(b) > 1]
    assert heads == [5, 5, 10, 10, 20, 20]
    assert model.middle_block[1].transformer_blocks[0].attn1.heads == 20


def test_timestep_embedding_closed_form():
    dim = 8  # half = 4 frequencies: 10000^(-i/4)
    emb = timestep_embedding(torch.tensor([0, 1, 999]), dim)
    for row, t in zip(emb, [0.0, 1.0, 999.0]):
        freqs = [10000 ** (-i / 4) for i in range(4)]
        expected = [math.cos(t * f) for f in freqs] + [math.sin(t * f) for f in freqs]
        torch.testing.assert_close(row, torch.tensor(expected), atol=1e-4, rtol=0)
    assert timestep_embedding(torch.tensor([3.5]), 7).shape == (1, 7)  # odd dim: zero pad
    assert timestep_embedding(torch.tensor([3.5]), 7)[0, -1] == 0


def test_norm_epsilons_are_the_originals():
    # Too small a difference for the parity tolerance to see (1e-5 instead of 1e-6 in the
    # transformer norms moves the output by ~1e-6), so pinned here: 1e-5 in the ResBlocks and
    # the output norm, 1e-6 in the transformers' GroupNorm, LayerNorm's default 1e-5 inside.
    model = UNet(UNET_TINY)
    eps = {name: m.eps for name, m in model.named_modules()
           if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    assert {e for n, e in eps.items() if n.endswith("layers.0") or n == "out.0"} == {1e-5}
    assert {e for n, e in eps.items() if n.endswith(".norm")} == {1e-6}
    assert {e for n, e in eps.items() if n[-6:-1] == ".norm"} == {1e-5}  # norm1..3


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_group_norm_32_keeps_float32_statistics(kernels, monkeypatch):
    """fp16 activations with a large mean: E[x²] = 9·10⁴ overflows float16 and naive fp16
    statistics lose the small deviations; float32 statistics leave only the output's rounding
    (float16: 2⁻¹¹ ≈ 4.9e-4 at most, relative)."""
    if kernels == "triton":
        pytest.importorskip("triton")  # on a CPU, conftest.py has set TRITON_INTERPRET=1
    monkeypatch.setenv("LDM_KERNELS", kernels)
    x = (300 + torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))).half()
    norm = randomize_(GroupNorm32(4, 16), seed=0).half()
    out = norm(x)
    assert out.dtype == torch.float16
    expected = torch.nn.functional.group_norm(
        x.double(), 4, norm.weight.double(), norm.bias.double(), eps=1e-5)
    assert ((out.double() - expected).norm() / expected.norm()).item() <= 4.9e-4


def tiny_inputs(batch=2, config=UNET_TINY, size=8, tokens=5):
    """Random latents (B, C_in, size, size) and context (B, tokens, context_dim)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    context = torch.randn(batch, tokens, config.context_dim, generator=g)
    return x, context


def test_tiny_output_shape_and_scalar_t_broadcast():
    torch.manual_seed(0)
    model = randomize_(UNet(UNET_TINY), seed=0).eval()
    x, context = tiny_inputs()
    with torch.no_grad():
        per_sample = model(x, torch.tensor([7, 7]), context)
        assert per_sample.shape == (2, UNET_TINY.out_channels, 8, 8)
        torch.testing.assert_close(model(x, 7, context), per_sample)
        torch.testing.assert_close(model(x, torch.tensor(7.0), context), per_sample)
        assert not torch.allclose(model(x, torch.tensor([7, 500]), context), per_sample)


@pytest.mark.parametrize("x_shape, t, ctx_shape, bad", [
    ((2, 3, 8, 8), 1, (2, 5, 32), "x"),       # wrong channels
    ((2, 4, 8, 8), 1, (2, 5, 16), "context"),  # wrong context width
    ((2, 4, 8, 8), 1, (3, 5, 32), "context"),  # batch mismatch
    ((2, 4, 8, 8), [1, 2, 3], (2, 5, 32), "t"),
])
def test_bad_inputs_raise_value_error_naming_the_argument(x_shape, t, ctx_shape, bad):
    model = UNet(UNET_TINY)
    with pytest.raises(ValueError, match=rf"^{bad} "):
        model(torch.zeros(x_shape), torch.as_tensor(t), torch.zeros(ctx_shape))


def test_any_latent_size_matches_diffusers():
    """Images any multiple of 8 px give latents of any size; the decoder's upsampling must land
    on each skip's size (13 → 7 → 4 comes back 4 → 7 → 13), as diffusers does."""
    config = replace(UNET_TINY, channel_mult=(1, 2, 2))
    model = randomize_(UNet(config), seed=3).eval()
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(2, config.in_channels, 13, 10, generator=g)
    context = torch.randn(2, 5, config.context_dim, generator=g)
    assert relative_error_vs_diffusers(model, x, context) <= 1e-5


# --- parity with diffusers' UNet2DConditionModel, through diffusers' own checkpoint converter


def diffusers_config(c):
    """The UNet2DConditionModel arguments describing the same network as UNetConfig `c`."""
    levels = range(c.num_levels)
    attn = [level in c.attention_levels for level in levels]
    return {
        "in_channels": c.in_channels, "out_channels": c.out_channels,
        "block_out_channels": [c.level_channels(level) for level in levels],
        "layers_per_block": c.num_res_blocks,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn[::-1]],
        "cross_attention_dim": c.context_dim,
        # diffusers' misnomer: `attention_head_dim` is the number of heads, per level
        "attention_head_dim": [c.attention_shape(c.level_channels(level))[0] for level in levels],
        "norm_num_groups": c.norm_groups,
        "use_linear_projection": c.use_linear_proj,
        "transformer_layers_per_block": c.transformer_depth,
    }


def diffusers_twin(model):
    """A diffusers UNet2DConditionModel holding `model`'s weights (shared, not copied),
    converted by diffusers' own `convert_ldm_unet_checkpoint` and loaded strictly."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = diffusers_config(model.config)
    checkpoint = {PREFIX + k: v for k, v in model.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):  # no second copy of the weights: assign ours below
        twin = diffusers.UNet2DConditionModel(**config)
    twin.load_state_dict(converted, strict=True, assign=True)
    assert not any(t.is_meta for t in twin.state_dict().values())
    return twin.eval()


def relative_error_vs_diffusers(model, x, context, seed=0):
    t = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
    twin = diffusers_twin(model)
    with torch.no_grad():
        ours = model(x, t, context)
        ref = twin(x, t, encoder_hidden_states=context).sample
    error = ((ours - ref).norm() / ref.norm()).item()
    print(f"relative error vs diffusers: {error:.2e}")  # shown with pytest -s
    return error


@pytest.mark.parametrize("config", [
    UNET_TINY,
    replace(UNET_TINY, num_heads=None, head_dim=16, use_linear_proj=True),  # SD 2 style
    replace(UNET_TINY, attention_levels=(0, 1), transformer_depth=2),
])
def test_tiny_matches_diffusers(config):
    model = randomize_(UNet(config), seed=0).eval()
    x, context = tiny_inputs(config=config)
    assert relative_error_vs_diffusers(model, x, context) <= 1e-5


@pytest.mark.slow
def test_sd15_matches_diffusers():
    with torch.device("meta"):  # skip the init of 860M parameters: randomize overwrites them
        model = UNet(UNetConfig())
    model = randomize_(model.to_empty(device="cpu"), seed=0).eval()
    x, context = tiny_inputs(batch=1, config=model.config, size=32, tokens=77)
    assert relative_error_vs_diffusers(model, x, context) <= 1e-5
