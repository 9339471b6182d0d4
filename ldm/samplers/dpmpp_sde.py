"""DPM-Solver++ SDE in σ space (Lu et al. 2022, arXiv:2211.01095: DPM-Solver++(2S) on the
reverse SDE, with r = 1/2), as k-diffusion's sample_dpmpp_sde writes it: A1111's "DPM++ SDE".

Each step is two ancestral DPM-Solver++ steps (dpmpp_2s.py) from the same x: the first to the
halfway point in λ = −log σ, σ_s = σ_i e^{−h/2} = √(σ_i σ_{i+1}), only to estimate D there; the
second over the whole step with that estimate:
    (σ_d, σ_u) = ancestral(σ_i, σ_s, η)
    u          = (σ_d/σ_i) x + (1 − σ_d/σ_i) D(x, σ_i) + σ_u z(σ_i, σ_s)
    (σ_d, σ_u) = ancestral(σ_i, σ_{i+1}, η)
    x_{i+1}    = (σ_d/σ_i) x + (1 − σ_d/σ_i) D(u, σ_s) + σ_u z(σ_i, σ_{i+1})
(σ_d/σ_i = e^{−h} of the DPM-Solver++ step, σ_d/σ_i x − (e^{−h} − 1) D; with a general r the
second estimate would be (1 − 1/(2r)) D(x, σ_i) + 1/(2r) D(u, σ_s), which r = 1/2 reduces to
D(u, σ_s).) The two noises are increments of one Brownian path W (brownian.py) over
[σ_s, σ_i] and [σ_{i+1}, σ_i], so they are correlated as the SDE's are; seeded from
`generator`, the path fixes the image, and at different step counts the images stay close.
Two network calls per step, except the last (to σ = 0): plain Euler, which lands on D(x, σ_i).
ancestral is euler.ancestral_sigmas; σ_s falls between the trained steps: the U-Net is given
its fractional timestep (sigmas.sigma_to_t, clamped).

Shapes: x, D, z (B, C, h, w); timesteps descending, fractional allowed; alphas_cumprod (T,).
"""
import math

from ldm.samplers.brownian import noise_sampler
from ldm.samplers.euler import ancestral_sigmas
from ldm.samplers.sigmas import apply_callback, enter_sigma_space, sigma_to_t


def sample_dpmpp_sde(eps_fn, x, timesteps, alphas_cumprod, *, eta=1.0, generator=None,
                     callback=None):
    """DPM++ SDE from x (SD's x_t at timesteps[0]) through every timestep to σ = 0; returns x0.

    2 len(timesteps) − 1 calls of eps_fn(x_t, t); callback(i, t, x, x0) as in sample_euler.
    The Brownian path's seed is drawn from `generator`; eta scales σ_u (0: no noise, the
    DPM-Solver++(2S) ODE solver)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    noise = noise_sampler("brownian", x, sigmas, generator)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)
        if sigma_next == 0:
            x = x + (sigma_next - sigma) * (x - x0) / sigma
        else:
            sigma_s = math.sqrt(sigma * sigma_next)
            u = _ancestral_step(x, x0, sigma, sigma_s, eta, noise)
            x0_s = denoise(u, sigma_s, sigma_to_t(sigma_s, alphas_cumprod, clamp=True))
            x = _ancestral_step(x, x0_s, sigma, sigma_next, eta, noise)
        x = apply_callback(callback, i, t, x, sigma_next, x0)
    return x


def _ancestral_step(x, x0, sigma, sigma_next, eta, noise):
    """DPM-Solver++'s first-order step from σ down to σ_d with the estimate x0, then the
    Brownian increment over [σ_next, σ] of size σ_u."""
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    ratio = sigma_down / sigma  # e^{−h}, written so that σ_d = 0 (η > 1) needs no log 0
    return ratio * x + (1 - ratio) * x0 + sigma_up * noise(sigma, sigma_next)
