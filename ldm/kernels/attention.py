"""The one attention function of the library, and the choice of kernel behind it.

Every attention in the models (U-Net self- and cross-attention, the VAE's single-head
attention, the text encoder's causal attention) calls `attention`, so a faster kernel plugs
in here and nowhere else. The kernel is chosen at call time:

    backend      runs                                                  default for
    "triton"     ldm.kernels.flash_attention (fused, online softmax)   —  (see below)
    "sdpa"       torch.nn.functional.scaled_dot_product_attention      CPU and CUDA tensors
    "reference"  the textbook softmax(q kᵀ) v in float32: the yardstick

The `backend` argument, or else the LDM_ATTENTION environment variable, forces one, so the
paths can be compared in place (LDM_ATTENTION=reference python -m ldm txt2img …).
The Triton kernel matches the reference under the interpreter and on an H100, but there it
was still slower than SDPA's flash backend at every SD shape (benchmarks/RESULTS.md), so SDPA
stays the default until a tuned kernel wins.

Axis letters: B batch, H heads, N query tokens, M key tokens, D head size.
"""
import math
import os

import torch
import torch.nn.functional as F

BACKENDS = ("triton", "sdpa", "reference")


def attention(q, k, v, *, causal=False, scale=None, backend=None):
    """softmax(q kᵀ · scale) v, per batch and head.

    q: (B, H, N, D); k, v: (B, H, M, D) -> (B, H, N, D). `scale` defaults to 1/sqrt(D).
    `causal` masks key j > query i (the text encoder); it needs N == M.
    `backend`: one of BACKENDS, else $LDM_ATTENTION, else the default for the device.
    """
    check_shapes(q, k, v, causal)
    backend = backend or os.environ.get("LDM_ATTENTION") or "sdpa"
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    if backend == "triton":
        from ldm.kernels.flash_attention import flash_attention  # imports Triton only when used
        return flash_attention(q, k, v, causal=causal, scale=scale)
    if backend == "reference":
        return attention_reference(q, k, v, causal=causal, scale=scale).to(q.dtype)
    raise ValueError(f"attention backend must be one of {BACKENDS} (argument or "
                     f"$LDM_ATTENTION), got {backend!r}")


def attention_reference(q, k, v, *, causal=False, scale=None):
    """The textbook formula, computed in float32 (float64 if given float64): the yardstick."""
    check_shapes(q, k, v, causal)
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, N, M)
    if causal:
        n, m = scores.shape[-2:]
        future = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


def check_shapes(q, k, v, causal, caller="attention"):
    """Raise a ValueError unless q (B, H, N, D), k and v (B, H, M, D) fit together."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"{caller} wants (B, H, N, D) tensors, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{caller} shapes disagree: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[2]} "
                         f"and {k.shape[2]}")
