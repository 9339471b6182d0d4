"""DDPM ancestral sampling (Ho et al. 2020, arXiv:2006.11239), as the original's `p_sample`
with the "fixed small" variance, over the full schedule or a strided subset of it.

One step from t to the next visited step t' (ᾱ_t' = 1 after the last step; in the code ᾱ_t
is a_t and ᾱ_t' is a_prev):
    β_t   = 1 − ᾱ_t/ᾱ_t'                          (the training β_t when t' = t − 1)
    x0    = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t                                          (eq. 15)
    μ     = √ᾱ_t' β_t / (1−ᾱ_t) x0 + √(1−β_t) (1−ᾱ_t') / (1−ᾱ_t) x_t            (eq. 7)
    β̃_t   = (1−ᾱ_t') / (1−ᾱ_t) β_t                posterior variance, "fixed small"
    x_t'  = μ + √β̃_t z,   z ~ N(0, I), except on the last step (β̃ = 0 there)
x0 is not clipped, as diffusers' clip_sample=False. (The original's LatentDiffusion inherits
DDPM's clip_denoised=True and clamps x0 to [-1, 1]; that range is the pixels', not the latents'.)

Shapes: x, ε, z (B, C, h, w); t (B,) int64 for eps_fn; alphas_cumprod (T,) float64.
"""
from ldm.samplers.common import alpha_bar_list, check_timesteps, full_t, predict_x0, randn


def ddpm_step(x, eps, a_t, a_prev, noise=None):
    """One ancestral step. Returns (x at ᾱ a_prev, predicted x0), both (B, C, h, w).

    a_t, a_prev: Python floats (float64); noise: z, or None for the noiseless last step.
    """
    beta = 1 - a_t / a_prev
    x0 = predict_x0(x, eps, a_t)
    mean = ((a_prev ** 0.5 * beta / (1 - a_t)) * x0
            + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x)  # μ, eq. 7
    if noise is None:
        return mean, x0
    variance = (1 - a_prev) / (1 - a_t) * beta
    return mean + variance ** 0.5 * noise, x0


def sample_ddpm(eps_fn, x, timesteps, alphas_cumprod, *, generator=None, callback=None):
    """Run ancestral sampling from x at timesteps[0] down through every timestep.

    timesteps: descending ints; torch.arange(999, -1, -1) is the full 1000-step chain.
    Returns the clean latent (the last step goes to ᾱ = 1, unlike DDIM's ᾱ_0).
    z is drawn on every step but the last as
    common.randn(x.shape, generator, device=x.device, dtype=x.dtype): from one generator,
    the same stream diffusers' DDPMScheduler draws from it; or from a list of one per image.
    callback(i, t, x, x0) after step i, with t the int step just taken, x the new latent and
    x0 the step's prediction of the clean latent; a returned tensor replaces x.
    """
    ts = check_timesteps(timesteps, alphas_cumprod)
    alpha_bars = alpha_bar_list(ts, alphas_cumprod)
    alpha_bars_prev = alpha_bars[1:] + [1.0]  # the chain ends at x_0 itself: ᾱ = 1
    for i, (t, a_t, a_prev) in enumerate(zip(ts, alpha_bars, alpha_bars_prev)):
        eps = eps_fn(x, full_t(t, x))
        noise = None
        if i < len(ts) - 1:
            noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        x, x0 = ddpm_step(x, eps, a_t, a_prev, noise)
        if callback is not None:
            replaced = callback(i, t, x, x0)  # inpainting puts the known region back
            x = x if replaced is None else replaced
    return x
