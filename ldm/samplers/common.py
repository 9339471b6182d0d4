"""What every sampler shares: ᾱ, the forward process q(x_t | x_0), x0 from ε, the checks
on a timestep list, and the draw of fresh noise.

ᾱ_t = ∏_{s ≤ t} (1 − β_s) is the one schedule quantity the samplers use. Its table is
`alphas_cumprod` (diffusers' name, in every signature); `alpha_bar(t)` reads it at any t and
`alpha_bar_list` at a list of steps; in a formula one value is `a` (`a_t`, and `a_prev` for the
next visited step, as CompVis names it).

Shapes: x, x0, noise (B, C, h, w); t an int or (B,) int64; alphas_cumprod (T,) float64.
"""
import torch

from ldm import rng


def randn(shape, generator, *, device=None, dtype=None):
    """Standard-normal noise of `shape` (B, C, h, w): every sampler's fresh noise.

    generator: one torch.Generator (None: torch's global one) or ldm.rng.PhiloxGenerator
    (CUDA's stream, drawn on the CPU and moved), which draws the whole batch in one call,
    torch.randn(shape, generator=generator, …), the stream diffusers and k-diffusion draw; or
    a list of B generators, image i's (C, h, w) drawn from generator i. With one
    generator per image, an image's noise does not depend on the batch it is made in, so the
    pipeline's image i of a batch seeded s is the image of seed s + i alone.
    """
    if not is_per_image(generator, shape[0]):
        return rng.draw(shape, generator, device=device, dtype=dtype)
    return torch.stack([rng.draw(shape[1:], g, device=device, dtype=dtype) for g in generator])


def is_per_image(generator, batch):
    """Whether `generator` is a list of generators, one per image of a batch of `batch`;
    ValueError for a list of another length."""
    if not isinstance(generator, (list, tuple)):
        return False
    if len(generator) != batch:
        raise ValueError(f"generator: {len(generator)} generators for a batch of {batch}; "
                         "give one generator, or one per image")
    return True


def add_noise(x0, noise, t, alphas_cumprod):
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) noise: a sample of q(x_t | x_0) (DDPM eq. 4).

    img2img and inpainting use it to put a clean latent at the level of their first timestep.
    t: an int (same step for the whole batch) or a (B,) int64 tensor (one step per image);
    fractional steps (a float, a float tensor) are interpolated as alpha_bar does.
    The coefficients are computed in float64, then cast to x0's dtype and device.
    """
    a = alpha_bar(t, alphas_cumprod).cpu()
    a = a.reshape(-1, *[1] * (x0.ndim - 1)).to(x0.device, x0.dtype)  # (B or 1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def alpha_bar(t, alphas_cumprod):
    """ᾱ_t in float64 on t's device; the table's value at integer t. At a fractional t (the
    Euler and DPM++ samplers' Karras steps) log σ_t, σ_t = √((1−ᾱ_t)/ᾱ_t), is interpolated
    linearly between the neighbouring trained steps, as k-diffusion's DiscreteSchedule does."""
    t = torch.as_tensor(t, dtype=torch.float64) if isinstance(t, float) else torch.as_tensor(t)
    if not t.is_floating_point():
        return torch.as_tensor(alphas_cumprod, dtype=torch.float64).to(t.device)[t]
    log_sigmas = sigmas_of(alphas_cumprod).log().to(t.device)
    low = t.floor().long().clamp(0, len(log_sigmas) - 2)
    w = t.double() - low
    log_sigma = (1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]
    return 1 / (1 + (2 * log_sigma).exp())  # ᾱ = 1 / (1 + σ²)


def sigmas_of(alphas_cumprod):
    """σ_t = √((1−ᾱ_t)/ᾱ_t) for every trained step, (T,) float64: the noise-to-signal ratio."""
    a = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    return ((1 - a) / a).sqrt()


def check_timesteps(timesteps, alphas_cumprod, fractional=False):
    """The timesteps as a list of Python numbers (ints, unless `fractional` allows floats),
    after checking they can be sampled.

    Converting once up front means the loops do their scalar math on the host in float64
    (Python floats) and never wait on the device.
    Raises ValueError unless timesteps is a non-empty 1-D sequence, strictly descending,
    within [0, len(alphas_cumprod) - 1], of integers (or of any numbers if `fractional`).
    """
    ts = torch.as_tensor(timesteps).cpu()
    kind = "" if fractional else "integer "
    if ts.ndim != 1 or len(ts) == 0 or (ts.is_floating_point() and not fractional):
        raise ValueError(f"timesteps must be a non-empty 1-D {kind}sequence, got {timesteps!r}")
    ts = ts.tolist()
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps must be strictly descending, got {ts}")
    last = len(alphas_cumprod) - 1
    if ts[-1] < 0 or ts[0] > last:
        raise ValueError(f"timesteps must lie in [0, {last}], got {ts[0]} … {ts[-1]}")
    return ts


def alpha_bar_list(timesteps, alphas_cumprod):
    """[ᾱ_t for t in timesteps] as Python floats (float64), for the loops' host-side math."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
    return ac[timesteps].tolist()


def predict_x0(x, eps, a):
    """The clean latent x_t implies given its noise: x0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t (DDPM eq. 15,
    DDIM eq. 12), q(x_t | x_0) solved for x0. Every sampler's x0 from ε is this one.
    x: x_t; a: ᾱ_t, a float or a tensor broadcasting against x."""
    return (x - (1 - a) ** 0.5 * eps) / a ** 0.5


def full_t(t, x):
    """The int step t as the (B,) int64 tensor on x's device that eps_fn takes."""
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
