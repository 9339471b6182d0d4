"""Every sampler ldm has, in one table: the only place that knows them.

The pipeline, the command line (`--sampler`, `--schedule` and their --help), the judge and the
notebooks all read SAMPLERS. Adding a sampler is one file with its `sample_*` function and one
line below.

    entry = SAMPLERS["dpmpp_2m"]
    ts = timesteps(entry, "karras", 25, pipe.alphas_cumprod)
    z = entry.sample(eps_fn, x_T, ts, pipe.alphas_cumprod)

A sampler steps through the timesteps of a schedule (schedules.py). The σ-space samplers take
any schedule; DDIM, PLMS and DDPM take integer steps only, LCM its own. "euler_karras" and the
like name a sampler with its schedule, and `from_a1111` reads what AUTOMATIC1111 writes in a
PNG's "parameters" ("Sampler: DPM++ 2M Karras", "Schedule type: Karras").
"""
from dataclasses import dataclass
from typing import Callable

from ldm.samplers.ddim import sample_ddim
from ldm.samplers.ddpm import sample_ddpm
from ldm.samplers.dpm2 import sample_dpm2, sample_dpm2_ancestral
from ldm.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde
from ldm.samplers.dpmpp_2s import sample_dpmpp_2s_ancestral
from ldm.samplers.dpmpp_3m_sde import sample_dpmpp_3m_sde
from ldm.samplers.dpmpp_sde import sample_dpmpp_sde
from ldm.samplers.euler import sample_euler, sample_euler_ancestral
from ldm.samplers.heun import sample_heun
from ldm.samplers.lcm import sample_lcm
from ldm.samplers.lms import sample_lms
from ldm.samplers.plms import sample_plms
from ldm.samplers.schedules import SCHEDULES
from ldm.samplers.unipc import sample_unipc

SIGMA_SCHEDULES = ("ddim_uniform", "normal", "karras", "exponential", "sgm_uniform", "simple")
INTEGER_SCHEDULES = ("ddim_uniform",)


@dataclass(frozen=True)
class Sampler:
    """One sampler: what it is called, how it runs, what it may be given.

    sample(eps_fn, x, timesteps, alphas_cumprod, *, callback=None, **options) -> final latent;
    options are `generator` when `noisy` (fresh noise at every step) and `eta` when `takes_eta`.
    schedules: those it can step through, its default first. calls_per_step: network
    evaluations per step (Heun's and DPM2's last step take one, PLMS's first takes two).
    """
    name: str
    sample: Callable
    a1111: str                           # the name in A1111's "Sampler:" field
    schedules: tuple = SIGMA_SCHEDULES
    noisy: bool = False
    takes_eta: bool = False
    calls_per_step: int = 1
    max_steps: int = 999                 # DDIM's +1 offset puts step 1000 past the schedule

    @property
    def sigma_space(self):
        """Steps in σ (any schedule, fractional timesteps) rather than at trained steps."""
        return "karras" in self.schedules


SAMPLERS = {s.name: s for s in [
    Sampler("ddim", sample_ddim, "DDIM", INTEGER_SCHEDULES, takes_eta=True),
    Sampler("plms", sample_plms, "PLMS", INTEGER_SCHEDULES),
    Sampler("ddpm", sample_ddpm, "DDPM", INTEGER_SCHEDULES, noisy=True, max_steps=1000),
    Sampler("euler", sample_euler, "Euler"),
    Sampler("euler_a", sample_euler_ancestral, "Euler a", noisy=True),
    Sampler("heun", sample_heun, "Heun", calls_per_step=2),
    Sampler("lms", sample_lms, "LMS"),
    Sampler("dpm2", sample_dpm2, "DPM2", calls_per_step=2),
    Sampler("dpm2_a", sample_dpm2_ancestral, "DPM2 a", noisy=True, calls_per_step=2),
    Sampler("dpmpp_2s_a", sample_dpmpp_2s_ancestral, "DPM++ 2S a", noisy=True, calls_per_step=2),
    Sampler("dpmpp_sde", sample_dpmpp_sde, "DPM++ SDE", noisy=True, calls_per_step=2),
    Sampler("dpmpp_2m", sample_dpmpp_2m, "DPM++ 2M"),
    Sampler("dpmpp_2m_sde", sample_dpmpp_2m_sde, "DPM++ 2M SDE", noisy=True),
    Sampler("dpmpp_3m_sde", sample_dpmpp_3m_sde, "DPM++ 3M SDE", noisy=True),
    Sampler("unipc", sample_unipc, "UniPC"),
    Sampler("lcm", sample_lcm, "LCM", ("lcm",), noisy=True),
]}


def resolve(name, schedule=None):
    """(Sampler, schedule name) for an ldm sampler name, which may carry its schedule as a
    suffix ("euler_a_karras"); `schedule` (None: the sampler's default) must not contradict it.
    Raises ValueError listing the known names."""
    entry, suffix = _split_schedule(name)
    if suffix and schedule and schedule != suffix:
        raise ValueError(f"sampler {name!r} already names schedule {suffix!r}, "
                         f"but schedule={schedule!r} was given")
    schedule = suffix or schedule or entry.schedules[0]
    if schedule not in entry.schedules:
        raise ValueError(f"sampler {entry.name!r} steps through "
                         f"{' or '.join(map(repr, entry.schedules))}, not {schedule!r}")
    return entry, schedule


def timesteps(entry, schedule, steps, alphas_cumprod):
    """The descending timesteps `entry` visits in `steps` steps of `schedule`; ValueError for a
    step count either cannot take."""
    if not isinstance(steps, int) or not 1 <= steps <= entry.max_steps:
        raise ValueError(f"steps must be an integer in [1, {entry.max_steps}] for sampler "
                         f"{entry.name!r}, got {steps!r}")
    return SCHEDULES[schedule](steps, alphas_cumprod)


def sampler_names():
    """Every name `resolve` takes: the samplers, then each σ sampler with "_karras"."""
    return [*SAMPLERS, *(f"{s.name}_karras" for s in SAMPLERS.values() if s.sigma_space)]


def _split_schedule(name):
    if name in SAMPLERS:
        return SAMPLERS[name], None
    for schedule in SCHEDULES:
        base = name.removesuffix(f"_{schedule}")
        if base != name and base in SAMPLERS and SAMPLERS[base].sigma_space:
            return SAMPLERS[base], schedule
    raise ValueError(f"unknown sampler {name!r}; known: {', '.join(sampler_names())} "
                     f"(σ samplers also take _{'/_'.join(SIGMA_SCHEDULES[1:])})")
