"""DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2) and its SDE variant, in σ
space as k-diffusion's sample_dpmpp_2m and sample_dpmpp_2m_sde write them.

With λ = −log σ and h_i = λ_{i+1} − λ_i, the exact solution of the ODE over one step, taking
the denoised estimate D as constant, is x_{i+1} = (σ_{i+1}/σ_i) x − (e^{−h_i} − 1) D. The
multistep ("2M") variant makes D second order from the previous step's estimate, at no extra
network call:
    r  = h_{i−1} / h_i
    D' = (1 + 1/(2r)) D_i − (1/(2r)) D_{i−1}
The first step, and the last (to σ = 0, where the update is x_{i+1} = D_i), are first order.

The SDE variant ("2M SDE") solves the reverse SDE instead: it shrinks x by e^{−ηh} more,
weights D by w = 1 − e^{−h−ηh}, adds the second-order term as ½ (w/r) (D_i − D_{i−1})
(k-diffusion's "midpoint" form: with η = 0 this is D' above) and fresh noise of size
σ_{i+1} √(1 − e^{−2ηh}). With η = 0 it is 2M, which is how sample_dpmpp_2m runs. The noise is
plain Gaussian, as in diffusers' sde-dpmsolver++ (k-diffusion defaults to a Brownian tree,
which needs torchsde).

Shapes: x, D (B, C, h, w); timesteps descending, fractional allowed; alphas_cumprod (T,).
"""
import math

import torch

from ldm.samplers.sigmas import apply_callback, enter_sigma_space


def sample_dpmpp_2m(eps_fn, x, timesteps, alphas_cumprod, *, callback=None):
    """DPM++ 2M from x (SD's x_t at timesteps[0]) through every timestep to σ = 0; returns x0.

    eps_fn(x_t, t) -> ε; callback(i, t, x, x0) as in sample_euler. The SDE variant with η = 0."""
    return sample_dpmpp_2m_sde(eps_fn, x, timesteps, alphas_cumprod, eta=0.0, callback=callback)


def sample_dpmpp_2m_sde(eps_fn, x, timesteps, alphas_cumprod, *, eta=1.0, generator=None,
                        callback=None):
    """DPM++ 2M SDE; as sample_dpmpp_2m, plus fresh noise z after every step but the last, drawn
    as torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    x0_prev = None
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            weight = -math.expm1(-h - eta * h)  # w
            x = (sigma_next / sigma) * math.exp(-eta * h) * x + weight * x0
            if x0_prev is not None:
                r = math.log(sigmas[i - 1] / sigma) / h
                x = x + 0.5 * weight / r * (x0 - x0_prev)
            if eta > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * z
        x0_prev = x0
        x = apply_callback(callback, i, t, x, sigma_next, x0)
    return x
