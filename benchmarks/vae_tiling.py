"""Tiled VAE decode (ldm.vae_tiling) against the untiled decode: difference, peak memory, time.

    python benchmarks/vae_tiling.py                       # 1024² and 1536², 512-px tiles
    python benchmarks/vae_tiling.py --sizes 1024 --vaes sd15-random
    python benchmarks/vae_tiling.py --big 4096 --budget-gib 4   # one 4096² decode in 4 GiB
    python benchmarks/vae_tiling.py --attention           # strided vs contiguous q/k/v in SDPA
    python benchmarks/vae_tiling.py --smoke               # tiny sizes, seconds (CI)

VAEs: "sd15-random" is SD 1.5's autoencoder (83.7 M parameters) with PyTorch's default random
initialisation, seed 0; "shipped" is the trained KL-f4 autoencoder of weights/tiny-shapes.
Latents: for the shipped VAE, the encoding of a mosaic of shapes-world pictures (64² each, so
the image holds many colours); for the random VAE, a smooth random field plus per-region
offsets plus white noise, so that the statistics differ across the image.

Rows, each decoding the same latent in a fresh process:
    untiled     vae.decode(z)
    exact       decode_tiled(..., exact=True): the whole image's GroupNorm statistics
    sampled     decode_tiled(..., exact=False, sample=1): a sample's statistics
    per-tile    each tile (with the same halo) decoded on its own by vae.decode and pasted:
                per-tile GroupNorm statistics and attention, as naive tiling does
    diffusers   diffusers' AutoencoderKL.enable_tiling() on the same weights (its default
                tiles for SD: 64² latents, overlap 25 %, blended), SD's VAE only
Difference: mean and max |tiled − untiled| over all pixels and channels, in 1/255 of the
image range ([-1, 1] is 255 steps). Memory: peak resident set size of the process during the
decode minus the resident size just before it (VmHWM after resetting it through
/proc/self/clear_refs), so the weights and the latent are not counted; MiB.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

ROW = r"""
import json, math, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, sys.argv[2])
from ldm.models.vae import AutoencoderKL, VAEConfig, VAE_TINY
from ldm import vae_tiling

args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])


def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


def shapes_mosaic(side):
    from ldm.data.shapes import training_batch
    n = side // 64
    images = training_batch(n * n, torch.Generator().manual_seed(0)).images
    return images.view(n, n, 3, 64, 64).permute(2, 0, 3, 1, 4).reshape(1, 3, side, side)


def structured_latent(side, channels):
    g = torch.Generator().manual_seed(1)
    smooth = F.interpolate(torch.randn(1, channels, 6, 6, generator=g), size=(side, side),
                           mode="bicubic", align_corners=False)
    regions = F.interpolate(torch.randn(1, channels, 4, 4, generator=g), size=(side, side),
                            mode="nearest")
    return smooth + regions + 0.5 * torch.randn(1, channels, side, side, generator=g)


def build(name, size):
    if name == "shipped":
        import ldm
        vae = ldm.load(config="tiny-shapes", dtype=torch.float32).vae.eval()  # as printed
        with torch.no_grad():
            z = vae.encode(shapes_mosaic(size)).mean
    else:
        config = {"sd15-random": VAEConfig(), "tiny-random": VAE_TINY}[name]
        torch.manual_seed(0)
        vae = AutoencoderKL(config).eval()
        f = config.downsampling_factor
        z = structured_latent(size // f, config.z_channels)
    return vae, z


def per_tile(vae, z, tile_size):
    f = vae.config.downsampling_factor
    grid = vae_tiling.Grid(tile_size // f, vae_tiling.decoder_halo(vae.config) // f, 1, f)
    out = z.new_empty(z.shape[0], 3, z.shape[2] * f, z.shape[3] * f)
    for rows in vae_tiling._spans(z.shape[2], grid):
        for cols in vae_tiling._spans(z.shape[3], grid):
            t = vae_tiling.Window(rows, cols)
            out[..., rows.start * f:rows.stop * f, cols.start * f:cols.stop * f] = \
                t.core_of(vae.decode(t.crop(z, 1)))
    return out


def diffusers_tiled(vae, z):
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    c = vae.config
    levels = len(c.ch_mult)
    kwargs = dict(in_channels=c.in_channels, out_channels=c.out_channels,
                  down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels,
                  block_out_channels=tuple(c.level_channels), layers_per_block=c.num_res_blocks,
                  latent_channels=c.z_channels, norm_num_groups=c.norm_groups, sample_size=512)
    state = {"first_stage_model." + k: v for k, v in vae.state_dict().items()}
    twin = diffusers.AutoencoderKL(**kwargs).eval()
    twin.load_state_dict(convert_ldm_vae_checkpoint(state, kwargs), strict=True)
    del vae
    twin.enable_tiling()
    return lambda: twin.decode(z).sample


vae, z = build(args["vae"], args["size"])
method, tile = args["method"], args["tile"]
runs = {
    "untiled": lambda: vae.decode(z),
    "exact": lambda: vae_tiling.decode_tiled(vae, z, tile, exact=True),
    "sampled": lambda: vae_tiling.decode_tiled(vae, z, tile, exact=False, sample=args["sample"]),
    "per-tile": lambda: per_tile(vae, z, tile),
    "auto": lambda: vae_tiling.decode_tiled(vae, z, **plan),
}
if method == "diffusers":
    runs["diffusers"] = diffusers_tiled(vae, z)
    vae = None
if method == "auto":  # what fits in the budget, the process's resident memory counted
    available = int(args["budget_gib"] * 2**30) - rss("VmRSS")
    plan = vae_tiling.auto_tiling(vae.config, z.shape[2] * vae.config.downsampling_factor,
                                  z.shape[3] * vae.config.downsampling_factor, z.dtype, available)
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS
before = rss("VmRSS")
start = time.perf_counter()
with torch.no_grad():
    image = runs[method]()
seconds = time.perf_counter() - start
peak = rss("VmHWM")
if args["out"]:
    torch.save(image.float(), args["out"])
print(json.dumps({"seconds": seconds, "peak_above": peak - before, "peak_total": peak,
                  "latent": list(z.shape), "plan": plan if method == "auto" else None}))
"""


def run_row(**args):
    out = subprocess.run([sys.executable, "-c", ROW, json.dumps(args), str(ROOT)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"row {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                  if line.startswith("flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"CPU: {model}, {os.cpu_count()} cores, flags {' '.join(wanted)}; python "
            f"{platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; dtype float32")


def compare(vaes, sizes, tile, methods, threads, sample):
    for vae in vaes:
        for size in sizes:
            with tempfile.TemporaryDirectory() as folder:
                rows = {}
                for method in methods:
                    if method == "diffusers" and vae != "sd15-random":
                        continue
                    path = f"{folder}/{method}.pt"
                    rows[method] = run_row(vae=vae, size=size, tile=tile, method=method,
                                           threads=threads, sample=sample, out=path)
                    rows[method]["path"] = path
                    print(f"  … {vae} {size}² {method}: {rows[method]['seconds']:.1f} s",
                          file=sys.stderr, flush=True)
                ref = torch.load(rows["untiled"]["path"], weights_only=True)
                latent = rows["untiled"]["latent"]
                print(f"\n{vae}, {size}×{size} image, latent {latent}, tiles of {tile} px")
                print(f"{'method':<10} {'time s':>8} {'peak MiB':>9} {'mean |Δ| /255':>14} "
                      f"{'max |Δ| /255':>13}")
                for method, r in rows.items():
                    image = torch.load(r["path"], weights_only=True)
                    delta = (image - ref).abs() * 127.5
                    print(f"{method:<10} {r['seconds']:>8.1f} {r['peak_above'] / 2**20:>9.0f} "
                          f"{delta.mean().item():>14.4f} {delta.max().item():>13.4f}")


def big(size, budget_gib, threads):
    r = run_row(vae="sd15-random", size=size, tile=None, method="auto", threads=threads,
                sample=1.0, out=None, budget_gib=budget_gib)
    print(f"\nsd15-random, {size}×{size} image (latent {r['latent']}), budget {budget_gib} GiB "
          f"for the whole process: auto_tiling chose {r['plan']}")
    print(f"time {r['seconds']:.0f} s, peak RSS of the process {r['peak_total'] / 2**30:.2f} GiB "
          f"(of which {r['peak_above'] / 2**30:.2f} GiB during the decode)")


ATTENTION = r"""
import json, sys, time, torch
import torch.nn.functional as F
n, c, layout = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(int(sys.argv[4]))
side = int(n ** 0.5)
x = torch.randn(1, c, side, side)
# As AttnBlock made them before: (B, C, h, w) -> (B, 1, N, C) views, channel-strided.
q, k, v = (x.flatten(2).transpose(1, 2)[:, None] for _ in range(3))
if layout == "contiguous":
    q, k, v = (t.contiguous() for t in (q, k, v))
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
before, start = rss("VmRSS"), time.perf_counter()
F.scaled_dot_product_attention(q, k, v)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_above": rss("VmHWM") - before}))
"""


def attention(sizes, threads):
    print(f"\nVAE mid-block attention, scaled_dot_product_attention on the CPU, B=1, C=512")
    print(f"{'N':>7} {'q/k/v':<12} {'time s':>7} {'peak MiB':>9}")
    for n in sizes:
        for layout in ("strided", "contiguous"):
            out = subprocess.run([sys.executable, "-c", ATTENTION, str(n), "512", layout,
                                  str(threads)], check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n:>7} {layout:<12} {r['seconds']:>7.2f} {r['peak_above'] / 2**20:>9.0f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    parser.add_argument("--vaes", nargs="+", default=["sd15-random", "shipped"])
    parser.add_argument("--sizes", nargs="*", type=int, default=[1024, 1536],
                        help="image sides; none (just --sizes) for only --big")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--methods", nargs="+",
                        default=["untiled", "exact", "sampled", "per-tile", "diffusers"])
    parser.add_argument("--sample", type=float, default=1.0, help="decode_tiled's `sample`")
    parser.add_argument("--big", type=int, help="also decode one BIG² image with auto_tiling")
    parser.add_argument("--budget-gib", type=float, default=4.0, help="for --big")
    parser.add_argument("--attention", action="store_true", help="only the SDPA layout rows")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    print(machine())
    if args.smoke:
        compare(["tiny-random", "shipped"], [128], 64, ["untiled", "exact", "sampled",
                                                         "per-tile"], args.threads, 1.0)
        attention([256], args.threads)
        return
    if args.attention:
        attention([4096, 9216], args.threads)
        return
    if args.sizes:
        compare(args.vaes, args.sizes, args.tile, args.methods, args.threads, args.sample)
    if args.big:
        big(args.big, args.budget_gib, args.threads)


if __name__ == "__main__":
    main()
