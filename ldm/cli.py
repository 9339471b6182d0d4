"""The command line: `python -m ldm txt2img "a red circle" --out out.png` (also img2img, inpaint).

With no --ckpt, the small model shipped in weights/ is used. Each PNG carries its generation
parameters (its own seed among them) as PNG text.

Output files: the images of a run take the names of one series, out.png, out-1.png,
out-2.png, … Without --overwrite an existing file is never replaced: each image takes the next
free name of the series, so a second run continues it. With --overwrite the N images of a run
replace exactly the first N names (out.png … out-{N-1}.png). Each file is complete or absent
(`ldm/outputs.py` writes them).

Seeds: image i of a run is made with seed + i, which its PNG records. A seed is kept exactly as
given, never reduced: seed + i must be in [0, 2**64), the range of torch's generator seeds.

Failures (`run`, what `python -m ldm` calls) are one line on stderr and an exit code:
    2    the command line cannot work (argparse's convention): a value out of range, a file that
         does not exist or cannot be opened (--ckpt, --image, --mask), an --out that cannot be
         written, a --device that is not there. All are checked before the model loads.
    1    the run failed: a checkpoint or image whose content is unusable (corrupt, refused,
         misshapen, too many pixels), a write that failed (disk full), out of memory.
    130  interrupted (Ctrl-C).
--debug shows the traceback instead. `main` is the same command for callers in Python: it
raises instead of reporting.
"""
import argparse
import math
import os
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image

from ldm import arguments
from ldm import schedule as noise_schedule
from ldm.checkpoint import CheckpointError, sha256_file
from ldm.config import PRESETS
from ldm.hires import DEFAULT_STRENGTH, UPSCALERS
from ldm.loader import DEFAULT_CHECKPOINT, load
from ldm.lora import LORA_TAG, find_lora, prompt_loras
from ldm.outputs import (_TEMPORARY, _host, _temporary, remove_stale_temporaries,  # noqa: F401
                         save_images, series_name, write_png)
from ldm.parameters import format_parameters, parse_parameters
from ldm.rng import RNGS
from ldm.samplers import SAMPLERS, SCHEDULES, resolve, timesteps
from ldm.samplers.registry import sampler_names

COMMANDS = {
    "txt2img": "generate images from a text prompt",
    "img2img": "re-imagine an input image following a text prompt",
    "inpaint": "repaint the white part of a mask in an image following a text prompt",
}
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
SEED_END = 2**64  # torch.Generator.manual_seed takes seeds in [0, 2**64)
SIZE_MULTIPLE = 8  # the SD VAEs downsample by 8; the pipeline checks its own model's factor too


class UsageError(ValueError):
    """A command line that cannot work, found before anything is loaded (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with each error on one line (argparse's own adds the usage text above it)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser():
    parser = _Parser(
        prog="python -m ldm", description="Generate images with latent diffusion. Without "
        "--ckpt, the small model shipped with ldm (64x64 shapes) is used.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text.capitalize() + ".")
        sub.add_argument("prompt", nargs="?", help='what to draw, e.g. "a red circle in the top '
                         'left" (may be left out with --from-png)')
        if name != "txt2img":
            sub.add_argument("--image", required=True, type=Path, help="the input image file")
        if name == "inpaint":
            sub.add_argument("--mask", required=True, type=Path,
                             help="mask image of the same size: white = repaint, black = keep")
        if name == "img2img":
            sub.add_argument("--strength", type=float,
                             help="how much to change the image, in (0, 1] (default 0.75)")
        if name == "txt2img":
            sub.add_argument("--height", type=int, help="image height, a multiple of 8 "
                             "(default: the model's native size)")
            sub.add_argument("--width", type=int, help="image width, a multiple of 8")
            sub.add_argument("--refiner", type=Path, help="an SDXL refiner checkpoint "
                             "(sd_xl_refiner_1.0.safetensors) that takes over the last steps")
            sub.add_argument("--refiner-start", type=float, help="the share of "
                             "the steps the base model runs before the refiner (default 0.8)")
            _add_hires(sub)
        _add_common(sub)
    from ldm import generate  # here, not at the top: ldm.generate imports this module
    generate.add_arguments(commands.add_parser(
        "generate", help="generate images for every prompt of a file (torchrun: in parallel)",
        description=generate.DESCRIPTION))
    return parser


def _add_hires(sub):
    sub.add_argument("--hires-scale", type=float, help="A1111's hires fix: draw at the native "
                     "size (--height, --width), upscale by this factor (> 1), then denoise again "
                     "at that size as img2img")
    sub.add_argument("--hires-strength", type=float, help="denoising strength of the hires "
                     f"pass, in (0, 1] (default {DEFAULT_STRENGTH})")
    sub.add_argument("--hires-steps", type=int, help="steps the hires pass runs (default: "
                     "--steps), of a schedule of steps / strength as A1111's")
    sub.add_argument("--hires-upscaler", choices=UPSCALERS, help="latent (default: the "
                     "latents interpolated, A1111's \"Latent\"), A1111's other latent modes, or "
                     "pixel (decode, Lanczos, encode)")


def _add_common(sub):
    sub.add_argument("--negative-prompt", help="what to steer away from")
    sub.add_argument("--ckpt", type=Path, help="a .safetensors or .ckpt Stable Diffusion 1.x, "
                     f"2.x or SDXL checkpoint (default: {DEFAULT_CHECKPOINT.name}, shipped "
                     "with ldm)")
    sub.add_argument("--prompt-syntax", choices=("a1111", "plain"),
                     help="a1111 (default): (word:1.2), [word], BREAK as AUTOMATIC1111 reads "
                     "them; plain: the prompt literally")
    sub.add_argument("--emphasis", choices=("original", "no_norm", "comfy"),
                     help="how prompt weights apply: A1111's original (default), no_norm, or "
                     "ComfyUI's")
    sub.add_argument("--pad-conds", action=argparse.BooleanOptionalAction, help="pad a prompt "
                     "and negative prompt of different 75-token chunk counts to the same count "
                     "(default; A1111's 'Pad conds'), or --no-pad-conds: A1111's default, "
                     "guidance in two U-Net calls")
    sub.add_argument("--clip-skip", type=int, help="A1111's CLIP skip (SD 1.x): 2 takes the "
                     "text encoder's penultimate layer")
    sub.add_argument("--lora", type=_lora_argument, action="append", default=[],
                     metavar="FILE[:MULT]", help="a LoRA (kohya/A1111, diffusers, LyCORIS) merged "
                     "with multiplier MULT (default 1); repeat for more")
    sub.add_argument("--embedding", type=Path, action="append", default=[], metavar="FILE",
                     help="a textual-inversion embedding (.pt, .safetensors, .bin), its file "
                     "name the trigger word; repeat for more")
    sub.add_argument("--config", choices=PRESETS, help="the model preset, instead of telling it "
                     "from the file (e.g. sd21-base for an SD 2 512 ε-model whose file name "
                     "does not say 512 or base)")
    sub.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    sub.add_argument("--sampler", choices=sampler_names(), metavar="SAMPLER",
                     help="default: the model's; one of " + ", ".join(
                         f"{name} ({entry.a1111})" for name, entry in SAMPLERS.items())
                     + "; a σ sampler's name + _karras also picks Karras steps")
    sub.add_argument("--schedule", choices=SCHEDULES, help="the timesteps the sampler visits "
                     "(default: the sampler's own; the σ samplers take any: "
                     + ", ".join(SCHEDULES) + ")")
    sub.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale; 1 = none")
    sub.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                     help="guidance only at the timesteps from LOW to HIGH, the conditional "
                     "prediction alone at the others (default: the model's; 0 1000: every step)")
    sub.add_argument("--eta", type=float, help="DDIM noise: 0 = deterministic")
    sub.add_argument("--rng", choices=RNGS, help="the numbers a seed gives: cpu (default; "
                     "torch's CPU generator, A1111's CPU) or nv (CUDA's torch.randn on any "
                     "device: A1111's NV, and its default GPU on an NVIDIA card)")
    sub.add_argument("--from-png", type=Path, metavar="FILE", help="regenerate the image an "
                     "A1111 (or ldm) PNG describes: its 'parameters' text gives the prompt and "
                     "settings, which the options given here override")
    sub.add_argument("--lora-dir", type=Path, metavar="DIR", help="where the LoRAs that "
                     "<lora:name:weight> tags name (in the prompt, or --from-png's) are found "
                     "(A1111's models/Lora)")
    sub.add_argument("--accept-differences", action="store_true", help="with --from-png, "
                     "generate even when the PNG's settings include what ldm does not "
                     "reproduce (hires fix, variation seeds, ...): a warning instead of an error")
    sub.add_argument("--seed", type=int, help="the same seed gives the same image; image i of a "
                     "run takes seed + i, in [0, 2**64) (default: random)")
    sub.add_argument("--num-images", type=int, default=1, help="images to make (default 1)")
    sub.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG (default "
                     "out.png); the images of a run are out.png, out-1.png, …, each taking the "
                     "next free name")
    sub.add_argument("--overwrite", action="store_true", help="replace the first N names of "
                     "the --out series (out.png, out-1.png, …) for N images, taken or not")
    sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sub.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"),
                     default="auto", help="auto (default): bfloat16 on a CPU with AMX, float32 "
                     "on other CPUs, float16 on CUDA (bfloat16 for SDXL)")
    sub.add_argument("--offload", choices=("model", "sequential"), help="keep the weights in "
                     "CPU memory and move each network (model) or each layer (sequential) to "
                     "the --device GPU only while it runs: for GPUs smaller than the model")
    sub.add_argument("--vae-tile-size", type=int, help="decode (and encode) the image in tiles "
                     "of this many pixels a side, which agree with the whole decode (default: "
                     "whole when it fits in memory, else tiles)")
    sub.add_argument("--no-progress", action="store_true",
                     help="hide the progress bar (shown when stderr is a terminal)")
    sub.add_argument("--debug", action="store_true",
                     help="on an error, show the traceback instead of one line")


# ---------------------------------------------------------------- the command
def run(argv=None):
    """`python -m ldm`: run one command line; returns the exit code, reporting an error as one
    line on stderr (see the module docstring), or raising it with --debug."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or argparse's own error line (2)
        return e.code
    try:
        return execute(args)
    except BaseException as e:
        code, message = _failure(e, args)
        if code is None or args.debug:
            raise  # not a user error, or asked for: the traceback
        print(f"python -m ldm {args.command}: {message}", file=sys.stderr)
        return code


def _failure(error, args):
    """(exit code, message) for an error a user can cause; (None, None) for any other."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(error, CheckpointError):
        source = "argument --ckpt" if args.ckpt is not None else "the shipped model"
        return EXIT_FAILED, f"error: {source}: {error}"
    if isinstance(error, (ValueError, TypeError)):
        return EXIT_USAGE, f"error: {error}"
    if isinstance(error, (OSError, torch.OutOfMemoryError)):
        return EXIT_FAILED, f"error: {error}"
    if isinstance(error, MemoryError):
        return EXIT_FAILED, "error: out of memory"
    return None, None


def main(argv=None):
    """The command for callers in Python: 0 on success; errors raise (`run` reports them)."""
    return execute(build_parser().parse_args(argv))


def execute(args):
    """Check the command line, load the model, generate, write the PNGs (printing each path)."""
    if args.command == "generate":
        from ldm import generate
        return generate.execute(args)
    inputs = check(args)
    dtype = args.dtype
    pipe = load(args.ckpt, device=args.device, dtype=dtype, config=args.config,
                offload=args.offload)
    if args.vae_tile_size is not None:
        pipe.vae_tile_size = args.vae_tile_size
    for path in args.embedding:
        pipe.load_embedding(path)
    # (path, multiplier), or from --from-png's tags (path, multiplier, text-encoder multiplier)
    args.loaded_loras = [pipe.load_lora(path, multiplier, text_multiplier=(text or [None])[0])
                         for path, multiplier, *text in args.lora]
    if getattr(args, "refiner", None) is not None:
        inputs["refiner"] = load(args.refiner, device=args.device, dtype=dtype,
                                 offload=args.offload)
    seed = args.seed if args.seed is not None else int(torch.randint(2**31, ()))
    images = _generate(pipe, args, seed, inputs)
    info = _parameters(pipe, args, images[0].size)
    texts = [_with_seed(info, seed + index, index, args.loaded_loras)
             for index in range(len(images))]
    for path in save_images(images, texts, args.out, overwrite=args.overwrite):
        print(path)
    return 0


def _generate(pipe, args, seed, inputs):
    common = dict(negative_prompt=args.negative_prompt, steps=args.steps, sampler=args.sampler,
                  schedule=args.schedule, cfg_scale=args.cfg_scale,
                  cfg_interval=args.cfg_interval, seed=seed,
                  num_images=args.num_images, eta=args.eta,
                  progress=False if args.no_progress else None,
                  prompt_syntax=args.prompt_syntax, emphasis=args.emphasis, rng=args.rng,
                  pad_conds=args.pad_conds)
    if args.clip_skip is not None:
        common["clip_skip"] = args.clip_skip
    if args.command == "txt2img":
        refiner = dict(refiner=inputs["refiner"], refiner_start=args.refiner_start) \
            if "refiner" in inputs else {}
        return pipe.txt2img(args.prompt, height=args.height, width=args.width, **refiner,
                            **_hires_options(args), **common)
    if args.command == "img2img":
        return pipe.img2img(inputs["image"], args.prompt, strength=args.strength, **common)
    return pipe.inpaint(inputs["image"], inputs["mask"], args.prompt, **common)


def _hires_options(args):
    """txt2img's hires_* keywords from the flags given (the rest keep the library's defaults)."""
    given = {"hires_scale": args.hires_scale, "hires_strength": args.hires_strength,
             "hires_steps": args.hires_steps, "hires_upscale": args.hires_upscaler}
    return {keyword: value for keyword, value in given.items() if value is not None}


# ---------------------------------------------------------------- checks before loading
def check(args):
    """What can be checked before the model loads, so that a user error costs no load time.

    Raises UsageError naming the argument; returns the input images ({"image": …, "mask": …}),
    read now so that an unreadable one is found before the load (OSError, naming the argument).
    """
    if getattr(args, "from_png", None) is not None:
        _from_png(args)
    _fill_defaults(args)
    _prompt_tags(args)
    _check_values(args)
    _check_sampling(args)
    _check_device(args.device)
    if args.offload and torch.device(args.device).type == "cpu":
        raise UsageError("argument --offload: moves the networks to a GPU only while they run, "
                         "but --device is the CPU (give --device cuda)")
    for flag in ("ckpt", "refiner"):
        if getattr(args, flag, None) is not None:
            _check_readable(f"--{flag}", getattr(args, flag))
    for path in args.embedding:
        _check_readable("--embedding", path)
    for path, *_ in args.lora:
        _check_readable("--lora", path)
    inputs = {name: _open_image(f"--{name}", getattr(args, name))
              for name in ("image", "mask") if getattr(args, name, None) is not None}
    check_out(args.out)
    return inputs


# The options --from-png may fill: (PNG keyword, its default when neither gives it).
FROM_PNG = {"prompt": None, "negative_prompt": "", "steps": None, "sampler": None,
            "schedule": None, "cfg_scale": None, "cfg_interval": None, "seed": None,
            "height": None, "width": None,
            "clip_skip": None, "prompt_syntax": "a1111", "emphasis": "original", "rng": "cpu",
            "pad_conds": True,
            "strength": 0.75, "eta": 0.0, "refiner_start": 0.8, "hires_scale": None,
            "hires_strength": None, "hires_steps": None, "hires_upscaler": None}
# parse_parameters' keywords whose option has another name
PNG_OPTIONS = {"hires_upscale": "hires_upscaler"}


def _fill_defaults(args):
    for name, default in FROM_PNG.items():
        if hasattr(args, name) and getattr(args, name) is None:
            setattr(args, name, default)
    if args.prompt is None:
        raise UsageError("a prompt is required (or --from-png FILE)")


def _from_png(args):
    """Fill the options not given on the command line from the PNG's "parameters" text."""
    _check_readable("--from-png", args.from_png)
    try:
        with Image.open(args.from_png) as image:
            text = image.info.get("parameters")
    except (OSError, Image.DecompressionBombError) as e:
        raise UsageError(f"argument --from-png: cannot read {args.from_png}: {e}") from e
    if not isinstance(text, str):
        raise UsageError(f"argument --from-png: {args.from_png} has no 'parameters' text")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = parse_parameters(text, strict=False)
    except ValueError as e:
        raise UsageError(f"argument --from-png: {e}") from e
    given = {name for name in FROM_PNG if getattr(args, name, None) is not None}
    # What the command line overrides is no longer a difference
    overridden = {"Sampler": "sampler", "RNG": "rng", "Emphasis": "emphasis",
                  "Pad conds": "pad_conds"}
    unsupported = {key: why for key, why in found.unsupported.items()
                   if overridden.get(key) not in given}
    if unsupported:
        listing = "; ".join(f"{key}: {why}" for key, why in unsupported.items())
        if not args.accept_differences:
            raise UsageError(f"argument --from-png: ldm does not reproduce {listing} "
                             "(--accept-differences to generate anyway)")
        print(f"python -m ldm {args.command}: warning: ldm does not reproduce {listing}",
              file=sys.stderr)
    if found.task == "img2img" and args.command == "txt2img":
        raise UsageError(f"argument --from-png: {args.from_png} was made by img2img "
                         f"(Denoising strength {found.kwargs['strength']}): use python -m ldm "
                         "img2img --image SOURCE --from-png")
    if "hires_scale" in found.kwargs and args.command != "txt2img":
        raise UsageError(f"argument --from-png: {args.from_png} was made by txt2img with the "
                         "hires fix: use python -m ldm txt2img --from-png")
    for keyword, value in found.kwargs.items():
        name = PNG_OPTIONS.get(keyword, keyword)
        if hasattr(args, name) and name not in given:
            setattr(args, name, value)
    args.lora += _tag_loras(args, found.loras, f"argument --from-png: {args.from_png}")


def _tag_loras(args, tags, source):
    """(path, multiplier, text multiplier) for A1111 `<lora:…>` tags not given by --lora;
    `source` names where the tags come from, for the errors."""
    named = {path.stem for path, *_ in args.lora}
    tags = [tag for tag in tags if tag.name not in named]
    if tags and args.lora_dir is None:
        raise UsageError(f"{source}: uses LoRA(s) {', '.join(tag.name for tag in tags)} in "
                         "<lora:…> tags: give --lora-dir (or --lora)")
    try:
        return [(find_lora(tag.name, args.lora_dir), tag.multiplier, tag.text_multiplier)
                for tag in tags]
    except FileNotFoundError as e:
        raise UsageError(f"argument --lora-dir: {e}") from e


def _prompt_tags(args):
    """Take A1111's `<lora:name:m>` tags out of the prompt into --lora: merged for the run and
    written back in the PNG's parameters with their hashes, as A1111 writes them."""
    if args.prompt_syntax == "plain":
        return
    if LORA_TAG.search(args.negative_prompt):
        raise UsageError("argument --negative-prompt: <lora:…> tags are read in the prompt "
                         "only (as A1111)")
    prompt, tags = prompt_loras(args.prompt)
    if tags:
        args.prompt = prompt.strip()  # the tags go back at the end, as --lora's do
        args.lora += _tag_loras(args, tags, "the prompt")


def _check_values(args):
    if args.num_images < 1:
        raise UsageError(f"argument --num-images: must be at least 1, got {args.num_images}")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"argument --steps: must be at least 1, got {args.steps}")
    if args.vae_tile_size is not None and (args.vae_tile_size <= 0 or args.vae_tile_size % 8):
        raise UsageError(f"argument --vae-tile-size: must be a positive multiple of 8, got "
                         f"{args.vae_tile_size}")
    if args.clip_skip is not None and args.clip_skip < 1:
        raise UsageError(f"argument --clip-skip: must be at least 1, got {args.clip_skip}")
    start = getattr(args, "refiner_start", None)
    if start is not None and not 0 < start <= 1:
        raise UsageError(f"argument --refiner-start: must be in (0, 1], got {start}")
    for name in ("height", "width"):
        value = getattr(args, name, None)
        if value is not None and (value <= 0 or value % SIZE_MULTIPLE):
            raise UsageError(f"argument --{name}: must be a positive multiple of "
                             f"{SIZE_MULTIPLE}, got {value}")
    _check_hires(args)
    last = SEED_END - args.num_images  # the largest seed whose images all have seeds < 2**64
    if args.seed is not None and not 0 <= args.seed <= last:
        raise UsageError(f"argument --seed: must be in [0, 2**64 - {args.num_images}] (image i "
                         f"takes seed + i, below 2**64; leave --seed out for a random one), "
                         f"got {args.seed}")
    # The library's own rules (ldm.arguments), checked here before the load rather than after
    checks = [("--eta", arguments.check_eta, args.eta),
              ("--strength", arguments.check_strength, getattr(args, "strength", None)),
              ("--cfg-scale", arguments.check_cfg_scale, args.cfg_scale),
              ("--cfg-interval", arguments.check_cfg_interval, args.cfg_interval)]
    for flag, check_value, value in checks:
        if value is not None:
            try:
                check_value(value)
            except ValueError as e:
                raise UsageError(f"argument {flag}: {e}") from e


def _check_hires(args):
    if getattr(args, "hires_scale", None) is None:
        for flag in ("hires_strength", "hires_steps", "hires_upscaler"):
            if getattr(args, flag, None) is not None:
                raise UsageError(f"argument --{flag.replace('_', '-')}: applies to the hires "
                                 "pass, which --hires-scale turns on")
        return
    if not 1 < args.hires_scale < math.inf:
        raise UsageError(f"argument --hires-scale: must be a finite number > 1, got "
                         f"{args.hires_scale}")
    if args.hires_strength is not None and not 0 < args.hires_strength <= 1:
        raise UsageError(f"argument --hires-strength: must be in (0, 1], got "
                         f"{args.hires_strength}")
    if args.hires_steps is not None and args.hires_steps < 1:
        raise UsageError(f"argument --hires-steps: must be at least 1, got {args.hires_steps}")
    if getattr(args, "refiner", None) is not None:
        raise UsageError("argument --hires-scale: not supported with --refiner yet")


def _lora_argument(text):
    """FILE[:MULT] -> (Path, float): split at the last ":" only when a number follows, so that
    a path with a colon (a Windows drive) stays whole."""
    path, _, multiplier = text.rpartition(":")
    try:
        return (Path(path), float(multiplier)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


def _check_sampling(args):
    """Sampler, schedule and steps together, when the sampler is known without the file."""
    sampler = args.sampler or (PRESETS[args.config].sampling.sampler if args.config else None)
    if sampler is None:
        # The model's own sampler is known once its file is read; until then, steps beyond
        # what any sampler takes are refused, and the pipeline checks the rest.
        most = max(entry.max_steps for entry in SAMPLERS.values())
        if args.steps is not None and args.steps > most:
            raise UsageError(f"argument --steps: no sampler takes more than {most}, "
                             f"got {args.steps}")
        return
    try:
        entry, schedule = resolve(sampler, args.schedule)
    except ValueError as e:
        raise UsageError(f"argument --schedule: {e}") from e
    if args.steps is not None:
        try:
            timesteps(entry, schedule, args.steps, noise_schedule.alphas_cumprod())
        except ValueError as e:
            raise UsageError(f"argument --steps: {e}") from e


def _check_device(name):
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"argument --device: {e}") from e
    available = {"cpu": lambda: 1, "cuda": torch.cuda.device_count,
                 "mps": lambda: int(torch.backends.mps.is_available())}
    count = available.get(device.type, lambda: 1)()  # other types: torch tells at load
    if count == 0:
        raise UsageError(f"argument --device: {name!r} asked for, but this torch sees no "
                         f"{device.type} device")
    if device.index is not None and device.index >= count:
        raise UsageError(f"argument --device: {name!r} asked for, but this torch sees "
                         f"{count} {device.type} device(s)")


def _check_readable(argument, path):
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise UsageError(f"argument {argument}: {path} {problem}")
    try:
        open(path, "rb").close()
    except OSError as e:
        raise UsageError(f"argument {argument}: cannot open {path}: {e.strerror}") from e


def _open_image(argument, path):
    """The decoded image in its own mode: ldm.images reads every mode on its own scale (a
    convert("RGB") here would clip 16-bit grey to white)."""
    _check_readable(argument, path)
    try:
        with Image.open(path) as image:
            return image.copy()  # decodes now, so a broken file is found before the load
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise OSError(f"argument {argument}: cannot read image {path}: {e}") from e


def check_out(out):
    """Refuse an --out that cannot be written (UsageError), by writing a temporary file there;
    remove the temporary files that killed ldm processes left in its directory."""
    if out.suffix.lower() != ".png":
        raise UsageError(f"argument --out: must name a .png file, got {out}")
    if out.is_dir():
        raise UsageError(f"argument --out: {out} is a directory")
    if not out.parent.is_dir():
        problem = "is not a directory" if out.parent.exists() else "does not exist"
        raise UsageError(f"argument --out: directory {out.parent} {problem}")
    remove_stale_temporaries(out.parent)
    probe = _temporary(out)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
    except OSError as e:
        raise UsageError(f"argument --out: cannot write in {out.parent}: {e.strerror}") from e
    finally:
        probe.unlink(missing_ok=True)


# ---------------------------------------------------------------- the PNGs
def _parameters(pipe, args, size):
    """The generation parameters shared by the images of a run, as PNG text chunks."""
    sampling = pipe.config.sampling
    ckpt = args.ckpt or DEFAULT_CHECKPOINT
    sampler, schedule = resolve(args.sampler or sampling.sampler, args.schedule)
    return {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt,
        "sampler": sampler.name, "schedule": schedule, "steps": str(args.steps or sampling.steps),
        "cfg_scale": str(args.cfg_scale if args.cfg_scale is not None else sampling.cfg_scale),
        **_interval_parameter(args.cfg_interval or sampling.cfg_interval),
        "size": f"{size[0]}x{size[1]}", "model": ckpt.name, "model_sha256": sha256_file(ckpt),
        "command": args.command, "prompt_syntax": args.prompt_syntax, "emphasis": args.emphasis,
        "rng": args.rng, **({"strength": str(args.strength)} if args.command == "img2img" else {}),
        **({"eta": str(args.eta)} if args.eta else {}),
        **({"pad_conds": "False"} if not args.pad_conds else {}),
        **({"clip_skip": str(args.clip_skip)} if args.clip_skip is not None else {}),
        **({"refiner": args.refiner.name, "refiner_start": str(args.refiner_start)}
           if getattr(args, "refiner", None) is not None else {}),
        **_hires_parameters(pipe, args),
        **({"embeddings": ", ".join(p.name for p in args.embedding)} if args.embedding else {}),
        **({"loras": ", ".join(f"{item.name}:{item.multiplier:g}" for item in args.loaded_loras),
            "lora_hashes": ", ".join(f"{item.name}: {item.hash}" for item in args.loaded_loras)}
           if getattr(args, "loaded_loras", None) else {}),
    }


def _interval_parameter(interval):
    """The guidance interval's PNG text, "LOW-HIGH", when guidance skips some steps."""
    if interval is None:
        return {}
    return {"cfg_interval": "-".join(map(str, arguments.check_cfg_interval(interval)))}


def _hires_parameters(pipe, args):
    """The hires pass's PNG text: its settings, and the first pass's size (A1111's "Size")."""
    if getattr(args, "hires_scale", None) is None:
        return {}
    native, strength = pipe.config.image_size, args.hires_strength or DEFAULT_STRENGTH
    return {"hires_scale": f"{args.hires_scale:g}", "hires_strength": f"{strength:g}",
            **({"hires_steps": str(args.hires_steps)} if args.hires_steps is not None else {}),
            "hires_upscaler": args.hires_upscaler or "latent",
            "first_pass_size": f"{args.width or native}x{args.height or native}"}


def _with_seed(info, seed, index, loras=()):
    """One image's text chunks: its own seed, and the "parameters" text A1111 writes
    (`ldm.parameters.format_parameters`, which `parse_parameters` and --from-png read back).
    With a hires pass, "Size" is the first pass's, as A1111 writes it."""
    width, height = map(int, info.get("first_pass_size", info["size"]).split("x"))
    settings = dict(prompt=info["prompt"], negative_prompt=info["negative_prompt"],
                    steps=int(info["steps"]), sampler=info["sampler"], schedule=info["schedule"],
                    cfg_scale=float(info["cfg_scale"]), seed=seed, width=width, height=height,
                    prompt_syntax=info["prompt_syntax"], emphasis=info["emphasis"],
                    rng=info["rng"])
    for name, kind in (("clip_skip", int), ("strength", float), ("eta", float),
                       ("refiner_start", float)):
        if name in info:
            settings[name] = kind(info[name])
    if info.get("pad_conds") == "False":
        settings["pad_conds"] = False
    if "cfg_interval" in info:
        settings["cfg_interval"] = tuple(map(float, info["cfg_interval"].split("-")))
    for keyword, kind in (("hires_scale", float), ("hires_strength", float),
                          ("hires_steps", int), ("hires_upscale", str)):
        name = PNG_OPTIONS.get(keyword, keyword)  # info's key is the option's
        if name in info:
            settings[keyword] = kind(info[name])
    extra = {"Model hash": info["model_sha256"][:10], "Model": info["model"],
             **({"Refiner": info["refiner"]} if "refiner" in info else {})}
    parameters = format_parameters(settings, loras=loras, info=extra)
    return {**info, "seed": str(seed), "image_index": str(index), "parameters": parameters}


if __name__ == "__main__":
    sys.exit(run())
