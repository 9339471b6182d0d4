"""ldm.precision: what dtype="auto" means on each device, the CPU's bf16 units as detected, and
the memory layouts the CPU fast path puts the networks in."""
import platform
from pathlib import Path

import pytest
import torch

import ldm
from ldm import precision

from helpers import rel_error

AUTO_CPU = {True: torch.bfloat16, False: torch.float32}
# The detection itself, kept before any fixture (here or in a conftest) replaces it.
HAS_FAST_BF16 = precision.has_fast_bf16


@pytest.fixture
def bf16_cpu(monkeypatch, request):
    """Pretend the CPU has (param True) or lacks (False) bf16 units faster than float32 (AMX)."""
    monkeypatch.setattr(precision, "has_fast_bf16", lambda: request.param)
    return request.param


@pytest.mark.parametrize("bf16_cpu", [True, False], indirect=True)
@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_auto_on_cpu_is_bf16_only_with_fast_units(bf16_cpu, device):
    assert precision.resolve_dtype("auto", device) == AUTO_CPU[bf16_cpu]


@pytest.mark.parametrize("bf16_cpu", [True, False], indirect=True)
def test_auto_on_cuda_is_fp16_whatever_the_cpu(bf16_cpu):
    # Only the device string is read: no GPU is needed to resolve it.
    assert precision.resolve_dtype("auto", "cuda") == torch.float16
    assert precision.resolve_dtype("auto", "cuda:1", family="sd15") == torch.float16


@pytest.mark.parametrize("has_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_avoids_fp16_for_families_that_overflow_it(monkeypatch, has_bf16,
                                                                expected):
    monkeypatch.setattr(precision, "_cuda_has_bf16", lambda: has_bf16)
    assert precision.FP16_OVERFLOWS  # SDXL's VAE
    for family in precision.FP16_OVERFLOWS:
        assert precision.resolve_dtype("auto", "cuda", family=family) == expected
        # off CUDA the family changes nothing
        assert precision.resolve_dtype("auto", "cpu", family=family) == \
            precision.resolve_dtype("auto", "cpu")


def test_auto_on_unmeasured_devices_is_fp32():
    assert precision.resolve_dtype("auto", "mps") == torch.float32


@pytest.mark.parametrize("bf16_cpu", [True, False], indirect=True)
@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_an_explicit_dtype_is_passed_through(bf16_cpu, device, dtype):
    assert precision.resolve_dtype(dtype, device) is dtype
    names = [name for name, d in precision.DTYPES.items() if d is dtype]
    assert len(names) == 2  # "float32" and "fp32", …
    assert all(precision.resolve_dtype(name, device, family="sdxl") is dtype for name in names)


@pytest.mark.parametrize("bad", ["Auto", "float64", "", torch.float64, torch.int8, 16, None,
                                 "torch.float16"])
def test_a_bad_dtype_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=r"dtype must be 'auto'.*got") as error:
        precision.resolve_dtype(bad, "cpu")
    assert repr(bad) in str(error.value)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", 3.5, None])
def test_a_bad_device_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="device must be a torch device") as error:
        precision.resolve_dtype("auto", bad)
    assert repr(bad) in str(error.value)


# ---------------------------------------------------------------- detecting the units
@pytest.mark.parametrize("flags, units, fast", [
    ({"avx512f", "avx512_bf16", "avx2"}, ("avx512_bf16",), False),     # Cooper Lake, Zen 4, or
    # a Sapphire Rapids whose hypervisor hides AMX: bf16 measured slower than float32 there
    ({"amx_bf16", "amx_tile", "avx512_bf16"}, ("amx_bf16", "avx512_bf16"), True),  # SPR, EMR
    ({"avx512f", "avx512_vnni", "avx2"}, (), False),                  # Cascade Lake: no bf16
    ({"avx2", "fma"}, (), False),                                     # Zen 2/3 EPYC
    ({"neon", "bf16", "i8mm"}, (), False),                            # ARM's bf16: not counted
    (set(), (), False),                                               # unknown
])
def test_bf16_units_are_read_from_the_flags(monkeypatch, flags, units, fast):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(precision, "has_fast_bf16", HAS_FAST_BF16)
    precision.cpu_bf16_units.cache_clear()
    try:
        assert precision.cpu_bf16_units() == units
        assert precision.has_fast_bf16() == fast
        assert precision.resolve_dtype("auto", "cpu") == AUTO_CPU[fast]
    finally:
        precision.cpu_bf16_units.cache_clear()


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu vme avx2 avx512f avx512_bf16 amx_bf16 amx_tile
power management:

processor\t: 1
flags\t\t: fpu vme avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp bf16 i8mm
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text, expected", [
    (X86_CPUINFO, {"fpu", "vme", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
    (ARM_CPUINFO, {"fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32",
                   "atomics", "fphp", "asimdhp", "bf16", "i8mm"}),
    ("processor\t: 0\n", set()),
])
def test_cpuinfo_is_read_where_torch_cannot_say(monkeypatch, tmp_path, text, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)  # an older torch
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    assert precision.cpu_flags() == expected


def test_no_cpuinfo_and_no_torch_query_means_no_units(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "absent")  # macOS, Windows
    assert precision.cpu_flags() == set()


@pytest.mark.skipif(not (Path("/proc/cpuinfo").exists() and platform.machine() == "x86_64"
                         and hasattr(torch.cpu, "get_capabilities")),
                    reason="needs Linux on x86 and torch's own CPU query")
def test_torch_and_the_kernel_agree_on_this_cpus_bf16_units(monkeypatch):
    """Detection, not a guess: PyTorch's cpuinfo and Linux's flags name the same bf16 units."""
    from_torch = precision.cpu_flags() & set(precision.BF16_UNITS)
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    from_kernel = precision.cpu_flags() & set(precision.BF16_UNITS)
    assert from_torch == from_kernel


# ---------------------------------------------------------------- layouts
@pytest.mark.parametrize("network", ["unet", "vae"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_memory_format_follows_the_measured_table_on_cpu_only(network, dtype):
    expected = (torch.channels_last if (network, dtype) in precision.CHANNELS_LAST_CPU
                else torch.contiguous_format)
    assert precision.preferred_memory_format("cpu", dtype, network) == expected
    assert precision.preferred_memory_format("cuda", dtype, network) == torch.contiguous_format


def test_memory_format_names_a_bad_network():
    with pytest.raises(ValueError, match="network must be 'unet' or 'vae', got 'text'"):
        precision.preferred_memory_format("cpu", torch.float32, "text")


def _generate(pipe):
    """Two images of the shipped model, 2 steps, fixed seeds -> (2, 3, 64, 64) float32."""
    return pipe.txt2img("a blue square on a yellow background", steps=2, seed=3, num_images=2,
                        output_type="tensor", progress=False).float()


@pytest.fixture(scope="module")
def fp32_images():
    return _generate(ldm.load(dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimize_relays_the_weights_and_keeps_the_outputs(monkeypatch, dtype, fp32_images):
    """optimize(pipe) puts each network's 4-D weights in its preferred layout (here: forced to
    channels_last for the U-Net, NCHW for the VAE) and the model computes the same function:
    in float32 to 1e-5; in bfloat16 no farther from float32's images than NCHW bfloat16 is."""
    monkeypatch.setattr(precision, "CHANNELS_LAST_CPU", frozenset({("unet", dtype)}))
    pipe = ldm.load(dtype=dtype)
    before = _generate(pipe)
    assert precision.optimize(pipe) is pipe
    convs = {name: [p for p in getattr(pipe, name).parameters() if p.ndim == 4]
             for name in ("unet", "vae")}
    assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
               for p in convs["unet"] if p.shape[2:] != (1, 1))  # 1×1 kernels are both
    assert all(p.is_contiguous() for p in convs["vae"])
    after = _generate(pipe)
    if dtype == torch.float32:
        assert rel_error(after, before) <= 1e-5
        return
    errors = rel_error(before, fp32_images), rel_error(after, fp32_images)
    print(f"bf16 vs fp32, relative error: NCHW {errors[0]:.1e}, channels_last {errors[1]:.1e}")
    assert errors[1] <= 2 * errors[0]


@pytest.mark.parametrize("bf16_cpu", [True, False], indirect=True)
def test_an_auto_dtype_model_generates_finite_images_close_to_fp32(bf16_cpu, fp32_images):
    """The shipped model loaded as "auto" resolves (bf16 on an AMX CPU, else fp32), optimized,
    makes finite images within a few /255 of float32's."""
    dtype = precision.resolve_dtype("auto", "cpu")
    assert dtype == AUTO_CPU[bf16_cpu]
    pipe = precision.optimize(ldm.load(dtype=dtype))
    images = _generate(pipe)
    assert pipe.dtype == dtype and torch.isfinite(images).all()
    difference = (images - fp32_images).abs() * 127.5  # [-1, 1] -> /255
    print(f"{dtype}: {difference.mean():.3f}/255 from float32 on average")
    assert difference.mean() <= (3.0 if bf16_cpu else 1e-3)
