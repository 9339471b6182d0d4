"""The one switch that picks the kernels behind `attention`, `group_norm_silu` and `geglu`.

    name         attention                           GroupNorm(+SiLU), GEGLU
    "torch"      F.scaled_dot_product_attention      PyTorch ops in the input dtype  (default)
    "triton"     flash_attention.py                  group_norm_triton.py, geglu_triton.py
    "reference"  the textbook formulas in float32, rounded to the input dtype: the yardstick

Every kernel call runs on the first of
    1. its `backend=` argument,
    2. the innermost `with ldm.kernels.backend(name):` around it in this thread (a choice made
       in one thread never reaches another),
    3. the LDM_KERNELS environment variable,
    4. "torch".
So the paths compare in place, without touching the models:

    with ldm.kernels.backend("reference"):
        images = pipe.txt2img("a photo of a cat")
    LDM_KERNELS=triton python -m ldm txt2img …

The choice lives in a threading.local rather than a contextvars.ContextVar: torch.compile
(Dynamo) traces a threading.local and guards on it, so a compiled model follows the switch
(it recompiles for a new choice), where a ContextVar would break the graph. A recorded CUDA
graph replays the kernels it recorded, whatever the switch says at replay.
"""
import contextlib
import os
import threading

BACKENDS = ("torch", "triton", "reference")
ENV = "LDM_KERNELS"

_chosen = threading.local()  # .name: the innermost `with backend(...)` of this thread


@contextlib.contextmanager
def backend(name):
    """Run every kernel inside the block on `name`, one of BACKENDS, in this thread.

    Blocks nest (the innermost wins) and each restores the choice around it on exit, even when
    the block raises. A `backend=` argument of a single call still overrides the block.
    """
    outer = getattr(_chosen, "name", None)
    _chosen.name = _check(name, "ldm.kernels.backend()")
    try:
        yield name
    finally:
        _chosen.name = outer


def choose(backend=None):
    """The backend one kernel call runs on: `backend` if given, else `ambient()`."""
    return ambient() if backend is None else _check(backend, "backend=")


def ambient():
    """The innermost `with backend(...)` of this thread, else $LDM_KERNELS, else "torch"."""
    # One variable covers attention too; a separate one left set would silently do nothing.
    if "LDM_ATTENTION" in os.environ:
        raise RuntimeError(f"LDM_ATTENTION is not read: attention follows {ENV} like every "
                           f"kernel; unset LDM_ATTENTION and set {ENV} to one of {BACKENDS}")
    name = getattr(_chosen, "name", None)
    return name if name is not None else _check(os.environ.get(ENV) or "torch", f"${ENV}")


def _check(name, where):
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS} ({where}), got {name!r}")
    return name
