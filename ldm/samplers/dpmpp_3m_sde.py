"""DPM-Solver++(3M) SDE in σ space (Lu et al. 2022, arXiv:2211.01095: the multistep solver of
their section 4 taken to third order, on the reverse SDE), as k-diffusion's sample_dpmpp_3m_sde
writes it: A1111's "DPM++ 3M SDE".

With λ = −log σ, h = λ_{i+1} − λ_i = log(σ_i/σ_{i+1}) and ĥ = (1 + η) h, the SDE step with D
held constant is (as dpmpp.py's 2M SDE; e^{−ĥ} = (σ_{i+1}/σ_i) e^{−ηh})
    x_{i+1} = e^{−ĥ} x + (1 − e^{−ĥ}) D_i + σ_{i+1} √(1 − e^{−2ηh}) z
The multistep variant corrects D with the finite differences of the last three estimates, at no
extra network call. With r_0 = h_{i−1}/h, r_1 = h_{i−2}/h:
    δ_0 = (D_i − D_{i−1}) / r_0,   δ_1 = (D_{i−1} − D_{i−2}) / r_1
    d_1 = δ_0 + (δ_0 − δ_1) r_0 / (r_0 + r_1)                (first derivative in λ, × h)
    d_2 = (δ_0 − δ_1) / (r_0 + r_1)                          (second, × h²/2)
    φ_2 = (e^{−ĥ} − 1)/ĥ + 1,   φ_3 = φ_2/ĥ − 1/2
    x_{i+1} += φ_2 d_1 − φ_3 d_2
The first step is first order, the second takes only φ_2 δ_0, and the last (to σ = 0) is
x_{i+1} = D_i. η = 0 gives the ODE solver DPM-Solver++(3M).

Noise: plain Gaussian draws by default, as dpmpp.py's 2M SDE; noise="brownian" takes it from a
Brownian path seeded from `generator` (brownian.py), as A1111 and k-diffusion do.

Shapes: x, D, z (B, C, h, w); timesteps descending, fractional allowed; alphas_cumprod (T,).
"""
import math

from ldm.samplers.brownian import noise_sampler
from ldm.samplers.sigmas import apply_callback, enter_sigma_space


def sample_dpmpp_3m_sde(eps_fn, x, timesteps, alphas_cumprod, *, eta=1.0, noise="gaussian",
                        generator=None, callback=None):
    """DPM++ 3M SDE from x (SD's x_t at timesteps[0]) through every timestep to σ = 0; returns
    x0.

    eps_fn(x_t, t) -> ε; callback(i, t, x, x0) as in sample_euler. Fresh noise z after every
    step but the last: noise "gaussian" draws torch.randn(x.shape, generator=generator,
    device=x.device, dtype=x.dtype), "brownian" a Brownian increment (brownian.noise_sampler)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    z = noise_sampler(noise, x, sigmas, generator)
    x0s, hs = [], []  # D_{i−1}, D_{i−2} and h_{i−1}, h_{i−2}: the newest first
    for i, t in enumerate(ts):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma, t)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma / sigma_next)
            h_eta = (1 + eta) * h
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * x0
            x = x + _multistep_correction(x0, x0s, [h_prev / h for h_prev in hs], h_eta)
            if eta > 0:
                x = x + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * z(sigma, sigma_next)
            x0s, hs = [x0, *x0s[:1]], [h, *hs[:1]]
        x = apply_callback(callback, i, t, x, sigma_next, x0)
    return x


def _multistep_correction(x0, x0s, rs, h_eta):
    """φ_2 d_1 − φ_3 d_2 from D_i = x0 and the earlier estimates x0s = [D_{i−1}, D_{i−2}] (as
    many as there are), rs = [r_0, r_1]."""
    if not x0s:
        return 0
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    delta_0 = (x0 - x0s[0]) / rs[0]
    if len(x0s) == 1:
        return phi_2 * delta_0
    phi_3 = phi_2 / h_eta - 0.5
    delta_1 = (x0s[0] - x0s[1]) / rs[1]
    d_1 = delta_0 + (delta_0 - delta_1) * rs[0] / (rs[0] + rs[1])
    d_2 = (delta_0 - delta_1) / (rs[0] + rs[1])
    return phi_2 * d_1 - phi_3 * d_2
