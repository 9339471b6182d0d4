"""The sampler registry: every sampler and schedule ldm knows, resolved by ldm's names and by
the names AUTOMATIC1111 writes in its PNG "parameters".

The samplers' maths is tested against its references in test_samplers.py, test_k_samplers.py
and the files beside them; here, that the table holds together and the names resolve.
"""
import inspect

import pytest
import torch

from ldm import schedule
from ldm.samplers import SAMPLERS, SCHEDULES, resolve, timesteps
from ldm.samplers.registry import a1111_names, from_a1111, sampler_names

from helpers import fresh_seed

AC = schedule.alphas_cumprod()


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_entry_describes_its_function(name):
    """The options the table says a sampler takes are the ones its function takes."""
    entry = SAMPLERS[name]
    params = inspect.signature(entry.sample).parameters
    assert list(params)[:4] == ["eps_fn", "x", "timesteps", "alphas_cumprod"]
    assert "callback" in params
    assert ("generator" in params) == entry.noisy, "noisy samplers take a generator"
    assert ("eta" in params) >= entry.takes_eta
    assert all(s in SCHEDULES for s in entry.schedules)
    assert entry.a1111 and entry.calls_per_step >= 1


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_runs_every_schedule_it_lists(name):
    """A whole run on a toy ε-model for each schedule the entry accepts, counting the model
    calls against calls_per_step."""
    entry = SAMPLERS[name]
    g = torch.Generator().manual_seed(fresh_seed())
    x = torch.randn(1, 4, 3, 3, generator=g, dtype=torch.float64)
    calls = []

    def eps_fn(x, t):
        calls.append(t)
        return 0.3 * x + torch.sin(t.double() / 100)[:, None, None, None]

    for schedule_name in entry.schedules:
        calls.clear()
        ts = timesteps(entry, schedule_name, 6, AC)
        options = {"generator": torch.Generator().manual_seed(0)} if entry.noisy else {}
        out = entry.sample(eps_fn, x, ts, AC, **options)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert len(ts) <= len(calls) <= entry.calls_per_step * len(ts) + 1


def test_schedules_descend_within_the_training_steps():
    for name, make in SCHEDULES.items():
        if name == "lcm":
            continue  # its own timesteps, tested with the LCM sampler
        for steps in (2, 7, 50):
            ts = make(steps, AC).tolist()
            assert len(ts) == steps and all(a > b for a, b in zip(ts, ts[1:]))
            assert 0 <= ts[-1] and ts[0] <= 999, name


def test_resolve_takes_names_with_a_schedule_suffix():
    assert resolve("euler_a_karras") == (SAMPLERS["euler_a"], "karras")
    assert resolve("euler_a", "exponential") == (SAMPLERS["euler_a"], "exponential")
    assert resolve("ddim") == (SAMPLERS["ddim"], "ddim_uniform")
    assert "dpmpp_2m_karras" in sampler_names() and "ddim_karras" not in sampler_names()
    with pytest.raises(ValueError, match="unknown sampler 'dpm_fast'; known: ddim, plms"):
        resolve("dpm_fast")
    with pytest.raises(ValueError, match="'ddim' steps through 'ddim_uniform', not 'karras'"):
        resolve("ddim", "karras")
    with pytest.raises(ValueError, match="already names schedule 'karras'"):
        resolve("euler_karras", "exponential")
    with pytest.raises(ValueError, match="unknown sampler 'ddim_karras'"):
        resolve("ddim_karras")


@pytest.mark.parametrize("fields, expected", [
    (("Euler a",), ("euler_a", "normal")),        # A1111's default: the model's own steps
    (("Euler",), ("euler", "normal")),
    (("DDIM",), ("ddim", "ddim_uniform")),
    (("PLMS",), ("plms", "ddim_uniform")),
    (("DPM++ 2M Karras",), ("dpmpp_2m", "karras")),  # before A1111 1.9: the schedule in the name
    (("DPM++ 2M SDE Exponential",), ("dpmpp_2m_sde", "exponential")),
    (("DPM++ 2M", "Karras"), ("dpmpp_2m", "karras")),  # 1.9 on: "Schedule type"
    (("DPM++ 2M", "Automatic"), ("dpmpp_2m", "karras")),
    (("DPM++ 2M SDE", "Automatic"), ("dpmpp_2m_sde", "exponential")),
    (("Euler a", "SGM Uniform"), ("euler_a", "sgm_uniform")),
    (("Heun", "Uniform"), ("heun", "normal")),
    (("Euler", "DDIM"), ("euler", "ddim_uniform")),
])
def test_from_a1111_reads_the_names_a1111_writes(fields, expected):
    entry, schedule_name = from_a1111(*fields)
    assert (entry.name, schedule_name) == expected
    sampler_label, schedule_label = a1111_names(entry, schedule_name)
    assert from_a1111(sampler_label, schedule_label) == (entry, schedule_name)


def test_from_a1111_names_what_it_does_not_know():
    with pytest.raises(ValueError, match="unknown A1111 sampler 'DPM adaptive'; known: DDIM"):
        from_a1111("DPM adaptive")
    with pytest.raises(ValueError, match="unknown A1111 schedule type 'Align Your Steps'"):
        from_a1111("Euler", "Align Your Steps")
    with pytest.raises(ValueError, match="steps through"):
        from_a1111("DDIM", "Karras")


def test_every_sampler_has_its_own_a1111_name():
    labels = [entry.a1111 for entry in SAMPLERS.values()]
    assert len(set(labels)) == len(labels)
