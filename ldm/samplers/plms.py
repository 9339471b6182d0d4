"""PLMS, pseudo linear multistep (Liu et al. 2022, arXiv:2202.09778), as CompVis
`ldm/models/diffusion/plms.py` samples it.

Every step is a deterministic DDIM step (η = 0, see ddim.py) taken with a combined noise
estimate ε' in place of the model's ε_t = eps_fn(x_t, t). With e_{-1}, e_{-2}, e_{-3} the ε_t
of the previous steps (the model's raw outputs, not their ε'):
    first step:  x' = DDIM step of x_t with ε_t;  ε' = (ε_t + eps_fn(x', t_next)) / 2
                 (a "pseudo improved Euler" step: the model is called twice)
    then         ε' = (3 ε_t − e_{-1}) / 2                              2nd-order Adams–Bashforth
                 ε' = (23 ε_t − 16 e_{-1} + 5 e_{-2}) / 12                3rd order
                 ε' = (55 ε_t − 59 e_{-1} + 37 e_{-2} − 9 e_{-3}) / 24    4th order, from then on
The k-th order formula is the mean over the coming step of the polynomial of degree k − 1
through the last k values of ε (equally spaced in steps), so it is exact when ε is such a
polynomial of the step (tests/test_k_samplers.py checks each).
diffusers' PNDMScheduler warms up differently (Runge–Kutta steps with extra model calls);
this is the original's algorithm.

Shapes: x, ε (B, C, h, w); t (B,) int64 for eps_fn; alphas_cumprod (T,) float64.
"""
from ldm.samplers.common import alpha_bar_list, check_timesteps, full_t
from ldm.samplers.ddim import ddim_step


def adams_bashforth_eps(eps, old_eps):
    """ε' from the model's ε_t and the ε of the 1, 2 or 3 previous steps (old_eps, oldest
    first): the Adams–Bashforth formula of order len(old_eps) + 1."""
    if len(old_eps) == 1:
        return (3 * eps - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    if len(old_eps) == 3:
        return (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
    raise ValueError(f"Adams–Bashforth here takes 1 to 3 previous ε, got {len(old_eps)}")


def improved_euler_eps(eps_fn, x, eps, t_next, a_t, a_prev):
    """ε' of PLMS's first step: the mean of ε_t and the model's ε at the DDIM step's result."""
    x_next, _ = ddim_step(x, eps, a_t, a_prev)
    return (eps + eps_fn(x_next, full_t(t_next, x))) / 2


def sample_plms(eps_fn, x, timesteps, alphas_cumprod, *, callback=None):
    """Run PLMS from x at timesteps[0] down through every timestep; returns the final latent.

    eps_fn(x, t) -> ε: x (B, C, h, w), t (B,) int64. timesteps: descending ints, usually
    `ddim_timesteps(n)`. Deterministic (the original refuses η ≠ 0 for PLMS).
    callback(i, t, x, x0) after step i, with t the int step just taken, x the new latent and
    x0 the step's prediction of the clean latent; a returned tensor replaces x.
    Model calls: len(timesteps) + 1.
    """
    ts = check_timesteps(timesteps, alphas_cumprod)
    alpha_bars = alpha_bar_list(ts, alphas_cumprod)
    # As DDIM (same quirk): the last step goes to ᾱ_0, not to 1.
    alpha_bars_prev = alpha_bars[1:] + alpha_bar_list([0], alphas_cumprod)
    old_eps = []  # the model's ε of the last (up to) 3 steps, oldest first
    for i, (t, a_t, a_prev) in enumerate(zip(ts, alpha_bars, alpha_bars_prev)):
        eps = eps_fn(x, full_t(t, x))
        if old_eps:
            eps_prime = adams_bashforth_eps(eps, old_eps)
        else:
            # Quirk of the original: t_next is min(i + 1, last), so with a single step the
            # second call is at t itself (though x' is already at ᾱ_0's level).
            t_next = ts[min(i + 1, len(ts) - 1)]
            eps_prime = improved_euler_eps(eps_fn, x, eps, t_next, a_t, a_prev)
        x, x0 = ddim_step(x, eps_prime, a_t, a_prev)
        old_eps = (old_eps + [eps])[-3:]  # the raw ε_t is stored; the second call's is not
        if callback is not None:
            replaced = callback(i, t, x, x0)  # inpainting puts the known region back
            x = x if replaced is None else replaced
    return x
