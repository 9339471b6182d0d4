"""The judge of shapes world: reads an image's object colour, shape, background and position,
and says whether the image satisfies a caption. Hand-written, no learning, so that it measures
the generator and not a second network's mistakes.

    reading = read_image(image)        # image (3, 64, 64) in [-1, 1]
    checks = judge(image, prompt)      # {"colour": True, "shape": True, "background": False}

It knows every word of the largest world (`shapes.EXTENDED`: purple and the star too), so one
judge scores the shipped model and a model taught the new words alike.

How an image is read:
  1. every pixel gets its nearest palette colour; the background is the commonest colour of the
     2-pixel border (an object touches at most two sides, so it never has the majority);
  2. the object's body is the pixels farther than 0.5 from the background colour (half the
     spacing of the six pure colours; purple is 0.71 from its nearest), opened (eroded then
     dilated, 3×3) so that stray pixels and 1-pixel seams vanish;
  3. colour: the commonest palette colour inside the eroded body (its edge pixels are blends);
     the object mask is then the pixels next to the body that are nearer to the object's colour
     than to the background's: a blurred edge splits at the half-way blend, and the apex of a
     small triangle, which the opening blunts, is given back;
  4. position: the named part of the image nearest to the centre of the mask's bounding box;
  5. shape: a star if the object has deep notches (solidity = area / area of its convex hull
     below 0.8) and is widest across its arms, between its top point and its middle (the widest
     row's depth in the box between 0.2 and 0.5: an ideal star 0.38). Both are measured on the
     whole object, the mask grown within the pixels nearer to the object's colour than to the
     background's, since the opening of step 2 cuts a small star's thin points off. Otherwise
     the nearest prototype in (fill, top) space, where fill = mask area / box area and top =
     mean width of the top quarter of the box / widest row:
         square (1, 1),  circle (π/4, 0.614),  upright triangle (1/2, 1/8).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.data import shapes
from ldm.data.shapes import IMAGE_SIZE, RGB, nearest_position

COLOURS = shapes.EXTENDED.colours    # what the judge can read: every word of every world
parse_caption = shapes.EXTENDED.parse_caption
BORDER = 2
# Palette colours are ≥ 0.71 apart in RGB ([0, 1] units; ≥ 1 but for purple, 0.71 from red, blue
# and black): beyond 0.5 a pixel is not background, and a purple object on those still is.
FAR_FROM_BACKGROUND = 0.5
MIN_OBJECT_PIXELS = 16
# (fill, top) of each ideal convex shape: a square fills its box; a circle fills π/4 of it and its
# top quarter is on average 4∫₀^¼ 2√(d(1−d)) dd ≈ 0.614 of its width; a triangle fills half, and
# its top quarter is on average 1/8 of its base. (16-32 px renders measure 0.78/0.61, 0.52/0.15.)
SHAPE_PROTOTYPES = {"square": (1.0, 1.0), "circle": (math.pi / 4, 0.614), "triangle": (0.5, 0.125)}
# Solidity below which an object is notched. A regular star covers 5 R r sin 36° (r = 0.382 R) of
# the pentagon of its points, 0.472. Its 16-32 px renders measure 0.47-0.56, and 0.56-0.73 with
# the tests' noise and blur; circles 0.93-0.97, triangles 0.90-0.95 (the hull of the pixel squares
# is a little larger than the ideal shape), squares 0.98-1. But the shipped model draws a third
# of its triangles with pinched sides, down to 0.60 (its circles ≥ 0.82), hence the second test,
# ARMS_DEPTH: a star's arms are 0.691 R below its top, 0.38 of its height (renders 0.32-0.44,
# 0.37-0.46 after the shipped autoencoder); a pinched triangle is widest at its base (0.81-0.94).
STAR_SOLIDITY = 0.8
ARMS_DEPTH = (0.2, 0.5)
ATTRIBUTES = ("colour", "shape", "background", "position")


@dataclass(frozen=True)
class Reading:
    """What the judge sees in one image; None where it found no object."""
    colour: str | None
    shape: str | None
    background: str
    position: str | None
    box: tuple | None = None       # (x0, y0, x1, y1) pixels, end-exclusive

    def as_dict(self):
        return {a: getattr(self, a) for a in ATTRIBUTES}


def palette_labels(image):
    """(3, H, W) in [-1, 1] -> (H, W) index of each pixel's nearest colour in COLOURS."""
    rgb = ((image.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0)  # (H, W, 3)
    palette = torch.tensor([RGB[c] for c in COLOURS])               # (7, 3)
    return torch.cdist(rgb.reshape(-1, 3), palette).argmin(dim=1).reshape(rgb.shape[:2])


def _dilate(mask):
    return F.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0


def _erode(mask):
    # Padding counts as "inside", so a shape that touches the image edge is not eaten from it.
    return ~_dilate(~mask)


def _distance(rgb, colour):
    """(3, H, W) in [0, 1] -> (H, W) Euclidean distance of each pixel to a palette colour."""
    return (rgb - torch.tensor(RGB[colour])[:, None, None]).norm(dim=0)


def _commonest(labels):
    return COLOURS[torch.bincount(labels, minlength=len(COLOURS)).argmax().item()]


def read_image(image):
    """Read one image (3, H, W) in [-1, 1]: a `Reading`."""
    labels = palette_labels(image)
    border = torch.ones_like(labels, dtype=torch.bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    background = _commonest(labels[border])
    rgb = ((image.float() + 1) / 2).clamp(0, 1)
    to_background = _distance(rgb, background)                     # (H, W)
    body = _dilate(_erode(to_background > FAR_FROM_BACKGROUND))
    if body.sum() < MIN_OBJECT_PIXELS:
        return Reading(None, None, background, None)
    core = _erode(body)
    colour = _commonest(labels[core if core.any() else body])
    nearer = _distance(rgb, colour) < to_background
    mask = _dilate(body) & nearer
    if colour == background or mask.sum() < MIN_OBJECT_PIXELS:  # a smudge, not an object
        return Reading(None, None, background, None)
    box = _box(mask)
    height, width = labels.shape
    position = nearest_position((box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height)
    return Reading(colour, _shape(mask, box, _grow(mask, nearer)), background, position, box)


def _grow(mask, within):
    """The pixels of `within` connected to `mask` (8-neighbours): the mask, its points restored."""
    while True:
        grown = _dilate(mask) & within
        if torch.equal(grown, mask):
            return mask
        mask = grown


def _box(mask):
    """(x0, y0, x1, y1), end-exclusive, of the True pixels of a (H, W) mask."""
    rows = mask.any(dim=1).nonzero()[:, 0]
    cols = mask.any(dim=0).nonzero()[:, 0]
    return cols[0].item(), rows[0].item(), cols[-1].item() + 1, rows[-1].item() + 1


def _shape(mask, box, whole):
    """"star" if the whole object looks like one, else the convex shape whose (fill, top)
    prototype is nearest to the mask's."""
    if _is_star(whole):
        return "star"
    x0, y0, x1, y1 = box
    inside = mask[y0:y1, x0:x1]
    fill = inside.float().mean().item()
    widths = inside.sum(dim=1).float()               # (box height,) pixels per row
    top_rows = max(1, round(len(widths) / 4))
    top = (widths[:top_rows].mean() / widths.max()).item()
    return min(SHAPE_PROTOTYPES, key=lambda s: (SHAPE_PROTOTYPES[s][0] - fill) ** 2
               + (SHAPE_PROTOTYPES[s][1] - top) ** 2)


def _is_star(mask):
    """Notched, and widest across its arms: between its top point and its middle."""
    x0, y0, x1, y1 = _box(mask)
    widths = mask[y0:y1, x0:x1].sum(dim=1)           # (box height,) pixels per row
    widest = (widths == widths.max()).nonzero()[:, 0].float().mean().item()
    arms = (widest + 0.5) / len(widths)
    return ARMS_DEPTH[0] < arms < ARMS_DEPTH[1] and solidity(mask) < STAR_SOLIDITY


def solidity(mask):
    """Area of a (H, W) mask / area of the convex hull of its pixels (unit squares): 1 for a
    convex shape drawn on the pixel grid, about 0.5 for a five-pointed star."""
    rows = mask.any(dim=1).nonzero()[:, 0]
    cols = torch.arange(mask.shape[1])
    left = torch.where(mask, cols, mask.shape[1]).amin(dim=1)[rows]    # first pixel of each row
    right = torch.where(mask, cols, -1).amax(dim=1)[rows] + 1           # past the last one
    # Only the outer corners of each row's end pixels can be corners of the hull.
    points = [(x, y) for r, x0, x1 in zip(rows.tolist(), left.tolist(), right.tolist())
              for x in (x0, x1) for y in (r, r + 1)]
    return mask.sum().item() / _hull_area(points)


def _hull_area(points):
    """Area of the convex hull of (x, y) points: Andrew's monotone chain, then the shoelace."""
    points = sorted(set(points))
    hull = _half_hull(points) + _half_hull(points[::-1])
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1]))) / 2


def _half_hull(points):
    """One side of the hull of points sorted along x, without its last point (the other side's
    first)."""
    chain = []
    for x, y in points:
        # Drop the last corner while it does not turn left on the way to (x, y).
        while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (y - chain[-2][1])
                                   - (chain[-1][1] - chain[-2][1]) * (x - chain[-2][0])) <= 0:
            chain.pop()
        chain.append((x, y))
    return chain[:-1]


def judge(image, prompt):
    """{attribute: satisfied} for each attribute the prompt (or caption string) names."""
    if isinstance(prompt, str):
        prompt = parse_caption(prompt)
    reading = read_image(image)
    wanted = {"colour": prompt.colour, "shape": prompt.shape,
              "background": prompt.background, "position": prompt.position}
    return {a: getattr(reading, a) == v for a, v in wanted.items() if v is not None}


def accepts(image, prompt):
    """True if the image satisfies every attribute the prompt names."""
    return all(judge(image, prompt).values())


# -- evaluating a model -------------------------------------------------------------------------

def evaluate(pipe, prompts, *, samples=8, seed=0, **sampling):
    """Draw `samples` images per prompt with `pipe.txt2img` and judge each one.

    seed: which block of n = len(prompts) × samples image seeds, image i taking s·n + i, so that
    two seeds never share a noise (with s + i, seeds 0 and 1 would share 7 of every prompt's
    8). sampling: steps, sampler, cfg_scale, cfg_interval (default: the model's). Returns a
    list of (prompt, {attribute: satisfied}), one per image.
    """
    first = seed * len(prompts) * samples
    images = pipe.txt2img([p.caption for p in prompts], num_images=samples, seed=first,
                          height=IMAGE_SIZE, width=IMAGE_SIZE, output_type="tensor",
                          progress=False, **sampling)
    repeated = [p for p in prompts for _ in range(samples)]  # txt2img's order: prompt-major
    return [(p, judge(image, p)) for p, image in zip(repeated, images)]


def accuracy(results):
    """{attribute: fraction satisfied, "all": fraction fully right} over `evaluate`'s results."""
    named = {a: [checks[a] for _, checks in results if a in checks] for a in ATTRIBUTES}
    scores = {a: sum(v) / len(v) for a, v in named.items() if v}
    scores["all"] = sum(all(checks.values()) for _, checks in results) / len(results)
    return scores


def _report(pipe, split, samples, cfg_scale, seed, world=shapes.DEFAULT, cfg_interval=None,
            **sampling):
    """Markdown table: per family, with and without guidance, per attribute and overall.
    cfg_interval: the guided rows' (None: every step)."""
    pick = world.held_out_prompts if split == "held-out" else world.training_prompts
    header = "| family | prompts × samples | guidance | colour | shape | background | position | all |"
    lines = [header, "|" + "---|" * 8]
    totals = {}
    for family in shapes.FAMILIES:
        prompts = pick(family)
        if not prompts:  # a world `naming` only some words may have none in a family
            continue
        for scale in (1.0, cfg_scale):
            # (0, 1000): every step, where txt2img's None would mean the model's default
            results = evaluate(pipe, prompts, samples=samples, seed=seed, cfg_scale=scale,
                               cfg_interval=cfg_interval or (0, 1000), **sampling)
            totals.setdefault(scale, []).extend(results)
            lines.append(_row(family, f"{len(prompts)} × {samples}", scale, accuracy(results),
                              cfg_interval))
    for scale, results in totals.items():
        lines.append(_row("**all**", str(len(results)), scale, accuracy(results), cfg_interval))
    return "\n".join(lines)


def _row(family, count, scale, scores, cfg_interval=None):
    guidance = "none (1.0)" if scale == 1.0 else f"{scale:g}"
    if scale != 1.0 and cfg_interval is not None:
        guidance += " at t {:g}–{:g}".format(*cfg_interval)
    cells = [f"{100 * scores[a]:.1f}" if a in scores else "–" for a in (*ATTRIBUTES, "all")]
    return f"| {family} | {count} | {guidance} | " + " | ".join(cells) + " |"


def main(argv=None):
    import argparse

    from ldm.loader import load
    from ldm.samplers.registry import sampler_names

    p = argparse.ArgumentParser(prog="python -m ldm.judge", description="Judge a shapes-world "
                                "model: accuracy (%) per family, with and without guidance.")
    p.add_argument("--ckpt", help="model file (default: the shipped model)")
    p.add_argument("--split", choices=("held-out", "train"), default="held-out")
    p.add_argument("--samples", type=int, default=8, help="images per prompt")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--sampler", choices=sampler_names(), help="default: the model's")
    p.add_argument("--cfg-scale", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LOW", "HIGH"),
                   help="guidance only at timesteps LOW to HIGH (default: the model's; "
                   "0 1000: every step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", default="shapes", help="whose prompts: 'shapes' (the default "
                   "world), or a larger one, 'shapes+purple+star' (ldm.data.shapes.world)")
    p.add_argument("--only", nargs="+", default=(), metavar="WORD", help="only the prompts "
                   "that name one of these words (e.g. --only purple star)")
    p.add_argument("--lora", metavar="FILE", help="a LoRA to merge into the model first")
    p.add_argument("--lora-multiplier", type=float, default=1.0)
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16",
                                                          "float16"),
                   help="the model's dtype (default float32, the model card's; auto: ldm.load's)")
    args = p.parse_args(argv)
    try:
        world = shapes.world(args.world).naming(*args.only)
    except ValueError as error:
        p.error(f"--world / --only: {error}")
    pipe = load(args.ckpt, dtype=args.dtype)
    if args.lora:
        pipe.load_lora(args.lora, args.lora_multiplier)
    scale = pipe.config.sampling.cfg_scale if args.cfg_scale is None else args.cfg_scale
    interval = args.cfg_interval or pipe.config.sampling.cfg_interval
    print(_report(pipe, args.split, args.samples, scale, args.seed, world, steps=args.steps,
                  sampler=args.sampler, cfg_interval=interval))


if __name__ == "__main__":
    main()
