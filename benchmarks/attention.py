"""Time every attention of SD 1.5 at 512x512: our Triton kernel against PyTorch's SDPA.

Shapes are one sampling step with classifier-free guidance (batch 2): the U-Net's self- and
cross-attention at each latent resolution (8 heads, head size 320/8, 640/8, 1280/8), the
VAE decoder's single-head attention (64x64 latent, 512 channels) and the text encoder's causal
attention (12 heads of 64 over 77 tokens). On a CUDA GPU each shape is timed for

    ours      ldm.kernels.flash_attention.flash_attention
    flash     F.scaled_dot_product_attention, FlashAttention-2 backend
    mem-eff   F.scaled_dot_product_attention, memory-efficient (xFormers/CUTLASS) backend

with CUDA events after warm-up, reporting the median of many runs and TFLOP/s counted as
4·B·H·N·M·D (two matrix products; half that when causal). A backend that does not support a
shape (flash has no head size 512) shows "n/a". Without a GPU there is nothing to time: the
script says so and runs a tiny correctness check of the kernel under the Triton interpreter.

With --sweep, each shape (or those whose name contains --only) is timed instead under every
tile configuration (BLOCK_M, BLOCK_N, num_warps, num_stages) of a grid, each checked against
float32 SDPA first; the best few are printed beside the default of `_block_sizes`, to tune
that table from measurements. Configurations that do not fit the GPU are skipped.

    python benchmarks/attention.py [--dtype fp16|bf16] [--runs 100] [--sweep] [--only SHAPE]
    python benchmarks/attention.py --smoke   # CI, seconds: the tiny correctness check (on the
                                             # GPU if any, else interpreted), exit 1 if an error
                                             # exceeds its tolerance; on a GPU then every shape
                                             # timed over 3 runs
"""
import itertools
import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

# name: (B, H, N, M, D, causal)
SHAPES = {
    "unet 64x64 self": (2, 8, 4096, 4096, 40, False),
    "unet 64x64 cross": (2, 8, 4096, 77, 40, False),
    "unet 32x32 self": (2, 8, 1024, 1024, 80, False),
    "unet 32x32 cross": (2, 8, 1024, 77, 80, False),
    "unet 16x16 self": (2, 8, 256, 256, 160, False),
    "unet 16x16 cross": (2, 8, 256, 77, 160, False),
    "unet 8x8 self": (2, 8, 64, 64, 160, False),
    "unet 8x8 cross": (2, 8, 64, 77, 160, False),
    "vae 64x64": (1, 1, 4096, 4096, 512, False),
    "clip text causal": (2, 12, 77, 77, 64, True),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The correctness check's shapes: odd lengths (partial tiles), every head size SD uses, causal.
TINY = {"cross, D 40": (1, 2, 37, 77, 40, False), "self, D 160": (1, 1, 70, 70, 160, False),
        "vae, D 512": (1, 1, 40, 33, 512, False), "causal, D 64": (1, 2, 50, 50, 64, True)}
# Relative error allowed against SDPA in float64: float32 inputs (the interpreter, numpy's
# matmuls), or fp16/bf16 ones on a GPU (their rounding of q, k, v, p alone is ~1e-3).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def flops(B, H, N, M, D, causal):
    """q kᵀ and p v, 2 flops per multiply-add each; causal computes about half."""
    return 4 * B * H * N * M * D * (0.5 if causal else 1.0)


def time_ms(fn, warmup, runs):
    """Median milliseconds of fn() over `runs` calls, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sdpa_with(backend):
    """F.scaled_dot_product_attention restricted to one backend (it raises if unsupported)."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def rel_error(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def benchmark_gpu(dtype, warmup, runs):
    import triton
    from torch.nn.attention import SDPBackend

    from ldm.kernels.flash_attention import flash_attention

    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name} ({props.multi_processor_count} SMs), dtype: {dtype}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
    print(f"median of {runs} runs after {warmup} warm-up runs, CUDA events\n")
    kernels = {
        "ours": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
        "flash": sdpa_with(SDPBackend.FLASH_ATTENTION),
        "mem-eff": sdpa_with(SDPBackend.EFFICIENT_ATTENTION),
    }
    head = f"{'shape':18} {'B':>2} {'H':>3} {'N':>5} {'M':>5} {'D':>4}"
    head += "".join(f" {name + ' ms':>11} {'TFLOP/s':>8}" for name in kernels)
    head += f" {'ours vs fp32':>12}"
    print(head + "\n" + "-" * len(head), flush=True)
    failures = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, shape in SHAPES.items():
        B, H, N, M, D, causal = shape
        q, k, v = (torch.randn(B, H, n, D, generator=g, device="cuda", dtype=dtype)
                   for n in (N, M, M))
        row = f"{name:18} {B:2d} {H:3d} {N:5d} {M:5d} {D:4d}"
        for kernel_name, kernel in kernels.items():
            try:
                ms = time_ms(lambda: kernel(q, k, v, causal), warmup, runs)
                row += f" {ms:11.4f} {flops(*shape) / ms / 1e9:8.1f}"
            except Exception as e:  # an SDPA backend without this shape; or a kernel failing
                row += f" {'n/a':>11} {'':>8}"
                failures.append(f"{name}, {kernel_name}: {type(e).__name__}: {e}".split("\n")[0])
        try:  # our output against SDPA in float32, as a sanity check on every timed shape
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 is_causal=causal)
            row += f" {rel_error(flash_attention(q, k, v, causal=causal), ref):12.1e}"
        except Exception:
            row += f" {'n/a':>12}"
        print(row, flush=True)
    for failure in failures:
        print("n/a:", failure[:200])


def sweep_gpu(dtype, warmup, runs, only):
    """Time our kernel under each tile configuration; print the best beside the default."""
    import triton

    from ldm.kernels.flash_attention import _block_sizes, flash_attention

    print(f"device: {torch.cuda.get_device_name()}, dtype: {dtype}, torch {torch.__version__}, "
          f"triton {triton.__version__}; median of {runs} runs, CUDA events\n")
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, shape in SHAPES.items():
        if only and only not in name:
            continue
        B, H, N, M, D, causal = shape
        q, k, v = (torch.randn(B, H, n, D, generator=g, device="cuda", dtype=dtype)
                   for n in (N, M, M))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal)
        d_pad = max(16, triton.next_power_of_2(D))
        default = _block_sizes(d_pad)
        timings, skipped = {}, 0
        for blocks in tile_grid(d_pad, default):
            run = lambda: flash_attention(q, k, v, causal=causal, block_sizes=blocks)  # noqa
            try:
                if rel_error(run(), ref) > 1e-2:
                    raise AssertionError("wrong result")
                timings[blocks] = time_ms(run, warmup, runs)
            except Exception:  # out of shared memory or registers for this tile
                skipped += 1
        best = sorted(timings, key=timings.get)[:5]
        print(f"{name} (B={B}, H={H}, N={N}, M={M}, D={D}): {len(timings)} tiles timed, "
              f"{skipped} skipped")
        for blocks in [default] + [b for b in best if b != default]:
            label = "default" if blocks == default else "       "
            ms = timings.get(blocks, float("nan"))
            print(f"  {label} BLOCK_M {blocks[0]:3d} BLOCK_N {blocks[1]:3d} warps {blocks[2]} "
                  f"stages {blocks[3]}: {ms:8.4f} ms {flops(*shape) / ms / 1e9:7.1f} TFLOP/s")
        print(flush=True)


def tile_grid(d_pad, default):
    """The default tiles and a grid around them, up to twice the default's register budget."""
    grid = itertools.product((32, 64, 128, 256), (16, 32, 64, 128), (4, 8), (2, 3, 4))
    fits = [(m, n, w, st) for m, n, w, st in grid if m * d_pad <= 32768 and n * d_pad <= 16384]
    return [default] + [b for b in fits if b != default]


def sanity_check_cpu():
    """No GPU: check a few tiny shapes under the Triton interpreter, against SDPA's math."""
    print("No CUDA GPU: timings need one. Running a tiny correctness check under the Triton "
          "interpreter instead (TRITON_INTERPRET=1).\n")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported
    try:
        import triton
    except ImportError:
        sys.exit("Triton is not installed (pip install triton): nothing to check.")
    print(f"torch {torch.__version__}, triton {triton.__version__}, float32 on CPU")
    return check("cpu", torch.float32)


def check(device, dtype):
    """Our kernel on the TINY shapes in `dtype` against SDPA in float64; True if every relative
    error is within TOLERANCE."""
    from ldm.kernels.flash_attention import flash_attention

    g = torch.Generator().manual_seed(0)
    ok = True
    for name, (B, H, N, M, D, causal) in TINY.items():
        q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (N, M, M))
        out = flash_attention(*(t.to(device, dtype) for t in (q, k, v)), causal=causal)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        error = rel_error(out.cpu(), ref)
        verdict = "ok" if error <= TOLERANCE[dtype] else f"TOO LARGE (> {TOLERANCE[dtype]:.0e})"
        ok &= error <= TOLERANCE[dtype]
        print(f"{name:14} (B={B}, H={H}, N={N}, M={M}, D={D}): "
              f"relative error {error:.1e} {verdict}", flush=True)
    return ok


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=DTYPES, default="fp16")
    parser.add_argument("--warmup", type=int, default=25)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--sweep", action="store_true", help="time a grid of tile sizes")
    parser.add_argument("--only", help="with --sweep: shapes whose name contains this")
    parser.add_argument("--smoke", action="store_true", help="the correctness check, and on a "
                        "GPU 3 timed runs per shape; exit 1 on a large error (CI)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        return 0 if sanity_check_cpu() else 1
    if args.smoke:
        print(f"correctness on {torch.cuda.get_device_name()}, {args.dtype}, against float64 "
              "SDPA:")
        ok = check("cuda", DTYPES[args.dtype])
        print()
        benchmark_gpu(DTYPES[args.dtype], warmup=1, runs=3)
        return 0 if ok else 1
    if args.sweep:
        sweep_gpu(DTYPES[args.dtype], args.warmup, args.runs, args.only)
        return
    benchmark_gpu(DTYPES[args.dtype], args.warmup, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
