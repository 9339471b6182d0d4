"""Your own images: a folder of pictures with captions, as a torch Dataset to train on.

    data = ImageFolder("my_images/", resolution=512)
    data[0]            # {"image": (3, 512, 512) float32 in [-1, 1], "caption": str, "path": Path}
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate)
    batch = data.batch(4, generator)   # .images (4, 3, 512, 512), .captions: what ldm.train takes

Captions, in either layout (both may be mixed; subfolders are searched, hidden ones skipped):
    a.png + a.txt       the text file's content, stripped (kohya's and A1111's layout)
    metadata.jsonl      diffusers' ImageFolder: one {"file_name": "a.png", "text": "…"} per line,
                        file_name relative to the metadata file's folder; it wins over a .txt
Images: .png .jpg .jpeg .webp .bmp .gif .tif .tiff, in any mode ldm.images reads (16-bit and
float grey on their own scale, transparency composited on white), turned upright by their EXIF
orientation. Each is resized down, bicubic with antialiasing (PIL's BICUBIC), until it just
covers `resolution` ((height, width), or one number for a square), and its centre cut out.

What fails, and how:
    an image that cannot be read    OSError naming the file: at construction if its header is
                                    broken, when the item is loaded if its pixels are
    an image with no caption        ValueError naming the file (unless `default_caption` is given)
    an image smaller than the       skipped, never silently: one warning with their count and
    resolution on either side       the first names; `.skipped` lists (path, (width, height))
    no image left                   ValueError naming the folder

Latent cache: ImageFolder(…, latents=LatentCache(folder, encode, encoder_id)) returns
{"latent": encode(image), "caption", "path"} items, each encoding stored once on disk, under a
key made of the image file's SHA-256, the resolution, the cropping rule and `encoder_id`: an
edited image, another resolution or another encoder is a new key, never a stale latent.
`LatentCache.for_vae(folder, vae)` stores the VAE posterior's moments (mean and log-variance,
(2·z, h, w)), so that training still draws a fresh latent each step:
`DiagonalGaussian(moments).sample(noise=…)`, keyed by the VAE's weights. `data.cache_latents()`
fills the cache ahead, in batches.
"""
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

from ldm.checkpoint import sha256_file
from ldm.images import to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
METADATA = "metadata.jsonl"
CAPTION_SUFFIX = ".txt"
# Part of every cache key: changing how pixels become a tensor must invalidate old latents.
PREPROCESSING = "ldm.images, bicubic antialiased resize, center crop, v1"
EXIF_ORIENTATION = 0x0112  # orientations 5-8 turn the picture by 90°: width and height swap
SHOWN = 5                  # names a message lists before "…"


@dataclass
class Batch:
    """A training batch: captions and paths, and images (B, 3, H, W) in [-1, 1] or, from a
    latent cache, latents (B, C, h, w). ImageFolder.batch also gives each image's size before
    resizing, `original_sizes` [(h, w)], and where its crop starts in the resized image,
    `crop_coords` [(top, left)]: SDXL's size conditioning (None: unknown)."""
    captions: list
    paths: list
    images: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    original_sizes: list | None = None
    crop_coords: list | None = None


def collate(items):
    """DataLoader's collate_fn: a list of items -> a Batch."""
    stacked = {key: torch.stack([item[key] for item in items]) for key in ("image", "latent")
               if key in items[0]}
    return Batch([item["caption"] for item in items], [item["path"] for item in items],
                 stacked.get("image"), stacked.get("latent"))


class ImageFolder(torch.utils.data.Dataset):
    """The captioned images of a folder (module docstring), cropped and resized to
    `resolution`; `latents`: a LatentCache to return cached encodings instead of images."""

    def __init__(self, root, resolution, *, default_caption=None, latents=None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} is not a folder")
        self.size = _resolution(resolution)  # (H, W)
        self.latents = latents
        captions = _metadata_captions(self.root)
        self.items, self.skipped = [], []    # [(path, caption)], [(path, (w, h))]
        self.original_sizes = []             # [(h, w)] of the items, upright
        for path in _image_files(self.root):
            width, height = _upright_size(path)
            if width < self.size[1] or height < self.size[0]:
                self.skipped.append((path, (width, height)))
            else:
                self.items.append((path, _caption(path, captions, default_caption)))
                self.original_sizes.append((height, width))
        self._warn_skipped()
        if not self.items:
            raise ValueError(f"image folder {self.root} holds no image of at least "
                             f"{self.size[1]}×{self.size[0]} pixels")
        self._digests = {}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, caption = self.items[index]
        if self.latents is None:
            return {"image": self.image(index), "caption": caption, "path": path}
        key = self.latents.key(self.digest(index), self.size)
        latent = self.latents.get(key)
        if latent is None:
            latent = self.latents.put(key, self.image(index)[None])[0]
        return {"latent": latent, "caption": caption, "path": path}

    def image(self, index):
        """Image `index`, cropped and resized: (3, H, W) float32 in [-1, 1]."""
        path = self.items[index][0]
        try:
            with Image.open(path) as image:
                pixels = to_tensor(ImageOps.exif_transpose(image), name=str(path))  # (1, 3, h, w)
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise OSError(f"cannot read image {path}: {e}") from e
        return _resize_and_crop(pixels, self.size)[0]

    def digest(self, index):
        """SHA-256 of image `index`'s file (read once per process)."""
        if index not in self._digests:
            self._digests[index] = sha256_file(self.items[index][0])
        return self._digests[index]

    def batch(self, batch_size, generator, part=None):
        """`batch_size` distinct images drawn uniformly (with repeats only when the folder
        holds fewer), as a Batch: the data(batch_size, generator) ldm.train takes. part: a
        slice of the batch to load, the rest only drawn (a data-parallel rank's share: the
        generator advances the same on every rank)."""
        order = torch.cat([torch.randperm(len(self), generator=generator)
                           for _ in range(-(-batch_size // len(self)))])[:batch_size]
        picked = order[slice(None) if part is None else part].tolist()
        batch = collate([self[i] for i in picked])
        batch.original_sizes = [self.original_sizes[i] for i in picked]
        batch.crop_coords = [_cover(size, self.size)[1] for size in batch.original_sizes]
        return batch

    def cache_latents(self, batch_size=8):
        """Encode every image not in the latent cache yet, `batch_size` at a time; returns how
        many were encoded."""
        if self.latents is None:
            raise ValueError("this ImageFolder has no latent cache (latents=LatentCache(…))")
        missing = [i for i in range(len(self))
                   if self.latents.get(self.latents.key(self.digest(i), self.size)) is None]
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            images = torch.stack([self.image(i) for i in chunk])
            self.latents.put([self.latents.key(self.digest(i), self.size) for i in chunk],
                             images)
        return len(missing)

    def _warn_skipped(self):
        if self.skipped:
            names = ", ".join(f"{p.relative_to(self.root)} ({w}×{h})"
                              for p, (w, h) in self.skipped[:SHOWN])
            more = ", …" if len(self.skipped) > SHOWN else ""
            warnings.warn(f"image folder {self.root}: {len(self.skipped)} of "
                          f"{len(self.skipped) + len(self.items)} images are smaller than "
                          f"{self.size[1]}×{self.size[0]} and are skipped: {names}{more}",
                          stacklevel=3)


class LatentCache:
    """Encodings of images on disk, one safetensors file per key (`key`); `encode` maps images
    (B, 3, H, W) in [-1, 1] to (B, …) tensors, `encoder_id` names it in the keys."""

    def __init__(self, folder, encode, encoder_id):
        if not isinstance(encoder_id, str) or not encoder_id:
            raise ValueError("encoder_id must name the encoder (e.g. its weights' SHA-256), so "
                             "that another encoder never reads this one's latents")
        self.folder, self.encode, self.encoder_id = Path(folder), encode, encoder_id
        self.folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_vae(cls, folder, vae):
        """A cache of `vae`'s posterior moments (B, 2·z, h, w) (mean, then log-variance),
        keyed by its weights."""
        def moments(images):
            parameter = next(vae.parameters())
            with torch.no_grad():
                posterior = vae.encode(images.to(parameter.device, parameter.dtype))
            return torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu()
        return cls(folder, moments, "vae:" + weights_sha256(vae))

    def key(self, image_sha256, size):
        text = json.dumps([image_sha256, list(size), PREPROCESSING, self.encoder_id])
        return hashlib.sha256(text.encode()).hexdigest()

    def path(self, key):
        return self.folder / f"{key}.safetensors"

    def get(self, key):
        """The stored encoding of `key`, or None."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return load_file(path)["latent"]
        except Exception as e:  # safetensors raises its own error types for a damaged file
            warnings.warn(f"latent cache {path} is unreadable ({e}); encoding again",
                          stacklevel=2)
            return None

    def put(self, keys, images):
        """Encode `images` (B, 3, H, W), store encoding b under keys[b] (a single key for
        B = 1), return the encodings."""
        keys = [keys] if isinstance(keys, str) else keys
        latents = self.encode(images)
        for key, latent in zip(keys, latents):
            path = self.path(key)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
            try:  # written whole, then renamed: a reader never sees half a file
                save_file({"latent": latent.contiguous()}, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return latents


def weights_sha256(module):
    """SHA-256 of a module's state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ---------------------------------------------------------------- reading the folder
def _resolution(resolution):
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
        raise ValueError(f"resolution must be a positive int or (height, width), got "
                         f"{resolution!r}")
    return size


def _hidden(path, root):
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _image_files(root):
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file() and not _hidden(p, root))


def _upright_size(path):
    """(width, height) as the picture stands after its EXIF orientation; reads the header
    only. OSError naming the file if it is no image."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            turned = image.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise OSError(f"cannot read image {path}: {e}") from e
    return (height, width) if turned else (width, height)


def _metadata_captions(root):
    """{image path: caption} from every metadata.jsonl under root (diffusers' layout)."""
    captions = {}
    for metadata in sorted(root.rglob(METADATA)):
        if _hidden(metadata, root):
            continue
        for number, line in enumerate(metadata.read_text(encoding="utf-8").split("\n"), 1):
            if line.strip():
                path, caption = _metadata_entry(metadata, number, line)
                captions[path.resolve()] = caption  # "sub/../a.png" is a.png
    return captions


def _metadata_entry(metadata, number, line):
    where = f"{metadata}:{number}"
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) \
            or not isinstance(entry.get("text"), str):
        raise ValueError(f"{where}: each line must be an object with a \"file_name\" and a "
                         f"\"text\" (strings), got {line.strip()[:80]}")
    path = metadata.parent / entry["file_name"]
    if not path.is_file():
        raise ValueError(f"{where}: file_name {entry['file_name']!r}: there is no {path}")
    return path, entry["text"]


def _caption(path, captions, default):
    """The caption of image `path`: its metadata entry, else its .txt file, else `default`."""
    if path.resolve() in captions:
        return captions[path.resolve()]
    text_file = path.with_suffix(CAPTION_SUFFIX)
    if text_file.is_file():
        try:
            return text_file.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"caption {text_file} is not UTF-8 text ({e})") from e
    if default is None:
        raise ValueError(f"image {path} has no caption: no {text_file.name} beside it and no "
                         f"entry in a {METADATA} (default_caption= gives one to all such)")
    return default


def _resize_and_crop(pixels, size):
    """(B, 3, h, w) -> (B, 3, H, W): scaled down until it covers size (H, W), then its centre
    cut out (diffusers' Resize + CenterCrop; the whole image is resized, so the pixels at the
    crop's edges are filtered with their true neighbours)."""
    height, width = size
    (new_h, new_w), (top, left) = _cover(pixels.shape[-2:], size)
    resized = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", antialias=True,
                            align_corners=False)  # as PIL's BICUBIC, to a fraction of a level
    return resized[..., top:top + height, left:left + width].clamp(-1, 1)  # bicubic overshoots


def _cover(original, size):
    """An image of `original` (h, w) -> (the (h, w) it is resized to, to just cover `size`
    (H, W); the (top, left) of the centred crop of `size` in it)."""
    (height, width), (h, w) = size, original
    scale = max(width / w, height / h)  # <= 1: smaller images are skipped
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    return (new_h, new_w), ((new_h - height) // 2, (new_w - width) // 2)
