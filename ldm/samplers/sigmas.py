"""The σ view of SD's schedule, which the Euler and DPM++ samplers step in (Karras et al. 2022,
arXiv:2206.00364, "Elucidating the design space of diffusion-based generative models").

SD's latent at step t is x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε. Divided by √ᾱ_t it becomes
    x = x0 + σ_t ε,      σ_t = √((1−ᾱ_t) / ᾱ_t)        (σ from 0.029 at t = 0 to 14.6 at 999)
and the network, fed x / √(σ²+1) = x_t, gives the denoised estimate
    D(x, σ) = x − σ ε(x_t, t),
which is predict_x0(x_t, ε, ᾱ_t) (common.py) with ᾱ_t = 1 / (1 + σ²), written in σ space.
Between the 1000 trained steps, t and σ are linked by linear interpolation of log σ, as
k-diffusion's DiscreteSchedule does; a fractional t is what the U-Net is then given.

Here every sampler takes and returns SD's x_t, like DDIM does (the pipeline, img2img and
inpainting need not know); the σ-space x lives only inside the loop.
Shapes: x (B, C, h, w); timesteps descending Python numbers; alphas_cumprod (T,) float64.
"""
import math

import torch

from ldm.samplers.common import alpha_bar, check_timesteps, sigmas_of


def sigma_to_t(sigma, alphas_cumprod, *, clamp=False):
    """The fractional timestep whose interpolated σ is `sigma` (a float): alpha_bar's inverse.

    A σ outside the schedule's range is a ValueError, or with `clamp` is taken to its nearest
    end, as k-diffusion's DiscreteSchedule does for the intermediate σ of DPM2, DPM++ 2S and
    SDE (a midpoint can round just below σ_0, or lie far below it when η > 1 drives σ_down
    towards 0)."""
    log_sigmas = sigmas_of(alphas_cumprod).log()
    log_sigma = math.log(sigma)
    if clamp:
        log_sigma = min(max(log_sigma, log_sigmas[0].item()), log_sigmas[-1].item())
    if not log_sigmas[0] <= log_sigma <= log_sigmas[-1]:
        raise ValueError(f"σ = {sigma} lies outside the schedule's [{log_sigmas[0].exp():.4g}, "
                         f"{log_sigmas[-1].exp():.4g}]")
    low = min(int(torch.searchsorted(log_sigmas, log_sigma, right=True)) - 1, len(log_sigmas) - 2)
    w = (log_sigma - log_sigmas[low].item()) / (log_sigmas[low + 1] - log_sigmas[low]).item()
    return low + w


def step_sigmas(timesteps, alphas_cumprod):
    """The checked timesteps as Python numbers, and their σ with the final σ = 0 (clean)
    appended: len(timesteps) + 1 floats."""
    ts = check_timesteps(timesteps, alphas_cumprod, fractional=True)
    fractional = any(isinstance(t, float) for t in ts)
    alpha_bars = alpha_bar(torch.tensor(ts, dtype=torch.float64 if fractional else torch.long),
                           alphas_cumprod).tolist()
    return ts, [((1 - a) / a) ** 0.5 for a in alpha_bars] + [0.0]


def enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod):
    """What every σ sampler starts from: the checked timesteps, their σ (σ = 0 appended), the
    denoiser D(x, σ, t) and x moved into σ space."""
    ts, sigmas = step_sigmas(timesteps, alphas_cumprod)
    return ts, sigmas, denoiser(eps_fn), to_sigma_space(x, sigmas[0])


def denoiser(eps_fn):
    """D(x, σ, t) -> x0 estimate, from eps_fn(x_t, t) with t a (B,) tensor on x's device:
    int64 at a trained step, else float (at least float32: float16 would round 978.6 to 978.5)."""
    def denoise(x, sigma, t):
        is_trained_step = float(t).is_integer()
        dtype = torch.long if is_trained_step else torch.promote_types(x.dtype, torch.float32)
        t = torch.full((x.shape[0],), int(t) if is_trained_step else t, dtype=dtype,
                       device=x.device)
        # predict_x0(x_t, ε, ᾱ) written in σ space: one multiply-add on x, where going through
        # x_t rounds twice more in 16-bit dtypes.
        return x - sigma * eps_fn(x / (sigma ** 2 + 1) ** 0.5, t)
    return denoise


def to_sigma_space(x, sigma):
    """SD's x_t -> x0 + σ ε (multiply by √(σ²+1) = 1/√ᾱ)."""
    return x * (sigma ** 2 + 1) ** 0.5


def apply_callback(callback, i, t, x, sigma_next, x0):
    """Call callback(i, t, x_t, x0) with x back in SD's form at the next σ; a returned x_t
    (inpainting's blend) comes back into σ space. Returns the σ-space x to continue from."""
    if callback is None:
        return x
    scale = (sigma_next ** 2 + 1) ** 0.5
    replaced = callback(i, t, x / scale, x0)
    return x if replaced is None else replaced * scale
