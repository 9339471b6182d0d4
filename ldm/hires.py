"""High-resolution fix, AUTOMATIC1111's "Hires. fix": draw at the model's own size, upscale,
then denoise the upscaled picture again at the target size (img2img).

Asked for a size well past its training size, SD repeats its subject (two heads, a second
castle): its receptive field covers a training-sized window, and each window draws a whole
picture. The first pass fixes the composition where the model knows how; the second, started
from the upscaled result noised to `strength`, only has to add the detail the size allows.

    images = pipe.txt2img("a castle", hires_scale=2.0, hires_strength=0.5)    # 512² -> 1024²

Upscalers (`UPSCALERS`, txt2img's `hires_upscale`), with the names A1111 writes in its PNGs:

    latent                      bilinear interpolation of the latents (A1111's default, "Latent")
    latent-antialiased, latent-bicubic, latent-bicubic-antialiased, latent-nearest,
    latent-nearest-exact        A1111's other "Latent (…)" modes (shared.latent_upscale_modes)
    pixel                       decode, resize the 8-bit image with Lanczos, encode ("Lanczos")

Interpolated latents decode blurred until the second pass repaints them, so A1111 advises a
strength of 0.5 or more with the latent upscalers; "pixel" starts from sharp edges.

What A1111 does (modules/processing.py, StableDiffusionProcessingTxt2Img.sample_hr_pass), and
ldm with it:
- target size: int(scale · size), here rounded down to a multiple of the VAE's factor (8).
- steps: "Hires steps" N (default: the first pass's steps) is the number of steps the second
  pass *runs*, the last N of a schedule of int(N / min(strength, 0.999)) steps
  (`second_pass_steps`; sd_samplers_common.setup_img2img_steps given its steps), where an
  img2img alone runs int(strength · steps) of `steps`.
- noise: A1111 draws the second pass's noise from a new generator per image seeded with the
  image's own seed, at the target latent shape. So does ldm, drawing what img2img with the
  same seed draws: with "pixel", the second pass is img2img(upscaled images, seed=seed,
  steps=schedule, strength=N / schedule) exactly, the VAE posterior's sample included (A1111
  draws that one from torch's global generator).
- conditioning: the same prompts; SDXL's original_size and target_size are the target size in
  the second pass (A1111 passes the hires width and height to its conditioning), unless given.
- the sampler, schedule and guidance scale are the first pass's (A1111 can change them).
"""
import math
import numbers
from dataclasses import dataclass

import torch.nn.functional as F
from PIL import Image

from ldm import arguments
from ldm.images import to_pil, to_tensor

DEFAULT_STRENGTH = 0.7  # A1111's default "Denoising strength" for the hires pass
# name: (A1111's "Hires upscaler", F.interpolate mode, antialias); mode None: in pixel space.
UPSCALERS = {
    "latent": ("Latent", "bilinear", False),
    "latent-antialiased": ("Latent (antialiased)", "bilinear", True),
    "latent-bicubic": ("Latent (bicubic)", "bicubic", False),
    "latent-bicubic-antialiased": ("Latent (bicubic antialiased)", "bicubic", True),
    "latent-nearest": ("Latent (nearest)", "nearest", False),
    "latent-nearest-exact": ("Latent (nearest-exact)", "nearest-exact", False),
    "pixel": ("Lanczos", None, False),
}


@dataclass(frozen=True)
class Hires:
    """The second pass's settings, checked: scale > 1, strength in (0, 1], steps (None: the
    first pass's) and an upscaler of `UPSCALERS`."""
    scale: float
    strength: float
    steps: int | None
    upscaler: str

    @classmethod
    def check(cls, scale, strength, steps, upscaler):
        """Hires from txt2img's hires_* arguments; None when hires_scale is None (off)."""
        if scale is None:
            return None
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"hires_scale must be a number or None, got {scale!r} "
                            f"({type(scale).__name__})")
        if not 1 < float(scale) < math.inf:  # NaN fails too
            raise ValueError(f"hires_scale must be a finite number > 1 (the factor from the "
                             f"native size to the target), got {scale!r}")
        strength = arguments.check_float("hires_strength", strength, 0, 1, low_open=True,
                                         why="the share of the second pass's schedule re-run")
        if steps is not None:
            steps = arguments.check_int("hires_steps", steps, minimum=1)
        if not isinstance(upscaler, str) or upscaler not in UPSCALERS:
            raise ValueError(f"hires_upscale must be one of {', '.join(map(repr, UPSCALERS))}; "
                             f"got {upscaler!r}")
        return cls(float(scale), strength, steps, upscaler)

    @property
    def a1111_name(self):
        """The upscaler as A1111's "Hires upscaler:" field names it."""
        return UPSCALERS[self.upscaler][0]

    def target_size(self, height, width, factor):
        """Pixel (height, width) of the second pass: int(scale · size), rounded down to a
        multiple of the VAE's downsampling `factor`."""
        return tuple(int(side * self.scale) // factor * factor for side in (height, width))


def second_pass_steps(steps, strength):
    """(schedule, run): A1111's second pass runs the last `run` = steps steps of a schedule of
    int(steps / min(strength, 0.999)) steps (A1111's own float arithmetic, so the same counts).
    At strength 1 that is the whole schedule of `steps`, begun from pure noise's level."""
    return int(steps / min(strength, 0.999)), steps


def upscale_latents(latents, size, upscaler="latent"):
    """(B, C, h, w) latents -> (B, C, *size) by one of the latent `UPSCALERS` (A1111's
    F.interpolate modes), computed in float32, returned in the latents' dtype."""
    _, mode, antialias = UPSCALERS[upscaler]
    if mode is None:
        raise ValueError(f"{upscaler!r} upscales pixels: use upscale_images")
    out = F.interpolate(latents.float(), size=tuple(size), mode=mode, antialias=antialias)
    return out.to(latents.dtype)


def upscale_images(images, size):
    """PIL images -> PIL images of pixel `size` (height, width), Lanczos-resampled, as A1111's
    "Lanczos" upscaler (its resize_image with resize mode "Just resize")."""
    height, width = size
    return [image.resize((width, height), resample=Image.LANCZOS) for image in images]


def upscale(pipe, latents, size, upscaler, generator=None):
    """The first pass's (B, 4, h, w) scaled latents -> (B, 4, *size) latents for the second.

    In latent space, an interpolation; "pixel": decode, to 8-bit images (as A1111 does, and as
    a PNG saved in between would be), Lanczos to the pixel size, encode, the posterior sample
    drawn from `generator` (one per image, see StableDiffusion.encode_image).
    """
    if UPSCALERS[upscaler][1] is not None:
        return upscale_latents(latents, size, upscaler)
    factor = pipe.vae.config.downsampling_factor
    images = upscale_images(to_pil(pipe.decode_latents(latents)), [n * factor for n in size])
    return pipe.encode_image(to_tensor(images), generator)
