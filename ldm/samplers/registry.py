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
    options are `generator` when `noisy` (fresh noise at every step; DDIM's only with η > 0):
    one torch.Generator for the batch, or a list of one per image (common.randn); and `eta`
    when `takes_eta`.
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
    a1111_schedule: str | None = None    # A1111's "Automatic" for it (None: see from_a1111)

    @property
    def sigma_space(self):
        """Steps in σ (any schedule, fractional timesteps) rather than at trained steps."""
        return "karras" in self.schedules


SAMPLERS = {s.name: s for s in [
    Sampler("ddim", sample_ddim, "DDIM", INTEGER_SCHEDULES, noisy=True, takes_eta=True),
    Sampler("plms", sample_plms, "PLMS", INTEGER_SCHEDULES),
    Sampler("ddpm", sample_ddpm, "DDPM", INTEGER_SCHEDULES, noisy=True, max_steps=1000),
    Sampler("euler", sample_euler, "Euler"),
    Sampler("euler_a", sample_euler_ancestral, "Euler a", noisy=True),
    Sampler("heun", sample_heun, "Heun", calls_per_step=2),
    Sampler("lms", sample_lms, "LMS"),
    Sampler("dpm2", sample_dpm2, "DPM2", calls_per_step=2, a1111_schedule="karras"),
    Sampler("dpm2_a", sample_dpm2_ancestral, "DPM2 a", noisy=True, calls_per_step=2,
            a1111_schedule="karras"),
    Sampler("dpmpp_2s_a", sample_dpmpp_2s_ancestral, "DPM++ 2S a", noisy=True, calls_per_step=2,
            a1111_schedule="karras"),
    Sampler("dpmpp_sde", sample_dpmpp_sde, "DPM++ SDE", noisy=True, calls_per_step=2,
            a1111_schedule="karras"),
    Sampler("dpmpp_2m", sample_dpmpp_2m, "DPM++ 2M", a1111_schedule="karras"),
    Sampler("dpmpp_2m_sde", sample_dpmpp_2m_sde, "DPM++ 2M SDE", noisy=True,
            a1111_schedule="exponential"),
    Sampler("dpmpp_3m_sde", sample_dpmpp_3m_sde, "DPM++ 3M SDE", noisy=True,
            a1111_schedule="exponential"),
    Sampler("unipc", sample_unipc, "UniPC"),
    Sampler("lcm", sample_lcm, "LCM", ("lcm",), noisy=True, max_steps=50),
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


# A1111's "Schedule type" labels (modules/sd_schedulers.py). "Uniform" is k-diffusion's
# get_sigmas, t evenly spaced from T−1 to 0, which is also what A1111's "Normal" computes.
A1111_SCHEDULES = {"Uniform": "normal", "Normal": "normal", "Karras": "karras",
                   "Exponential": "exponential", "SGM Uniform": "sgm_uniform",
                   "SGMUniform": "sgm_uniform", "Simple": "simple", "DDIM": "ddim_uniform"}


def from_a1111(sampler, schedule_type=None):
    """(Sampler, schedule name) for the "Sampler:" and "Schedule type:" fields of an A1111 PNG,
    e.g. ("DPM++ 2M Karras") or ("DPM++ 2M", "Karras"). Raises ValueError listing the names
    it knows.

    Older A1111 versions fold the schedule into the sampler's name ("… Karras",
    "… Exponential"). A σ sampler with neither suffix nor schedule type runs on the model's own
    discretisation ("normal"); "Automatic" is the sampler's own default in A1111 ≥ 1.9
    (`a1111_schedule`: Karras for DPM++ 2M, …). Left out, as A1111 behaviour ldm does not
    reproduce: DPM2's and DPM++ 3M SDE's dropped next-to-last σ, A1111's own UniPC variant
    (bh1) and its "Polyexponential", "KL Optimal", "Align Your Steps" and "Beta" schedules.
    """
    by_label = {entry.a1111: entry for entry in SAMPLERS.values()}
    name, suffix = sampler, None
    for label in ("Karras", "Exponential"):
        if sampler.endswith(f" {label}") and sampler not in by_label:
            name, suffix = sampler.removesuffix(f" {label}"), label
    if name not in by_label:
        raise ValueError(f"unknown A1111 sampler {sampler!r}; known: {', '.join(by_label)} "
                         "(σ samplers also with ' Karras' / ' Exponential')")
    entry = by_label[name]
    label = suffix or schedule_type
    if label in (None, "Automatic"):
        default = entry.a1111_schedule if label == "Automatic" else None
        return entry, default or ("normal" if entry.sigma_space else entry.schedules[0])
    if label not in A1111_SCHEDULES:
        raise ValueError(f"unknown A1111 schedule type {label!r}; known: Automatic, "
                         f"{', '.join(A1111_SCHEDULES)}")
    return resolve(entry.name, A1111_SCHEDULES[label])


def a1111_names(entry, schedule):
    """The ("Sampler", "Schedule type") A1111 writes for `entry` on `schedule`, the inverse of
    from_a1111; the schedule type is None for the model's own discretisation."""
    if schedule == "normal" or (schedule == entry.schedules[0] and not entry.sigma_space):
        return entry.a1111, None
    label = next(label for label, name in A1111_SCHEDULES.items() if name == schedule)
    return entry.a1111, label


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
