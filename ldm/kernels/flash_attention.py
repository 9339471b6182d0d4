"""Fused attention forward in Triton (FlashAttention-2 style), for every attention in SD.

Algorithm (Dao 2023, "FlashAttention-2", Algorithm 1, forward only). The (N, M) score matrix
is never written to memory. Each program owns one tile of BLOCK_M queries of one (batch, head)
and walks over the keys in blocks of BLOCK_N, keeping per query row

    m  the running maximum of the scores seen so far,
    l  the running sum of exp(score - m),
    acc  the running sum of exp(score - m) · v, in float32, shape (BLOCK_M, D).

When a new key block raises the maximum from m to m', the old terms are rescaled by
alpha = exp(m - m') (l ← alpha·l + Σ p, acc ← alpha·acc + p v), so after the last block
acc / l = softmax(q kᵀ · scale) v exactly, up to rounding. Exponentials use exp2 with the
scale folded into log2(e)·scale: one multiply per score, and exp2 is the native instruction.

Shapes: q (B, H, N, D), k and v (B, H, M, D) -> (B, H, N, D), any strides (every stride is
passed to the kernel; nothing is copied). That covers all of SD:
    U-Net self-attention    N = M up to 16384, D = 40, 80, 160 (SD 1.x) or 64 (SD 2.x)
    U-Net cross-attention   M = 77 text tokens
    VAE mid-block           one head, D = 512
    CLIP text encoder       causal, N = M = 77
Any N and M work, not only multiples of the block sizes: the query tail is masked on load
and store, the key tail gets score -inf. A head size that is not a power of two (40, 80, 160)
is padded to the next one (`tl.arange` needs powers of two) by masked loads that read 0,
which adds nothing to q kᵀ or to the output. D up to 512.
Dtypes: float16, bfloat16, float32; the output has the input dtype. Both matrix products
accumulate in float32; p is rounded to v's dtype before p v, as in FlashAttention. Float32
inputs use IEEE float32 products (not TF32), to match torch's float32 attention.

Causal (the text encoder): query i sees keys j <= i; N must equal M. Key blocks that lie
entirely after a tile's last query are skipped, not just masked.

Caveats: forward only (no backward, so no training through it); no dropout, no attention
mask other than causal. Under TRITON_INTERPRET=1 (CPU) it runs, slowly, in NumPy: fine for
tests on small shapes, not for inference; the interpreter does not support bfloat16 `tl.dot`
(triton-lang/triton#11584), so bfloat16 needs a GPU. This module imports Triton; the
dispatcher (ldm.kernels.attention) imports it on the first Triton call, not with ldm.

Axis letters: B batch, H heads, N query tokens, M key tokens, D head size.
"""
import contextlib
import math

import torch
import triton
import triton.language as tl

from ldm.kernels.checks import TRITON_DTYPES, check_attention_shapes, check_launchable

LOG2E = 1.4426950408889634  # exp(x) = exp2(x · log2(e))


@triton.jit
def _flash_attention_fwd(
    Q, K, V, Out,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N, M, D,
    qk_scale,  # scale · log2(e)
    CAUSAL: tl.constexpr,
    D_PAD: tl.constexpr,  # D rounded up to a power of two
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs; unused for 16-bit ones
):
    # -- which tile: queries [start_m, start_m + BLOCK_M) of batch b, head h
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // H).to(tl.int64)  # int64: b · stride_b can pass 2^31 on large batches
    off_h = (off_bh % H).to(tl.int64)
    Q += off_b * stride_qb + off_h * stride_qh
    K += off_b * stride_kb + off_h * stride_kh
    V += off_b * stride_vb + off_h * stride_vh
    Out += off_b * stride_ob + off_h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)  # query rows of this tile
    offs_n = tl.arange(0, BLOCK_N)  # key rows within a key block
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < D  # the padded head-size columns read 0 and are never stored
    m_ok = offs_m < N

    # -- load the query tile once; it stays in registers for the whole key loop
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, D_PAD)

    # -- running softmax statistics and output accumulator, all float32
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # -- causal: keys after this tile's last query are masked for every row, so stop there
    hi = M
    if CAUSAL:
        hi = tl.minimum(M, start_m + BLOCK_M)

    for start_n in range(0, hi, BLOCK_N):
        offs_kv = start_n + offs_n
        kv_ok = offs_kv < M
        kv_mask = kv_ok[:, None] & d_ok[None, :]

        # -- scores s = q kᵀ · scale · log2(e), (BLOCK_M, BLOCK_N)
        k = tl.load(K + offs_kv[:, None] * stride_km + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        keep = kv_ok[None, :]  # the tail of the last key block is past M
        if CAUSAL:
            keep = keep & (offs_kv[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))

        # -- online softmax: new running max, rescale the old sum, add this block's terms.
        # m_new is finite: the first block always holds key 0, which every row may see.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)  # exp(m_old - m_new): 0 on the first block
        p = tl.exp2(s - m_new[:, None])  # masked scores give exactly 0
        l_i = l_i * alpha + tl.sum(p, axis=1)

        # -- accumulate p v, after rescaling what was accumulated under the old max
        v = tl.load(V + offs_kv[:, None] * stride_vm + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)  # (BLOCK_N, D_PAD); tail rows 0, not garbage
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # -- epilogue: normalise by the softmax denominator, store in the input dtype
    acc = acc / l_i[:, None]
    tl.store(Out + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             acc.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _block_sizes(d_pad):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for a padded head size.

    The accumulator (BLOCK_M, D_PAD) float32 and the query tile live in registers for the whole
    key loop, so BLOCK_M shrinks as D grows: BLOCK_M · D_PAD ≤ 16384 keeps the accumulator at
    64 KiB per program (64 registers a thread at 8 warps). The k and v tiles (BLOCK_N, D_PAD)
    are staged through shared memory num_stages deep, so BLOCK_N shrinks too: BLOCK_N · D_PAD
    ≤ 8192 keeps them under ~100 KiB, which fits every GPU since Ampere. The VAE's D = 512
    thus gets 32 × 16 tiles. tl.dot needs every side ≥ 16.
    """
    block_m = max(16, min(128, 16384 // d_pad))
    block_n = max(16, min(64, 8192 // d_pad))
    num_warps = 4 if d_pad <= 64 else 8
    num_stages = 3 if d_pad <= 128 else 2
    return block_m, block_n, num_warps, num_stages


def flash_attention(q, k, v, *, causal=False, scale=None, block_sizes=None):
    """softmax(q kᵀ · scale) v per batch and head, by the fused Triton kernel above.

    q: (B, H, N, D); k, v: (B, H, M, D) -> (B, H, N, D) in q's dtype. `scale` defaults to
    1/sqrt(D). `causal` masks key j > query i and needs N == M. Always runs the Triton kernel:
    on a GPU, or on the CPU under TRITON_INTERPRET=1 (set before Triton is imported).
    `block_sizes`: (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of `_block_sizes`' choice,
    for tuning (benchmarks/attention.py --sweep); the blocks must be powers of two ≥ 16.
    """
    _check_inputs(q, k, v, causal)
    B, H, N, D = q.shape
    M = k.shape[2]
    out = torch.empty((B, H, N, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    d_pad = max(16, triton.next_power_of_2(D))
    block_m, block_n, num_warps, num_stages = block_sizes or _block_sizes(d_pad)
    if any(b < 16 or b & (b - 1) for b in (block_m, block_n)):  # tl.dot and tl.arange need it
        raise ValueError(f"block sizes must be powers of two >= 16, got {block_m}, {block_n}")
    grid = (triton.cdiv(N, block_m), B * H)
    # Launch on q's GPU, not whichever is current.
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _flash_attention_fwd[grid](
            q, k, v, out,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, N, M, D, scale * LOG2E,
            CAUSAL=causal, D_PAD=d_pad, BLOCK_M=block_m, BLOCK_N=block_n,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=num_warps, num_stages=num_stages,
        )
    return out


def _check_inputs(q, k, v, causal):
    check_attention_shapes(q, k, v, causal, caller="flash_attention")
    if k.shape[2] == 0:
        raise ValueError("flash_attention needs at least one key (softmax over nothing)")
    if q.shape[-1] > 512:
        raise ValueError(f"flash_attention supports head sizes up to 512, got {q.shape[-1]}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in TRITON_DTYPES:
        raise TypeError(f"flash_attention wants q, k, v of one dtype among float16, bfloat16, "
                        f"float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    check_launchable(q, _flash_attention_fwd, "flash attention")
