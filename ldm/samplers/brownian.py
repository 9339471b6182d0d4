"""The noise of the SDE samplers: plain Gaussian draws, or increments of one Brownian motion
W(σ) sampled by a Brownian tree, as k-diffusion's BrownianTreeNoiseSampler (the noise
AUTOMATIC1111 gives DPM++ SDE, 2M SDE and 3M SDE).

An SDE sampler's step from σ to σ' needs z ~ N(0, I). Drawn fresh at every step, z depends on
how many draws came before, so the image changes with the step count. Taken instead as the
normalised increment of a single Brownian path fixed by a seed,
    z = (W(σ') − W(σ)) / √|σ' − σ|,
the noise over a stretch of σ is the same however it is cut into steps: more steps refine the
same path, and the image converges as the step count grows. torchsde's BrownianTree samples W
at any σ from the seed alone, independently of the order of the queries (it bisects [σ_min,
σ_max], each sub-interval's Brownian bridge seeded from its place in the tree).

Shapes: x, z (B, C, h, w); σ Python floats.
"""
import math
import warnings

import torch
import torchsde

from ldm import rng
from ldm.samplers.common import is_per_image, randn

NOISE_KINDS = ("gaussian", "brownian")


class BrownianNoise:
    """z(σ, σ') = (W(σ') − W(σ)) / √|σ' − σ| for σ, σ' in [sigma_min, sigma_max].

    seed: an int (one path for the whole batch, k-diffusion's default), or a list of B ints
    (one path per image, each from its own seed, as A1111 seeds each image of a batch)."""

    def __init__(self, x, sigma_min, sigma_max, seed):
        # float16 cannot resolve the small increments of W; the path lives in float32 at least
        dtype = torch.promote_types(x.dtype, torch.float32)
        per_image = isinstance(seed, (list, tuple))
        if per_image and len(seed) != x.shape[0]:
            raise ValueError(f"seed must be an int or {x.shape[0]} ints, one per image, got {seed}")
        w0 = torch.zeros(x.shape[1:] if per_image else x.shape, dtype=dtype, device=x.device)
        self.per_image, self.dtype = per_image, x.dtype
        self.trees = [torchsde.BrownianTree(sigma_min, w0, sigma_max, entropy=s)
                      for s in (seed if per_image else [seed])]

    def __call__(self, sigma, sigma_next):
        low, high = sorted((sigma, sigma_next))
        with warnings.catch_warnings():
            # torchsde rounds the tree's ends to its tolerance (1e-6) and warns when a query at
            # σ_max lies past the rounded end; it clamps the query, which is what is wanted.
            warnings.filterwarnings("ignore", "Should have", UserWarning)
            w = torch.stack([tree(low, high) for tree in self.trees])  # W(high) − W(low)
        w = w if self.per_image else w[0]
        if sigma_next < sigma:  # the samplers step down: W(σ') − W(σ) = −(W(σ) − W(σ'))
            w = -w
        return (w / math.sqrt(high - low)).to(self.dtype)


def noise_sampler(kind, x, sigmas, generator=None):
    """z(σ, σ') -> (B, C, h, w) standard-normal noise for the step from σ to σ'.

    generator: one torch.Generator for the batch (None: torch's global one), or a list of B, one
    per image. kind "gaussian": common.randn(x.shape, generator, device=x.device, dtype=x.dtype)
    at each call. kind "brownian": BrownianNoise over the positive `sigmas`, its seed drawn from
    `generator` (with a list, one path per image, its seed drawn from the image's generator),
    so that a seed still fixes the image."""
    if kind == "gaussian":
        return lambda sigma, sigma_next: randn(x.shape, generator, device=x.device, dtype=x.dtype)
    if kind != "brownian":
        raise ValueError(f"noise must be one of {NOISE_KINDS}, got {kind!r}")
    if is_per_image(generator, x.shape[0]):
        seed = [_draw_seed(g) for g in generator]
    else:
        seed = _draw_seed(generator)
    positive = [s for s in sigmas if s > 0]
    return BrownianNoise(x, min(positive), max(positive), seed)


def _draw_seed(generator):
    """A Brownian tree's seed, drawn on the generator's device (the CPU for torch's global one);
    a PhiloxGenerator's own seed, which is how A1111 seeds each image's tree."""
    if isinstance(generator, rng.PhiloxGenerator):
        return generator.initial_seed()
    device = "cpu" if generator is None else generator.device
    return int(torch.randint(2 ** 63 - 1, (), generator=generator, device=device))
