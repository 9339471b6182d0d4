"""Import Triton on a kernel's first use, not with ldm.

Triton reads TRITON_INTERPRET when it is imported, and importing it costs time that CPU-only
users should not pay, so the element-wise kernels jit themselves only when first called.
"""
import torch


def jit_on_first_use(kernel):
    """Import Triton, give the kernel's module its `triton` and `tl` globals (the kernel body and
    its launcher use them), and return triton.jit(kernel)."""
    try:
        import triton
        import triton.language as tl
    except ImportError as e:
        raise RuntimeError("the Triton backend needs Triton (pip install triton), or use "
                           "backend='torch'") from e
    kernel.__globals__.update(triton=triton, tl=tl)
    return triton.jit(kernel)


def check_launchable(x, kernel, name):
    """Raise unless `kernel` (from jit_on_first_use) can run on tensor x: float16, bfloat16 or
    float32, on a CUDA GPU, or on the CPU under Triton's interpreter. `name` is the op's."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the Triton {name} takes float16, bfloat16 or float32, got {x.dtype}")
    if not x.is_cuda and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(f"the Triton {name} got a tensor on {x.device}: it runs on a CUDA "
                           "GPU, or on the CPU only under TRITON_INTERPRET=1 (set before Triton "
                           "is first imported)")
