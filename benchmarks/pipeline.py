"""End-to-end txt2img: ldm's pipeline against diffusers' StableDiffusionPipeline, side by side.

Both load ONE full-size SD 1.5 file in the original layout (--ckpt, else random weights with the
tensors of v1-5-pruned-emaonly, written to a temporary folder): ours by `ldm.load`, diffusers'
through its own converters with a DDIMScheduler set up like the original, as in
tests/test_parity_sd15.py. Same prompt, same starting latents, batch 1 with guidance (7.5, empty
negative prompt), DDIM, default attention (SDPA in both). Each row runs in a process of its
own, so no pipeline's weights or caches count in another's memory; after one warm-up image it
reports medians over --repeats of
    s/image    a whole txt2img call, text encoder to PIL image (wall clock, CUDA-synchronised;
               min-max beside it: on a GPU, SD 1.5 at batch 2 is bound by kernel launches, so
               the host's CPU makes the figures vary from run to run)
    steps/s    steps / a call stopped before the VAE (output_type="latent"; text encoder in)
    peak GiB   CUDA: torch.cuda.max_memory_allocated; CPU: peak resident set (ru_maxrss); both
               reset once the weights are in (the loaders differ; generation is compared)
and the mean absolute pixel difference from diffusers' image, in /255: fast and wrong is worthless.

Defaults: on CUDA 512x512, 50 steps, fp16, 10 repeats, and more rows of ours with its opt-in
speed-ups: the U-Net replayed from CUDA graphs (pipe.cuda_graphs), that plus channels_last
networks and the Triton kernels (the GroupNorm reads channels_last in place), and the Triton
kernels alone (LDM_KERNELS=triton: attention, GroupNorm+SiLU, GEGLU); on CPU 256x256, 4 steps,
fp32, 3 repeats.

    python benchmarks/pipeline.py [--ckpt FILE] [--device cuda|cpu] [--dtype fp16|bf16|fp32]
                                  [--size 512] [--steps 50] [--repeats 10] [--threads N]
"""
import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

# The random checkpoint and diffusers' models built from it are the parity tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_parity_sd15 as parity  # noqa: E402
from helpers import read_manifest, write_clip_vocab_files  # noqa: E402

PROMPT = "a watercolor painting of a lighthouse at dusk"
CFG_SCALE = 7.5
SWITCHES = ("LDM_KERNELS",)  # ldm's kernel choice; unset in the default row
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULTS = {"cuda": {"size": 512, "steps": 50, "dtype": "fp16", "repeats": 10},
            "cpu": {"size": 256, "steps": 4, "dtype": "fp32", "repeats": 3}}


def write_checkpoint(path, seed=0):
    """A random SD 1.5 file as the parity tests write it: the real tensor names and shapes."""
    from ldm import schedule

    g = torch.Generator().manual_seed(seed)
    tensors = {name: parity.random_tensor(name, shape, dtype, g)
               for name, (shape, dtype) in read_manifest("sd15_emaonly").items()}
    tensors.update(schedule.checkpoint_buffers())  # the real schedule, or ldm.load warns
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77).unsqueeze(0)
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_ours(path, folder, args):
    """ldm: returns generate(latents, output_type) -> PIL images or final latents."""
    import ldm

    pipe = ldm.load(path, device=args.device, dtype=DTYPES[args.dtype])
    options = getattr(args, "options", {})
    if options.get("channels_last"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    pipe.cuda_graphs = options.get("cuda_graphs", False)
    return lambda latents, output_type: pipe.txt2img(
        PROMPT, steps=args.steps, sampler="ddim", cfg_scale=CFG_SCALE, height=args.size,
        width=args.size, latents=latents, output_type=output_type, progress=False)


def load_diffusers(path, folder, args):
    """diffusers' StableDiffusionPipeline from the same file: the same generate function."""
    scheduler = parity.diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    tokenizer = parity.transformers.CLIPTokenizer.from_pretrained(
        write_clip_vocab_files(folder), pad_token="<|endoftext|>", model_max_length=77)
    pipe = parity.diffusers.StableDiffusionPipeline(
        vae=parity.reference_vae(path), text_encoder=parity.reference_text_encoder(path),
        tokenizer=tokenizer, unet=parity.reference_unet(path), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device, DTYPES[args.dtype])
    return lambda latents, output_type: pipe(
        PROMPT, num_inference_steps=args.steps, guidance_scale=CFG_SCALE, height=args.size,
        width=args.size, latents=latents, output_type=output_type).images


def timed(fn, device):
    """(seconds, result) of fn(), the GPU's queue drained before and after."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def reset_peak_memory(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # Linux: "5" resets this process's peak RSS (VmHWM,
        Path("/proc/self/clear_refs").write_text("5")  # hence ru_maxrss) to its current RSS


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(args):
    """One pipeline in this process: load, warm up, time; print a JSON line, save the image."""
    device = torch.device(args.device)
    load = {"ours": load_ours, "diffusers": load_diffusers}[args.pipeline]
    generate = load(args.ckpt, Path(args.image).parent, args)
    reset_peak_memory(device)
    g = torch.Generator().manual_seed(0)  # the same latents in every process
    latents = torch.randn(1, 4, args.size // 8, args.size // 8, generator=g)
    latents = latents.to(device, DTYPES[args.dtype])
    generate(latents, "pil")  # warm-up: kernel choices, caches, Triton's compilation
    image_s, latent_s = [], []
    for _ in range(args.repeats):
        seconds, images = timed(lambda: generate(latents, "pil"), device)
        image_s.append(seconds)
        latent_s.append(timed(lambda: generate(latents, "latent"), device)[0])
    np.save(args.image, np.asarray(images[0]))
    print(json.dumps({"s_per_image": statistics.median(image_s),
                      "range": [min(image_s), max(image_s)],
                      "steps_per_s": args.steps / statistics.median(latent_s),
                      "peak_bytes": peak_memory(device)}))


def run_row(pipeline, switches, options, image, args):
    """Runs `worker` in a fresh process, with ldm's kernel `switches` and no others set, and the
    pipeline `options` (cuda_graphs, channels_last)."""
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES} | switches
    job = dict(vars(args), ckpt=str(args.ckpt), pipeline=pipeline, image=str(image),
               options=options)
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:  # one failing row (a kernel, say) should not hide the others
        print(f"{pipeline} {switches} failed:\n{done.stderr[-3000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def ldm_version():
    """ldm's version and the git commit it ran at, "+" marking uncommitted changes."""
    git = ["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty=+"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    return f"{version('ldm')} ({commit or 'no git'})"


def device_name(args):
    if torch.device(args.device).type == "cuda":
        return torch.cuda.get_device_name(args.device)
    cpu = platform.processor()
    with contextlib.suppress(OSError):  # Linux names the model here; platform often does not
        cpu = re.search(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text()).group(1)
    return f"CPU, {cpu}, {torch.get_num_threads()} threads"


def print_header(args, ckpt):
    print(f"txt2img end to end, ldm vs diffusers — {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"device: {device_name(args)}")
    print(f"{args.dtype}, {args.size}x{args.size}, {args.steps} DDIM steps, batch 1, "
          f"cfg {CFG_SCALE}; median of {args.repeats} after 1 warm-up image")
    print(f"torch {torch.__version__}, diffusers {version('diffusers')}, transformers "
          f"{version('transformers')}, triton {version('triton')}, ldm {ldm_version()}")
    print(f"checkpoint: {ckpt}\n", flush=True)


def print_table(results, images):
    head = (f"{'pipeline':26} {'s/image':>8} {'(min-max)':>12} {'steps/s':>8} {'peak GiB':>9} "
            f"{'time vs diffusers':>18} {'|pixel diff| /255':>18}")
    print(head + "\n" + "-" * len(head))
    if results["diffusers"] is None:
        return
    base = results["diffusers"]["s_per_image"]
    reference = np.load(images["diffusers"]).astype(np.float64)
    for label, r in results.items():
        if r is None:
            print(f"{label:26} {'failed':>8}")
            continue
        difference = np.abs(np.load(images[label]).astype(np.float64) - reference).mean()
        spread = "{:.2f}-{:.2f}".format(*r["range"])
        print(f"{label:26} {r['s_per_image']:8.3f} {spread:>12} {r['steps_per_s']:8.2f} "
              f"{r['peak_bytes'] / 2**30:9.2f} {r['s_per_image'] / base:18.2f} "
              f"{difference:18.4f}")


def main(args):
    rows = [("diffusers", "diffusers", {}, {}), ("ours", "ours", {}, {})]
    if torch.device(args.device).type == "cuda":  # the speed-ups, opt-in for now
        graphs, everything = {"cuda_graphs": True}, {"cuda_graphs": True, "channels_last": True}
        rows += [("ours, graphs", "ours", {}, graphs),
                 ("ours, graphs+NHWC+triton", "ours", {"LDM_KERNELS": "triton"}, everything),
                 ("ours, kernels=triton", "ours", {"LDM_KERNELS": "triton"}, {})]
    with tempfile.TemporaryDirectory() as folder:
        print_header(args, args.ckpt or "random SD 1.5, written to a temporary file")
        if args.ckpt is None:
            args.ckpt = Path(folder) / "sd15-random.safetensors"
            write_checkpoint(args.ckpt)
        results, images = {}, {}
        for label, pipeline, switches, options in rows:
            images[label] = Path(folder) / f"{label.replace(', ', '-')}.npy"
            results[label] = run_row(pipeline, switches, options, images[label], args)
        print_table(results, images)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, help="an SD 1.5 file; default: a random one")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--size", type=int, help="image height and width")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int, help="timed images (and latent-only runs)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a row's settings, as JSON
    args = parser.parse_args()
    if args.worker:
        args = argparse.Namespace(**json.loads(args.worker))
    for name, value in DEFAULTS[torch.device(args.device).type].items():
        setattr(args, name, getattr(args, name) or value)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if hasattr(arguments, "pipeline"):  # a worker, started by run_row
        worker(arguments)
    else:
        main(arguments)
