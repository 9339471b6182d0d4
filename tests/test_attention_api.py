"""ldm.attention: observe or replace the attention of chosen layers, and undo it.

Every test runs the tiny U-Net (UNET_TINY: one attention level, 2 heads) with random weights;
an override is a function of (q, k, v) installed by name, so each test below is also an example
of one use: reproduce the default, record the maps, swap one block, re-weight a word's column,
inject one prompt's maps into another's run (Prompt-to-Prompt, Hertz et al. 2022).
"""
import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from helpers import randomize_, rel_error
from ldm.attention import (AttentionStore, attention_layers, attention_probs, override,
                           reweight)
from ldm.kernels import attention
from ldm.models.transformer import CrossAttention
from ldm.models.unet import UNET_TINY, UNet
from ldm.models.vae import VAE_TINY, AutoencoderKL

MIDDLE_ATTN2 = "middle_block.1.transformer_blocks.0.attn2"


def setup(batch=2, size=8):
    """A random tiny U-Net and random inputs (x, t, context) for it."""
    seed = int(torch.randint(1 << 20, ()))
    g = torch.Generator().manual_seed(seed)
    unet = randomize_(UNet(UNET_TINY), seed).eval()
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, 77, UNET_TINY.context_dim, generator=g)
    return unet, (x, t, context)


def default_attention(q, k, v, *, layer):
    return attention(q, k, v)


def uniform_attention(q, k, v, *, layer):
    """Every query weighs every key the same: the mean of the values."""
    return v.mean(dim=2, keepdim=True).expand_as(q)


@torch.no_grad()
def test_installing_the_default_attention_changes_no_bit():
    unet, inputs = setup()
    expected = unet(*inputs)
    with override(unet, default_attention) as handle:
        assert len(handle._undo) == 2 * 4  # attn1 and attn2 of 4 transformers
        assert torch.equal(unet(*inputs), expected)


def capture_inputs(unet):
    """{layer name: (x, context)} that each CrossAttention is called with, filled by a forward.

    A test-only pre-hook, to recompute the maps independently of the library."""
    seen, hooks = {}, []
    for name, m in unet.named_modules():
        if isinstance(m, CrossAttention):
            hooks.append(m.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, args)))
    return seen, hooks


def maps_in_float64(layer, x, context):
    """softmax(q kᵀ / √D) from the layer's own to_q, to_k weights, in float64: (B, H, N, M)."""
    context = x if context is None else context
    q = F.linear(x.double(), layer.to_q.weight.double())
    k = F.linear(context.double(), layer.to_k.weight.double())
    q = rearrange(q, "b n (h d) -> b h n d", h=layer.heads)  # (B, H, N, D)
    k = rearrange(k, "b m (h d) -> b h m d", h=layer.heads)  # (B, H, M, D)
    return (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)


@torch.no_grad()
def test_store_records_the_softmax_maps_of_every_layer():
    unet, inputs = setup(size=8)
    store = AttentionStore()
    seen, hooks = capture_inputs(unet)
    try:
        with override(unet, store):
            out = unet(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert rel_error(out, unet(*inputs)) <= 1e-6  # probs @ v: the default up to rounding
    layers = attention_layers(unet)
    assert list(store.maps) == list(layers)  # every layer, in the order they run
    for name, layer in layers.items():
        (maps,) = store.maps[name]  # one forward: one call
        x, context = (*seen[name], None)[:2]
        pixels = (8 // 2) ** 2  # the tiny U-Net attends at level 1 only: 4×4 of the 8×8 latent
        keys = 77 if name.endswith("attn2") else pixels
        assert maps.shape == (2, UNET_TINY.num_heads, pixels, keys)
        assert maps.device == torch.device("cpu")
        assert rel_error(maps, maps_in_float64(layer, x, context)) <= 1e-6
        assert torch.allclose(maps.sum(dim=-1), torch.ones(()), atol=1e-6)


@torch.no_grad()
def test_store_can_average_over_heads_and_keeps_one_map_per_call():
    unet, inputs = setup()
    full, mean = AttentionStore(), AttentionStore(average_heads=True)
    with override(unet, full, layers="attn2"):
        unet(*inputs)
    with override(unet, mean, layers="attn2"):
        unet(*inputs)
        unet(*inputs)
    assert all(name.endswith(".attn2") for name in mean.maps)
    for name, calls in mean.maps.items():
        assert len(calls) == 2 and calls[0].shape == (2, calls[0].shape[1], 77)
        assert torch.allclose(calls[0], full.maps[name][0].mean(dim=1))


@torch.no_grad()
def test_swapping_one_block_changes_that_block_only():
    unet, inputs = setup()
    layers = attention_layers(unet)
    g = torch.Generator().manual_seed(0)
    # Each layer on fixed inputs of its own width, before and during the override.
    probes = {name: (torch.randn(2, 16, m.to_q.in_features, generator=g),
                     torch.randn(2, 77, m.to_k.in_features, generator=g)
                     if name.endswith("attn2") else None)
              for name, m in layers.items()}
    before = {name: layers[name](*probe) for name, probe in probes.items()}
    expected = unet(*inputs)
    with override(unet, uniform_attention, layers=MIDDLE_ATTN2):
        during = {name: layers[name](*probe) for name, probe in probes.items()}
        changed = unet(*inputs)
    assert [name for name in layers if not torch.equal(during[name], before[name])] == [
        MIDDLE_ATTN2]
    assert rel_error(changed, expected) > 1e-3
    assert torch.equal(unet(*inputs), expected)


@torch.no_grad()
def test_override_is_undone_on_exit_even_on_an_exception():
    unet, inputs = setup()
    expected = unet(*inputs)
    with pytest.raises(RuntimeError, match="inside"):
        with override(unet, uniform_attention, layers="attn2"):
            raise RuntimeError("inside the block")
    assert all("attend" not in m.__dict__ for m in unet.modules())
    assert torch.equal(unet(*inputs), expected)
    # Nested overrides come off in reverse; remove() undoes without a `with`.
    outer = override(unet, uniform_attention)
    with override(unet, default_attention, layers="attn2"):
        pass
    assert not torch.equal(unet(*inputs), expected)  # the outer override is still there
    outer.remove()
    assert torch.equal(unet(*inputs), expected)


@torch.no_grad()
def test_reweighting_a_token_adds_its_column_times_the_factor_minus_one():
    """Prompt-to-Prompt's re-weighting: out_c = out_1 + (c − 1) · p_j v_j for token j."""
    g = torch.Generator().manual_seed(int(torch.randint(1 << 20, ())))
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (16, 77, 77))
    j, c = 5, 3.0
    p = attention_probs(q, k)  # (B, H, N, 77)
    same = reweight(j, 1.0)(q, k, v, layer="any")
    assert rel_error(same, attention(q, k, v)) <= 1e-6
    expected = same + (c - 1) * p[..., j:j + 1] @ v[..., j:j + 1, :]
    assert rel_error(reweight(j, c)(q, k, v, layer="any"), expected) <= 1e-6

    unet, inputs = setup()
    plain = unet(*inputs)
    with override(unet, reweight(j, c), layers="attn2"):
        assert rel_error(unet(*inputs), plain) > 1e-3


@torch.no_grad()
def test_prompt_to_prompt_injects_one_prompt_s_maps_into_another_s_run():
    """P2P's edit: run prompt B with the cross-attention maps of prompt A, so that B's words
    land where A's were. Injecting B's own maps gives back B's output."""
    unet, (x, t, context_a) = setup()
    context_b = torch.randn_like(context_a)

    def inject(store):
        def attend(q, k, v, *, layer):
            probs = store.maps[layer][0]  # (B, H, N, 77) recorded by the other run
            return (probs @ v.to(probs.dtype)).to(q.dtype)
        return attend

    maps_a, maps_b = AttentionStore(), AttentionStore()
    with override(unet, maps_a, layers="attn2"):
        unet(x, t, context_a)
    with override(unet, maps_b, layers="attn2"):
        plain_b = unet(x, t, context_b)
    with override(unet, inject(maps_b), layers="attn2"):
        assert rel_error(unet(x, t, context_b), plain_b) <= 1e-6
    with override(unet, inject(maps_a), layers="attn2"):
        assert rel_error(unet(x, t, context_b), plain_b) > 1e-3


def test_patterns_select_by_suffix_glob_or_predicate_and_a_miss_names_the_pattern():
    with torch.device("meta"):
        unet = UNet(UNET_TINY)
    names = list(attention_layers(unet))
    assert list(attention_layers(unet, "attn2")) == [n for n in names if n.endswith(".attn2")]
    assert list(attention_layers(unet, "middle_block.*")) == [n for n in names if "middle" in n]
    assert list(attention_layers(unet, lambda n: n == MIDDLE_ATTN2)) == [MIDDLE_ATTN2]
    with pytest.raises(ValueError, match=r"'attn3'.*8, named like: input_blocks\.3\.1\."):
        override(unet, default_attention, layers="attn3")
    assert all("attend" not in m.__dict__ for m in unet.modules())


@torch.no_grad()
def test_the_vae_attention_takes_the_same_override():
    seed = int(torch.randint(1 << 20, ()))
    vae = randomize_(AutoencoderKL(VAE_TINY), seed).eval()
    z = torch.randn(1, VAE_TINY.z_channels, 4, 4, generator=torch.Generator().manual_seed(seed))
    store = AttentionStore()
    with override(vae, store, layers="decoder.*"):
        image = vae.decode(z)
    assert rel_error(image, vae.decode(z)) <= 1e-6
    ((name, (maps,)),) = store.maps.items()
    assert name == "decoder.mid.attn_1" and maps.shape == (1, 1, 16, 16)  # one head, 4×4 pixels
