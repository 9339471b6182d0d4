"""Compute kernels of the hot path. Every attention in the models goes through `attention`."""
from ldm.kernels.attention import attention, attention_reference

__all__ = ["attention", "attention_reference"]
