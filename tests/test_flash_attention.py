"""The Triton flash-attention kernel against the textbook formula in float64.

Without a GPU the kernel runs under the Triton interpreter (TRITON_INTERPRET=1, set below
before Triton is imported), so the CPU cases are small; they still cross every boundary the
kernel has: several query and key blocks, a ragged last block, padded head sizes, causal
block skipping. With a GPU the same cases run compiled, and the full SD shapes run too.

Inputs are fresh random normals (never zeros); the reference is computed in float64 from the
same rounded inputs, so the error measures the kernel alone: ‖out − ref‖ / ‖ref‖.
"""
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton decorates the kernel
pytest.importorskip("triton")

from helpers import rel_error  # noqa: E402
from ldm.kernels.attention import attention_reference  # noqa: E402
from ldm.kernels.flash_attention import _block_sizes, flash_attention  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Relative error bounds. float16 keeps 11 significant bits (2^-11 ≈ 5e-4 per rounding),
# bfloat16 8 (4e-3); p is rounded to the input dtype before p v, as in FlashAttention, and
# the output is rounded once more.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (B, H, N, M, D, causal), small enough for the interpreter. Block sizes (BLOCK_M, BLOCK_N)
# are (128, 64) for D ≤ 128, (64, 32) for D = 160, (32, 16) for D = 512.
SMALL_CASES = {
    "cross-attn, 77 text keys, D 40": (2, 3, 37, 77, 40, False),  # key tail 77 = 64 + 13
    "self-attn, 2x3 blocks, D 80": (1, 2, 130, 130, 80, False),  # 2 query x 3 key blocks
    "cross-attn, D 160": (2, 1, 70, 77, 160, False),  # 2 query x 3 key blocks, pad 160→256
    "causal, one block, D 64": (1, 2, 50, 50, 64, True),
    "causal, skips key blocks, D 64": (1, 2, 150, 150, 64, True),  # tile 0 skips keys 128+
    "causal, one token": (1, 1, 1, 1, 40, True),
    "VAE single head, D 512": (1, 1, 40, 33, 512, False),  # 2 query x 3 key blocks
}


def random_qkv(B, H, N, M, D, dtype, seed, device=DEVICE):
    """Standard normal q, k, v of the given dtype, drawn in float64 from a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (N, M, M))
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def check_against_reference(q, k, v, causal=False, scale=None):
    out = flash_attention(q, k, v, causal=causal, scale=scale)
    ref = attention_reference(q.double(), k.double(), v.double(), causal=causal, scale=scale)
    assert out.shape == ref.shape and out.dtype == q.dtype and out.device == q.device
    err = rel_error(out, ref)
    assert err <= TOL[q.dtype], f"relative error {err:.2e} > {TOL[q.dtype]:.0e}"
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", SMALL_CASES.values(), ids=SMALL_CASES.keys())
def test_matches_reference(case, dtype):
    B, H, N, M, D, causal = case
    check_against_reference(*random_qkv(B, H, N, M, D, dtype, seed=N * M + D), causal=causal)


@needs_cuda  # the interpreter multiplies bfloat16 bit patterns in tl.dot (triton#11584)
@pytest.mark.parametrize("case", SMALL_CASES.values(), ids=SMALL_CASES.keys())
def test_bfloat16_matches_reference(case):
    B, H, N, M, D, causal = case
    check_against_reference(*random_qkv(B, H, N, M, D, torch.bfloat16, seed=N + M + D),
                            causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_arbitrary_strides(dtype):
    """The models hand over views, never copies: q from a (B, N, H, D) projection, k and v
    from one packed (B, M, 2, H, D) projection, and a v whose head size is not the last axis."""
    B, H, N, M, D = 2, 3, 45, 77, 40
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    kv = torch.randn(B, M, 2, H, D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    q = q.transpose(1, 2)  # (B, H, N, D), strides (N·H·D, D, H·D, 1)
    k = kv[:, :, 0].transpose(1, 2)  # (B, H, M, D), strides (M·2·H·D, D, 2·H·D, 1)
    v = kv[:, :, 1].permute(0, 2, 3, 1).contiguous().transpose(-1, -2)  # D stride M, not 1
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_against_reference(q, k, v)
    check_against_reference(q[..., ::2, :], k, v)  # every other query row: query stride 2·H·D


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_custom_scale(causal):
    q, k, v = random_qkv(1, 2, 60, 60, 64, torch.float32, seed=2)
    check_against_reference(q, k, v, causal=causal, scale=0.3)


def test_large_scores_do_not_overflow():
    """Scores near ±150 overflow exp in float32 (max e^88) unless the running max is
    subtracted first; the max also jumps between key blocks, exercising the rescaling."""
    q, k, v = random_qkv(1, 2, 70, 150, 64, torch.float32, seed=6)
    check_against_reference(6 * q, 6 * k, v)


def test_causal_skips_future_key_blocks():
    """A causal tile never reads keys past its last query: poison them with NaN, and the
    first tile's rows still come out exact (0 · NaN would be NaN had they been loaded)."""
    block_m, block_n, _, _ = _block_sizes(64)
    assert block_m % block_n == 0  # so the first tile's last key block ends at block_m
    q, k, v = random_qkv(1, 2, block_m + 22, block_m + 22, 64, torch.float32, seed=7)
    k[..., block_m:, :] = float("nan")
    v[..., block_m:, :] = float("nan")
    out = flash_attention(q, k, v, causal=True)[..., :block_m, :]
    first = (..., slice(0, block_m), slice(None))
    ref = attention_reference(q[first].double(), k[first].double(), v[first].double(),
                              causal=True)
    assert rel_error(out, ref) <= TOL[torch.float32]


def test_output_dtype_and_layout():
    q, k, v = random_qkv(1, 2, 20, 30, 40, torch.float16, seed=3)
    out = flash_attention(q, k, v)
    assert out.dtype == torch.float16 and out.shape == (1, 2, 20, 40) and out.is_contiguous()


def test_block_sizes_fit_every_sd_head_size():
    """Blocks shrink as the head size grows, so the accumulator and tiles stay bounded."""
    for d_pad in (16, 32, 64, 128, 256, 512):
        block_m, block_n, _, _ = _block_sizes(d_pad)
        assert block_m >= 16 and block_n >= 16  # tl.dot's smallest tile
        assert block_m * d_pad <= 16384 and block_n * d_pad <= 8192


@pytest.mark.parametrize("blocks", [(16, 16, 4, 1), (32, 64, 4, 2), (64, 16, 8, 3)],
                         ids=["16x16", "32x64", "64x16"])
def test_other_block_sizes_give_the_same_result(blocks):
    """The sweep of benchmarks/attention.py may pick any tiles: each must stay exact, with query
    and key tails in different places (37 queries, 77 keys)."""
    q, k, v = random_qkv(2, 2, 37, 77, 40, torch.float32, seed=int(torch.randint(99, ())))
    out = flash_attention(q, k, v, block_sizes=blocks)
    assert rel_error(out, attention_reference(q.double(), k.double(), v.double())) <= 1e-5
    with pytest.raises(ValueError, match="powers of two"):
        flash_attention(q, k, v, block_sizes=(48, 16, 4, 1))


def test_rejects_bad_inputs():
    q, k, v = random_qkv(1, 2, 8, 6, 16, torch.float32, seed=4)
    with pytest.raises(ValueError, match="causal"):
        flash_attention(q, k, v, causal=True)  # N != M
    with pytest.raises(ValueError, match="disagree"):
        flash_attention(q, k[..., :8], v)
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q, k.half(), v)
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q.double(), k.double(), v.double())


def test_cpu_without_interpreter_raises_clearly():
    """Compiled Triton cannot read CPU tensors: say so instead of failing inside Triton."""
    script = ("import torch; from ldm.kernels.flash_attention import flash_attention\n"
              "x = torch.randn(1, 1, 4, 16)\n"
              "try:\n    flash_attention(x, x, x)\n"
              "except RuntimeError as e:\n    print('RuntimeError:', e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert "RuntimeError:" in run.stdout and "TRITON_INTERPRET=1" in run.stdout, run.stderr


# -- full SD 1.5 / 2.x sizes, batch 2 (classifier-free guidance): GPU only ---------------------

SD_CASES = {
    "unet 64x64 self, D 40": (2, 8, 4096, 4096, 40, False),
    "unet 64x64 cross, D 40": (2, 8, 4096, 77, 40, False),
    "unet 32x32 self, D 80": (2, 8, 1024, 1024, 80, False),
    "unet 32x32 cross, D 80": (2, 8, 1024, 77, 80, False),
    "unet 16x16 self, D 160": (2, 8, 256, 256, 160, False),
    "unet 16x16 cross, D 160": (2, 8, 256, 77, 160, False),
    "unet 8x8 self, D 160": (2, 8, 64, 64, 160, False),
    "unet 8x8 cross, D 160": (2, 8, 64, 77, 160, False),
    "sd2 96x96 self, D 64": (2, 5, 9216, 9216, 64, False),
    "sd2 128x128 self, D 64": (1, 2, 16384, 16384, 64, False),
    "vae 64x64, D 512": (1, 1, 4096, 4096, 512, False),
    "clip text causal, D 64": (2, 12, 77, 77, 64, True),
}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                         ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("case", SD_CASES.values(), ids=SD_CASES.keys())
def test_sd_shapes_on_gpu(case, dtype):
    B, H, N, M, D, causal = case
    q, k, v = random_qkv(B, H, N, M, D, dtype, seed=5)
    # Reference one (batch, head) at a time: the float64 (N, M) scores of a whole batch
    # would take gigabytes at N = M = 16384.
    out = flash_attention(q, k, v, causal=causal)
    for b in range(B):
        for h in range(H):
            one = (slice(b, b + 1), slice(h, h + 1))
            ref = attention_reference(q[one].double(), k[one].double(), v[one].double(),
                                      causal=causal)
            err = rel_error(out[one], ref)
            assert err <= TOL[dtype], f"(b={b}, h={h}) relative error {err:.2e}"
