"""DPM2 and DPM2 ancestral in σ space (Karras et al. 2022, arXiv:2206.00364, Algorithm 2 with a
DPM-Solver-2 step, Lu et al. 2022, arXiv:2206.00927), as k-diffusion's sample_dpm_2 (with no
noise "churn") and sample_dpm_2_ancestral write them.

Heun (heun.py) measures the second slope at the end of the step; DPM2 measures it at the
midpoint in log σ and takes the whole step with it (the midpoint method):
    d       = (x − D(x, σ_i)) / σ_i
    σ_mid   = √(σ_i σ_{i+1})                               (log σ_mid halfway)
    x̃       = x + (σ_mid − σ_i) d
    d'      = (x̃ − D(x̃, σ_mid)) / σ_mid
    x_{i+1} = x + (σ_{i+1} − σ_i) d'
Two network calls per step, except the last (to σ = 0, where log σ is undefined): plain Euler,
which lands on D(x, σ_i).
Ancestral: the same step to σ_down instead of σ_{i+1}, then fresh noise of size σ_up, as Euler a
does (euler.ancestral_sigmas). σ_mid falls between the trained steps: the U-Net is given its
fractional timestep (sigmas.sigma_to_t, clamped).

Shapes: x, d, z (B, C, h, w); timesteps descending, fractional allowed; alphas_cumprod (T,).
"""
import math

from ldm.samplers.common import randn
from ldm.samplers.euler import ancestral_sigmas
from ldm.samplers.sigmas import apply_callback, enter_sigma_space, sigma_to_t


def sample_dpm2(eps_fn, x, timesteps, alphas_cumprod, *, callback=None):
    """DPM2 from x (SD's x_t at timesteps[0]) through every timestep to σ = 0; returns x0.

    2 len(timesteps) − 1 calls of eps_fn(x_t, t); callback(i, t, x, x0) as in sample_euler."""
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)
        d = (x - x0) / sigma  # dx/dσ
        if sigma_next == 0:
            x = x + (sigma_next - sigma) * d
        else:
            sigma_mid = math.sqrt(sigma * sigma_next)
            x_mid = x + (sigma_mid - sigma) * d
            x0_mid = denoise(x_mid, sigma_mid, sigma_to_t(sigma_mid, alphas_cumprod, clamp=True))
            x = x + (sigma_next - sigma) * (x_mid - x0_mid) / sigma_mid
        x = apply_callback(callback, i, t, x, sigma_next, x0)
    return x


def sample_dpm2_ancestral(eps_fn, x, timesteps, alphas_cumprod, *, eta=1.0, generator=None,
                          callback=None):
    """DPM2 ancestral ("DPM2 a"); as sample_dpm2, plus fresh noise z after every step but the
    last, drawn as common.randn(x.shape, generator, device=x.device, dtype=x.dtype) (one
    generator, or a list of one per image).
    eta scales σ_up: 1 is k-diffusion's, 0 is plain DPM2."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
        d = (x - x0) / sigma  # dx/dσ
        if sigma_down == 0:
            x = x + (sigma_down - sigma) * d
        else:
            sigma_mid = math.sqrt(sigma * sigma_down)
            x_mid = x + (sigma_mid - sigma) * d
            x0_mid = denoise(x_mid, sigma_mid, sigma_to_t(sigma_mid, alphas_cumprod, clamp=True))
            x = x + (sigma_down - sigma) * (x_mid - x0_mid) / sigma_mid
        # k-diffusion adds no noise when η > 1 drives σ_down to 0 before σ_{i+1} = 0; the
        # ancestral step needs it whenever σ_up > 0.
        if sigma_up > 0:
            x = x + sigma_up * randn(x.shape, generator, device=x.device, dtype=x.dtype)
        x = apply_callback(callback, i, t, x, sigma_next, x0)
    return x
