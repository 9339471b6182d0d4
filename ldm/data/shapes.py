"""Shapes world: 64×64 pictures of one flat-coloured shape on a flat-coloured background,
with captions, drawn on the fly (no downloads) and exactly reproducible from a torch.Generator.

A scene is one object (circle, axis-aligned square or upright triangle; its size 25-50 % of the
image width) of one of six colours on a background of another. Its caption comes from one of
three families, which the model trained on this world must follow:

    family        caption                                    what the caption fixes
    "object"      a red circle                               colour, shape (object near the middle)
    "background"  a red circle on a blue background          colour, shape, background
    "position"    a red circle in the top left               colour, shape, part of the image

Whatever a caption leaves open is drawn at random: the background (never the object's colour)
and, outside the "position" family, the object's centre within ±6 px of the image centre.

A fixed sixth of each family's combinations never appears in a training caption (`is_held_out`);
those prompts measure whether the model composes words it has only seen apart. The rule keeps
every colour, shape, background and position in the training captions.

Images are float tensors (B, 3, 64, 64) in [-1, 1], the range the autoencoder takes.
Geometry is in pixels, y downwards: a pixel (row i, column j) has its centre at (j + ½, i + ½).
"""
import re
from dataclasses import dataclass

import torch

from ldm.config import PRESETS

IMAGE_SIZE = 64
# Pure RGB corners of the colour cube, in [0, 1]: any two are at least 1 apart, so a pixel's
# nearest palette colour is unambiguous even after a blurry decoder.
PALETTE = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}
COLOURS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
# Centre of each named part of the image, as fractions of the side (x, y).
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
FAMILIES = ("object", "background", "position")
SIZE_RANGE = (0.25, 0.5)   # object size (bounding-box side) as a fraction of the image width
# px: "near the middle" for captions that name no position; below 8, so the object is always
# nearer to the centre than to the centre of a quarter (11.3 px off each diagonal).
MIDDLE_JITTER = 6.0
POSITION_JITTER = 4.0      # px around the centre of the named part

# The architecture of the shipped model, trained on this data (a preset of ldm.config).
TINY_SHAPES_CONFIG = PRESETS["tiny-shapes"]


@dataclass(frozen=True)
class Prompt:
    """What a caption asks for: colour and shape always, at most one of background/position."""
    colour: str
    shape: str
    background: str | None = None
    position: str | None = None

    def __post_init__(self):
        if self.background is not None and self.position is not None:
            raise ValueError("a caption names a background or a position, not both")

    @property
    def family(self):
        if self.background is not None:
            return "background"
        return "position" if self.position is not None else "object"

    @property
    def caption(self):
        text = f"a {self.colour} {self.shape}"
        if self.background is not None:
            return f"{text} on a {self.background} background"
        return f"{text} in the {self.position}" if self.position is not None else text


_CAPTION = re.compile(
    rf"a (?P<colour>{'|'.join(COLOURS)}) (?P<shape>{'|'.join(SHAPES)})"
    rf"(?: on a (?P<background>{'|'.join(COLOURS)}) background"
    rf"| in the (?P<position>{'|'.join(POSITIONS)}))?")


def parse_caption(caption):
    """The inverse of `Prompt.caption`; raises ValueError on text outside the three families."""
    match = _CAPTION.fullmatch(caption.strip().lower())
    if match is None:
        raise ValueError(f"{caption!r} is not a shapes-world caption")
    return Prompt(**match.groupdict())


@dataclass(frozen=True)
class Scene:
    """The ground truth of one image: colours, shape, and the object's box in pixels."""
    colour: str
    shape: str
    background: str
    x: float      # centre of the object's bounding box
    y: float
    size: float   # side of the (square) bounding box

    @property
    def position(self):
        """The named part of the image whose centre is nearest to the object's centre."""
        return nearest_position(self.x / IMAGE_SIZE, self.y / IMAGE_SIZE)


def nearest_position(x, y):
    """Name of the part of the image nearest to (x, y), given as fractions of the side."""
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def is_held_out(prompt):
    """True for the sixth of each family's combinations kept out of the training captions.

    Index sum ≡ 0 (mod 6) over (colour, shape[, background or position]) picks one colour for
    every other choice, so each shape, background and position keeps 5 of its 6 colours.
    """
    total = COLOURS.index(prompt.colour) + SHAPES.index(prompt.shape)
    if prompt.background is not None:
        total += COLOURS.index(prompt.background)
    if prompt.position is not None:
        total += list(POSITIONS).index(prompt.position)
    return total % 6 == 0


def all_prompts(family):
    """Every prompt of a family (18, 90 and 90 of them), in a fixed order."""
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    if family == "object":
        return [Prompt(c, s) for c, s in objects]
    if family == "background":
        return [Prompt(c, s, background=b) for c, s in objects for b in COLOURS if b != c]
    if family == "position":
        return [Prompt(c, s, position=p) for c, s in objects for p in POSITIONS]
    raise ValueError(f"unknown family {family!r}; the families are {FAMILIES}")


def training_prompts(family):
    return [p for p in all_prompts(family) if not is_held_out(p)]


def held_out_prompts(family):
    return [p for p in all_prompts(family) if is_held_out(p)]


def _uniform(low, high, generator):
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(options, generator):
    return options[torch.randint(len(options), (), generator=generator).item()]


def scene_for(prompt, generator):
    """Draw a scene that satisfies `prompt`, choosing what it leaves open at random."""
    background = prompt.background or _choice([c for c in COLOURS if c != prompt.colour], generator)
    size = IMAGE_SIZE * _uniform(*SIZE_RANGE, generator)
    if prompt.position is None:
        anchor, jitter = (0.5, 0.5), MIDDLE_JITTER
    else:
        anchor, jitter = POSITIONS[prompt.position], POSITION_JITTER
    # Clamped so that the whole object stays inside the picture.
    x, y = (min(max(IMAGE_SIZE * a + _uniform(-jitter, jitter, generator), size / 2),
                IMAGE_SIZE - size / 2) for a in anchor)
    return Scene(prompt.colour, prompt.shape, background, x, y, size)


def shape_masks(scenes, image_size=IMAGE_SIZE):
    """(B, H, W) bool: the pixels each scene's object covers (pixel centres inside the shape)."""
    centres = torch.arange(image_size, dtype=torch.float32) + 0.5
    x, y, size = (torch.tensor([getattr(s, k) for s in scenes], dtype=torch.float32)[:, None, None]
                  for k in ("x", "y", "size"))                 # each (B, 1, 1)
    dx, dy = centres[None, None, :] - x, centres[None, :, None] - y  # (B, 1, W), (B, H, 1)
    half = size / 2
    inside_box = (dx.abs() <= half) & (dy.abs() <= half)       # (B, H, W)
    masks = {
        "circle": dx ** 2 + dy ** 2 <= half ** 2,
        "square": inside_box,
        # Apex at the top, base (width = size) at the bottom: the half-width grows from 0 to
        # size/2 over the height, i.e. it is half the depth below the apex.
        "triangle": inside_box & (dx.abs() <= (dy + half) / 2),
    }
    return torch.stack([masks[s.shape][i] for i, s in enumerate(scenes)])


def render(scenes, image_size=IMAGE_SIZE):
    """Scenes -> images (B, 3, H, W) in [-1, 1], hard-edged (no anti-aliasing)."""
    masks = shape_masks(scenes, image_size)[:, None]                           # (B, 1, H, W)
    colour = torch.tensor([PALETTE[s.colour] for s in scenes])[:, :, None, None]      # (B, 3, 1, 1)
    background = torch.tensor([PALETTE[s.background] for s in scenes])[:, :, None, None]
    return torch.where(masks, colour, background) * 2 - 1


@dataclass
class Batch:
    images: torch.Tensor   # (B, 3, 64, 64) in [-1, 1]
    captions: list         # B str
    scenes: list           # B Scene, the ground truth


def batch_for(prompts, generator):
    """One image per prompt, each a fresh random scene that satisfies it."""
    scenes = [scene_for(p, generator) for p in prompts]
    return Batch(render(scenes), [p.caption for p in prompts], scenes)


def training_batch(batch_size, generator):
    """A batch from the training distribution: a family uniformly, then one of its training
    prompts uniformly, then a random scene for it."""
    pools = {f: training_prompts(f) for f in FAMILIES}
    prompts = [_choice(pools[_choice(FAMILIES, generator)], generator) for _ in range(batch_size)]
    return batch_for(prompts, generator)
