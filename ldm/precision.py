"""Which dtype and memory layout a model runs fastest in on the machine at hand.

    dtype = resolve_dtype("auto", "cpu")   # bfloat16 on a CPU with AMX, else float32
    pipe = optimize(ldm.load(path, dtype=dtype))   # each network in its faster memory layout

"auto", by device:
    CPU   bfloat16 on a CPU with AMX-BF16 (Intel Xeon from Sapphire Rapids on), float32 elsewhere.
          AVX512-BF16 alone is not enough: measured on a Xeon exposing AVX512-BF16 but not AMX,
          oneDNN's bf16 kernels (`avx512_core_bf16`) ran convolutions and matrix products at
          78-86 GFLOP/s against float32's 100-160, and SD 1.5's U-Net and VAE took 1.4× as
          long in bf16 (see FAST_BF16_UNITS). With AMX, SD 1.5 end to end ran 3.2× faster in
          bf16 than in float32, 4.05× with the U-Net's weights packed (PREPACK_CPU; 2-core
          Xeon, 2026-12-03, benchmarks/cpu.py; images 0.6/255 apart on average).
    CUDA  float16, the precision SD was released in; bfloat16 for the families whose activations
          overflow float16's range (FP16_OVERFLOWS: SDXL's VAE), float32 on a GPU without bf16.
    other float32 (MPS, XPU, …: not measured here).
An explicit dtype (torch.float32 / float16 / bfloat16, or a name in DTYPES) is passed through.

The CPU's units are detected, not guessed from its name: PyTorch's own query (cpuinfo), else
Linux's /proc/cpuinfo; a virtual machine shows what its hypervisor exposes (the Xeon above is
an AMX-capable model whose hypervisor hides AMX). ARM's bf16 extension (FEAT_BF16: Graviton 3,
Apple M2 on) is not counted: unmeasured, so ARM gets float32.

Layouts (`preferred_memory_format`, applied by `optimize`): channels_last only where measured
faster, see CHANNELS_LAST_CPU; weights packed for oneDNN where measured faster, see
PREPACK_CPU (the bf16 U-Net on the CPU). No thread setting is changed: PyTorch's default (one
thread per core) was not beaten by any measured alternative.
"""
import functools
import re
from pathlib import Path

import torch

from ldm.kernels import prepacked

# The dtypes a model generates in, and the names they may be given by.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

CPUINFO = Path("/proc/cpuinfo")  # Linux's, read where torch cannot say

# x86 instructions that multiply bf16 natively, as /proc/cpuinfo and torch.cpu.get_capabilities()
# name them: AMX's tile multiply, and AVX-512's bf16 dot product (VDPBF16PS).
BF16_UNITS = ("amx_bf16", "avx512_bf16")
# Those that make bf16 faster than float32. VDPBF16PS does 32 multiply-adds per instruction
# where float32 FMA does 16, but Sapphire/Emerald Rapids issue it on one port against FMA's two,
# so its peak is float32's, and the conversions around it make PyTorch's bf16 slower (measured:
# 2026-12-02, 1 thread, benchmarks/cpu.py --kernels: GEMMs 77-82 vs 107-147 GFLOP/s, 3×3
# convolutions 76-86 vs 100-160 GFLOP/s; SD 1.5 U-Net, batch 2 at 32×32: 5.8 vs 4.1 CPU s).
FAST_BF16_UNITS = ("amx_bf16",)

# Model families (preset names) whose activations exceed float16's 65504 somewhere: SDXL's VAE
# decoder (why diffusers marks that VAE `force_upcast`, and madebyollin re-trained it as
# sdxl-vae-fp16-fix). SD 1.x/2.x run in float16 (the pipeline re-decodes an overflowing batch in
# float32, see StableDiffusion.decode_latents).
FP16_OVERFLOWS = frozenset({"sdxl", "sdxl-refiner"})

# (network, dtype) that run faster in channels_last (NHWC) than in NCHW on the CPU. Measured as
# NCHW time / NHWC time (2026-12-02, Xeon with AVX512-BF16, no AMX; `benchmarks/cpu.py
# --layouts --threads 1`, CPU time, the layouts interleaved, two runs of 7; U-Net batch 2 at
# 32×32 latents, VAE decode to 256²):
#     U-Net float32 0.89-0.90, bfloat16 1.00-1.03 (issue 15, on a Xeon with AMX: 1.19)
#     VAE   float32 0.94-0.99, bfloat16 1.05-1.08
# and on an AMD EPYC (RESULTS.md, 2026-11-25, wall clock): U-Net float32 0.87, VAE decoder
# float32 1.12. So float32 stays NCHW (the U-Net, most of the time, loses on both CPUs), and
# bf16, never slower in NHWC, goes channels_last.
CHANNELS_LAST_CPU = frozenset({("unet", torch.bfloat16), ("vae", torch.bfloat16)})

# (network, dtype) whose convolutions and linear layers read oneDNN-packed weights on the CPU
# (ldm/kernels/prepacked.py). Measured 2026-12-03 on a 2-core Xeon with AMX, SD 1.5 U-Net at
# 32×32 latents, batch 2: 1.16-1.33× faster in bf16, 1.27× in float32; the VAE decoder not
# faster. Packing doubles the network's weights in memory, so it is done where bf16 is the
# default (AMX) and costs half of float32's; float32 is opt-in: prepacked.prepack(pipe.unet).
PREPACK_CPU = frozenset({("unet", torch.bfloat16)})


def cpu_flags():
    """The CPU's feature flags, as a set of lower-case names ("avx512_bf16", …).

    From PyTorch's own query (cpuinfo, any OS, recent torch), else Linux's /proc/cpuinfo
    ("flags" on x86, "Features" on ARM); an empty set where neither says: unknown is absent.
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return {name for name, present in capabilities().items() if present is True}
    try:
        text = CPUINFO.read_text()
    except OSError:
        return set()
    found = re.search(r"^(?:flags|Features)\s*:(.*)$", text, re.MULTILINE)  # first core's
    return set(found.group(1).split()) if found else set()


@functools.cache
def cpu_bf16_units():
    """The native bf16 instructions this CPU has, of BF16_UNITS (e.g. ("avx512_bf16",))."""
    flags = cpu_flags()
    return tuple(unit for unit in BF16_UNITS if unit in flags)


def has_fast_bf16():
    """True if this CPU runs bf16 faster than float32: it has AMX-BF16 (FAST_BF16_UNITS)."""
    return any(unit in FAST_BF16_UNITS for unit in cpu_bf16_units())


def resolve_dtype(dtype, device, *, family=None):
    """The torch.dtype to load and run a model in.

    dtype: "auto", a torch dtype (float32, float16, bfloat16) or a name in DTYPES ("bf16", …).
    device: where the model runs ("cpu", "cuda:0", a torch.device).
    family: the model's preset name ("sd15", "sdxl", …): those in FP16_OVERFLOWS get bf16
    rather than fp16 on CUDA. Only "auto" looks at device and family.
    Raises ValueError naming the argument for a dtype or device it does not know.
    """
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if not (isinstance(dtype, str) and dtype == "auto"):
        raise ValueError(f"dtype must be 'auto', torch.float32, torch.float16 or torch.bfloat16 "
                         f"(or one of {list(DTYPES)}), got {dtype!r}")
    device = _device(device)
    if device.type == "cpu":
        return torch.bfloat16 if has_fast_bf16() else torch.float32
    if device.type == "cuda":
        if family not in FP16_OVERFLOWS:
            return torch.float16
        return torch.bfloat16 if _cuda_has_bf16() else torch.float32
    return torch.float32


def preferred_memory_format(device, dtype, network):
    """torch.channels_last or torch.contiguous_format: the layout `network` ("unet" or "vae")
    in `dtype` runs faster in on `device`, as measured (CHANNELS_LAST_CPU). Off the CPU: NCHW
    (channels_last on CUDA is not measured yet)."""
    if network not in ("unet", "vae"):
        raise ValueError(f"network must be 'unet' or 'vae', got {network!r}")
    if _device(device).type == "cpu" and (network, dtype) in CHANNELS_LAST_CPU:
        return torch.channels_last
    return torch.contiguous_format


def optimize(pipe):
    """Put the pipeline's U-Net and VAE in their preferred memory formats for their device and
    dtype (`preferred_memory_format`), and pack the weights of those in PREPACK_CPU; returns
    pipe. Only the 4-D weights are re-laid (copied; a weight mapped from its file becomes a
    private copy); the function computed is the same, to rounding. The inputs need no change: a
    convolution with channels_last weights gives channels_last outputs, and the layout carries
    through the network."""
    for name in ("unet", "vae"):
        module = getattr(pipe, name)
        weight = next(module.parameters())
        module.to(memory_format=preferred_memory_format(weight.device, weight.dtype, name))
        if weight.device.type == "cpu" and (name, weight.dtype) in PREPACK_CPU:
            prepacked.prepack(module)
    return pipe


def _cuda_has_bf16():
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def _device(device):
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got "
                         f"{device!r} ({e})") from None
