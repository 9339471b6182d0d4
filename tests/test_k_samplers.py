"""Euler, Euler ancestral, Heun, DPM++ 2M and 2M SDE (σ-space samplers) against diffusers'
schedulers, against the original's samplers (over the same steps Euler is DDIM up to the last
step, Euler a is DDPM, DPM++ 2M's first step is DDIM's), and their σ schedule.

float64 on tiny latents (B=2, C=4, 5×5) with a toy ε model that depends on x and on t, so every
step's timestep matters. diffusers' Euler, Heun and DPMSolverMultistep schedulers compute in
float32 (their step upcasts the sample to float32, their σ table is float32): those
comparisons hold to float32 rounding.
"""
import numpy as np
import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler)

from helpers import fresh_seed, rel_error
from ldm import schedule
from ldm.samplers import (add_noise, alpha_bar, ddim_timesteps, eps_from_v,
                          sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_dpmpp_2m_sde,
                          sample_euler, sample_euler_ancestral, sample_heun)
from ldm.samplers.common import sigmas_of
from ldm.samplers.plms import adams_bashforth_eps
from ldm.samplers.schedules import karras as karras_timesteps
from ldm.samplers.sigmas import sigma_to_t

AC = schedule.alphas_cumprod()  # (1000,) float64
SIGMAS = sigmas_of(AC)
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
K_SAMPLERS = [sample_euler, sample_euler_ancestral, sample_heun, sample_dpmpp_2m,
              sample_dpmpp_2m_sde]
NOISY = (sample_euler_ancestral, sample_dpmpp_2m_sde)  # fresh noise at every step but the last


def noise_options(sampler, seed):
    return {"generator": torch.Generator().manual_seed(seed)} if sampler in NOISY else {}


def randn(seed, *shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def toy_eps_fn(seed):
    """A fixed random channel mix of x plus a fixed random map scaled by sin(t / 300)."""
    w, b = randn(seed, 4, 4) / 2, randn(seed + 1, 4, 5, 5)

    def eps_fn(x, t):
        assert t.shape == (x.shape[0],)
        mix = torch.einsum("oc,bchw->bohw", w.to(x.dtype), x)
        scale = torch.sin(t.double() / 300.0).to(x.dtype)[:, None, None, None]
        return 0.5 * mix + scale * b.to(x.dtype)  # in x's dtype, for the float32 checks
    return eps_fn


def test_alphas_at_is_the_table_at_trained_steps_and_log_sigma_linear_between():
    t = torch.tensor([0, 1, 500, 998, 999])
    assert torch.equal(alpha_bar(t, AC), AC[t])
    assert torch.allclose(alpha_bar(t.double(), AC), AC[t], rtol=1e-14, atol=0)
    low = torch.randint(0, 999, (20,))
    w = torch.rand(20, dtype=torch.float64)
    sigma = ((1 - alpha_bar(low + w, AC)) / alpha_bar(low + w, AC)).sqrt()
    expected = (SIGMAS[low].log() * (1 - w) + SIGMAS[low + 1].log() * w).exp()
    assert rel_error(sigma, expected) < 1e-14


def test_sigma_to_t_matches_diffusers_and_inverts_alphas_at():
    reference = EulerDiscreteScheduler(**SD_SCHEDULE)
    g = torch.Generator().manual_seed(fresh_seed())
    log_sigmas = SIGMAS[0].log() + torch.rand(50, generator=g, dtype=torch.float64) * (
        SIGMAS[-1].log() - SIGMAS[0].log())
    for sigma in log_sigmas.exp().tolist():
        t = sigma_to_t(sigma, AC)
        assert t == pytest.approx(reference._sigma_to_t(np.array(sigma), SIGMAS.log().numpy()),
                                  abs=1e-9)
        a = alpha_bar(torch.tensor(t, dtype=torch.float64), AC).item()
        assert ((1 - a) / a) ** 0.5 == pytest.approx(sigma, rel=1e-12)
    with pytest.raises(ValueError, match="outside the schedule"):
        sigma_to_t(20.0, AC)


@pytest.mark.parametrize("steps", [2, 10, 25, 50])
def test_karras_timesteps_match_diffusers(steps):
    reference = EulerDiscreteScheduler(**SD_SCHEDULE, use_karras_sigmas=True)
    reference.set_timesteps(steps)
    ts = karras_timesteps(steps, AC)
    assert ts.dtype == torch.float64 and ts.shape == (steps,)
    sigmas = sigmas_of(alpha_bar(ts, AC)).tolist()
    # diffusers builds its σ from a float32 schedule
    assert rel_error(torch.tensor(sigmas), reference.sigmas[:-1]) < 2e-6
    assert (ts - reference.timesteps.double()).abs().max() < 2e-3
    assert ts[0] == 999 and ts[-1] == 0


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_euler_over_ddim_steps_is_ddim_with_its_last_x0(steps):
    """DDIM (η = 0) is Euler's method on the ODE in σ space: x_t/√ᾱ moves by (σ' − σ) ε. So over
    the same steps the trajectories agree, and Euler's last step (to σ = 0) lands on the
    clean-latent prediction of DDIM's last step (DDIM itself stops at ᾱ_0)."""
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    ts = ddim_timesteps(steps)
    ddim_xs, ddim_x0s, euler_xs = [], [], []
    sample_ddim(eps_fn, x, ts, AC, callback=lambda i, t, x, x0: (ddim_xs.append(x),
                                                                 ddim_x0s.append(x0)) and None)
    out = sample_euler(eps_fn, x, ts, AC, callback=lambda i, t, x, x0: euler_xs.append(x))
    for ours, theirs in zip(euler_xs[:-1], ddim_xs[:-1]):
        assert rel_error(ours, theirs) < 1e-12
    assert rel_error(out, ddim_x0s[-1]) < 1e-12
    assert torch.equal(out, euler_xs[-1])


@pytest.mark.parametrize("steps", [1, 10, 50])
def test_euler_ancestral_over_ddim_steps_is_ddpm(steps):
    """Euler a (η = 1) steps down to σ_down and adds noise σ_up: the DDPM posterior (mean and
    "fixed small" variance) in σ space. With the same noise draws it is our DDPM, exactly."""
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    ts = ddim_timesteps(steps)
    ours = sample_euler_ancestral(eps_fn, x, ts, AC, generator=torch.Generator().manual_seed(seed))
    ddpm = sample_ddpm(eps_fn, x, ts, AC, generator=torch.Generator().manual_seed(seed))
    assert rel_error(ours, ddpm) < 1e-12


def test_dpmpp_2m_first_step_is_ddim():
    """DPM-Solver++ of first order, which 2M takes for its first step, is DDIM (Lu et al. 2022)."""
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    ts = ddim_timesteps(20)
    ddim_xs, dpm_xs = [], []
    sample_ddim(eps_fn, x, ts, AC, callback=lambda i, t, x, x0: ddim_xs.append(x))
    sample_dpmpp_2m(eps_fn, x, ts, AC, callback=lambda i, t, x, x0: dpm_xs.append(x))
    assert rel_error(dpm_xs[0], ddim_xs[0]) < 1e-12
    assert rel_error(dpm_xs[1], ddim_xs[1]) > 1e-6  # from the second step on, second order


@pytest.mark.parametrize("karras", [False, True])
def test_euler_and_dpmpp_2m_are_their_noisy_variants_at_eta_zero(karras):
    """Each has its own loop; at η = 0 the noisy variant takes the same steps: Euler a's
    σ_up = 0 and σ_down = σ_{i+1} (Euler); 2M SDE's w = 1 − e^{−h} and
    w D_i + ½ (w/r) (D_i − D_{i−1}) = w D' (2M). Every step's x agrees to float64 rounding."""
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    ts = karras_timesteps(15, AC) if karras else ddim_timesteps(15)
    for sampler, noisy_variant in [(sample_euler, sample_euler_ancestral),
                                   (sample_dpmpp_2m, sample_dpmpp_2m_sde)]:
        xs, xs_eta_zero = [], []
        sampler(eps_fn, x, ts, AC, callback=lambda i, t, x, x0: xs.append(x))
        noisy_variant(eps_fn, x, ts, AC, eta=0.0, generator=torch.Generator().manual_seed(seed),
                      callback=lambda i, t, x, x0: xs_eta_zero.append(x))
        assert len(xs) == len(xs_eta_zero) == len(ts)
        assert max(rel_error(a, b) for a, b in zip(xs, xs_eta_zero)) < 1e-12


@pytest.mark.parametrize("order", [2, 3, 4])
def test_plms_formulas_are_adams_bashforth_of_their_order(order):
    """The k-th order Adams–Bashforth ε' integrates, over the coming step, the polynomial
    through the last k values of ε: given ε(s) at steps s = −(k−1) … 0 of a polynomial of
    degree k − 1, ε' is exactly its mean ∫₀¹ ε(s) ds; for degree k it is not (order exactly k)."""
    g = torch.Generator().manual_seed(fresh_seed())

    def error_on_polynomial(degree):
        coeffs = torch.randn(degree + 1, 3, generator=g, dtype=torch.float64)  # 3 "pixels"
        eps = [sum(c * s ** j for j, c in enumerate(coeffs)) for s in range(1 - order, 1)]
        mean = sum(c / (j + 1) for j, c in enumerate(coeffs))  # ∫₀¹ Σ c_j s^j ds
        return (adams_bashforth_eps(eps[-1], eps[:-1]) - mean).abs().max().item()

    assert error_on_polynomial(order - 1) < 1e-12
    assert error_on_polynomial(order) > 1e-6


def diffusers_loop(scheduler, eps_fn, x, generator=None):
    """diffusers' sampling loop from SD's x_t at the first step. The Euler schedulers step in σ
    space: x is put there as ours is, × √(σ²+1). (Their own init_noise_sigma is that with
    "leading" spacing but σ alone with "linspace", as k-diffusion starts; ldm's x_T is SD's
    unit-variance noise.) DPMSolverMultistep steps SD's x_t itself (init_noise_sigma 1)."""
    if scheduler.init_noise_sigma != 1:
        x = x * (scheduler.sigmas[0].double() ** 2 + 1) ** 0.5
    for t in scheduler.timesteps:
        eps = eps_fn(scheduler.scale_model_input(x, t), t.expand(x.shape[0]))
        options = {} if generator is None else {"generator": generator}
        x = scheduler.step(eps, t, x, **options).prev_sample
    return x


def reference_over_our_steps(scheduler_class, steps, karras, **config):
    """diffusers' scheduler set to the steps ours take, and those steps: DDIM's ("leading" with
    offset 1) or Karras σ (diffusers takes their range from the steps its spacing picks:
    "linspace" spans the whole schedule)."""
    spacing = dict(timestep_spacing="linspace") if karras else dict(
        timestep_spacing="leading", steps_offset=1)
    reference = scheduler_class(**SD_SCHEDULE, **spacing, use_karras_sigmas=karras, **config)
    reference.set_timesteps(steps)
    return reference, karras_timesteps(steps, AC) if karras else ddim_timesteps(steps)


@pytest.mark.parametrize("steps", [10, 30])
@pytest.mark.parametrize("karras", [False, True])
def test_euler_matches_diffusers(steps, karras):
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    reference, ts = reference_over_our_steps(EulerDiscreteScheduler, steps, karras)
    if not karras:
        assert torch.equal(reference.timesteps.long(), ts)
    error = rel_error(sample_euler(eps_fn, x, ts, AC), diffusers_loop(reference, eps_fn, x))
    assert error < 2e-6  # diffusers in float32


@pytest.mark.parametrize("steps", [10, 30])
def test_euler_ancestral_matches_diffusers(steps):
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    reference = EulerAncestralDiscreteScheduler(**SD_SCHEDULE, timestep_spacing="leading",
                                                steps_offset=1)
    reference.set_timesteps(steps)
    ours = sample_euler_ancestral(eps_fn, x, ddim_timesteps(steps), AC,
                                  generator=torch.Generator().manual_seed(seed + 3))
    theirs = diffusers_loop(reference, eps_fn, x, torch.Generator().manual_seed(seed + 3))
    assert rel_error(ours, theirs) < 2e-6  # diffusers in float32


@pytest.mark.parametrize("steps", [1, 2, 10, 20, 50])
def test_dpmpp_2m_matches_diffusers_dpmsolver_plus_plus(steps):
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    ts = ddim_timesteps(steps)
    reference = DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="dpmsolver++",
                                            solver_order=2, final_sigmas_type="zero")
    reference.set_timesteps(timesteps=ts.tolist())
    assert rel_error(reference.sigmas[:-1], SIGMAS[ts]) < 1e-5  # its float32 σ table
    ours = sample_dpmpp_2m(eps_fn, x, ts, AC)
    assert rel_error(ours, diffusers_loop(reference, eps_fn, x)) < 2e-6  # diffusers in float32


@pytest.mark.parametrize("steps, karras", [(1, False), (10, False), (30, False), (10, True),
                                           (30, True)])
def test_heun_matches_diffusers(steps, karras):
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    reference, ts = reference_over_our_steps(HeunDiscreteScheduler, steps, karras)
    calls = []
    ours = sample_heun(lambda x, t: calls.append(t) or eps_fn(x, t), x, ts, AC)
    assert len(calls) == 2 * steps - 1 == len(reference.timesteps)
    assert rel_error(ours, diffusers_loop(reference, eps_fn, x)) < 2e-6  # diffusers in float32


@pytest.mark.parametrize("steps", [1, 2, 10, 30])
def test_dpmpp_2m_sde_matches_diffusers_sde_dpmsolver_plus_plus(steps):
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    ts = ddim_timesteps(steps)
    ours = sample_dpmpp_2m_sde(eps_fn, x, ts, AC, generator=torch.Generator().manual_seed(seed))
    # The same draws, handed to diffusers (it draws its own at every step, the last included).
    g = torch.Generator().manual_seed(seed)
    noises = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(steps - 1)]
    reference = DPMSolverMultistepScheduler(**SD_SCHEDULE, algorithm_type="sde-dpmsolver++",
                                            solver_order=2, final_sigmas_type="zero")
    reference.set_timesteps(timesteps=ts.tolist())
    theirs = x
    for i, t in enumerate(reference.timesteps):
        eps = eps_fn(theirs, t.expand(x.shape[0]))
        noise = noises[i] if i < steps - 1 else torch.zeros_like(x)  # × σ = 0 on the last step
        theirs = reference.step(eps, t, theirs, variance_noise=noise).prev_sample
    assert rel_error(ours, theirs) < 2e-6  # diffusers in float32


def test_v_prediction_at_fractional_steps_matches_diffusers_euler():
    """eps_from_v interpolates ᾱ at the fractional Karras steps as the σ samplers do."""
    seed = fresh_seed()
    v_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    eps_fn = eps_from_v(lambda x, t, context: v_fn(x, t), AC)
    reference, ts = reference_over_our_steps(EulerDiscreteScheduler, 20, karras=True,
                                             prediction_type="v_prediction")
    ours = sample_euler(lambda x, t: eps_fn(x, t, None), x, ts, AC)
    assert rel_error(ours, diffusers_loop(reference, v_fn, x)) < 2e-6  # diffusers in float32


@pytest.mark.parametrize("sampler", K_SAMPLERS)
def test_with_the_true_noise_every_sampler_returns_x0(sampler):
    """If eps_fn returns the ε that made x_t from x0, every step predicts x0 and the last lands
    on it (σ = 0), from integer and from fractional starting steps."""
    seed = fresh_seed()
    x0, eps = randn(seed, 2, 4, 5, 5), randn(seed + 1, 2, 4, 5, 5)
    for ts in (ddim_timesteps(25)[5:], karras_timesteps(12, AC)[3:]):
        x_t = add_noise(x0, eps, ts[0].item(), AC)
        preds = []
        out = sampler(lambda x, t: eps, x_t, ts, AC, callback=lambda i, t, x, p: preds.append(p),
                      **noise_options(sampler, seed))
        if sampler in NOISY:  # their fresh noise is not the ε of eps_fn
            preds = preds[:1]
        assert max(rel_error(p, x0) for p in preds) < 1e-12
        if sampler not in NOISY:
            assert rel_error(out, x0) < 1e-12


@pytest.mark.parametrize("sampler", K_SAMPLERS)
def test_callback_sees_and_replaces_sd_latents(sampler):
    """What the callback returns is continued from: x unchanged changes nothing, a replacement
    does. (That it is given SD's x_t, as DDIM's callback is: the DDIM comparisons.)"""
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    ts = ddim_timesteps(10)

    def run(callback):
        return sampler(eps_fn, x, ts, AC, callback=callback, **noise_options(sampler, seed))
    plain = run(None)
    assert rel_error(run(lambda i, t, x, x0: x), plain) < 1e-14
    assert not torch.allclose(run(lambda i, t, x, x0: x * 0.9 if i == 4 else None), plain)


@pytest.mark.parametrize("timesteps", [[1, 21], [21, 21, 1], [1000, 1], [999.5, 1], [21, -1],
                                       [], [[21]]])
@pytest.mark.parametrize("sampler", K_SAMPLERS)
def test_k_samplers_reject_bad_timesteps(sampler, timesteps):
    with pytest.raises(ValueError, match="timesteps"):
        sampler(lambda x, t: x, randn(1, 1, 4, 5, 5), timesteps, AC)


def test_karras_timesteps_rejects_too_few_steps():
    with pytest.raises(ValueError, match="steps"):
        karras_timesteps(1, AC)
