"""Euler and Euler ancestral in σ space (Karras et al. 2022, arXiv:2206.00364: the first-order
step of their Algorithm 1; the ancestral variant as k-diffusion's sample_euler_ancestral).

With x = x0 + σ ε (sigmas.py), the probability-flow ODE is dx/dσ = (x − D(x, σ)) / σ. Euler:
    d       = (x − D(x, σ_i)) / σ_i
    x_{i+1} = x + (σ_{i+1} − σ_i) d
Ancestral: step down to σ_down, then add fresh noise of size σ_up, where σ_down² + σ_up² =
σ_{i+1}² and σ_up = η σ_{i+1} √(1 − σ_{i+1}²/σ_i²): η = 1 adds as much noise as DDPM would,
η = 0 none (σ_down = σ_{i+1}: the Euler step). The last step lands on σ = 0: x is the clean
latent.
Over the same timesteps, Euler is DDIM (η = 0) in other coordinates, except that DDIM's last
step stops at ᾱ_0 instead of σ = 0; Euler a (η = 1) is DDPM's ancestral step, the same numbers
for the same noise (tests/test_k_samplers.py checks both, and Euler against Euler a at η = 0).

Shapes: x, d, z (B, C, h, w); timesteps descending, fractional allowed; alphas_cumprod (T,).
"""
from ldm.samplers.common import randn
from ldm.samplers.sigmas import apply_callback, enter_sigma_space


def sample_euler(eps_fn, x, timesteps, alphas_cumprod, *, callback=None):
    """Euler from x (SD's x_t at timesteps[0]) through every timestep to σ = 0; returns x0.

    eps_fn(x_t, t) -> ε, t (B,) int64 or float; callback(i, t, x, x0) as in sample_ddim (x
    given and taken back as SD's x_t at the next step's noise level)."""
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)
        d = (x - x0) / sigma  # dx/dσ
        x = x + (sigma_next - sigma) * d
        x = apply_callback(callback, i, t, x, sigma_next, x0)
    return x


def ancestral_sigmas(sigma, sigma_next, eta=1.0):
    """(σ_down, σ_up) for an ancestral step from σ to σ_next (floats): σ_up as above, capped at
    σ_next, and σ_down = √(σ_next² − σ_up²), so the step ends at σ_next's noise level."""
    sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2)
                                      / sigma ** 2) ** 0.5)
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def sample_euler_ancestral(eps_fn, x, timesteps, alphas_cumprod, *, eta=1.0, generator=None,
                           callback=None):
    """Euler ancestral ("Euler a"); as sample_euler, plus fresh noise z after every step but the
    last, drawn as common.randn(x.shape, generator, device=x.device, dtype=x.dtype) (one
    generator, or a list of one per image).
    eta scales σ_up: 1 is k-diffusion's (and diffusers') Euler a, 0 is plain Euler."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
        d = (x - x0) / sigma  # dx/dσ
        x = x + (sigma_down - sigma) * d
        if sigma_up > 0:
            x = x + sigma_up * randn(x.shape, generator, device=x.device, dtype=x.dtype)
        x = apply_callback(callback, i, t, x, sigma_next, x0)
    return x
