"""UniPC and LCM against diffusers' UniPCMultistepScheduler (bh2, data prediction) and
LCMScheduler over whole runs, against closed forms, and their argument checks.

float64 on tiny latents (B=2, C=4, 5×5) with a toy ε model that depends on x and on t.
diffusers keeps its schedule tables in float32; to compare the algorithms and not the roundings
its reference runs are made float64 throughout:
- UniPC reads α_t, σ_t and λ_t of every step from its `sigmas` (k-diffusion's σ, float32, the
  clean end's 0 appended) and ignores its alpha_t/sigma_t/lambda_t tables. After set_timesteps
  we hand it our timesteps and their float64 σ. (This is also how it visits our steps: its
  "leading" spacing takes ⌊T/(n+1)⌋ strides, not DDIM's ⌊T/n⌋, and its set_timesteps takes no
  custom timesteps.) Given float64 σ and samples, all its step arithmetic is float64.
- LCM reads ᾱ from its float32 `alphas_cumprod`: we give it ours (float64). It computes c_skip
  and c_out from the timestep it is handed, which a tensor from its int64 `timesteps` would
  make float32 (int64 × 10.0 is float32 in torch): we hand it the timestep as a Python int.
  It draws its noise with diffusers' randn_tensor, torch.randn(shape, generator, dtype) on the
  CPU: the same stream as ours from a generator seeded alike.
With that, both agree with ours to float64 rounding: measured ≤ 1e-15 over 1 … 50 steps, orders
1 … 3, integer and fractional steps; asserted at 1e-12. (Left in float32, the references differ
from ours by ~5e-7: UniPC with its float32 σ, LCM with its float32 ᾱ; LCM with float64 ᾱ but a
tensor timestep by ~3e-8, from c_skip and c_out alone.)
"""
import pytest
import torch
from diffusers import LCMScheduler, UniPCMultistepScheduler

from helpers import rel_error
from ldm import schedule
from ldm.samplers import SAMPLERS, add_noise, alpha_bar, resolve, sample_lcm, sample_unipc
from ldm.samplers import timesteps as registry_timesteps
from ldm.samplers.common import sigmas_of
from ldm.samplers.lcm import boundary_scalings
from ldm.samplers.registry import SIGMA_SCHEDULES
from ldm.samplers.schedules import SCHEDULES, ddim_uniform, karras, lcm
from test_k_samplers import fresh_seed, randn, toy_eps_fn

AC = schedule.alphas_cumprod()  # (1000,) float64
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PARITY = 1e-12


def problem():
    """A toy ε model and a starting latent x_T (2, 4, 5, 5), from a fresh seed; and the seed."""
    seed = fresh_seed()
    return toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5), seed


# ---- UniPC ---------------------------------------------------------------------------------

def diffusers_unipc(eps_fn, x, ts, order):
    """diffusers' UniPC (bh2, x0 prediction, lower_order_final) over our timesteps ts, in float64
    (see the module docstring)."""
    reference = UniPCMultistepScheduler(**SD_SCHEDULE, solver_order=order, solver_type="bh2",
                                        predict_x0=True, lower_order_final=True,
                                        final_sigmas_type="zero")
    reference.set_timesteps(len(ts))
    assert rel_error(reference.sigmas[:-1], sigmas_of(AC)[reference.timesteps]) < 1e-5  # float32
    reference.timesteps = ts.clone()
    clean = torch.zeros(1, dtype=torch.float64)
    reference.sigmas = torch.cat([sigmas_of(alpha_bar(ts, AC)), clean])  # σ_N = 0
    for t in reference.timesteps:
        eps = eps_fn(x, t.expand(x.shape[0]))
        x = reference.step(eps, t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 25])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers_over_ddim_steps(order, steps):
    eps_fn, x, _ = problem()
    ts = ddim_uniform(steps, AC)
    ours = sample_unipc(eps_fn, x, ts, AC, order=order)
    assert rel_error(ours, diffusers_unipc(eps_fn, x, ts, order)) < PARITY


@pytest.mark.parametrize("schedule_name, steps", [("karras", 2), ("karras", 10), ("normal", 7),
                                                  ("exponential", 25)])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_matches_diffusers_at_fractional_steps(order, schedule_name, steps):
    """At fractional timesteps the network gets the float t, and ᾱ is interpolated (alpha_bar)."""
    eps_fn, x, _ = problem()
    ts = SCHEDULES[schedule_name](steps, AC)
    assert ts.is_floating_point()
    ours = sample_unipc(eps_fn, x, ts, AC, order=order)
    assert rel_error(ours, diffusers_unipc(eps_fn, x, ts, order)) < PARITY


def test_unipc_order_2_is_the_default_and_order_matters():
    eps_fn, x, _ = problem()
    ts = ddim_uniform(10, AC)
    runs = {order: sample_unipc(eps_fn, x, ts, AC, order=order) for order in (1, 2, 3)}
    assert torch.equal(sample_unipc(eps_fn, x, ts, AC), runs[2])
    assert rel_error(runs[1], runs[2]) > 1e-6 and rel_error(runs[3], runs[2]) > 1e-6


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_with_the_true_noise_stays_on_the_trajectory_and_returns_x0(order):
    """If eps_fn returns the ε that made x_t from x0, every estimate m_i is x0, every difference
    D_k vanishes, and each step (DDIM's, in effect) lands on x_t' of that same x0 and ε: what
    the callback sees is SD's x_t at the next step, and the last step gives x0. From integer
    and from fractional starting steps."""
    seed = fresh_seed()
    x0, eps = randn(seed, 2, 4, 5, 5), randn(seed + 1, 2, 4, 5, 5)
    for ts in (ddim_uniform(25, AC)[5:], karras(12, AC)[3:]):
        seen = []
        out = sample_unipc(lambda x, t: eps, add_noise(x0, eps, ts[0].item(), AC), ts, AC,
                           order=order, callback=lambda i, t, x, p: seen.append((t, x, p)))
        assert [t for t, _, _ in seen] == ts.tolist()
        for (_, x, p), t_next in zip(seen, ts[1:].tolist()):
            assert rel_error(x, add_noise(x0, eps, t_next, AC)) < 1e-12
            assert rel_error(p, x0) < 1e-12
        assert rel_error(out, x0) < 1e-12


def test_unipc_calls_the_network_once_per_step_at_each_timestep():
    eps_fn, x, _ = problem()
    ts = karras(8, AC)
    calls = []
    sample_unipc(lambda x, t: calls.append(t) or eps_fn(x, t), x, ts, AC)
    assert [t[0].item() for t in calls] == ts.tolist()
    # 999 and 0, the ends, are trained steps; between them Karras steps are fractional
    assert [t.dtype for t in calls] == [torch.long] + [torch.float64] * 6 + [torch.long]


@pytest.mark.parametrize("schedule_name", SIGMA_SCHEDULES)
def test_unipc_runs_every_schedule_it_is_registered_for(schedule_name):
    eps_fn, x, _ = problem()
    entry, name = resolve(f"unipc_{schedule_name}")
    assert entry.sample is sample_unipc and name == schedule_name
    out = entry.sample(eps_fn, x, registry_timesteps(entry, name, 6, AC), AC)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unipc_float32_keeps_dtype_and_matches_float64():
    eps_fn, x, _ = problem()
    ts = karras(15, AC)
    out32 = sample_unipc(eps_fn, x.float(), ts, AC)
    assert out32.dtype == torch.float32
    assert rel_error(out32, sample_unipc(eps_fn, x, ts, AC)) < 1e-5


# ---- LCM -----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 8, 25, 50])
def test_lcm_timesteps_match_diffusers(steps):
    reference = LCMScheduler(**SD_SCHEDULE, original_inference_steps=50)
    reference.set_timesteps(steps)
    ts = lcm(steps, AC)
    assert ts.dtype == torch.long and torch.equal(ts, reference.timesteps)


def test_lcm_timesteps_are_the_skipping_step_grid():
    assert lcm(4, AC).tolist() == [999, 759, 499, 259]
    assert lcm(50, AC).tolist() == list(range(999, 0, -20))
    assert lcm(1, AC).tolist() == [999]


def diffusers_lcm(eps_fn, x, ts, seed, custom):
    """diffusers' LCM over ts (its own schedule, or given as custom timesteps), float64 (see the
    module docstring), drawing its noise from a generator seeded with `seed`."""
    reference = LCMScheduler(**SD_SCHEDULE)
    if custom:
        reference.set_timesteps(timesteps=ts.tolist())
    else:
        reference.set_timesteps(len(ts))
    assert torch.equal(reference.timesteps, ts)
    assert rel_error(reference.alphas_cumprod, AC) < 1e-6  # float32
    reference.alphas_cumprod = AC.clone()
    g = torch.Generator().manual_seed(seed)
    for t in reference.timesteps:
        eps = eps_fn(x, t.expand(x.shape[0]))
        x = reference.step(eps, int(t), x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 25])
def test_lcm_matches_diffusers(steps):
    eps_fn, x, seed = problem()
    ts = lcm(steps, AC)
    ours = sample_lcm(eps_fn, x, ts, AC, generator=torch.Generator().manual_seed(seed))
    assert rel_error(ours, diffusers_lcm(eps_fn, x, ts, seed, custom=False)) < PARITY


def test_lcm_matches_diffusers_over_custom_timesteps():
    eps_fn, x, seed = problem()
    ts = torch.tensor([999, 749, 499, 249])  # off LCM's own grid
    ours = sample_lcm(eps_fn, x, ts, AC, generator=torch.Generator().manual_seed(seed))
    assert rel_error(ours, diffusers_lcm(eps_fn, x, ts, seed, custom=True)) < PARITY


def test_lcm_boundary_scalings():
    """f(x, 0) = x (c_skip = 1, c_out = 0); at LCM's steps c_skip ≈ 0 and c_out ≈ 1."""
    assert boundary_scalings(0) == (1.0, 0.0)
    c_skip, c_out = boundary_scalings(19)
    assert c_skip == pytest.approx(0.25 / (190 ** 2 + 0.25), rel=1e-15) and c_skip < 1e-5
    assert c_out == pytest.approx(190 / (190 ** 2 + 0.25) ** 0.5, rel=1e-15)
    reference = LCMScheduler(**SD_SCHEDULE)
    for t in (0, 19, 259, 999):
        assert boundary_scalings(t) == reference.get_scalings_for_boundary_condition_discrete(t)


def test_lcm_steps_renoise_to_the_next_level_and_end_on_x0():
    """The callback sees x = √ᾱ' x0 + √(1−ᾱ') z with the step's x0 and the generator's next z,
    and after the last step x0 itself; one step is one call and draws no noise."""
    eps_fn, x, seed = problem()
    ts = lcm(4, AC)
    seen = []
    out = sample_lcm(eps_fn, x, ts, AC, generator=torch.Generator().manual_seed(seed),
                     callback=lambda i, t, x, x0: seen.append((t, x, x0)))
    assert [t for t, _, _ in seen] == ts.tolist()
    g = torch.Generator().manual_seed(seed)
    for (_, x_next, x0), t_next in zip(seen, ts[1:].tolist()):
        z = torch.randn(x.shape, generator=g, dtype=x.dtype)
        assert rel_error(x_next, add_noise(x0, z, t_next, AC)) < 1e-14
    assert torch.equal(out, seen[-1][1]) and torch.equal(out, seen[-1][2])
    g = torch.Generator().manual_seed(seed)
    state = g.get_state()
    sample_lcm(eps_fn, x, lcm(1, AC), AC, generator=g)
    assert torch.equal(g.get_state(), state)


# ---- both: the callback contract, the registry, bad arguments ------------------------------

@pytest.mark.parametrize("sampler", ["unipc", "lcm"])
def test_callback_output_replaces_x(sampler):
    """x returned unchanged changes nothing; a replacement changes the result."""
    eps_fn, x, seed = problem()
    entry = SAMPLERS[sampler]
    ts = registry_timesteps(entry, entry.schedules[0], 6, AC)

    def run(callback):
        options = {"generator": torch.Generator().manual_seed(seed)} if entry.noisy else {}
        return entry.sample(eps_fn, x, ts, AC, callback=callback, **options)
    plain = run(None)
    assert torch.equal(run(lambda i, t, x, x0: x), plain)
    assert rel_error(run(lambda i, t, x, x0: x * 0.9 if i == 2 else None), plain) > 1e-3


def test_registry_entries():
    unipc_entry, lcm_entry = SAMPLERS["unipc"], SAMPLERS["lcm"]
    assert unipc_entry.sample is sample_unipc and unipc_entry.a1111 == "UniPC"
    assert unipc_entry.schedules == SIGMA_SCHEDULES and unipc_entry.sigma_space
    assert not unipc_entry.noisy and unipc_entry.calls_per_step == 1
    assert lcm_entry.sample is sample_lcm and lcm_entry.a1111 == "LCM" and lcm_entry.noisy
    assert resolve("lcm") == (lcm_entry, "lcm") and not lcm_entry.sigma_space
    assert registry_timesteps(lcm_entry, "lcm", 4, AC).tolist() == [999, 759, 499, 259]
    with pytest.raises(ValueError, match="lcm"):
        resolve("lcm", "karras")


@pytest.mark.parametrize("order", [0, -1, 1.5, 2.0, True, "2", None])
def test_unipc_rejects_a_bad_order(order):
    with pytest.raises(ValueError, match="order"):
        sample_unipc(lambda x, t: x, randn(1, 1, 4, 5, 5), [21, 1], AC, order=order)


@pytest.mark.parametrize("timesteps", [[1, 21], [21, 21, 1], [1000, 1], [21, -1], [], [[21]]])
@pytest.mark.parametrize("sampler", [sample_unipc, sample_lcm])
def test_reject_bad_timesteps(sampler, timesteps):
    with pytest.raises(ValueError, match="timesteps"):
        sampler(lambda x, t: x, randn(1, 1, 4, 5, 5), timesteps, AC)


def test_lcm_rejects_fractional_timesteps():
    """c_skip, c_out and the table's ᾱ are those of trained steps."""
    with pytest.raises(ValueError, match="timesteps"):
        sample_lcm(lambda x, t: x, randn(1, 1, 4, 5, 5), [999.5, 499.0], AC)


@pytest.mark.parametrize("steps", [0, 51, 2.0, None])
def test_lcm_schedule_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        lcm(steps, AC)
