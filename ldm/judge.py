"""The judge of shapes world: reads an image's object colour, shape, background and position,
and says whether the image satisfies a caption. Hand-written, no learning, so that it measures
the generator and not a second network's mistakes.

    reading = read_image(image)        # image (3, 64, 64) in [-1, 1]
    checks = judge(image, prompt)      # {"colour": True, "shape": True, "background": False}

How an image is read:
  1. every pixel gets its nearest palette colour; the background is the commonest colour of the
     2-pixel border (an object touches at most two sides, so it never has the majority);
  2. the object's body is the pixels farther than half the palette spacing from the background
     colour, opened (eroded then dilated, 3×3) so that stray pixels and 1-pixel seams vanish;
  3. colour: the commonest palette colour inside the eroded body (its edge pixels are blends);
     the object mask is then the pixels next to the body that are nearer to the object's colour
     than to the background's: a blurred edge splits at the half-way blend, and the apex of a
     small triangle, which the opening blunts, is given back;
  4. position: the named part of the image nearest to the centre of the mask's bounding box;
  5. shape: the nearest prototype in (fill, top) space, where fill = mask area / box area and
     top = mean width of the top quarter of the box / widest row:
         square (1, 1),  circle (π/4, 0.614),  upright triangle (1/2, 1/8).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.data.shapes import COLOURS, IMAGE_SIZE, PALETTE, nearest_position, parse_caption

BORDER = 2
# Palette colours are ≥ 1 apart in RGB ([0, 1] units): beyond 0.5 a pixel is not background.
FAR_FROM_BACKGROUND = 0.5
MIN_OBJECT_PIXELS = 16
# (fill, top) of each ideal shape: a square fills its box; a circle fills π/4 of it and its top
# quarter is on average 4∫₀^¼ 2√(d(1−d)) dd ≈ 0.614 of its width; a triangle fills half, and its
# top quarter is on average 1/8 of its base. (16-32 px renders measure 0.78/0.61, 0.52/0.15.)
SHAPE_PROTOTYPES = {"square": (1.0, 1.0), "circle": (math.pi / 4, 0.614), "triangle": (0.5, 0.125)}
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
    palette = torch.tensor([PALETTE[c] for c in COLOURS])           # (6, 3)
    return torch.cdist(rgb.reshape(-1, 3), palette).argmin(dim=1).reshape(rgb.shape[:2])


def _dilate(mask):
    return F.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0


def _erode(mask):
    # Padding counts as "inside", so a shape that touches the image edge is not eaten from it.
    return ~_dilate(~mask)


def _distance(rgb, colour):
    """(3, H, W) in [0, 1] -> (H, W) Euclidean distance of each pixel to a palette colour."""
    return (rgb - torch.tensor(PALETTE[colour])[:, None, None]).norm(dim=0)


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
    mask = _dilate(body) & (_distance(rgb, colour) < to_background)
    if colour == background or mask.sum() < MIN_OBJECT_PIXELS:  # a smudge, not an object
        return Reading(None, None, background, None)
    box = _box(mask)
    height, width = labels.shape
    position = nearest_position((box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height)
    return Reading(colour, _shape(mask, box), background, position, box)


def _box(mask):
    """(x0, y0, x1, y1), end-exclusive, of the True pixels of a (H, W) mask."""
    rows = mask.any(dim=1).nonzero()[:, 0]
    cols = mask.any(dim=0).nonzero()[:, 0]
    return cols[0].item(), rows[0].item(), cols[-1].item() + 1, rows[-1].item() + 1


def _shape(mask, box):
    """The shape whose (fill, top) prototype is nearest to the mask's."""
    x0, y0, x1, y1 = box
    inside = mask[y0:y1, x0:x1]
    fill = inside.float().mean().item()
    widths = inside.sum(dim=1).float()               # (box height,) pixels per row
    top_rows = max(1, round(len(widths) / 4))
    top = (widths[:top_rows].mean() / widths.max()).item()
    return min(SHAPE_PROTOTYPES, key=lambda s: (SHAPE_PROTOTYPES[s][0] - fill) ** 2
               + (SHAPE_PROTOTYPES[s][1] - top) ** 2)


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

    sampling: steps, sampler, cfg_scale (default: the model's). Returns a list of
    (prompt, {attribute: satisfied}), one per image.
    """
    images = pipe.txt2img([p.caption for p in prompts], num_images=samples, seed=seed,
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


def _report(pipe, split, samples, cfg_scale, seed, **sampling):
    """Markdown table: per family, with and without guidance, per attribute and overall."""
    from ldm.data.shapes import FAMILIES, held_out_prompts, training_prompts

    pick = held_out_prompts if split == "held-out" else training_prompts
    header = "| family | prompts × samples | guidance | colour | shape | background | position | all |"
    lines = [header, "|" + "---|" * 8]
    totals = {}
    for family in FAMILIES:
        prompts = pick(family)
        for scale in (1.0, cfg_scale):
            results = evaluate(pipe, prompts, samples=samples, seed=seed, cfg_scale=scale,
                               **sampling)
            totals.setdefault(scale, []).extend(results)
            lines.append(_row(family, f"{len(prompts)} × {samples}", scale, accuracy(results)))
    for scale, results in totals.items():
        lines.append(_row("**all**", str(len(results)), scale, accuracy(results)))
    return "\n".join(lines)


def _row(family, count, scale, scores):
    guidance = "none (1.0)" if scale == 1.0 else f"{scale:g}"
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
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pipe = load(args.ckpt)
    scale = pipe.config.sampling.cfg_scale if args.cfg_scale is None else args.cfg_scale
    print(_report(pipe, args.split, args.samples, scale, args.seed, steps=args.steps,
                  sampler=args.sampler))


if __name__ == "__main__":
    main()
