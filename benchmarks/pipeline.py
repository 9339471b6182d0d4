"""End-to-end txt2img: ldm's pipeline against diffusers' StableDiffusionPipeline, side by side.

Both load ONE full-size SD 1.5 file in the original layout (--ckpt, else random weights with the
tensors of v1-5-pruned-emaonly, written to a temporary folder): ours by `ldm.load`, diffusers'
through its own converters (the file's tensors, read with safetensors) with a DDIMScheduler set
up like the original, as in tests/test_parity_sd15.py. Same prompt, same starting latents,
batch 1 with guidance (7.5, empty negative prompt), DDIM, default attention (SDPA in both).
Each row runs in a process of its own, so no pipeline's weights or caches count in another's
memory; after one warm-up image it reports medians over --repeats of
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

--preset tiny runs the same code on ldm's tiny preset (random weights; diffusers' networks set
up from the preset's shapes). --smoke is that on the CPU at 32x32, 2 steps, 1 repeat, fp32: it
takes seconds, and exits 1 if a row fails or ldm's image is more than SMOKE_TOLERANCE from
diffusers' (CI: the benchmark must not rot). Any run exits 1 if a row fails.

    python benchmarks/pipeline.py [--ckpt FILE] [--device cuda|cpu] [--dtype fp16|bf16|fp32]
                                  [--size 512] [--steps 50] [--repeats 10] [--threads N]
                                  [--preset sd15|tiny] [--smoke]
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
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.config import PRESETS

# The random checkpoint and diffusers' models built from it are the parity tests' own.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import random_tensor, randomize_, read_manifest, write_clip_vocab_files  # noqa: E402

PROMPT = "a watercolor painting of a lighthouse at dusk"
CFG_SCALE = 7.5
SWITCHES = ("LDM_KERNELS",)  # ldm's kernel choice; unset in the default row
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULTS = {"cuda": {"size": 512, "steps": 50, "dtype": "fp16", "repeats": 10},
            "cpu": {"size": 256, "steps": 4, "dtype": "fp32", "repeats": 3}}
# --smoke: the same code on the tiny preset, in seconds on the CPU (a given --device wins).
SMOKE = {"preset": "tiny", "size": 32, "steps": 2, "repeats": 1, "dtype": "fp32"}
# The most a row's image may differ from diffusers' under --smoke: mean |Δ| of the 8-bit pixels,
# in /255 (the parity tests' bound for SD 1.5 in float32), per dtype.
SMOKE_TOLERANCE = {"fp32": 1.0, "fp16": 3.0, "bf16": 6.0}


def write_checkpoint(path, preset, seed=0):
    """A random file of `preset` in the original layout. SD 1.5: as the parity tests write it,
    the release's tensor names and shapes; tiny: ldm's tiny preset, every weight random."""
    import ldm
    from ldm import schedule
    from ldm.pipeline import StableDiffusion

    if preset == "tiny":
        ldm.save(randomize_(StableDiffusion(PRESETS["tiny"]), seed), path)
        return
    g = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(name, shape, dtype, g)
               for name, (shape, dtype) in read_manifest("sd15_emaonly").items()}
    tensors.update(schedule.checkpoint_buffers())  # the real schedule, or ldm.load warns
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = \
        torch.arange(77).unsqueeze(0)
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_ours(path, folder, args):
    """ldm: returns generate(latents, output_type) -> PIL images or final latents."""
    import ldm

    pipe = ldm.load(path, device=args.device, dtype=DTYPES[args.dtype], config=args.preset)
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
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # "modules … kept in float32: []" on .to()
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        write_clip_vocab_files(folder), pad_token="<|endoftext|>", model_max_length=77)
    vae, text_encoder, unet = reference_networks(path, args.preset)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device, DTYPES[args.dtype])
    return lambda latents, output_type: pipe(
        PROMPT, num_inference_steps=args.steps, guidance_scale=CFG_SCALE, height=args.size,
        width=args.size, latents=latents, output_type=output_type).images


def read_tensors(path, prefix):
    """{name: tensor} of the file's tensors whose names start with `prefix`: one network's
    share, so that no more than one network's weights are ever held twice (.safetensors; a
    .ckpt is mapped, its tensors read as they are used)."""
    if Path(path).suffix != ".safetensors":
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("state_dict", state)
        return {name: t for name, t in state.items() if name.startswith(prefix)}
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys() if name.startswith(prefix)}


def reference_networks(path, preset):
    """(AutoencoderKL, CLIPTextModel, UNet2DConditionModel) holding the original-layout file's
    tensors, renamed by diffusers' own converters. SD 1.5: the parity tests' networks, set up
    from the release's configs; tiny: set up from ldm's preset by the tests' translations."""
    import test_parity_sd15 as parity

    if preset == "sd15":
        return (parity.reference_vae(read_tensors(path, "first_stage_model.")),
                parity.reference_text_encoder(read_tensors(path, "cond_stage_model.")),
                parity.reference_unet(read_tensors(path, "model.diffusion_model.")))
    import diffusers
    import transformers
    from diffusers.loaders import single_file_utils as convert
    from test_unet import diffusers_config

    config = PRESETS[preset]
    unet_config = diffusers_config(config.unet)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert.convert_ldm_unet_checkpoint(
        read_tensors(path, "model.diffusion_model."), unet_config), strict=True)
    v = config.vae
    vae_config = dict(in_channels=v.in_channels, out_channels=v.out_channels,
                      down_block_types=("DownEncoderBlock2D",) * len(v.ch_mult),
                      up_block_types=("UpDecoderBlock2D",) * len(v.ch_mult),
                      block_out_channels=tuple(v.level_channels),
                      layers_per_block=v.num_res_blocks, latent_channels=v.z_channels,
                      norm_num_groups=v.norm_groups, scaling_factor=config.scale_factor)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(convert.convert_ldm_vae_checkpoint(
        read_tensors(path, "first_stage_model."), vae_config), strict=True)
    t = config.text
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=t.vocab_size, max_position_embeddings=t.max_positions, hidden_size=t.width,
        intermediate_size=t.mlp_width, num_hidden_layers=t.layers, num_attention_heads=t.heads,
        hidden_act="quick_gelu", layer_norm_eps=t.eps, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407))
    weights = convert.convert_ldm_clip_checkpoint(read_tensors(path, "cond_stage_model."))
    if not hasattr(text_encoder, "text_model"):  # transformers 5 dropped the `text_model.` level
        weights = {name.removeprefix("text_model."): w for name, w in weights.items()}
    weights = {name: w for name, w in weights.items() if not name.endswith("position_ids")}
    text_encoder.load_state_dict(weights, strict=True)
    return vae.eval(), text_encoder.eval(), unet.eval()


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
    config = PRESETS[args.preset]
    side = args.size // config.vae.downsampling_factor
    g = torch.Generator().manual_seed(0)  # the same latents in every process
    latents = torch.randn(1, config.unet.in_channels, side, side, generator=g)
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
    print(f"{args.preset}, {args.dtype}, {args.size}x{args.size}, {args.steps} DDIM steps, "
          f"batch 1, cfg {CFG_SCALE}; median of {args.repeats} after 1 warm-up image")
    print(f"torch {torch.__version__}, diffusers {version('diffusers')}, transformers "
          f"{version('transformers')}, triton {version('triton')}, ldm {ldm_version()}")
    print(f"checkpoint: {ckpt}\n", flush=True)


def print_table(results, images):
    """The rows beside diffusers'; returns {label: mean |pixel difference| from diffusers'}."""
    head = (f"{'pipeline':26} {'s/image':>8} {'(min-max)':>12} {'steps/s':>8} {'peak GiB':>9} "
            f"{'time vs diffusers':>18} {'|pixel diff| /255':>18}")
    print(head + "\n" + "-" * len(head))
    base = results["diffusers"] and results["diffusers"]["s_per_image"]
    reference = base and np.load(images["diffusers"]).astype(np.float64)
    differences = {}
    for label, r in results.items():
        if r is None:
            print(f"{label:26} {'failed':>8}")
            continue
        spread = "{:.2f}-{:.2f}".format(*r["range"])
        row = (f"{label:26} {r['s_per_image']:8.3f} {spread:>12} {r['steps_per_s']:8.2f} "
               f"{r['peak_bytes'] / 2**30:9.2f}")
        if base:
            differences[label] = np.abs(np.load(images[label]).astype(np.float64)
                                        - reference).mean()
            row += f" {r['s_per_image'] / base:18.2f} {differences[label]:18.4f}"
        print(row)
    return differences


def verdict(results, differences, args):
    """The exit status: 1 if a row failed, or (--smoke) if a row's image is further than
    SMOKE_TOLERANCE from diffusers'."""
    failed = [label for label, r in results.items() if r is None]
    if failed:
        print(f"FAILED rows: {', '.join(failed)}")
        return 1
    if not args.smoke:
        return 0
    tolerance = SMOKE_TOLERANCE[args.dtype]
    far = {label: d for label, d in differences.items() if d > tolerance}
    for label, d in far.items():
        print(f"smoke: {label} differs from diffusers by {d:.3f}/255 on average "
              f"(allowed {tolerance})")
    if not far:
        print(f"smoke: every row ran; each within {tolerance}/255 of diffusers")
    return 1 if far else 0


def main(args):
    rows = [("diffusers", "diffusers", {}, {}), ("ours", "ours", {}, {})]
    if torch.device(args.device).type == "cuda":  # the speed-ups, opt-in for now
        graphs, everything = {"cuda_graphs": True}, {"cuda_graphs": True, "channels_last": True}
        rows += [("ours, graphs", "ours", {}, graphs),
                 ("ours, graphs+NHWC+triton", "ours", {"LDM_KERNELS": "triton"}, everything),
                 ("ours, kernels=triton", "ours", {"LDM_KERNELS": "triton"}, {})]
    with tempfile.TemporaryDirectory() as folder:
        print_header(args, args.ckpt or f"random {args.preset}, written to a temporary file")
        if args.ckpt is None:
            args.ckpt = Path(folder) / f"{args.preset}-random.safetensors"
            write_checkpoint(args.ckpt, args.preset)
        results, images = {}, {}
        for label, pipeline, switches, options in rows:
            images[label] = Path(folder) / f"{label.replace(', ', '-')}.npy"
            results[label] = run_row(pipeline, switches, options, images[label], args)
        return verdict(results, print_table(results, images), args)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", type=Path, help="an SD 1.5 file; default: a random one")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--size", type=int, help="image height and width")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--repeats", type=int, help="timed images (and latent-only runs)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads; default: torch's")
    parser.add_argument("--preset", default="sd15", choices=("sd15", "tiny"),
                        help="the model (random weights unless --ckpt)")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, 32x32, 2 steps, "
                        "1 repeat, on the CPU; exit 1 if ldm and diffusers disagree (CI)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a row's settings, as JSON
    args = parser.parse_args()
    if args.worker:
        args = argparse.Namespace(**json.loads(args.worker))
    elif args.smoke:
        if "--device" not in sys.argv:
            args.device = "cpu"
        vars(args).update(SMOKE)
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
        sys.exit(main(arguments))
