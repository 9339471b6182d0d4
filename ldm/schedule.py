"""The noise schedule of Stable Diffusion 1.x and 2.x (CompVis `LatentDiffusion.register_schedule`).

T = 1000 training steps; betas linear in sqrt(beta) ("scaled linear"):
    beta_t = (sqrt(0.00085) + t/(T-1) * (sqrt(0.012) - sqrt(0.00085)))**2,   t = 0 … T-1
    ᾱ_t = Π_{s≤t} (1 - beta_s)
A noised latent at step t is x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε.
"""
import torch

NUM_TRAIN_STEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012


def betas(num_steps=NUM_TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END):
    """(T,) float64. Linear in sqrt(beta), as the original: not linear in beta."""
    return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2


def alphas_cumprod(num_steps=NUM_TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END):
    """(T,) float64: ᾱ_t, the fraction of signal variance left at step t."""
    return torch.cumprod(1.0 - betas(num_steps, beta_start, beta_end), dim=0)


def checkpoint_buffers(num_steps=NUM_TRAIN_STEPS, beta_start=BETA_START, beta_end=BETA_END):
    """The 12 schedule buffers the original stores in every checkpoint, as float32 (T,) tensors.

    Computed in float64 as the original (numpy) does, with DDPM's posterior q(x_{t-1} | x_t, x_0)
    and v_posterior = 0.
    """
    b = betas(num_steps, beta_start, beta_end)
    ac = torch.cumprod(1.0 - b, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    posterior_variance = b * (1.0 - ac_prev) / (1.0 - ac)
    buffers = {
        "betas": b,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        # posterior_variance[0] is 0: clip before the log, as the original does.
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": b * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * (1.0 - b).sqrt() / (1.0 - ac),
    }
    return {name: t.float() for name, t in buffers.items()}
