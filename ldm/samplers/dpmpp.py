"""DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2), in σ space as
k-diffusion's sample_dpmpp_2m writes it.

With λ = −log σ and h_i = λ_{i+1} − λ_i, the exact solution of the ODE over one step, taking
the denoised estimate D as constant, is x_{i+1} = (σ_{i+1}/σ_i) x − (e^{−h_i} − 1) D. The
multistep ("2M") variant makes D second order from the previous step's estimate, at no extra
network call:
    r  = h_{i−1} / h_i
    D' = (1 + 1/(2r)) D_i − (1/(2r)) D_{i−1}
The first step, and the last (to σ = 0, where the update is x_{i+1} = D_i), are first order.

Shapes: x, D (B, C, h, w); timesteps descending, fractional allowed; alphas_cumprod (T,).
"""
import math

from ldm.samplers.sigmas import denoiser, report, step_sigmas, to_sigma_space


def sample_dpmpp_2m(eps_fn, x, timesteps, alphas_cumprod, *, callback=None):
    """DPM++ 2M from x (SD's x_t at timesteps[0]) through every timestep to σ = 0; returns x0.

    eps_fn(x_t, t) -> ε; callback(i, t, x, x0) as in sample_euler."""
    ts, sigmas = step_sigmas(timesteps, alphas_cumprod)
    denoise = denoiser(eps_fn)
    x = to_sigma_space(x, sigmas[0])
    x0_prev = None
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            x0_mix = x0
            if x0_prev is not None:
                r = math.log(sigmas[i - 1] / sigma) / h
                x0_mix = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_next / sigma) * x - math.expm1(-h) * x0_mix
        x0_prev = x0
        x = report(callback, i, t, x, sigma_next, x0)
    return x
