"""Latent Consistency Models (Luo et al. 2023, arXiv:2310.04378), sampled in several steps as
diffusers' LCMScheduler does.

An LCM is distilled so that one network call maps x_t to the clean end of its probability-flow
ODE trajectory: the consistency function of Song et al. 2023 (arXiv:2303.01469), parameterised as
    f(x_t, t) = c_skip(t) x_t + c_out(t) x̂0,      x̂0 = (x_t − √(1−ᾱ_t) ε) / √ᾱ_t   (predict_x0)
    c_skip(t) = σ_d² / ((s t)² + σ_d²),   c_out(t) = s t / √((s t)² + σ_d²),   σ_d = 0.5, s = 10
so that f(x, 0) = x, the boundary condition. The scale s ("timestep_scaling") makes c_skip ≈ 0
and c_out ≈ 1 at every step LCM visits (c_skip = 6.9e-6 at its lowest step, 19).
Multistep sampling alternates that jump to x0 with a return to the next, lower, noise level:
    x0_i      = f(x_{t_i}, t_i)
    x_{t_{i+1}} = √ᾱ_{t_{i+1}} x0_i + √(1 − ᾱ_{t_{i+1}}) z,      z ~ N(0, I)
and the last step returns x0_{N−1}, adding nothing (so one step is one network call).
The steps are LCM's own (schedules.lcm): those it was distilled on, 999, 979, …, 19.

Shapes: x, ε, z (B, C, h, w); timesteps descending ints; alphas_cumprod (T,) float64.
"""
from ldm.samplers.common import alpha_bar_list, check_timesteps, full_t, predict_x0, randn

SIGMA_DATA = 0.5        # σ_d, the data's standard deviation in the consistency models' scalings
TIMESTEP_SCALING = 10   # s: diffusers' timestep_scaling


def boundary_scalings(t):
    """(c_skip(t), c_out(t)) for the int step t, Python floats: f(x, t) = c_skip x + c_out x̂0."""
    st = TIMESTEP_SCALING * t
    c_skip = SIGMA_DATA ** 2 / (st ** 2 + SIGMA_DATA ** 2)
    c_out = st / (st ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip, c_out


def sample_lcm(eps_fn, x, timesteps, alphas_cumprod, *, generator=None, callback=None):
    """LCM from x (SD's x_t at timesteps[0]) through every timestep; returns the last x0.

    eps_fn(x_t, t) -> ε: x_t (B, C, h, w), t (B,) int64. timesteps: descending ints, usually
    schedules.lcm(n). After every step but the last, z is drawn as
    common.randn(x.shape, generator, device=x.device, dtype=x.dtype) (one generator, or a
    list of one per image).
    callback(i, t, x, x0) after step i, with t the int step just taken, x the new latent (the
    final x0 after the last step) and x0 = f(x_t, t); a returned tensor replaces x.
    """
    ts = check_timesteps(timesteps, alphas_cumprod)
    alphas = alpha_bar_list(ts, alphas_cumprod)
    for i, (t, a_t) in enumerate(zip(ts, alphas)):
        c_skip, c_out = boundary_scalings(t)
        x0 = c_skip * x + c_out * predict_x0(x, eps_fn(x, full_t(t, x)), a_t)
        if i + 1 < len(ts):
            a_next = alphas[i + 1]
            z = randn(x.shape, generator, device=x.device, dtype=x.dtype)
            x = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * z
        else:
            x = x0
        if callback is not None:
            replaced = callback(i, t, x, x0)
            x = x if replaced is None else replaced
    return x
