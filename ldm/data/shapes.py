"""Shapes world: 64×64 pictures of one flat-coloured shape on a flat-coloured background,
with captions, drawn on the fly (no downloads) and exactly reproducible from a torch.Generator.

A scene is one object (circle, axis-aligned square or upright triangle; its size 25-50 % of the
image width) of one of six colours on a background of another (larger worlds add purple and an
upright five-pointed star). Its caption comes from one of three families, which the model
trained on this world must follow:

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

Worlds. Everything above is the default world, the one the shipped model learnt; the module's
functions (`all_prompts`, `training_batch`, …) are its methods. Larger worlds add words the
shipped model never saw, for teaching it something new (a LoRA):

    world("shapes+purple+star")            # 7 colours, 4 shapes: EXTENDED
    EXTENDED.naming("purple", "star")      # only its captions that name purple or star
    EXTENDED.training_batch(32, generator) # same signature as `training_batch`

A prompt's place in the held-out split does not depend on the world (`is_held_out`), so a larger
world keeps the default world's split, and its seeded batches, unchanged.
"""
import math
import re
from dataclasses import dataclass, replace

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
# Words only larger worlds use (`world`). Purple is CSS's #800080: the middle of red, blue and
# black, 0.71 from each (its nearest colours) and ≥ 1.2 from the others.
EXTRA_PALETTE = {"purple": (0.5, 0.0, 0.5)}
EXTRA_SHAPES = ("star",)
RGB = {**PALETTE, **EXTRA_PALETTE}           # every colour any world draws
ALL_COLOURS = tuple(RGB)                     # the default's six first: their indices never move
ALL_SHAPES = SHAPES + EXTRA_SHAPES
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
    every other choice, so each shape, background and position keeps 5 of its 6 colours. The
    indices are those of ALL_COLOURS and ALL_SHAPES, whose first words are the default world's,
    so a prompt is held out in every world or in none. Larger worlds also hold out every object
    made of two new words ("a purple star …"): the new words are taught apart and judged together.
    """
    total = ALL_COLOURS.index(prompt.colour) + ALL_SHAPES.index(prompt.shape)
    if prompt.background is not None:
        total += ALL_COLOURS.index(prompt.background)
    if prompt.position is not None:
        total += list(POSITIONS).index(prompt.position)
    both_new = prompt.colour not in COLOURS and prompt.shape not in SHAPES
    return total % 6 == 0 or both_new


def _uniform(low, high, generator):
    return low + (high - low) * torch.rand((), generator=generator).item()


def _choice(options, generator):
    return options[torch.randint(len(options), (), generator=generator).item()]


@dataclass(frozen=True)
class World:
    """A shapes world: the colours and shapes its captions use (the families, positions and
    sizes are every world's), and `only`: if given, its captions are those naming one of these
    words (as colour, shape or background): the data for teaching a model just those words.

    World() is the default world; `world(name)` builds the named larger ones.
    """
    colours: tuple = COLOURS
    shapes: tuple = SHAPES
    only: tuple = ()

    def __post_init__(self):
        self._set_words("colours", ALL_COLOURS, 2)  # a background needs a second colour
        self._set_words("shapes", ALL_SHAPES, 1)
        self._set_words("only", self.colours + self.shapes, 0)

    def _set_words(self, field, known, least):
        value = getattr(self, field)
        words = (value,) if isinstance(value, str) else tuple(value)
        if any(w not in known for w in words) or len(set(words)) != len(words) \
                or len(words) < least:
            raise ValueError(f"World {field} must be {least} or more distinct words of {known}, "
                             f"got {value!r}")
        object.__setattr__(self, field, words)  # frozen: lists and strings become tuples

    @property
    def name(self):
        """"shapes" plus "+word" for each word beyond the default world's (`world`'s inverse)."""
        extra = [w for w in self.colours + self.shapes if w not in COLOURS + SHAPES]
        return "+".join(["shapes", *extra])

    def naming(self, *words):
        """This world, with only the captions that name one of `words`."""
        return replace(self, only=words)

    def parse_caption(self, caption):
        """The inverse of `Prompt.caption` for this world's words (whatever `only` says);
        raises ValueError on text outside the three families."""
        colours, shapes = "|".join(self.colours), "|".join(self.shapes)
        pattern = (rf"a (?P<colour>{colours}) (?P<shape>{shapes})"
                   rf"(?: on a (?P<background>{colours}) background"
                   rf"| in the (?P<position>{'|'.join(POSITIONS)}))?")
        match = re.fullmatch(pattern, caption.strip().lower())
        if match is None:
            raise ValueError(f"{caption!r} is not a {self.name}-world caption")
        return Prompt(**match.groupdict())

    def all_prompts(self, family):
        """Every prompt of a family, in a fixed order (default world: 18, 90 and 90)."""
        objects = [(c, s) for c in self.colours for s in self.shapes]
        if family == "object":
            prompts = [Prompt(c, s) for c, s in objects]
        elif family == "background":
            prompts = [Prompt(c, s, background=b) for c, s in objects for b in self.colours
                       if b != c]
        elif family == "position":
            prompts = [Prompt(c, s, position=p) for c, s in objects for p in POSITIONS]
        else:
            raise ValueError(f"unknown family {family!r}; the families are {FAMILIES}")
        if not self.only:
            return prompts
        return [p for p in prompts if {p.colour, p.shape, p.background} & set(self.only)]

    def training_prompts(self, family):
        return [p for p in self.all_prompts(family) if not is_held_out(p)]

    def held_out_prompts(self, family):
        return [p for p in self.all_prompts(family) if is_held_out(p)]

    def scene_for(self, prompt, generator):
        """Draw a scene that satisfies `prompt`, choosing what it leaves open at random."""
        backgrounds = [c for c in self.colours if c != prompt.colour]
        background = prompt.background or _choice(backgrounds, generator)
        size = IMAGE_SIZE * _uniform(*SIZE_RANGE, generator)
        if prompt.position is None:
            anchor, jitter = (0.5, 0.5), MIDDLE_JITTER
        else:
            anchor, jitter = POSITIONS[prompt.position], POSITION_JITTER
        # Clamped so that the whole object stays inside the picture.
        x, y = (min(max(IMAGE_SIZE * a + _uniform(-jitter, jitter, generator), size / 2),
                    IMAGE_SIZE - size / 2) for a in anchor)
        return Scene(prompt.colour, prompt.shape, background, x, y, size)

    def batch_for(self, prompts, generator):
        """One image per prompt, each a fresh random scene that satisfies it."""
        scenes = [self.scene_for(p, generator) for p in prompts]
        return Batch(render(scenes), [p.caption for p in prompts], scenes)

    def training_batch(self, batch_size, generator):
        """A batch from the training distribution: a family uniformly, then one of its training
        prompts uniformly, then a random scene for it."""
        pools = {f: self.training_prompts(f) for f in FAMILIES}
        prompts = [_choice(pools[_choice(FAMILIES, generator)], generator)
                   for _ in range(batch_size)]
        return self.batch_for(prompts, generator)


def world(name):
    """The world called `name`: "shapes" (the default), then "+word" for each word it adds, from
    EXTRA_PALETTE and EXTRA_SHAPES: "shapes+purple", "shapes+purple+star" (EXTENDED)."""
    base, *extra = name.split("+")
    unknown = [w for w in extra if w not in ALL_COLOURS[len(COLOURS):] + EXTRA_SHAPES]
    if base != "shapes" or unknown or len(set(extra)) != len(extra):
        raise ValueError(f"unknown world {name!r}: 'shapes', then '+word' for each of "
                         f"{ALL_COLOURS[len(COLOURS):] + EXTRA_SHAPES} it adds")
    # In ALL_COLOURS / ALL_SHAPES order, whatever the name's: "shapes+star+purple" is the same.
    return World(tuple(c for c in ALL_COLOURS if c in COLOURS or c in extra),
                 tuple(s for s in ALL_SHAPES if s in SHAPES or s in extra))


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
    if any(s.shape == "star" for s in scenes):
        masks["star"] = _star_mask(dx, dy, half)
    return torch.stack([masks[s.shape][i] for i, s in enumerate(scenes)])


# A regular star {5/2}: outer radius R, inner r = R cos 72° / cos 36°. It is 2 R sin 72° wide and
# R (1 + cos 36°) tall, so with its width the box side, its box is 0.95 as tall as wide.
STAR_INNER = math.cos(math.radians(72)) / math.cos(math.radians(36))   # r / R = 0.382


def _star_mask(dx, dy, half):
    """(B, H, W): pixel centres inside an upright five-pointed star, its box `2 half` wide and
    centred at dx = dy = 0 (dx (B, 1, W), dy (B, H, 1), half (B, 1, 1))."""
    outer = half / math.sin(math.radians(72))                      # R, (B, 1, 1)
    # The star's centre sits below its box's: the top point is R above it, the bottom points
    # R cos 36° below.
    centre_y = outer * (1 - math.cos(math.radians(36))) / 2
    angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]   # top point first, clockwise
    radii = [outer if k % 2 == 0 else outer * STAR_INNER for k in range(10)]
    xs = [r * math.cos(a) for r, a in zip(radii, angles)]
    ys = [centre_y + r * math.sin(a) for r, a in zip(radii, angles)]
    # Even-odd rule: a point is inside if a ray to its right crosses the outline an odd number
    # of times.
    inside = torch.zeros(torch.broadcast_shapes(dx.shape, dy.shape), dtype=torch.bool)
    for k in range(10):
        x1, y1, x2, y2 = xs[k], ys[k], xs[k - 1], ys[k - 1]
        straddles = (y1 > dy) != (y2 > dy)                          # (B, H, 1)
        # where the edge meets the row; nan on horizontal edges, which never straddle
        x_cross = x1 + (dy - y1) * (x2 - x1) / (y2 - y1)
        inside ^= straddles & (dx < x_cross)
    return inside


def render(scenes, image_size=IMAGE_SIZE):
    """Scenes -> images (B, 3, H, W) in [-1, 1], hard-edged (no anti-aliasing)."""
    masks = shape_masks(scenes, image_size)[:, None]                           # (B, 1, H, W)
    colour = torch.tensor([RGB[s.colour] for s in scenes])[:, :, None, None]   # (B, 3, 1, 1)
    background = torch.tensor([RGB[s.background] for s in scenes])[:, :, None, None]
    return torch.where(masks, colour, background) * 2 - 1


@dataclass
class Batch:
    images: torch.Tensor   # (B, 3, 64, 64) in [-1, 1]
    captions: list         # B str
    scenes: list           # B Scene, the ground truth


# The default world, the one the shipped model learnt, and the largest one.
DEFAULT = World()
EXTENDED = world("shapes+purple+star")
# The LoRA's data (issue 13 part 7): the extended world's captions naming a new word.
NEW_CONCEPTS = EXTENDED.naming(*EXTRA_PALETTE, *EXTRA_SHAPES)

# The default world's methods, as the module's functions (`training_batch` is a data function of
# ldm.train).
parse_caption = DEFAULT.parse_caption
all_prompts = DEFAULT.all_prompts
training_prompts = DEFAULT.training_prompts
held_out_prompts = DEFAULT.held_out_prompts
scene_for = DEFAULT.scene_for
batch_for = DEFAULT.batch_for
training_batch = DEFAULT.training_batch
