"""Import Triton on a kernel's first use, not with ldm.

Triton reads TRITON_INTERPRET when it is imported, and importing it costs time that CPU-only
users should not pay, so the element-wise kernels jit themselves only when first called.
"""


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
