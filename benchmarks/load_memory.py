"""Peak memory and time of `ldm.load` on a full-size checkpoint (random weights).

    python benchmarks/load_memory.py [--ckpt FILE | --manifest sdxl_base] [--mmap]
    python benchmarks/load_memory.py --smoke   # CI, seconds: the shipped 11 MB model (float16)
                                               # cast to float32, and mapped in float16; exit 1
                                               # if a figure is absurd

Without --ckpt, writes a random checkpoint with the exact tensor set of a release (a manifest of
tests/data/manifests: sd15_emaonly, the default, or sdxl_base, sdxl_refiner, …; their dtypes
kept: SDXL's files are float16) to a temporary folder first. Each load runs in a fresh process, and
its peak anonymous memory (what it allocated) and peak resident memory (which also counts the
file's mapped pages) are compared with the size of the weights.
"""
import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "tests/data/manifests"
SHIPPED = ROOT / "weights/tiny-shapes.safetensors"
DTYPES = {"F32": torch.float32, "F16": torch.float16, "I64": torch.int64, "I32": torch.int32}

MEASURE = """
import json, resource, sys, threading, time, torch, ldm

# Peak RSS counts the file's pages that the mmap touched, which the OS can drop at will; the
# memory loading really needs is the anonymous part (RssAnon), sampled while it runs.
peak_anon, done = [0], threading.Event()
def sample():
    while not done.is_set():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
pipe = ldm.load(sys.argv[1], dtype=getattr(torch, sys.argv[2]), mmap=sys.argv[3] == "mmap")
seconds = time.perf_counter() - start
done.set()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(t.numel() * t.element_size() for t in pipe.state_dict().values())
print(json.dumps({"seconds": seconds, "peak_rss": peak, "peak_anon": peak_anon[0],
                  "weights": weights}))
"""


def write_random_checkpoint(path, manifest):
    tensors = {}
    for line in (MANIFESTS / f"{manifest}.tsv").read_text().splitlines():
        name, shape, dtype = line.split("\t")
        shape = tuple(int(n) for n in shape.split(",")) if shape else ()
        tensors[name] = (torch.randn(shape) * 0.02).to(DTYPES[dtype])
    save_file(tensors, str(path))


def measure(path, dtype, mmap):
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path), dtype,
                           "mmap" if mmap else "copy"], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"ldm.load({path.name}, dtype={dtype}, mmap={mmap}) failed:\n"
                 f"{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def float_numel(path):
    """The number of floating-point values in a .safetensors file, from its header alone."""
    import math

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys()
                   if f.get_slice(name).get_dtype() in ("F64", "F32", "F16", "BF16"))


def absurd(r, numel, dtype):
    """Why a row's figures cannot be right (for --smoke), or None: the weights must be the
    file's float values in `dtype` (within 10%: the schedule's buffers are no weights), the
    peaks positive and the anonymous one at most the resident one."""
    if not 0 < r["peak_anon"] <= r["peak_rss"]:
        return f"peaks anon {r['peak_anon']}, RSS {r['peak_rss']}"
    expected = numel * getattr(torch, dtype).itemsize
    if not 0.9 * expected <= r["weights"] <= 1.1 * expected:
        return f"weights {r['weights']} bytes, {expected} expected"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path)
    parser.add_argument("--manifest", default="sd15_emaonly",
                        help="the release whose tensor set the random file has")
    parser.add_argument("--mmap", action="store_true", help="ldm.load(..., mmap=True)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16"])
    parser.add_argument("--smoke", action="store_true", help="the shipped model, copied and "
                        "mapped (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.ckpt = SHIPPED
    failures = []
    with tempfile.TemporaryDirectory() as folder:
        path = args.ckpt
        if path is None:
            path = Path(folder) / f"{args.manifest}-random.safetensors"
            write_random_checkpoint(path, args.manifest)
        size = path.stat().st_size
        print(f"machine: {platform.processor() or platform.machine()}, python "
              f"{platform.python_version()}, torch {torch.__version__}")
        print(f"checkpoint: {path.name}, {size / 2**30:.2f} GiB")
        print(f"{'dtype':<9} {'mmap':<5} {'load s':>7} {'weights GiB':>12} "
              f"{'peak anon GiB':>14} {'peak RSS GiB':>13}")
        rows = [(dtype, args.mmap) for dtype in args.dtypes]
        if args.smoke:  # a cast (a copy of every tensor), and the weights left in the file
            rows = [("float32", False), ("float16", True)]
        for dtype, mmap in rows:
            r = measure(path, dtype, mmap)
            print(f"{dtype:<9} {str(mmap):<5} {r['seconds']:>7.2f} {r['weights'] / 2**30:>12.4f} "
                  f"{r['peak_anon'] / 2**30:>14.2f} {r['peak_rss'] / 2**30:>13.2f}", flush=True)
            wrong = absurd(r, float_numel(path), dtype) if args.smoke else None
            if wrong:
                failures.append(f"{dtype}, mmap={mmap}: {wrong}")
        print("peak anon: memory the load allocated (the weights it copied or cast) and the "
              "process's own (Python, torch); peak RSS adds the checkpoint's pages mapped from "
              "disk, which the OS can drop")
    for failure in failures:
        print(f"smoke: absurd figures for {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
