"""Codec pictures: generic pictures for training an autoencoder that must encode more than one
world. Each is one to three hard-edged objects in random colours on a random flat background,
each object one of

    a rectangle, an ellipse             axis-aligned, aspect 0.4-1.6
    a star-shaped polygon               3-10 vertices at random angles and radii
    a spiky polygon                     3-8 spikes: vertices alternating between an outer and an
                                        inner radius (0.25-0.6 of it), each jittered, any rotation

Half the objects are spiky, so thin points of every size and direction are common; none is the
shapes world's upright regular star in particular, so an autoencoder trained on these pictures
and on the default shapes world has still not seen a star.

    pictures(8, generator)          # (8, 3, 64, 64) in [-1, 1], exactly reproducible

Geometry as in `ldm.data.shapes`: pixels, y downwards, pixel (i, j) centred at (j + ½, i + ½);
sizes are for 64 px and scale with `size`.
"""
import math

import torch

SPIKY_SHARE = 0.5   # of the objects; the other three kinds share the rest equally


def pictures(n, generator, size=64):
    """(n, 3, size, size) float in [-1, 1]: n codec pictures drawn from `generator`."""
    centres = torch.arange(size, dtype=torch.float32) + 0.5
    grid = torch.meshgrid(centres, centres, indexing="ij")          # (y, x), each (size, size)
    images = torch.empty(n, 3, size, size)
    for i in range(n):
        image = torch.rand(3, 1, 1, generator=generator).expand(3, size, size).clone()
        for _ in range(int(torch.randint(1, 4, (), generator=generator))):
            mask = _object_mask(grid, size / 64, generator)
            image = torch.where(mask, torch.rand(3, 1, 1, generator=generator), image)
        images[i] = image
    return images * 2 - 1


def _uniform(low, high, generator):
    return low + (high - low) * torch.rand((), generator=generator).item()


def _object_mask(grid, scale, generator):
    """(size, size) bool: one object, its kind drawn first."""
    yy, xx = grid
    g = generator
    spiky = torch.rand((), generator=g).item() < SPIKY_SHARE
    kind = "spiky" if spiky else ("rectangle", "ellipse", "polygon")[
        int(torch.randint(3, (), generator=g))]
    cx, cy = (_uniform(4, 60, g) * scale for _ in range(2))
    if kind == "spiky":
        return _polygon_mask(grid, *_spiky_vertices(cx, cy, _uniform(4, 20, g) * scale, g))
    r = _uniform(3, 20, g) * scale
    if kind in ("rectangle", "ellipse"):
        w, h = r, r * _uniform(0.4, 1.6, g)
        if kind == "rectangle":
            return ((xx - cx).abs() < w) & ((yy - cy).abs() < h)
        return ((xx - cx) / w) ** 2 + ((yy - cy) / h) ** 2 < 1
    k = int(torch.randint(3, 11, (), generator=g))
    angles = sorted(_uniform(0, 2 * math.pi, g) for _ in range(k))
    radii = [r * _uniform(0.3, 1.0, g) for _ in range(k)]
    return _polygon_mask(grid, [cx + q * math.cos(a) for q, a in zip(radii, angles)],
                         [cy + q * math.sin(a) for q, a in zip(radii, angles)])


def _spiky_vertices(cx, cy, r, g):
    spikes = int(torch.randint(3, 9, (), generator=g))
    turn = _uniform(0, 2 * math.pi, g)
    xs, ys = [], []
    for i in range(2 * spikes):
        q = r * (_uniform(0.8, 1.0, g) if i % 2 == 0 else _uniform(0.25, 0.6, g))
        a = turn + math.pi * i / spikes + _uniform(-0.15, 0.15, g)
        xs.append(cx + q * math.cos(a))
        ys.append(cy + q * math.sin(a))
    return xs, ys


def _polygon_mask(grid, xs, ys):
    """Pixel centres inside the closed polygon (even-odd rule: a ray to the left crosses an
    odd number of edges)."""
    yy, xx = grid
    inside = torch.zeros_like(xx, dtype=torch.bool)
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:] + xs[:1], ys[1:] + ys[:1])):
        if y0 == y1:
            continue
        inside ^= ((y0 > yy) != (y1 > yy)) & (xx < x0 + (yy - y0) * (x1 - x0) / (y1 - y0))
    return inside
