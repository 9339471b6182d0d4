"""GEGLU's gating: the middle of every transformer feed-forward in the U-Net.

    geglu(h) = a · GELU(g),  (a, g) = h.chunk(2, -1),  GELU(g) = g · ½(1 + erf(g/√2))

The value a is the first half of the last axis, the gate g the second, as in the original's
GEGLU (Shazeer 2020, "GLU Variants Improve Transformer"), with the exact erf GELU, not the
tanh approximation. The kernel is chosen at each call by ldm.kernels.switch (`backend=`, else
`with ldm.kernels.backend(...)`, else $LDM_KERNELS, else "torch"):

    backend      runs
    "torch"      a * F.gelu(g) in h's dtype: the original's arithmetic (default)
    "triton"     ldm.kernels.geglu_triton: h read once, the product written once, rounded once;
                 imports Triton on first use
    "reference"  `geglu_reference` in float32, rounded to h's dtype: the yardstick

The Triton path matches float64 under the interpreter and on an H100 (SD shapes in float16;
whole under torch.compile and CUDA graphs), where it ran 2.1x faster than the torch path.

Axis letters: I inner width (4 · model width in SD).
"""
import torch
import torch.nn.functional as F

from ldm.kernels.switch import choose


def geglu(h, *, backend=None):
    """a · gelu(g) for (a, g) = h.chunk(2, -1). h: (..., 2·I) -> (..., I) in h's dtype.
    `backend`: "torch", "triton" or "reference"; None follows ldm.kernels.switch."""
    if h.ndim == 0 or h.shape[-1] % 2:
        raise ValueError(f"geglu wants (..., 2·I): an even last axis, got {tuple(h.shape)}")
    backend = choose(backend)
    if backend == "torch":
        value, gate = h.chunk(2, dim=-1)
        return value * F.gelu(gate)
    if backend == "reference":
        return geglu_reference(h).to(h.dtype)
    from ldm.kernels.geglu_triton import geglu_triton  # imports Triton, on first use
    return geglu_triton(h)


def geglu_reference(h):
    """Plain PyTorch in float32 (float64 if given float64); returns that dtype: the yardstick."""
    value, gate = h.to(torch.promote_types(h.dtype, torch.float32)).chunk(2, dim=-1)
    return value * F.gelu(gate)
