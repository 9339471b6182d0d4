"""Compute kernels of the hot path: every attention goes through `attention`, every GroupNorm
followed by SiLU through `group_norm_silu`, every GEGLU through `geglu`."""
from ldm.kernels.attention import attention, attention_reference
from ldm.kernels.geglu import geglu, geglu_reference
from ldm.kernels.group_norm import group_norm_silu, group_norm_silu_reference

__all__ = ["attention", "attention_reference", "geglu", "geglu_reference", "group_norm_silu",
           "group_norm_silu_reference"]
