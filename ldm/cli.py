"""The command line: `python -m ldm txt2img "a red circle" --out out.png` (also img2img, inpaint).

With no --ckpt, the small model shipped in weights/ is used. Each PNG carries its generation
parameters as PNG text; an existing file is never replaced unless --overwrite is given: the
next free numbered name (out-1.png, out-2.png, …) is used instead.
"""
import argparse
import hashlib
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.config import PRESETS
from ldm.loader import DEFAULT_CHECKPOINT, load
from ldm.samplers import SAMPLERS, SCHEDULES, resolve
from ldm.samplers.registry import a1111_names, sampler_names

COMMANDS = {
    "txt2img": "generate images from a text prompt",
    "img2img": "re-imagine an input image following a text prompt",
    "inpaint": "repaint the white part of a mask in an image following a text prompt",
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m ldm", description="Generate images with latent diffusion. Without "
        "--ckpt, the small model shipped with ldm (64x64 shapes) is used.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text.capitalize() + ".")
        sub.add_argument("prompt", help='what to draw, e.g. "a red circle in the top left"')
        if name != "txt2img":
            sub.add_argument("--image", required=True, type=Path, help="the input image file")
        if name == "inpaint":
            sub.add_argument("--mask", required=True, type=Path,
                             help="mask image of the same size: white = repaint, black = keep")
        if name == "img2img":
            sub.add_argument("--strength", type=float, default=0.75,
                             help="how much to change the image, in (0, 1] (default 0.75)")
        if name == "txt2img":
            sub.add_argument("--height", type=int, help="image height, a multiple of 8 "
                             "(default: the model's native size)")
            sub.add_argument("--width", type=int, help="image width, a multiple of 8")
        _add_common(sub)
    return parser


def _add_common(sub):
    sub.add_argument("--negative-prompt", default="", help="what to steer away from")
    sub.add_argument("--ckpt", type=Path, help="a .safetensors or .ckpt Stable Diffusion 1.x "
                     f"or 2.x checkpoint (default: {DEFAULT_CHECKPOINT.name}, shipped with ldm)")
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
    sub.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 = deterministic")
    sub.add_argument("--seed", type=int, help="the same seed gives the same image (default: random)")
    sub.add_argument("--num-images", type=int, default=1, help="images to make (default 1)")
    sub.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG (default "
                     "out.png; taken names get a number: out-1.png, …)")
    sub.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sub.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                     help="default: float16 on CUDA, float32 on CPU")
    sub.add_argument("--no-progress", action="store_true",
                     help="hide the progress bar (shown when stderr is a terminal)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    pipe = load(args.ckpt, device=args.device, dtype=dtype, config=args.config)
    seed = args.seed if args.seed is not None else int(torch.randint(2**31, ()))
    images = _generate(pipe, args, seed)
    info = _parameters(pipe, args, seed, images[0].size)
    for index, image in enumerate(images):
        path = write_png(image, args.out, {**info, "image_index": str(index)},
                         overwrite=args.overwrite)
        print(path)
    return 0


def _generate(pipe, args, seed):
    common = dict(negative_prompt=args.negative_prompt, steps=args.steps, sampler=args.sampler,
                  schedule=args.schedule, cfg_scale=args.cfg_scale, seed=seed, num_images=args.num_images, eta=args.eta,
                  progress=False if args.no_progress else None)
    if args.command == "txt2img":
        return pipe.txt2img(args.prompt, height=args.height, width=args.width, **common)
    image = _open_image(args.image)
    if args.command == "img2img":
        return pipe.img2img(image, args.prompt, strength=args.strength, **common)
    return pipe.inpaint(image, _open_image(args.mask), args.prompt, **common)


def _open_image(path):
    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        raise SystemExit(f"cannot read image {path}: {e}") from e


def _parameters(pipe, args, seed, size):
    """The generation parameters, as PNG text chunks, and the "parameters" summary A1111 writes
    (its sampler and schedule names, so A1111's PNG Info and `samplers.from_a1111` read it)."""
    sampling = pipe.config.sampling
    ckpt = args.ckpt or DEFAULT_CHECKPOINT
    sampler, schedule = resolve(args.sampler or sampling.sampler, args.schedule)
    a1111_sampler, a1111_schedule = a1111_names(sampler, schedule)
    info = {
        "prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": str(seed),
        "sampler": sampler.name, "schedule": schedule, "steps": str(args.steps or sampling.steps),
        "cfg_scale": str(args.cfg_scale if args.cfg_scale is not None else sampling.cfg_scale),
        "size": f"{size[0]}x{size[1]}", "model": ckpt.name, "model_sha256": _sha256(ckpt),
        "command": args.command,
    }
    info["parameters"] = (f"{info['prompt']}\nNegative prompt: {info['negative_prompt']}\n"
                          f"Steps: {info['steps']}, Sampler: {a1111_sampler}, "
                          + (f"Schedule type: {a1111_schedule}, " if a1111_schedule else "")
                          + f"CFG scale: {info['cfg_scale']}, Seed: {seed}, Size: {info['size']}, "
                          f"Model hash: {info['model_sha256'][:10]}, Model: {ckpt.name}")
    return info


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_png(image, path, text, *, overwrite=False):
    """Save `image` with PNG text chunks, complete or not at all; returns the path written.

    Without `overwrite`, an existing file is kept and the next free name is used (out-1.png …);
    the PNG is written to a temporary file first and linked into place, which is atomic and
    fails rather than replace a file that appeared meanwhile.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SystemExit(f"--out must be a .png file, got {path}")
    metadata = PngInfo()
    for key, value in text.items():
        metadata.add_text(key, value)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    image.save(tmp, format="PNG", pnginfo=metadata)
    try:
        if overwrite:
            os.replace(tmp, path)
            return path
        for number in range(100000):
            candidate = path if number == 0 else path.with_name(f"{path.stem}-{number}.png")
            try:
                os.link(tmp, candidate)  # atomic, and fails rather than replace a file
                return candidate
            except FileExistsError:
                continue
        raise SystemExit(f"no free file name next to {path}")
    finally:
        tmp.unlink(missing_ok=True)

if __name__ == "__main__":
    sys.exit(main())
