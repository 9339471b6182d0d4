"""GroupNorm fused with the SiLU after it: the opening of every ResBlock in the U-Net and VAE.

    y = SiLU(GroupNorm(x)),  GroupNorm(x) = (x − μ_bg) / √(σ²_bg + eps) · γ_c + β_c

μ and σ² are the mean and (biased) variance of group g of sample b: its C/G channels × all
spatial positions. Statistics are always float32, whatever x's dtype, as in the original's
GroupNorm32 (fp16 sums over ~10⁵ values lose the small deviations, and squares overflow); the
output has x's dtype, rounded once (the original also rounded between norm and SiLU: in fp16
outputs may differ from it by one ulp). The kernel is chosen at call time:

    backend   runs                                                      default
    "triton"  the fused kernel below: x read twice, y written once      —  (see below)
    "torch"   F.group_norm on x.float(), F.silu, cast back (reference)  everywhere

The `backend` argument, else the LDM_KERNELS environment variable, picks one. The Triton path
matches float64 under the interpreter and on an H100 (SD shapes in float16; whole under
torch.compile and CUDA graphs), where it ran 3.4x faster than the torch path (18 µs against
61 µs at (2, 320, 64, 64)); making it the CUDA default is the next step. Triton is imported on
its first use, not with ldm.

Kernel: one program per (batch, group). For a contiguous x (B, C, S) that group is one
contiguous run of n = C/G · S values (4·262144 in the VAE decoder at 512²), so the
program walks it in blocks of BLOCK:
    pass 1, statistics: each block's count n_b, mean m_b and M2_b = Σ(x − m_b)² (two passes
    over the block, in registers) are merged into the running (n, mean, M2) (Chan et al. 1979):
        δ = m_b − mean,  n' = n + n_b,  mean += δ·n_b/n',  M2 += M2_b + δ²·n·n_b/n'
    which never forms E[x²] − E[x]², so activations with a large mean keep their variance;
    pass 2, normalise: reread the block, y = (x − μ)·rstd·γ_c + β_c, y·sigmoid(y), store.

Shapes: x (B, C, *spatial), any number of spatial axes (none too); C divisible by G. Dtypes:
float16, bfloat16, float32. Caveats: x is made contiguous first (channels_last is copied);
forward only; B·G programs, so SD's B·32 = 64 leave half of an H100's 132 SMs idle: it
streams ~600-850 GB/s of 3 TB/s. Splitting each group's statistics over several programs
(a partial-statistics pass, then a wide normalising pass) would be the next speed-up.

Axis letters: B batch, C channels, G groups, S spatial positions (h·w).
"""
from __future__ import annotations  # `tl.constexpr` stays a string until Triton reads it

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

from ldm.kernels.lazy_triton import jit_on_first_use

BACKENDS = ("triton", "torch")
triton = tl = None  # set by jit_on_first_use() on first use; the kernel finds `tl` here


def group_norm_silu(x, norm, *, silu=True, backend=None):
    """SiLU(norm(x)) for an nn.GroupNorm `norm` (GroupNorm alone if not `silu`), statistics in
    float32. x: (B, C, *spatial) -> same shape, x's dtype. `backend`: see the module docstring."""
    if x.ndim < 2 or x.shape[1] != norm.num_channels:
        raise ValueError(f"{norm} wants (B, {norm.num_channels}, ...), got {tuple(x.shape)}")
    if kernel_backend(backend) == "torch":
        return group_norm_silu_reference(x, norm.num_groups, norm.weight, norm.bias, norm.eps,
                                         silu=silu).to(x.dtype)
    return _group_norm_silu_triton(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu)


def kernel_backend(backend=None):
    """The backend argument, else $LDM_KERNELS, else "torch"; refuse unknown names."""
    backend = backend or os.environ.get("LDM_KERNELS") or "torch"
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS} (argument or $LDM_KERNELS), "
                         f"got {backend!r}")
    return backend


def group_norm_silu_reference(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=True):
    """Plain PyTorch in float32 (float64 if given float64); returns that dtype: the yardstick."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    weight = None if weight is None else weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    y = F.group_norm(x.to(dtype), num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def _group_norm_silu_fwd(X, W, Bias, Y, S, group_channels, group_size, G, eps,
                         SILU: tl.constexpr, BLOCK: tl.constexpr):
    # -- which group: program b·G + g owns x[b, g·C/G : (g+1)·C/G, :], group_size values in a row
    pid = tl.program_id(0)
    first_channel = (pid % G) * group_channels
    X += pid.to(tl.int64) * group_size  # int64: B·C·S can pass 2^31 (the VAE at 1024²)
    Y += pid.to(tl.int64) * group_size
    offs = tl.arange(0, BLOCK)

    # -- pass 1: running count, mean and M2 = Σ(x − mean)², merged block by block (Chan et al.)
    n = tl.zeros((), dtype=tl.float32)
    mean = tl.zeros((), dtype=tl.float32)
    m2 = tl.zeros((), dtype=tl.float32)
    for start in range(0, group_size, BLOCK):
        ok = start + offs < group_size
        x = tl.load(X + start + offs, mask=ok, other=0.0).to(tl.float32)
        n_b = tl.minimum(group_size - start, BLOCK).to(tl.float32)
        mean_b = tl.sum(x, axis=0) / n_b
        m2_b = tl.sum(tl.where(ok, (x - mean_b) * (x - mean_b), 0.0), axis=0)
        delta = mean_b - mean
        n_new = n + n_b
        mean += delta * (n_b / n_new)
        m2 += m2_b + delta * delta * (n * (n_b / n_new))
        n = n_new
    rstd = tl.math.rsqrt(m2 / group_size + eps)  # biased variance, as GroupNorm

    # -- pass 2: normalise, per-channel affine, SiLU, store in y's dtype
    for start in range(0, group_size, BLOCK):
        ok = start + offs < group_size
        x = tl.load(X + start + offs, mask=ok, other=0.0).to(tl.float32)
        channel = first_channel + (start + offs) // S
        w = tl.load(W + channel, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(Bias + channel, mask=ok, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w + b
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(Y + start + offs, y.to(Y.dtype.element_ty), mask=ok)


@functools.cache
def _load_kernel():
    """The jitted _group_norm_silu_fwd, made on first use."""
    return jit_on_first_use(_group_norm_silu_fwd)


def _group_norm_silu_triton(x, num_groups, weight, bias, eps, silu):
    kernel = _load_kernel()
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton group norm takes float16, bfloat16 or float32, got {x.dtype}")
    if not x.is_cuda and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(f"the Triton group norm got a tensor on {x.device}: it runs on a CUDA "
                           "GPU, or on the CPU only under TRITON_INTERPRET=1 (set before Triton "
                           "is first imported)")
    x = x.contiguous()
    B, C = x.shape[:2]
    S = x[0, 0].numel()  # spatial positions (1 for a (B, C) input)
    weight = x.new_ones(C) if weight is None else weight
    bias = x.new_zeros(C) if bias is None else bias
    y = torch.empty_like(x)
    group_size = C // num_groups * S
    if y.numel() == 0:
        return y
    # Measured on an H100 (fp16, SD shapes): 8192 values and 16 warps a block beat smaller
    # blocks by up to 2x, since each program streams a whole group alone.
    block = min(8192, triton.next_power_of_2(group_size))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        kernel[(B * num_groups,)](x, weight, bias, y, S, C // num_groups, group_size,
                                  num_groups, eps, SILU=silu, BLOCK=block,
                                  num_warps=max(4, min(16, block // 512)))
    return y
