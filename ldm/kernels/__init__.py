"""Compute kernels of the hot path: every attention goes through `attention`, every GroupNorm
followed by SiLU through `group_norm_silu` (held by the models as `GroupNormSiLU`), every GEGLU
through `geglu`. One switch picks the kernel behind all three (ldm.kernels.switch):

    with ldm.kernels.backend("triton"):    # or "torch" (default), "reference"; or $LDM_KERNELS
        ...

Triton is imported on the first Triton call, not with ldm.

Apart from the switch, `ldm.kernels.prepacked` makes convolutions and linear layers read
weights packed once for oneDNN in CPU inference (applied by ldm.precision.optimize where it
measured faster: the bf16 U-Net).
"""
from ldm.kernels.attention import attention, attention_reference
from ldm.kernels.geglu import geglu, geglu_reference
from ldm.kernels.group_norm import (GroupNorm32, GroupNormSiLU, group_norm_silu,
                                    group_norm_silu_reference)
from ldm.kernels.switch import BACKENDS, backend

__all__ = ["BACKENDS", "GroupNorm32", "GroupNormSiLU", "attention", "attention_reference",
           "backend", "geglu", "geglu_reference", "group_norm_silu", "group_norm_silu_reference"]
