"""LMS, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE and DPM++ 3M SDE against k-diffusion's own
sampling.py, run over the same σ with the same noise.

The reference is k-diffusion 0.1.1.post1's sampling.py (and the utils.py it imports), read out
of the wheel that `make test` downloads and loaded as a module: the package is never installed
or imported (its __init__ pulls in torchvision), and the imports these samplers do not use are
stubbed. Its model is the denoiser D(x, σ) = x − σ ε(x / √(σ²+1), t(σ)) built from the same toy
ε as ours. float64 on tiny latents (B=2, C=4, 5×5), so whole runs agree to rounding.
"""
import importlib.util
import math
import os
import sys
import types
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import torch

from helpers import rel_error
from ldm import schedule
from ldm.samplers import SAMPLERS
from ldm.samplers.brownian import BrownianNoise, noise_sampler
from ldm.samplers.common import sigmas_of
from ldm.samplers.dpm2 import sample_dpm2, sample_dpm2_ancestral
from ldm.samplers.dpmpp import sample_dpmpp_2m_sde
from ldm.samplers.dpmpp_2s import sample_dpmpp_2s_ancestral
from ldm.samplers.dpmpp_3m_sde import sample_dpmpp_3m_sde
from ldm.samplers.dpmpp_sde import sample_dpmpp_sde
from ldm.samplers.lms import lms_coefficients, sample_lms
from ldm.samplers.schedules import ddim_uniform, exponential, karras, normal, sgm_uniform, simple
from ldm.samplers.sigmas import sigma_to_t, step_sigmas
from test_k_samplers import fresh_seed, randn, toy_eps_fn

K_DIFFUSION_WHEEL = Path(os.environ.get(
    "K_DIFFUSION_WHEEL",
    Path(__file__).resolve().parents[1] / "build" / "reference"
    / "k_diffusion-0.1.1.post1-py3-none-any.whl"))
AC = schedule.alphas_cumprod()  # (1000,) float64
TOLERANCE = 1e-10

# ldm name -> (ours, k-diffusion's name, its noise: None, "gaussian" or "brownian", options)
CASES = {
    "lms": (sample_lms, "sample_lms", None, {}),
    "dpm2": (sample_dpm2, "sample_dpm_2", None, {}),
    "dpm2_a": (sample_dpm2_ancestral, "sample_dpm_2_ancestral", "gaussian", {}),
    "dpm2_a eta=0.5": (sample_dpm2_ancestral, "sample_dpm_2_ancestral", "gaussian",
                       {"eta": 0.5}),
    "dpmpp_2s_a": (sample_dpmpp_2s_ancestral, "sample_dpmpp_2s_ancestral", "gaussian", {}),
    "dpmpp_sde": (sample_dpmpp_sde, "sample_dpmpp_sde", "brownian", {}),
    "dpmpp_sde eta=0.5": (sample_dpmpp_sde, "sample_dpmpp_sde", "brownian", {"eta": 0.5}),
    "dpmpp_3m_sde": (sample_dpmpp_3m_sde, "sample_dpmpp_3m_sde", "gaussian", {}),
    "dpmpp_3m_sde brownian": (sample_dpmpp_3m_sde, "sample_dpmpp_3m_sde", "brownian",
                              {"noise": "brownian"}),
    # tests/test_k_samplers.py compares the Gaussian 2M SDE with diffusers'
    "dpmpp_2m_sde brownian": (sample_dpmpp_2m_sde, "sample_dpmpp_2m_sde", "brownian",
                              {"noise": "brownian"}),
}
SCHEDULE_STEPS = [(ddim_uniform, 1), (ddim_uniform, 2), (ddim_uniform, 5), (ddim_uniform, 20),
                  (karras, 2), (karras, 4), (karras, 12), (exponential, 3), (exponential, 15)]
# torchsde warns when k-diffusion's query at σ_max lies past the tree's end rounded to 1e-6
pytestmark = pytest.mark.filterwarnings("ignore:Should have:UserWarning")
NOISY = {sample_dpm2_ancestral, sample_dpmpp_2s_ancestral, sample_dpmpp_sde,
         sample_dpmpp_3m_sde, sample_dpmpp_2m_sde}


@pytest.fixture(scope="module")
def k_diffusion():
    """k-diffusion's sampling and external modules, from the wheel; torchvision (imported by its utils.py) and
    torchdiffeq (its log-likelihood ODE) are stubbed while it loads, tqdm too if absent."""
    if not K_DIFFUSION_WHEEL.exists():
        pytest.skip(f"no k-diffusion wheel at {K_DIFFUSION_WHEEL} (run make test, or set "
                    "K_DIFFUSION_WHEEL)")
    with zipfile.ZipFile(K_DIFFUSION_WHEEL) as wheel:
        sources = {name: wheel.read(f"k_diffusion/{name}.py").decode()
                   for name in ("utils", "sampling", "external")}
    package = types.ModuleType("k_diffusion")
    package.__path__ = []
    stubs = {"k_diffusion": package, "torchdiffeq": types.ModuleType("torchdiffeq")}
    stubs["torchdiffeq"].odeint = None
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        stubs[name] = types.ModuleType(name)
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    if importlib.util.find_spec("tqdm") is None:
        stubs["tqdm"] = types.ModuleType("tqdm")
        stubs["tqdm"].auto = stubs["tqdm.auto"] = types.ModuleType("tqdm.auto")
        stubs["tqdm.auto"].trange = lambda n, disable=None: range(n)
        stubs["tqdm.auto"].tqdm = None  # only the samplers left out use it
    with mock.patch.dict(sys.modules, stubs):
        for name, source in sources.items():
            module = types.ModuleType(f"k_diffusion.{name}")
            module.__package__ = "k_diffusion"
            sys.modules[module.__name__] = module
            setattr(package, name, module)
            exec(compile(source, f"{K_DIFFUSION_WHEEL.name}/k_diffusion/{name}.py", "exec"),
                 module.__dict__)
    return package


@pytest.fixture(scope="module")
def k_sampling(k_diffusion):
    return k_diffusion.sampling


def k_denoiser(eps_fn):
    """k-diffusion's model: D(x, σ) = x − σ ε(x / √(σ²+1), t(σ)), σ a (B,) tensor."""
    def model(x, sigma):
        t = torch.full((x.shape[0],), sigma_to_t(sigma[0].item(), AC, clamp=True), dtype=torch.float64)
        sigma = sigma[:, None, None, None]
        return x - sigma * eps_fn(x / (sigma ** 2 + 1).sqrt(), t)
    return model


def f64(value):
    """A float64 tensor: k-diffusion's torch.as_tensor would make a Python float float32."""
    return torch.tensor(value, dtype=torch.float64)


def brownian_seed(seed):
    """The Brownian path's seed that ldm draws from a generator seeded with `seed`."""
    return int(torch.randint(2 ** 63 - 1, (), generator=torch.Generator().manual_seed(seed)))


def reference_run(k_sampling, k_name, noise, options, eps_fn, x, ts, seed, callback=None):
    """k-diffusion's sampler over our σ, from our x_T moved into σ space, with our noise."""
    sigmas = torch.tensor(step_sigmas(ts, AC)[1], dtype=torch.float64)
    x = x * (sigmas[0] ** 2 + 1).sqrt()
    kwargs = dict(options)
    if noise == "gaussian":  # the same draws from the same generator, in the same order
        g = torch.Generator().manual_seed(seed)
        kwargs["noise_sampler"] = lambda sigma, sigma_next: torch.randn(
            x.shape, generator=g, dtype=x.dtype)
    elif noise == "brownian":  # k-diffusion's own Brownian tree, with the seed ours draws
        positive = sigmas[sigmas > 0]
        kwargs["noise_sampler"] = k_sampling.BrownianTreeNoiseSampler(
            x, positive.min(), positive.max(), seed=brownian_seed(seed))
    kwargs.pop("noise", None)
    return getattr(k_sampling, k_name)(k_denoiser(eps_fn), x, sigmas, disable=True,
                                       callback=callback, **kwargs)


def run_case(k_sampling, case, make_ts, steps):
    ours_fn, k_name, noise, options = CASES[case]
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    ts = make_ts(steps, AC)
    generator = {"generator": torch.Generator().manual_seed(seed)} if noise else {}
    ours = ours_fn(eps_fn, x, ts, AC, **options, **generator)
    theirs = reference_run(k_sampling, k_name, noise, options, eps_fn, x, ts, seed)
    return rel_error(ours, theirs)


@pytest.mark.parametrize("make_ts, steps", SCHEDULE_STEPS,
                         ids=[f"{f.__name__}-{n}" for f, n in SCHEDULE_STEPS])
@pytest.mark.parametrize("case", CASES)
def test_matches_k_diffusion(k_sampling, case, make_ts, steps):
    if CASES[case][1] in ("sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde") and steps == 1:
        pytest.skip("k-diffusion's 2M and 3M SDE fail on one step (their history update reads "
                    "h, unset there); test_one_step_lands_on_the_denoised_estimate covers it")
    assert run_case(k_sampling, case, make_ts, steps) <= TOLERANCE


@pytest.mark.parametrize("case", CASES)
def test_one_step_lands_on_the_denoised_estimate(case):
    """With one step, to σ = 0, every sampler returns D(x_T, σ_0)."""
    ours_fn, _, noise, options = CASES[case]
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    generator = {"generator": torch.Generator().manual_seed(seed)} if noise else {}
    ts = ddim_uniform(1, AC)
    sigma = step_sigmas(ts, AC)[1][0]
    x0 = k_denoiser(eps_fn)(x * math.sqrt(sigma ** 2 + 1), f64([sigma, sigma]))
    assert rel_error(ours_fn(eps_fn, x, ts, AC, **options, **generator), x0) <= 1e-14


def test_brownian_noise_matches_k_diffusion_per_image_seeds(k_sampling):
    """One tree per image, each from its own seed, as A1111 seeds a batch."""
    seed = fresh_seed()
    x = randn(seed, 3, 4, 5, 5)
    seeds = [seed, seed + 1, seed + 2]
    ours = BrownianNoise(x, 0.03, 14.6, seeds)
    theirs = k_sampling.BrownianTreeNoiseSampler(x, f64(0.03), f64(14.6), seed=seeds)
    for sigma, sigma_next in [(14.6, 7.0), (7.0, 1.25), (1.25, 0.03), (3.0, 2.9)]:
        assert torch.equal(ours(sigma, sigma_next), theirs(f64(sigma), f64(sigma_next)))
    alone = BrownianNoise(x[1:2], 0.03, 14.6, [seed + 1])
    assert torch.equal(ours(1.0, 0.5)[1], alone(1.0, 0.5)[0])  # each image its own path


def test_brownian_increments_add_up_whatever_the_steps():
    """W(σ_2) − W(σ_0) = (W(σ_1) − W(σ_0)) + (W(σ_2) − W(σ_1)): one path, however it is cut,
    so the image of an SDE sampler converges as its step count grows."""
    seed = fresh_seed()
    x = randn(seed, 2, 4, 5, 5)
    noise = BrownianNoise(x, 0.03, 14.6, seed)
    whole = noise(10.0, 1.0) * 9.0 ** 0.5
    parts = noise(10.0, 4.0) * 6.0 ** 0.5 + noise(4.0, 1.0) * 3.0 ** 0.5
    assert rel_error(parts, whole) < 1e-12
    again = BrownianNoise(x, 0.03, 14.6, seed)
    assert torch.equal(again(4.0, 1.0), noise(4.0, 1.0))  # the order of queries does not matter
    sample = BrownianNoise(randn(seed, 64, 4, 8, 8), 0.03, 14.6, seed)(5.0, 4.0)
    assert abs(sample.mean()) < 0.05 and abs(sample.std() - 1) < 0.05  # N(0, 1) per step


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_coefficients_integrate_polynomials_exactly(order):
    """Σ_j c_j p(σ_{i−j}) = ∫_{σ_i}^{σ_{i+1}} p for every polynomial of degree < order, the
    defining property of the Lagrange interpolant's integral."""
    sigmas = step_sigmas(karras(10, AC), AC)[1]
    nodes = sigmas[7::-1][:order + 1]  # σ_{i+1}, σ_i, …, from i = 6
    coeffs = lms_coefficients(nodes)
    for degree in range(order):
        exact = (nodes[0] ** (degree + 1) - nodes[1] ** (degree + 1)) / (degree + 1)
        assert sum(c * s ** degree for c, s in zip(coeffs, nodes[1:])) == pytest.approx(
            exact, rel=1e-12)


@pytest.mark.parametrize("steps", [2, 7, 25, 50])
def test_karras_and_exponential_steps_are_k_diffusions(k_sampling, steps):
    """Our schedules' σ (through their fractional timesteps and back) against k-diffusion's
    get_sigmas_karras / get_sigmas_exponential between the schedule's own σ_min and σ_max."""
    sigmas = sigmas_of(AC)
    ends = dict(sigma_min=sigmas[0].item(), sigma_max=sigmas[-1].item())
    for ours, theirs in [(karras, k_sampling.get_sigmas_karras(steps, rho=7.0, **ends)),
                         (exponential, k_sampling.get_sigmas_exponential(steps, **ends))]:
        _, ours_sigmas = step_sigmas(ours(steps, AC), AC)
        error = rel_error(torch.tensor(ours_sigmas, dtype=torch.float64), theirs.double())
        # k-diffusion builds its ramp in float32: agreement to float32 rounding
        assert error < 1e-6, (ours.__name__, error)


@pytest.mark.parametrize("steps", [1, 2, 7, 25, 50])
def test_normal_sgm_uniform_and_simple_steps_are_a1111s(k_diffusion, steps):
    """The schedules A1111 builds on k-diffusion's DiscreteSchedule (modules/sd_schedulers.py):
    "Uniform" is its get_sigmas(n); "SGM Uniform" its t_to_sigma over linspace(t(σ_max),
    t(σ_min), n + 1) without the last; "Simple" every (T/n)-th of its σ from the top."""
    schedule = k_diffusion.external.DiscreteSchedule(sigmas_of(AC), quantize=False)
    start, end = (schedule.sigma_to_t(s) for s in (schedule.sigma_max, schedule.sigma_min))
    stride = len(schedule.sigmas) / steps
    references = {
        normal: schedule.get_sigmas(steps)[:-1],
        sgm_uniform: schedule.t_to_sigma(torch.linspace(start, end, steps + 1)[:-1]),
        simple: torch.stack([schedule.sigmas[-(1 + int(k * stride))] for k in range(steps)]),
    }
    for ours, theirs in references.items():
        _, ours_sigmas = step_sigmas(ours(steps, AC), AC)
        error = rel_error(torch.tensor(ours_sigmas[:-1], dtype=torch.float64), theirs.double())
        # simple picks trained steps: exact; the others go through t_to_sigma's float32 t
        assert error < (1e-14 if ours is simple else 1e-6), (ours.__name__, error)


def test_sigma_to_t_clamps_to_the_schedule_only_when_asked():
    sigmas = sigmas_of(AC)
    for sigma in torch.logspace(-1.5, 1.1, 9).tolist():
        assert sigma_to_t(sigma, AC, clamp=True) == sigma_to_t(sigma, AC)
    assert sigma_to_t(sigmas[0].item() * (1 - 1e-15), AC, clamp=True) == 0.0
    with pytest.raises(ValueError, match="outside the schedule"):
        sigma_to_t(1e-4, AC)
    assert sigma_to_t(1e-4, AC, clamp=True) == 0.0 and sigma_to_t(50.0, AC, clamp=True) == 999.0


def test_dpm2_ancestral_without_noise_is_dpm2():
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    ts = karras(8, AC)
    assert rel_error(sample_dpm2_ancestral(eps_fn, x, ts, AC, eta=0.0),
                     sample_dpm2(eps_fn, x, ts, AC)) < 1e-14


@pytest.mark.parametrize("case", ["lms", "dpm2", "dpm2_a", "dpmpp_2s_a", "dpmpp_sde",
                                  "dpmpp_3m_sde"])
def test_callback_gets_sd_latents_and_x0_along_k_diffusions_path(k_sampling, case):
    """callback(i, t, x, x0) after step i: x is SD's x_t at σ_{i+1}, i.e. k-diffusion's x (its
    callback, before step i + 1) ÷ √(σ_{i+1}² + 1); x0 is its denoised at step i. What the
    callback returns is continued from; the sampler's network calls are what the registry says."""
    ours_fn, k_name, noise, _ = CASES[case]
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    ts, sigmas = karras(6, AC), step_sigmas(karras(6, AC), AC)[1]
    theirs, ours, calls = [], [], []

    def counted(x, t):
        calls.append(t)
        return eps_fn(x, t)

    def run(callback):
        generator = {"generator": torch.Generator().manual_seed(seed)} if noise else {}
        return ours_fn(counted, x, ts, AC, callback=callback, **generator)
    out = run(lambda i, t, x, x0: ours.append((i, t, x, x0)))
    reference_run(k_sampling, k_name, noise, {}, eps_fn, x, ts, seed,
                  callback=lambda d: theirs.append((d["x"], d["denoised"])))
    assert [(i, t) for i, t, _, _ in ours] == list(enumerate(ts.tolist()))
    for (i, _, x_t, x0), (_, denoised) in zip(ours, theirs):
        assert rel_error(x0, denoised) <= TOLERANCE
        if i + 1 < len(theirs):
            x_next = theirs[i + 1][0] / math.sqrt(sigmas[i + 1] ** 2 + 1)
            assert rel_error(x_t, x_next) <= TOLERANCE
    assert torch.equal(out, ours[-1][2])
    entry = SAMPLERS[case]
    assert len(calls) == entry.calls_per_step * len(ts) - (entry.calls_per_step - 1)
    assert rel_error(run(lambda i, t, x, x0: x), out) < 1e-14
    assert not torch.allclose(run(lambda i, t, x, x0: x * 0.9 if i == 2 else None), out)


@pytest.mark.parametrize("sampler, options, match", [
    (sample_dpm2_ancestral, {"eta": -0.1}, "eta"),
    (sample_dpmpp_2s_ancestral, {"eta": -1.0}, "eta"),
    (sample_dpmpp_sde, {"eta": -1.0}, "eta"),
    (sample_dpmpp_3m_sde, {"eta": -1.0}, "eta"),
    (sample_dpmpp_3m_sde, {"noise": "pink"}, "noise"),
    (sample_lms, {"order": 0}, "order"),
    (sample_lms, {"order": 2.0}, "order"),
])
def test_bad_arguments_raise(sampler, options, match):
    with pytest.raises(ValueError, match=match):
        sampler(lambda x, t: x, randn(1, 1, 4, 5, 5), ddim_uniform(5, AC), AC, **options)


@pytest.mark.parametrize("sampler", [sample_lms, sample_dpm2, sample_dpm2_ancestral,
                                     sample_dpmpp_2s_ancestral, sample_dpmpp_sde,
                                     sample_dpmpp_3m_sde])
@pytest.mark.parametrize("timesteps", [[1, 21], [21, 21, 1], [1000, 1], [], [[21]]])
def test_bad_timesteps_raise(sampler, timesteps):
    with pytest.raises(ValueError, match="timesteps"):
        sampler(lambda x, t: x, randn(1, 1, 4, 5, 5), timesteps, AC)


def test_noise_sampler_rejects_a_wrong_seed_count_or_kind():
    with pytest.raises(ValueError, match="seed"):
        BrownianNoise(randn(1, 2, 4, 5, 5), 0.03, 14.6, [1, 2, 3])
    with pytest.raises(ValueError, match="noise"):
        noise_sampler("white", randn(1, 2, 4, 5, 5), [1.0, 0.0])


@pytest.mark.parametrize("sampler", sorted(NOISY, key=lambda f: f.__name__))
def test_a_seed_fixes_the_image(sampler):
    seed = fresh_seed()
    eps_fn, x = toy_eps_fn(seed), randn(seed + 2, 2, 4, 5, 5)
    ts = karras(6, AC)

    def run(s):
        return sampler(eps_fn, x, ts, AC, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(seed), run(seed))
    assert not torch.allclose(run(seed), run(seed + 1))
