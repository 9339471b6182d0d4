"""DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2) and its SDE variant, in σ
space as k-diffusion's sample_dpmpp_2m and sample_dpmpp_2m_sde write them.

With λ = −log σ and h_i = λ_{i+1} − λ_i, the exact solution of the ODE over one step, taking
the denoised estimate D as constant, is
    x_{i+1} = (σ_{i+1}/σ_i) x_i − (e^{−h_i} − 1) D.
DPM-Solver++(1) uses D = D_i (it is DDIM). The multistep ("2M") variant makes D second order
from the previous step's estimate, at no extra network call:
    r  = h_{i−1} / h_i
    D' = (1 + 1/(2r)) D_i − (1/(2r)) D_{i−1}
The first step (no D_{i−1} yet) and the last (to σ = 0, where the update is x_{i+1} = D_i)
are first order.

The SDE variant ("2M SDE") solves the reverse SDE instead, adding fresh noise z:
    w       = 1 − e^{−h−ηh}
    x_{i+1} = (σ_{i+1}/σ_i) e^{−ηh} x_i + w D_i + ½ (w/r) (D_i − D_{i−1})
              + σ_{i+1} √(1 − e^{−2ηh}) z
with the ½ (w/r) term from the second step on (k-diffusion's "midpoint" form), and the same
last step to σ = 0, x_{i+1} = D_i, without noise. At η = 0, w = 1 − e^{−h} and
w D_i + ½ (w/r) (D_i − D_{i−1}) = w D': the update is 2M's (tests/test_k_samplers.py checks
it). The noise is plain Gaussian by default, as in diffusers' sde-dpmsolver++; noise="brownian"
takes it from a Brownian path seeded from `generator` (brownian.py), as k-diffusion and A1111 do.

Shapes: x, D (B, C, h, w); timesteps descending, fractional allowed; alphas_cumprod (T,).
"""
import math

from ldm.samplers.brownian import noise_sampler
from ldm.samplers.sigmas import apply_callback, enter_sigma_space


def sample_dpmpp_2m(eps_fn, x, timesteps, alphas_cumprod, *, callback=None):
    """DPM++ 2M from x (SD's x_t at timesteps[0]) through every timestep to σ = 0; returns x0.

    eps_fn(x_t, t) -> ε; callback(i, t, x, x0) as in sample_euler."""
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    x0_prev = None  # D_{i−1}
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)  # D_i
        if sigma_next == 0:
            x = x0  # the update's limit as σ_{i+1} → 0 (h → ∞)
        else:
            h = math.log(sigma / sigma_next)
            x0_prime = x0  # D' = D_i: first order on the first step
            if x0_prev is not None:
                r = math.log(sigmas[i - 1] / sigma) / h
                x0_prime = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (sigma_next / sigma) * x - math.expm1(-h) * x0_prime
        x0_prev = x0
        x = apply_callback(callback, i, t, x, sigma_next, x0)
    return x


def sample_dpmpp_2m_sde(eps_fn, x, timesteps, alphas_cumprod, *, eta=1.0, noise="gaussian",
                        generator=None, callback=None):
    """DPM++ 2M SDE; as sample_dpmpp_2m, plus fresh noise z after every step but the last:
    noise "gaussian" draws torch.randn(x.shape, generator=generator, device=x.device,
    dtype=x.dtype), "brownian" a Brownian increment (brownian.noise_sampler). eta scales the
    noise: 1 is k-diffusion's (and diffusers') 2M SDE, 0 is 2M."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    z = noise_sampler(noise, x, sigmas, generator)
    x0_prev = None  # D_{i−1}
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)  # D_i
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
                x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * z(sigma, sigma_next)
        x0_prev = x0
        x = apply_callback(callback, i, t, x, sigma_next, x0)
    return x
