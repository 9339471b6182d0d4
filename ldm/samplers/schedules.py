"""Step schedules: which timesteps a sampler visits, as A1111 and ComfyUI name them.

Every schedule returns the (steps,) descending timesteps of SD's 1000-step schedule. DDIM's and
LCM's are integers; the others are fractional wherever their σ falls between trained steps (σ
and t are linked as in sigmas.py: log σ linear between neighbouring steps, k-diffusion's
DiscreteSchedule), and the σ-space samplers and UniPC take them all. After the last timestep
a σ-space sampler and UniPC land on σ = 0, DDIM/PLMS on ᾱ_0 (their original's quirk), DDPM on
ᾱ = 1, LCM on its last x0 estimate.

    name           timesteps / σ                                         also known as
    ddim_uniform   1 + k·⌊T/n⌋, k = n−1 … 0 (981, 961, …, 1 for 50)      CompVis "uniform"; diffusers
                                                                         "leading" + offset 1; A1111 "DDIM"
    normal         t = linspace(T−1, 0, n)                               A1111 "Uniform"; ComfyUI "normal"
    sgm_uniform    t = linspace(T−1, 0, n+1) without its last            ComfyUI/A1111 "SGM Uniform"
    simple         t = T−1 − ⌊k·T/n⌋, k = 0 … n−1                         ComfyUI "simple"
    karras         σ_i = (σ_max^(1/ρ) + i/(n−1)(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7   Karras et al. eq. 5
    exponential    σ_i = exp(linspace(log σ_max, log σ_min, n))          k-diffusion, A1111, ComfyUI
    lcm            of the 50 steps LCM is distilled on, 20j − 1 (999, 979,   diffusers LCMScheduler,
                   …, 19), the n at indices ⌊k·50/n⌋ (999, 759, 499, 259)    50 original steps

σ_max and σ_min are the schedule's own ends, at t = T−1 and t = 0 (14.61 and 0.0292 for SD).
T is len(alphas_cumprod).
"""
import math

import torch

from ldm.samplers.common import sigmas_of
from ldm.samplers.ddim import ddim_timesteps
from ldm.samplers.sigmas import sigma_to_t


def ddim_uniform(steps, alphas_cumprod):
    """(steps,) int64: the original's "uniform" discretisation (ddim.ddim_timesteps), and for
    steps == T every step, T−1 … 0 (the +1 would put the first past the schedule): the full
    DDPM chain."""
    num_train_steps = len(alphas_cumprod)
    if steps == num_train_steps:
        return torch.arange(num_train_steps - 1, -1, -1)
    return ddim_timesteps(steps, num_train_steps)


def normal(steps, alphas_cumprod):
    """(steps,) float64: evenly spaced in t from T−1 down to 0 (k-diffusion's get_sigmas)."""
    _check_steps(steps, 1)
    return torch.linspace(len(alphas_cumprod) - 1, 0, steps, dtype=torch.float64)


def sgm_uniform(steps, alphas_cumprod):
    """(steps,) float64: evenly spaced in t from T−1 towards 0, stopping one interval short, as
    the SGM (SDXL) code base discretises; ComfyUI's "sgm_uniform"."""
    _check_steps(steps, 1)
    return torch.linspace(len(alphas_cumprod) - 1, 0, steps + 1, dtype=torch.float64)[:-1]


def simple(steps, alphas_cumprod):
    """(steps,) int64: every (T/steps)-th trained step from the top, ComfyUI's "simple"."""
    num_train_steps = len(alphas_cumprod)
    _check_steps(steps, 1, num_train_steps)
    stride = num_train_steps / steps
    return torch.tensor([num_train_steps - 1 - int(k * stride) for k in range(steps)])


def karras(steps, alphas_cumprod, rho=7.0):
    """(steps,) float64 timesteps at Karras et al.'s σ (eq. 5), from the schedule's largest σ to
    its smallest; ρ = 7 crowds the steps at low noise. ("DPM++ 2M Karras" and friends.)"""
    _check_steps(steps, 2)
    sigmas = sigmas_of(alphas_cumprod)
    hi, lo = sigmas[-1].item() ** (1 / rho), sigmas[0].item() ** (1 / rho)
    return _timesteps_at([(hi + i / (steps - 1) * (lo - hi)) ** rho for i in range(steps)],
                         alphas_cumprod)


def exponential(steps, alphas_cumprod):
    """(steps,) float64 timesteps at σ evenly spaced in log σ from σ_max to σ_min."""
    _check_steps(steps, 1)
    sigmas = sigmas_of(alphas_cumprod)
    log_hi, log_lo = math.log(sigmas[-1].item()), math.log(sigmas[0].item())
    if steps == 1:
        return _timesteps_at([sigmas[-1].item()], alphas_cumprod)
    return _timesteps_at([math.exp(log_hi + i / (steps - 1) * (log_lo - log_hi))
                          for i in range(steps)], alphas_cumprod)


def lcm(steps, alphas_cumprod, original_steps=50):
    """(steps,) int64: LCM's "skipping-step" schedule (Luo et al. 2023, §4.3), as diffusers'
    LCMScheduler picks it. The model is distilled on `original_steps` steps k·j − 1, j = 50 … 1,
    with k = T // 50 = 20 the skipping interval (999, 979, …, 19); sampling takes `steps` of
    them at evenly spaced indices ⌊i·50/steps⌋ (i = 0 … steps−1), so at most 50."""
    num_train_steps = len(alphas_cumprod)
    _check_steps(steps, 1, original_steps)
    k = num_train_steps // original_steps
    distilled = [k * j - 1 for j in range(original_steps, 0, -1)]
    return torch.tensor([distilled[i * original_steps // steps] for i in range(steps)])


def _timesteps_at(sigmas, alphas_cumprod):
    """The fractional timesteps of a descending σ list that runs from σ_max (to σ_min): the ends
    are pinned to T−1 and 0, where (σ^(1/ρ))^ρ or exp(log σ) may round past the schedule."""
    last = len(alphas_cumprod) - 1
    ts = [float(last)] + [sigma_to_t(s, alphas_cumprod) for s in sigmas[1:]]
    if len(sigmas) > 1:
        ts[-1] = 0.0
    return torch.tensor(ts, dtype=torch.float64)


def _check_steps(steps, minimum, maximum=None):
    if not isinstance(steps, int) or steps < minimum or (maximum and steps > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum else f">= {minimum}"
        raise ValueError(f"steps must be an integer {bound} for this schedule, got {steps!r}")


SCHEDULES = {"ddim_uniform": ddim_uniform, "normal": normal, "sgm_uniform": sgm_uniform,
             "simple": simple, "karras": karras, "exponential": exponential, "lcm": lcm}
