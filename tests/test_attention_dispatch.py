"""The one attention function: each backend in place inside the real models, chosen by argument,
by `with ldm.kernels.backend(...)` or by $LDM_KERNELS, agrees with the others."""
import pytest
import torch

import ldm.kernels
from ldm.kernels import attention, attention_reference
from ldm.models.clip_text import CLIP_TINY, CLIPTextModel
from ldm.models.unet import UNET_TINY, UNet
from ldm.models.vae import VAE_TINY, AutoencoderKL

from helpers import randomize_, rel_error


# The Triton kernel runs on a GPU, or on the CPU under the interpreter (tests/conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_models(seed):
    """Outputs of a tiny U-Net, VAE and text encoder on fixed random inputs."""
    g = torch.Generator().manual_seed(seed)
    unet = randomize_(UNet(UNET_TINY), seed).eval().to(DEVICE)
    vae = randomize_(AutoencoderKL(VAE_TINY), seed + 1).eval().to(DEVICE)
    text = randomize_(CLIPTextModel(CLIP_TINY), seed + 2).eval().to(DEVICE)
    x = torch.randn(2, 4, 8, 8, generator=g).to(DEVICE)
    context = torch.randn(2, 77, UNET_TINY.context_dim, generator=g).to(DEVICE)
    images = (torch.rand(1, 3, 16, 16, generator=g) * 2 - 1).to(DEVICE)
    ids = torch.randint(0, 49406, (2, 77), generator=g).to(DEVICE)
    t = torch.tensor([10, 900], device=DEVICE)
    with torch.no_grad():
        return [unet(x, t, context), vae.decode(vae.encode(images).mean), text(ids)]


@pytest.fixture
def exact_float32(monkeypatch):
    """TF32 convolutions and matmuls (CUDA's default for convs) would round the small
    differences between attention kernels up to ~1e-3; compare in true float32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_backends_agree_inside_the_models(backend, exact_float32):
    """Every kernel of the three networks (attention, GroupNorm+SiLU, GEGLU) on `backend`,
    against the default PyTorch ops."""
    if backend == "triton":
        pytest.importorskip("triton")
    seed = int(torch.randint(1 << 20, ()))
    default = run_models(seed)
    with ldm.kernels.backend(backend):
        forced = run_models(seed)
    for ours, ref in zip(forced, default):
        assert rel_error(ours, ref) <= 1e-5


def test_argument_overrides_environment_and_bad_names_are_refused(monkeypatch):
    g = torch.Generator().manual_seed(int(torch.randint(1 << 20, ())))
    q, k, v = (torch.randn(1, 2, 5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    monkeypatch.setenv("LDM_KERNELS", "no-such-kernel")
    out = attention(q, k, v, causal=True, backend="reference")
    assert rel_error(out, attention_reference(q, k, v, causal=True)) == 0.0
    with pytest.raises(ValueError, match="backend must be one of .*'no-such-kernel'"):
        attention(q, k, v)
    with pytest.raises(ValueError, match="backend must be one of .*'sdpa'"):
        attention(q, k, v, backend="sdpa")  # the operator's name; the backend's is "torch"
