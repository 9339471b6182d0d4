"""Heun's method in σ space (Karras et al. 2022, arXiv:2206.00364, Algorithm 1: deterministic
sampling; their Algorithm 2's noise "churn" is left out, as k-diffusion's sample_heun defaults).

A second-order (trapezoid) correction of the Euler step of euler.py: take the Euler step to
σ_{i+1}, measure the slope there too, and step again from x with the average of both slopes:
    d       = (x − D(x, σ_i)) / σ_i
    x̃       = x + (σ_{i+1} − σ_i) d                          (Euler, the predictor)
    d'      = (x̃ − D(x̃, σ_{i+1})) / σ_{i+1}
    x_{i+1} = x + (σ_{i+1} − σ_i) (d + d') / 2               (the corrector)
Two network calls per step, except the last (to σ = 0, where d' is undefined): plain Euler.

Shapes: x, d (B, C, h, w); timesteps descending, fractional allowed; alphas_cumprod (T,).
"""
from ldm.samplers.sigmas import apply_callback, enter_sigma_space


def sample_heun(eps_fn, x, timesteps, alphas_cumprod, *, callback=None):
    """Heun from x (SD's x_t at timesteps[0]) through every timestep to σ = 0; returns x0.

    2 len(timesteps) − 1 calls of eps_fn(x_t, t); callback(i, t, x, x0) as in sample_euler."""
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)
        d = (x - x0) / sigma
        x_euler = x + (sigma_next - sigma) * d
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = (x_euler - denoise(x_euler, sigma_next, ts[i + 1])) / sigma_next
            x = x + (sigma_next - sigma) * (d + d_next) / 2
        x = apply_callback(callback, i, t, x, sigma_next, x0)
    return x
