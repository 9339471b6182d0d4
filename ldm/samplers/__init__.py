"""Samplers: pure functions of (eps_fn, x, timesteps, alphas_cumprod) that return the final latent.

    eps_fn = cfg(pipe.unet, cond, uncond, scale=7.5)       # eps_fn(x, t) -> ε, guidance.py
    ts = ddim_timesteps(50)                                # 981, 961, …, 1
    z = sample_ddim(eps_fn, x_T, ts, pipe.alphas_cumprod)  # or sample_plms / sample_ddpm

A v-prediction model (SD 2 768-v) is wrapped first: eps_from_v(unet, alphas_cumprod).
img2img: start at a tail of the timesteps, x = add_noise(z0, noise, ts[k], alphas_cumprod),
then sample with ts[k:].

The Euler, Euler ancestral, Heun, DPM++ 2M and 2M SDE samplers (k-diffusion's) step in σ
space but take and return the same x_t; they also take the fractional timesteps of Karras σ:
    z = sample_dpmpp_2m(eps_fn, x_T, schedules.karras(25, pipe.alphas_cumprod), pipe.alphas_cumprod)
"""
from ldm.samplers.common import add_noise, alpha_bar
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
           "sample_unipc", "timesteps"]
