"""Samplers: pure functions of (eps_fn, x, timesteps, alphas_cumprod) that return the final latent.

    eps_fn = cfg(model, cond, uncond, scale=7.5)           # eps_fn(x, t) -> ε, guidance.py
    entry, schedule = resolve("dpmpp_2m_karras")           # registry.py: every sampler, once
    ts = timesteps(entry, schedule, 25, pipe.alphas_cumprod)    # schedules.py
    z = entry.sample(eps_fn, x_T, ts, pipe.alphas_cumprod) # or sample_dpmpp_2m(…) directly

`model(x, t, cond)` is the network with its conditioning dict ({"context": …}), e.g.
`lambda x, t, cond: pipe.unet(x, t, **cond)`; a v-prediction model (SD 2 768-v) is wrapped
first: eps_from_v(model, alphas_cumprod). img2img: start at a tail of the timesteps,
x = add_noise(z0, noise, ts[k], alphas_cumprod), then sample with ts[k:].

The original's DDIM, PLMS and DDPM step between trained timesteps. k-diffusion's family (Euler,
Euler a, Heun, LMS, DPM2 (a), DPM++ 2S a, SDE, 2M, 2M SDE, 3M SDE) and UniPC step in σ space,
taking any schedule's fractional timesteps, but take and return the same x_t; LCM has its own.
Each sampler is one file; `SAMPLERS` in registry.py lists them with what they take.
"""
from ldm.samplers.common import add_noise, alpha_bar, randn
from ldm.samplers.ddim import ddim_step, ddim_timesteps, sample_ddim
from ldm.samplers.ddpm import ddpm_step, sample_ddpm
from ldm.samplers.dpm2 import sample_dpm2, sample_dpm2_ancestral
from ldm.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde
from ldm.samplers.dpmpp_2s import sample_dpmpp_2s_ancestral
from ldm.samplers.dpmpp_3m_sde import sample_dpmpp_3m_sde
from ldm.samplers.dpmpp_sde import sample_dpmpp_sde
from ldm.samplers.euler import sample_euler, sample_euler_ancestral
from ldm.samplers.guidance import cfg
from ldm.samplers.heun import sample_heun
from ldm.samplers.lcm import sample_lcm
from ldm.samplers.lms import sample_lms
from ldm.samplers.plms import sample_plms
from ldm.samplers.prediction import eps_from_v
from ldm.samplers.registry import SAMPLERS, Sampler, resolve, timesteps
from ldm.samplers.schedules import SCHEDULES
from ldm.samplers.unipc import sample_unipc

__all__ = ["SAMPLERS", "SCHEDULES", "Sampler", "add_noise", "alpha_bar", "cfg", "ddim_step",
           "ddim_timesteps", "ddpm_step", "eps_from_v", "resolve", "sample_ddim", "sample_ddpm",
           "sample_dpm2", "sample_dpm2_ancestral", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
           "sample_dpmpp_2s_ancestral", "sample_dpmpp_3m_sde", "sample_dpmpp_sde", "sample_euler",
           "sample_euler_ancestral", "sample_heun", "sample_lcm", "sample_lms", "sample_plms",
           "randn", "sample_unipc", "timesteps"]
