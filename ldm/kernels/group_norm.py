"""GroupNorm fused with the SiLU after it: the opening of every ResBlock in the U-Net and VAE.

    y = SiLU(GroupNorm(x)),  GroupNorm(x) = (x − μ_bg) / √(σ²_bg + eps) · γ_c + β_c

μ and σ² are the mean and (biased) variance of group g of sample b: its C/G channels × all
spatial positions. Statistics are always float32, whatever x's dtype, as in the original's
GroupNorm32 (fp16 sums over ~10⁵ values lose the small deviations, and squares overflow); the
output has x's dtype. The models hold the two modules at the bottom, `GroupNormSiLU` where the
original has GroupNorm32 then SiLU, and `GroupNorm32` where it has GroupNorm alone; both call
`group_norm_silu`, whose kernel is chosen at each call by ldm.kernels.switch (`backend=`, else
`with ldm.kernels.backend(...)`, else $LDM_KERNELS, else "torch"):

    backend      runs
    "torch"      F.group_norm, then F.silu, in x's dtype (default)
    "triton"     ldm.kernels.group_norm_triton: two launches, x read twice, y written once;
                 imports Triton on first use
    "reference"  `group_norm_silu_reference` in float32, rounded to x's dtype: the yardstick

The torch path does what the original does: GroupNorm32 normalises in float32 and rounds to
x's dtype, then SiLU runs in x's dtype. PyTorch's CPU and CUDA group_norm kernels already keep
float32 statistics for float16/bfloat16 inputs, so x is not cast to float32 and back: that
would cost two more launches and ~3x the memory traffic per norm at SD's sizes in float16.
Other devices, and x in another dtype than the norm's weights on CUDA (whose group_norm
refuses that), get the explicit float32 computation (`group_norm_silu_reference`). A
channels_last x gives a channels_last y: CUDA's group_norm returns it contiguous, so the torch
path converts it back rather than leave the conversion to every convolution after a norm.
The Triton path matches float64 under the interpreter and on an H100 (SD shapes in float16;
whole under torch.compile and CUDA graphs).

Axis letters: B batch, C channels, G groups.
"""
import torch
import torch.nn.functional as F
from torch import nn

from ldm.kernels.switch import choose


def group_norm_silu(x, norm, *, silu=True, backend=None):
    """SiLU(norm(x)) for an nn.GroupNorm `norm` (GroupNorm alone if not `silu`), statistics in
    float32. x: (B, C, *spatial) -> same shape, x's dtype. `backend`: "torch", "triton" or
    "reference"; None follows ldm.kernels.switch."""
    if x.ndim < 2 or x.shape[1] != norm.num_channels:
        raise ValueError(f"{norm} wants (B, {norm.num_channels}, ...), got {tuple(x.shape)}")
    backend = choose(backend)
    args = (norm.num_groups, norm.weight, norm.bias, norm.eps)
    if backend == "triton":
        from ldm.kernels.group_norm_triton import group_norm_silu_triton  # imports Triton
        return group_norm_silu_triton(x, *args, silu)
    if backend == "torch" and _native_group_norm_fits(x, norm.weight):
        y = _keep_channels_last(F.group_norm(x, *args), x)
        return F.silu(y) if silu else y
    # "reference"; 16-bit x on a device whose group_norm may not keep float32 statistics; or
    # x and the norm's weights in different dtypes where the device's group_norm refuses that
    return group_norm_silu_reference(x, *args, silu=silu).to(x.dtype)


def _native_group_norm_fits(x, weight):
    """Whether F.group_norm on x keeps float32 statistics and accepts the weights' dtype: CPU
    takes 16-bit x with float32 weights, CUDA wants the same dtype."""
    if x.device.type == "cpu":
        return True
    same = weight is None or weight.dtype == x.dtype
    return same and (x.device.type == "cuda" or x.dtype == torch.float32)


def _keep_channels_last(y, x):
    """y in x's layout: CUDA's group_norm returns a contiguous y for a channels_last x, and the
    next convolution would convert it back (a whole extra pass, at every norm)."""
    channels_last = torch.channels_last
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return y.contiguous(memory_format=channels_last)
    return y


def group_norm_silu_reference(x, num_groups, weight=None, bias=None, eps=1e-5, *, silu=True):
    """Plain PyTorch in float32 (float64 if given float64); returns that dtype: the yardstick."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    weight = None if weight is None else weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    y = F.group_norm(x.to(dtype), num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with float32 statistics whatever the input dtype; returns the input dtype.

    x: (B, C, ...) -> (B, C, ...). The original (`GroupNorm32` in CompVis openaimodel) upcasts
    because fp16 group statistics over h·w·C/groups values lose precision and can overflow
    when squared; the transformer's plain GroupNorm ran under autocast, which also computes
    group_norm in float32. `group_norm_silu` (without the SiLU) keeps float32 statistics on
    every backend, so both are reproduced.
    """

    def forward(self, x):
        return group_norm_silu(x, self, silu=False)


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm32 followed by SiLU, one module: SiLU(GroupNorm(x)), statistics in float32.

    x: (B, C, ...) -> (B, C, ...) in x's dtype. Stands where the original's Sequentials hold
    (GroupNorm32, SiLU), so that the Triton backend fuses the pair; as an nn.GroupNorm its
    parameters keep the checkpoint's names, `weight` and `bias`.
    """

    def forward(self, x):
        return group_norm_silu(x, self)
