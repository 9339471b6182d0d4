"""Input checks shared by the kernel dispatchers and the Triton kernels behind them.

Kept apart from both so that each may import it: the dispatchers must import without Triton,
and the Triton modules import Triton at their top.

Axis letters: B batch, H heads, N query tokens, M key tokens, D head size.
"""
import torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_attention_shapes(q, k, v, causal, caller="attention"):
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


def check_launchable(x, kernel, name):
    """Raise unless the jitted Triton `kernel` can run on tensor x: float16, bfloat16 or
    float32, on a CUDA GPU, or on the CPU under Triton's interpreter. `name` is the op's."""
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"the Triton {name} takes float16, bfloat16 or float32, got {x.dtype}")
    if not x.is_cuda and type(kernel).__name__ != "InterpretedFunction":
        raise RuntimeError(f"the Triton {name} got a tensor on {x.device}: it runs on a CUDA "
                           "GPU, or on the CPU only under TRITON_INTERPRET=1 (set before Triton "
                           "is first imported)")
