"""The one attention function of the library, and the choice of kernel behind it.

Every attention in the models (U-Net self- and cross-attention, the VAE's single-head
attention, the text encoder's causal attention) calls `attention`, so a faster kernel plugs
in here and nowhere else. The kernel is chosen at each call by the switch of ldm.kernels.switch
(`backend=`, else `with ldm.kernels.backend(...)`, else $LDM_KERNELS, else "torch"):

    backend      runs
    "torch"      torch.nn.functional.scaled_dot_product_attention (default)
    "triton"     ldm.kernels.flash_attention: fused, online softmax; imports Triton on first use
    "reference"  the textbook softmax(q kᵀ) v in float32: the yardstick

The Triton kernel matches the reference under the interpreter and on an H100, but there it
is slower than SDPA's flash backend at every SD shape (benchmarks/RESULTS.md), so SDPA is the
default until a tuned kernel wins.

Axis letters: B batch, H heads, N query tokens, M key tokens, D head size.
"""
import math

import torch
import torch.nn.functional as F

from ldm.kernels.checks import check_attention_shapes
from ldm.kernels.switch import choose


def attention(q, k, v, *, causal=False, scale=None, backend=None):
    """softmax(q kᵀ · scale) v, per batch and head.

    q: (B, H, N, D); k, v: (B, H, M, D) -> (B, H, N, D) in q's dtype. `scale` defaults to
    1/sqrt(D). `causal` masks key j > query i (the text encoder); it needs N == M.
    `backend`: "torch", "triton" or "reference"; None follows ldm.kernels.switch.
    """
    check_attention_shapes(q, k, v, causal)
    backend = choose(backend)
    if backend == "torch":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if backend == "reference":
        return attention_reference(q, k, v, causal=causal, scale=scale).to(q.dtype)
    from ldm.kernels.flash_attention import flash_attention  # imports Triton, on first use
    return flash_attention(q, k, v, causal=causal, scale=scale)


def attention_reference(q, k, v, *, causal=False, scale=None):
    """The textbook formula, computed in float32 (float64 if given float64): the yardstick."""
    check_attention_shapes(q, k, v, causal)
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, N, M)
    if causal:
        n, m = scores.shape[-2:]
        future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v
