"""DPM-Solver++(2S) ancestral in σ space (Lu et al. 2022, arXiv:2211.01095, Algorithm 1 with
r = 1/2), as k-diffusion's sample_dpmpp_2s_ancestral writes it.

With λ = −log σ, DPM-Solver++'s first-order step from σ to σ' = σ e^{−h} solves the ODE exactly
when the denoised estimate D is held constant:
    x' = (σ'/σ) x − (e^{−h} − 1) D                          (DDIM's step, in σ space)
The single-step second-order ("2S") variant takes that step halfway in λ first, to
σ_s = σ e^{−h/2}, and takes the whole step with the estimate made there:
    h       = log(σ_i / σ_down)
    u       = (σ_s/σ_i) x − (e^{−h/2} − 1) D(x, σ_i)
    x_down  = (σ_down/σ_i) x − (e^{−h} − 1) D(u, σ_s)
Ancestral: the step goes to σ_down, then fresh noise of size σ_up is added, as Euler a does
(euler.ancestral_sigmas). Two network calls per step, except the last (to σ = 0): plain Euler,
which lands on D(x, σ_i). σ_s falls between the trained steps: the U-Net is given its
fractional timestep (sigmas.sigma_to_t, clamped).

Shapes: x, D, z (B, C, h, w); timesteps descending, fractional allowed; alphas_cumprod (T,).
"""
import math

from ldm.samplers.common import randn
from ldm.samplers.euler import ancestral_sigmas
from ldm.samplers.sigmas import apply_callback, enter_sigma_space, sigma_to_t


def sample_dpmpp_2s_ancestral(eps_fn, x, timesteps, alphas_cumprod, *, eta=1.0, generator=None,
                              callback=None):
    """DPM++ 2S ancestral ("DPM++ 2S a") from x (SD's x_t at timesteps[0]) through every
    timestep to σ = 0; returns x0.

    2 len(timesteps) − 1 calls of eps_fn(x_t, t); callback(i, t, x, x0) as in sample_euler.
    Fresh noise z after every step but the last, drawn as common.randn(x.shape, generator,
    device=x.device, dtype=x.dtype) (one generator, or a list of one per image); eta scales
    σ_up (0: no noise)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
        if sigma_down == 0:
            x = x + (sigma_down - sigma) * (x - x0) / sigma
        else:
            h = math.log(sigma / sigma_down)
            sigma_s = sigma * math.exp(-h / 2)
            u = (sigma_s / sigma) * x - math.expm1(-h / 2) * x0
            x0_s = denoise(u, sigma_s, sigma_to_t(sigma_s, alphas_cumprod, clamp=True))
            x = (sigma_down / sigma) * x - math.expm1(-h) * x0_s
        if sigma_next > 0:
            x = x + sigma_up * randn(x.shape, generator, device=x.device, dtype=x.dtype)
        x = apply_callback(callback, i, t, x, sigma_next, x0)
    return x
