"""The one switch behind every kernel (ldm.kernels.switch), and the fused GroupNorm+SiLU modules
that run where the models show them.

Order of precedence: a call's `backend=` argument, the innermost `with ldm.kernels.backend()`,
$LDM_KERNELS, "torch". These tests need no Triton: the choice is observed through the float32
references, which the "reference" backend calls.
"""
import importlib
import threading

import pytest
import torch
from torch import nn

import ldm.kernels
from ldm.kernels import BACKENDS, GroupNorm32, GroupNormSiLU, backend
from ldm.kernels.switch import choose
from ldm.models.transformer import GEGLU, CrossAttention
from ldm.models.unet import UNET_TINY, ResBlock, UNet
from ldm.models.vae import VAE_TINY, AutoencoderKL

from helpers import randomize_

CHOICES = r"one of \('torch', 'triton', 'reference'\)"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    monkeypatch.delenv("LDM_KERNELS", raising=False)
    monkeypatch.delenv("LDM_ATTENTION", raising=False)


def test_argument_then_block_then_environment_then_torch(monkeypatch):
    assert BACKENDS == ("torch", "triton", "reference")
    assert choose() == "torch"
    monkeypatch.setenv("LDM_KERNELS", "reference")
    assert choose() == "reference"
    with backend("triton"):
        assert choose() == "triton"  # the block beats the environment
        assert choose("torch") == "torch"  # and the argument beats the block
    assert choose() == "reference"


def test_blocks_nest_and_restore_on_exit_even_when_raising():
    with backend("reference") as name:
        assert name == "reference"
        with backend("triton"):
            assert choose() == "triton"
        assert choose() == "reference"
        with pytest.raises(KeyError):
            with backend("torch"):
                raise KeyError("inside the block")
        assert choose() == "reference"
    assert choose() == "torch"


def test_a_block_stays_in_its_own_thread():
    """Another thread, running while this one is inside a block, keeps the default."""
    inside, looked = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        inside.wait(timeout=30)
        seen["other"] = choose()
        looked.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with backend("reference"):
        inside.set()
        looked.wait(timeout=30)
        seen["this"] = choose()
    thread.join()
    assert seen == {"other": "torch", "this": "reference"}


@pytest.mark.parametrize("where", ["block", "argument", "environment"])
def test_unknown_names_are_refused_with_the_choices(where, monkeypatch):
    x = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match=CHOICES + r".*'sdpa'"):
        if where == "block":
            with backend("sdpa"):
                pass
        elif where == "argument":
            ldm.kernels.attention(x, x, x, backend="sdpa")
        else:
            monkeypatch.setenv("LDM_KERNELS", "sdpa")
            ldm.kernels.attention(x, x, x)
    monkeypatch.delenv("LDM_KERNELS", raising=False)
    assert choose() == "torch"  # a refused block leaves no choice behind


def test_a_leftover_ldm_attention_is_refused_not_ignored(monkeypatch):
    monkeypatch.setenv("LDM_ATTENTION", "triton")
    x = torch.randn(1, 1, 2, 4)
    with pytest.raises(RuntimeError, match="LDM_ATTENTION is not read.*LDM_KERNELS"):
        ldm.kernels.attention(x, x, x)
    assert torch.equal(ldm.kernels.attention(x, x, x, backend="torch"),
                       torch.nn.functional.scaled_dot_product_attention(x, x, x))


def spy_on_references(monkeypatch):
    """Count the calls of each float32 reference, as the dispatchers make them."""
    calls = {"attention": 0, "group_norm_silu": 0, "geglu": 0}
    for kernel in calls:
        module = importlib.import_module(f"ldm.kernels.{kernel.removesuffix('_silu')}")
        reference = getattr(module, f"{kernel}_reference")

        def counted(*args, _kernel=kernel, _reference=reference, **kwargs):
            calls[_kernel] += 1
            return _reference(*args, **kwargs)
        monkeypatch.setattr(module, f"{kernel}_reference", counted)
    return calls


def count(model, *types):
    return sum(isinstance(m, types) for m in model.modules())


def test_a_block_reaches_every_kernel_of_the_models(monkeypatch):
    """Inside `with backend("reference")` every attention, GroupNorm and GEGLU of a tiny U-Net
    and VAE runs its reference, once per layer; outside it, none does."""
    calls = spy_on_references(monkeypatch)
    unet = randomize_(UNet(UNET_TINY), seed=0).eval()
    vae = randomize_(AutoencoderKL(VAE_TINY), seed=1).eval()
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 5, UNET_TINY.context_dim)
    with torch.no_grad():
        unet(x, 10, context)
        assert calls == {"attention": 0, "group_norm_silu": 0, "geglu": 0}
        with backend("reference"):
            unet(x, 10, context)
            vae.decode(torch.randn(1, 4, 8, 8))
    decoder = vae.decoder
    assert calls == {
        "attention": count(unet, CrossAttention) + 1,  # + the VAE decoder's mid-block
        "group_norm_silu": count(unet, nn.GroupNorm) + count(decoder, nn.GroupNorm),
        "geglu": count(unet, GEGLU)}


def test_print_shows_the_fused_norm_where_the_pair_stood():
    """GroupNormSiLU where the original has GroupNorm then SiLU; the SiLUs left are the ones
    on the timestep embedding, which follow no norm."""
    unet, vae = UNet(UNET_TINY), AutoencoderKL(VAE_TINY)
    text = str(unet)
    assert "(0): GroupNormSiLU(8, 64, eps=1e-05" in text
    assert "(2): Conv2d(64, 64" in text  # in_layers keeps the original's index of the conv
    assert count(unet, nn.SiLU) == 1 + count(unet, ResBlock)  # time_embed, each emb_layers
    assert count(unet, GroupNormSiLU) == 2 * count(unet, ResBlock) + 1  # + the `out` norm
    assert count(vae, nn.SiLU) == 0 and "(norm1): GroupNormSiLU(8, 32, eps=1e-06" in str(vae)
    assert {type(m) for m in vae.modules() if isinstance(m, nn.GroupNorm)} == \
        {GroupNormSiLU, GroupNorm32}  # GroupNorm32: the attention's norm, without SiLU


def test_the_norm_in_the_sequential_is_the_norm_that_runs():
    """Replacing in_layers[0] replaces what the block computes: the forward is the Sequential."""
    block = randomize_(ResBlock(16, 16, 8, groups=4), seed=0).eval()
    x, emb = torch.randn(2, 16, 5, 5), torch.randn(2, 8)
    with torch.no_grad():
        before = block(x, emb)
        fused, seen = block.in_layers[0], []
        block.in_layers[0] = nn.Sequential(nn.GroupNorm(4, 16), nn.SiLU())  # the unfused pair
        block.in_layers[0][0].load_state_dict(fused.state_dict())
        block.in_layers[0].register_forward_hook(lambda *args: seen.append(1))
        torch.testing.assert_close(block(x, emb), before)
        assert seen == [1]
        block.out_layers[0] = nn.Identity()
        assert not torch.allclose(block(x, emb), before)
    assert block.in_layers[2] is list(block.in_layers.children())[1]  # [2] is index 2, the conv
    with pytest.raises(IndexError, match=r"1 is none of .*\['0', '2'\]"):
        block.in_layers[1] = nn.Identity()


def test_state_dict_names_keep_the_original_indices():
    names = set(UNet(UNET_TINY).state_dict())
    for name in ("input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
                 "input_blocks.1.0.out_layers.0.bias", "input_blocks.1.0.out_layers.3.weight",
                 "out.0.weight", "out.2.weight"):
        assert name in names
    assert not any(".in_layers.1." in n or ".out_layers.1." in n or n.startswith("out.1.")
                   for n in names)
