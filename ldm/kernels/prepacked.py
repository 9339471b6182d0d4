"""Convolutions and linear layers that hand oneDNN their weights pre-packed: CPU inference.

Why: on the CPU, PyTorch's eager conv2d and linear give oneDNN the dense weight, and oneDNN
re-lays it into the blocked layout its AMX / AVX-512 kernels read — on every call. Where the
activations are small and the weights large (the U-Net's 16×16, 8×8 and 4×4 levels, 640-2560
channels, at batch 2), that reorder costs more than the product. Measured on a 2-core Xeon with
AMX (2026-12-03, bf16, channels_last, batch 2, ms per call; eager → packed):

    3×3 conv 320→320 at 32×32       2.09 → 1.71
    3×3 conv 1280→1280 at 8×8       6.85 → 2.74
    3×3 conv 2560→1280 at 8×8      16.9  → 8.5
    linear (128, 1280) → 10240      3.30 → 2.05
    SD 1.5 U-Net, 32×32 latents     1.16-1.33× faster in bf16, 1.27× in float32

and no gain for the VAE decoder (large activations, small weights: the reorder is noise there).

`prepack(module)` turns every nn.Conv2d and nn.Linear inside `module` into `PackedConv2d` /
`PackedLinear` (the same class with another forward; parameters, state_dict, hooks unchanged).
Each keeps its dense weight as the parameter — saving, LoRA merging and `.to()` see what they
always saw — and a packed copy beside it, made on the first inference call and made again
whenever the weight changes: another Parameter, `.to()` and the like, an in-place change (its
version counter), or `.data =` a tensor at another address.
oneDNN runs the same arithmetic: convolutions gave the same bits here, linear layers differ by
float rounding (tests/test_prepacked.py). Calls that need gradients, run on another device or
dtype, under torch.compile (inductor packs weights itself), or with inputs the packed ops do not
take (string padding, non-zero padding modes, 3-D conv inputs) run the stock forward.

The cost is memory: the packed copies double the packed network's weights (SD 1.5's U-Net:
+1.7 GB in bf16, +3.4 GB in float32), which is why precision.optimize packs only where it
says. The ops are PyTorch's own (`torch.ops.mkldnn`, what torch.compile's CPU backend emits
after freezing); `prepack` packs nothing on a build without them or off x86.
"""
import functools
import platform
import weakref

import torch
from torch import nn


@functools.cache
def available():
    """True on an x86 CPU whose torch build has oneDNN's packed conv/linear ops (ARM builds
    have oneDNN too, over ACL: unmeasured here, so not packed)."""
    return (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@functools.cache
def packed_dtypes():
    """The dtypes packed on this CPU: float32, and bfloat16 where oneDNN has bf16 kernels for it
    (AVX-512 or AMX; float16 on the CPU is neither a default nor measured)."""
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


def prepack(module):
    """Make every nn.Conv2d and nn.Linear in `module` (itself included) read a packed weight in
    inference; returns module. Idempotent; `unpack` undoes it."""
    if not available():
        return module
    for layer in module.modules():
        if type(layer) is nn.Conv2d:
            layer.__class__ = PackedConv2d
        elif type(layer) is nn.Linear:
            layer.__class__ = PackedLinear
    return module


def unpack(module):
    """Give every packed layer in `module` back its stock class and drop the packed copies."""
    for layer in module.modules():
        if isinstance(layer, _Packed):
            layer.__dict__.pop("_packed", None)
            layer.__class__ = layer.__class__.__bases__[-1]
    return module


class _Packed:
    """The packed copy's bookkeeping, shared by both layer kinds."""

    def _packed_weight(self, x):
        """The packed weight for input x, or None where the stock forward must run."""
        if torch.compiler.is_compiling():  # traced: inductor packs weights its own way
            return None
        weight = self.weight
        if weight.device.type != "cpu":
            self.__dict__.pop("_packed", None)  # moved off the CPU: free the CPU copy
            return None
        if (x.device.type != "cpu" or x.dtype != weight.dtype or x.dtype not in packed_dtypes()
                or (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))):
            return None
        # The same tensor object (a weak reference: an address or id may be reused by the next
        # weight), the same storage (`.data = …` keeps the object) and no in-place change since.
        cached = self.__dict__.get("_packed")
        if (cached is None or cached[0]() is not weight
                or cached[1:3] != (weight.data_ptr(), weight._version)):
            with torch.no_grad():
                packed = self._pack(weight.detach(), x)
            cached = (weakref.ref(weight), weight.data_ptr(), weight._version, packed)
            self.__dict__["_packed"] = cached
        return cached[3]

    def _apply(self, fn, recurse=True):
        # .to(), .float(), .cuda() … replace the weight's storage, and the allocator may hand the
        # new one the old one's address: drop the packed copy rather than trust the address.
        self.__dict__.pop("_packed", None)
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copies and pickles carry the dense weight, not the packed one
        state = self.__dict__.copy()
        state.pop("_packed", None)
        return state


class PackedConv2d(_Packed, nn.Conv2d):
    """nn.Conv2d whose CPU inference calls run oneDNN on a packed weight (see module doc).
    x: (B, C_in, H, W) -> (B, C_out, H', W'), in x's memory format."""

    def forward(self, x):
        packable = (self.padding_mode == "zeros" and not isinstance(self.padding, str)
                    and x.ndim == 4)
        packed = self._packed_weight(x) if packable else None
        if packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "none", [], "")

    def _pack(self, weight, x):
        return torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
            self.groups, list(x.shape))


class PackedLinear(_Packed, nn.Linear):
    """nn.Linear whose CPU inference calls run oneDNN on a packed weight (see module doc).
    x: (..., in_features) -> (..., out_features)."""

    def forward(self, x):
        packed = self._packed_weight(x) if x.ndim >= 2 else None
        if packed is None:
            return super().forward(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

    def _pack(self, weight, x):
        return torch.ops.mkldnn._reorder_linear_weight(weight, x.numel() // x.shape[-1])
