"""Images in and out of the pipeline: PIL images or tensors <-> (B, C, H, W) tensors in [-1, 1]."""
import numpy as np
import torch
from PIL import Image


def to_tensor(image, *, name="image"):
    """A PIL image, a list of them, or a tensor -> (B, 3, H, W) float32 in [-1, 1].

    Tensors are taken as (3, H, W) or (B, 3, H, W) already in [-1, 1].
    """
    if isinstance(image, torch.Tensor):
        x = image.unsqueeze(0) if image.ndim == 3 else image
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{name} tensor must be (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        return x.float()
    images = image if isinstance(image, (list, tuple)) else [image]
    if not all(isinstance(im, Image.Image) for im in images):
        raise TypeError(f"{name} must be a PIL image, a list of them, or a tensor")
    arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def mask_to_tensor(mask, *, name="mask"):
    """A PIL mask (white = repaint) or a tensor -> (B, 1, H, W) float32 in {0, 1}, 1 = repaint.

    Grey levels are thresholded at one half, as the original inpainting script does.
    """
    if isinstance(mask, torch.Tensor):
        m = mask.float()
        m = m[None, None] if m.ndim == 2 else m.unsqueeze(0) if m.ndim == 3 else m
        if m.ndim != 4 or m.shape[1] != 1:
            raise ValueError(f"{name} tensor must be (H, W), (1, H, W) or (B, 1, H, W), "
                             f"got {tuple(mask.shape)}")
    else:
        masks = mask if isinstance(mask, (list, tuple)) else [mask]
        if not all(isinstance(im, Image.Image) for im in masks):
            raise TypeError(f"{name} must be a PIL image, a list of them, or a tensor")
        arrays = [np.asarray(im.convert("L"), dtype=np.float32) / 255.0 for im in masks]
        m = torch.from_numpy(np.stack(arrays))[:, None]
    return (m >= 0.5).float()


def to_pil(images):
    """(B, 3, H, W) in about [-1, 1] -> list of B PIL images (values clamped, rounded)."""
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]
