"""DDIM (Song et al. 2020, arXiv:2010.02502), as CompVis `ldm/models/diffusion/ddim.py` samples it.

One step from t to the next visited step t' (in the code ᾱ_t is a_t and ᾱ_t' is a_prev):
    x0    = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t                    predicted clean latent (eq. 12)
    σ_t   = η √((1−ᾱ_t') / (1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_t')       (eq. 16)
    x_t'  = √ᾱ_t' x0 + √(1−ᾱ_t'−σ_t²) ε + σ_t z,   z ~ N(0, I)
η = 0 is deterministic; η = 1 is DDPM's ancestral sampling over the visited steps. (This σ_t
is the size of the fresh noise, not the noise level σ of sigmas.py.)
x0 is never clipped (the original does not clip it for latents).

Shapes: x, ε, z (B, C, h, w); t (B,) int64 for eps_fn; alphas_cumprod (T,) float64.
"""
import torch

from ldm.samplers.common import alpha_bar_list, check_timesteps, full_t, predict_x0, randn


def ddim_timesteps(steps, num_train_steps=1000):
    """The (steps,) int64 timesteps DDIM visits, descending: for 50 steps 981, 961, …, 21, 1.

    The original's "uniform" discretisation, range(0, T, T // steps) + 1. Where steps does not
    divide T, that range is longer than asked (30 → 31 steps; 9 → 10 steps ending at t = 1000,
    an IndexError in the original): we keep its first `steps` entries, as diffusers' "leading"
    spacing does. Both agree whenever steps divides T (10, 20, 25, 50, 100, 250 …).
    """
    if not 1 <= steps < num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps - 1}] (the +1 offset puts step "
                         f"{num_train_steps} past the schedule), got {steps}")
    ts = torch.arange(steps, dtype=torch.long) * (num_train_steps // steps)
    # Quirk of the original: +1 on every step, "to get the final alpha values right"; the
    # visited steps are 1, 21, …, not 0, 20, …
    ts = ts + 1
    return ts.flip(0)


def ddim_sigma(a_t, a_prev, eta):
    """σ_t of eq. 16, the fresh noise's size, for stepping from ᾱ = a_t to ᾱ = a_prev (floats)."""
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5


def ddim_step(x, eps, a_t, a_prev, sigma=0.0, noise=None):
    """One DDIM update. Returns (x at ᾱ a_prev, predicted x0), both (B, C, h, w).

    a_t, a_prev, sigma: Python floats (float64); noise: z, needed only when sigma > 0.
    """
    x0 = predict_x0(x, eps, a_t)
    dir_xt = (1 - a_prev - sigma ** 2) ** 0.5 * eps  # the "direction pointing to x_t"
    x_prev = a_prev ** 0.5 * x0 + dir_xt
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def sample_ddim(eps_fn, x, timesteps, alphas_cumprod, *, eta=0.0, generator=None, callback=None):
    """Run DDIM from x at timesteps[0] down through every timestep; returns the final latent.

    eps_fn(x, t) -> ε: x (B, C, h, w), t (B,) int64. timesteps: descending ints (a tail of
    `ddim_timesteps(n)` for img2img). eta: η in [0, 1]. With eta > 0, z is drawn each step as
    common.randn(x.shape, generator, device=x.device, dtype=x.dtype): `generator` is one
    torch.Generator for the batch or a list of one per image.
    callback(i, t, x, x0) after step i, with t the int step just taken, x the new latent and
    x0 the step's prediction of the clean latent; a returned tensor replaces x.
    """
    # η ≤ 1 keeps σ_t² ≤ 1 − ᾱ_t', so that √(1 − ᾱ_t' − σ_t²) is real: by eq. 16,
    # σ_t² = η² (1 − ᾱ_t') (1 − ᾱ_t/ᾱ_t') / (1 − ᾱ_t) ≤ η² (1 − ᾱ_t') as ᾱ_t' ≤ 1.
    # (`not 0 <= eta <= 1` refuses NaN too.)
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (DDIM's η), got {eta}")
    ts = check_timesteps(timesteps, alphas_cumprod)
    alpha_bars = alpha_bar_list(ts, alphas_cumprod)
    # Quirk of the original: the last step goes to ᾱ_0 (≈ 0.99915), not to 1 (clean data),
    # so the result keeps a trace of noise, and with eta > 0 the last step still adds noise.
    alpha_bars_prev = alpha_bars[1:] + alpha_bar_list([0], alphas_cumprod)
    for i, (t, a_t, a_prev) in enumerate(zip(ts, alpha_bars, alpha_bars_prev)):
        eps = eps_fn(x, full_t(t, x))
        sigma = ddim_sigma(a_t, a_prev, eta)
        noise = None
        if sigma > 0:
            noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        x, x0 = ddim_step(x, eps, a_t, a_prev, sigma, noise)
        if callback is not None:
            replaced = callback(i, t, x, x0)  # inpainting puts the known region back
            x = x if replaced is None else replaced
    return x
