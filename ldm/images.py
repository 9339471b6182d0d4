"""Images in and out of the pipeline: PIL images or tensors <-> (B, C, H, W) tensors in [-1, 1].

Every PIL mode is read on its own scale, so that white is white whatever the file's depth:

    1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV   8 bits a channel, through Pillow's RGB conversion
    LA, La, PA, RGBA, RGBa, P or L or RGB with a transparent colour ("transparency")
                                                 alpha composited on a background (below)
    I;16, I;16L, I;16B, I;16N                    16-bit grey: 65535 is white
    I                                            32-bit integer grey, read as 16-bit (Pillow opens
                                                 some 16-bit PNGs as I): 65535 is white; values
                                                 outside [0, 65535] are refused
    F                                            float grey on Pillow's own 8-bit scale (what
                                                 convert("F") gives and convert("L") reads):
                                                 255 is white; values outside [0, 255] or NaN
                                                 are refused (scale a [0, 1] image by 255 first)

Any other mode is refused (ValueError naming the argument and the mode).

Transparency: an image is composited on white, as AUTOMATIC1111 flattens its img2img inputs
(its img2img_background_color, #ffffff), so an RGBA file starts from the same picture there and
here; dropping alpha would show whatever colour the editor left under transparent pixels (often
black). A mask is composited on black, "keep": strokes painted on a transparent layer mark what
to repaint, and the unpainted rest is kept.
"""
import numpy as np
import torch
from PIL import Image

IMAGE_BACKGROUND = 1.0  # white, for images with alpha
MASK_BACKGROUND = 0.0   # black (= keep), for masks with alpha
# The grey modes Pillow's RGB conversion would clip at 255, and the value that is white in each.
HIGH_DEPTH_WHITE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535,
                    "I": 65535, "F": 255}
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
# PIL's "L" conversion: ITU-R 601-2 luma.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def image_shape(image, *, name="image"):
    """(B, H, W) of what `to_tensor` would make of `image`, without converting any pixels: the
    pipeline sizes its memory from it before it allocates."""
    if isinstance(image, torch.Tensor):
        if not 2 <= image.ndim <= 4:
            raise ValueError(f"{name} tensor must be (…, H, W) with 2 to 4 axes, got "
                             f"{tuple(image.shape)}")
        return (image.shape[0] if image.ndim == 4 else 1, *image.shape[-2:])
    images = _pil_list(image, name)
    return (len(images), images[0].height, images[0].width)


def to_tensor(image, *, name="image"):
    """A PIL image (any mode above), a list of them of one size, or a tensor -> (B, 3, H, W)
    float32 in [-1, 1].

    Tensors are taken as (3, H, W) or (B, 3, H, W), floating point, already in [-1, 1].
    """
    if isinstance(image, torch.Tensor):
        x = image.unsqueeze(0) if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} tensor must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        return _finite_float(x, name)
    arrays = [_rgb(im, name, IMAGE_BACKGROUND) * 2 - 1 for im in _pil_list(image, name)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def mask_to_tensor(mask, *, name="mask"):
    """A PIL mask (white = repaint; any mode above) or a tensor -> (B, 1, H, W) float32 in
    {0, 1}, 1 = repaint.

    Grey levels (the luma of a colour mask, as Pillow's "L") are thresholded at one half, as
    the original inpainting script does.
    """
    if isinstance(mask, torch.Tensor):
        m = _finite_float(mask, name, integers=True)  # 0/1 or 0/255 integer masks are plain
        m = m[None, None] if m.ndim == 2 else m.unsqueeze(0) if m.ndim == 3 else m
        if m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"{name} tensor must be (H, W), (1, H, W) or (B, 1, H, W), "
                             f"got {tuple(mask.shape)}")
    else:
        arrays = [_rgb(im, name, MASK_BACKGROUND) @ LUMA for im in _pil_list(mask, name)]
        m = torch.from_numpy(np.stack(arrays))[:, None]
    return (m >= 0.5).float()


def to_pil(images):
    """(B, 3, H, W) in about [-1, 1] -> list of B PIL images (values clamped, rounded)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


def _pil_list(image, name):
    """A PIL image or a non-empty list of them of one size, as a list."""
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images or not all(isinstance(im, Image.Image) for im in images):
        raise TypeError(f"{name} must be a PIL image, a list of them, or a tensor, got "
                        f"{type(image).__name__}" + (" of " + ", ".join(
                            sorted({type(im).__name__ for im in images})) if images else ""))
    sizes = sorted({im.size for im in images})
    if len(sizes) > 1:
        raise ValueError(f"{name} list mixes sizes {sizes} (width, height): give one size")
    return images


def _rgb(image, name, background):
    """A PIL image -> (H, W, 3) float32 in [0, 1], on its mode's scale, alpha composited on
    `background` (0 black, 1 white)."""
    if image.mode in HIGH_DEPTH_WHITE:
        return np.repeat(_grey(image, name)[..., None], 3, axis=2)
    if image.mode == "La":  # premultiplied; Pillow converts it to LA only
        image = image.convert("LA")
    with_alpha = image.mode in ALPHA_MODES or "transparency" in image.info
    try:
        converted = image.convert("RGBA" if with_alpha else "RGB")
    except ValueError as error:  # a mode Pillow cannot convert to RGB
        raise ValueError(f"{name} has PIL mode {image.mode!r}, which ldm cannot read ({error}); "
                         "convert it to RGB first") from error
    x = np.asarray(converted, dtype=np.float32) / 255
    if with_alpha:
        alpha = x[..., 3:]
        x = x[..., :3] * alpha + background * (1 - alpha)
    return x


def _grey(image, name):
    """A 16-bit, 32-bit integer or float grey PIL image -> (H, W) float32 in [0, 1]."""
    white = HIGH_DEPTH_WHITE[image.mode]
    x = np.asarray(image).astype(np.float64)
    if x.size and not (np.isfinite(x).all() and 0 <= x.min() and x.max() <= white):
        raise ValueError(f"{name} has PIL mode {image.mode!r} with values in "
                         f"[{x.min():g}, {x.max():g}]; ldm reads that mode as [0, {white}] "
                         "(black to white)")
    return (x / white).astype(np.float32)


def _finite_float(x, name, integers=False):
    """A floating-point (or, with `integers`, integer or bool) tensor without NaN or inf, as
    float32. An integer image tensor is refused: it is most likely 0..255, not [-1, 1]."""
    if not (x.is_floating_point() or integers and not x.is_complex()):
        raise TypeError(f"{name} tensor must be floating point (in [-1, 1]), got dtype "
                        f"{x.dtype}")
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} tensor holds NaN or infinite values")
    return x
