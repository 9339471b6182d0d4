"""Samplers against references nobody here wrote (diffusers' schedulers, a literal transcription
of the CompVis PLMS code), against closed forms, and their argument checks.

Everything runs in float64 on tiny latents (B=2, C=4, 5×5) so tolerances can be tight.
"""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from helpers import rel_error
from ldm import schedule
from ldm.samplers import (add_noise, cfg, ddim_timesteps, eps_from_v, sample_ddim, sample_ddpm,
                          sample_plms)

AC = schedule.alphas_cumprod()  # (1000,) float64
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)


def randn(seed, *shape):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def toy_eps_fn(seed, channels=4):
    """A deterministic stand-in for the U-Net: a fixed random channel mix of x plus a fixed
    random map scaled by a function of t, so that every step's t matters."""
    w, b = randn(seed, channels, channels) / channels ** 0.5, randn(seed + 1, channels, 5, 5)

    def eps_fn(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        mix = torch.einsum("oc,bchw->bohw", w.to(x.dtype), x)
        return 0.5 * mix + torch.sin(t / 300.0).to(x.dtype)[:, None, None, None] * b.to(x.dtype)

    return eps_fn


def diffusers_ddim(steps):
    s = DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    # diffusers keeps the schedule in float32; give it ours (float64) so only the algorithms differ.
    assert rel_error(s.alphas_cumprod, AC) < 1e-6
    s.alphas_cumprod, s.final_alpha_cumprod = AC.clone(), AC[0].clone()
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("steps", [1, 7, 10, 30, 50, 250])
def test_ddim_timesteps_match_diffusers_leading(steps):
    assert torch.equal(ddim_timesteps(steps), diffusers_ddim(steps).timesteps)


@pytest.mark.parametrize("steps", [10, 50, 250])
def test_ddim_timesteps_are_the_originals_uniform_plus_one(steps):
    original = [t + 1 for t in range(0, 1000, 1000 // steps)][::-1]
    assert ddim_timesteps(steps).tolist() == original


@pytest.mark.parametrize("steps,eta", [(10, 0.0), (50, 0.0), (10, 1.0), (25, 0.3)])
def test_ddim_matches_diffusers(steps, eta):
    eps_fn, x = toy_eps_fn(seed=11), randn(12, 2, 4, 5, 5)
    out = sample_ddim(eps_fn, x, ddim_timesteps(steps), AC, eta=eta,
                      generator=torch.Generator().manual_seed(13))
    sched, g, ref = diffusers_ddim(steps), torch.Generator().manual_seed(13), x
    for t in sched.timesteps:
        eps = eps_fn(ref, torch.full((2,), int(t)))
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype) if eta > 0 else None
        ref = sched.step(eps, t, ref, eta=eta, variance_noise=noise).prev_sample
    assert rel_error(out, ref) < 1e-12


def test_ddim_float32_keeps_dtype_and_matches_float64():
    eps_fn, x = toy_eps_fn(seed=21), randn(22, 2, 4, 5, 5)
    out32 = sample_ddim(eps_fn, x.float(), ddim_timesteps(20), AC)
    assert out32.dtype == torch.float32
    assert rel_error(out32, sample_ddim(eps_fn, x, ddim_timesteps(20), AC)) < 1e-5


@pytest.mark.parametrize("steps", [None, 50])
def test_ddpm_matches_diffusers(steps):
    eps_fn, x = toy_eps_fn(seed=31), randn(32, 2, 4, 5, 5)
    sched = DDPMScheduler(**SD_SCHEDULE, variance_type="fixed_small")
    sched.alphas_cumprod = AC.clone()
    sched.set_timesteps(steps or 1000)
    timesteps = torch.arange(999, -1, -1) if steps is None else sched.timesteps
    out = sample_ddpm(eps_fn, x, timesteps, AC, generator=torch.Generator().manual_seed(33))
    g, ref = torch.Generator().manual_seed(33), x
    for t in sched.timesteps:  # same noise: diffusers draws from g exactly as sample_ddpm does
        ref = sched.step(eps_fn(ref, torch.full((2,), int(t))), t, ref, generator=g).prev_sample
    assert rel_error(out, ref) < 1e-10


def test_v_prediction_ddpm_matches_diffusers():
    """DDPM over all 1000 steps with a v-model through eps_from_v, against DDPMScheduler
    (prediction_type="v_prediction") given the raw v and the same noise."""
    toy, context, x = toy_eps_fn(seed=41), randn(42, 2, 4, 5, 5), randn(43, 2, 4, 5, 5)

    def v_model(x, t, cond):
        return toy(x, t) + cond["offset"]

    eps_fn = lambda x, t: eps_from_v(v_model, AC)(x, t, {"offset": context})  # noqa: E731
    out = sample_ddpm(eps_fn, x, torch.arange(999, -1, -1), AC,
                      generator=torch.Generator().manual_seed(44))
    sched = DDPMScheduler(**SD_SCHEDULE, variance_type="fixed_small",
                          prediction_type="v_prediction")
    sched.alphas_cumprod = AC.clone()
    sched.set_timesteps(1000)
    g, ref = torch.Generator().manual_seed(44), x
    for t in sched.timesteps:
        v = v_model(ref, torch.full((2,), int(t)), {"offset": context})
        ref = sched.step(v, t, ref, generator=g).prev_sample
    assert rel_error(out, ref) < 1e-10


def test_ddim_with_eta_one_is_ddpm_over_the_same_steps():
    """DDIM paper §4.1: η = 1 gives DDPM's posterior. Both draw one z per step from the same
    generator; only the last step differs (DDIM goes to ᾱ_0 with noise, DDPM to 1 without)."""
    eps_fn, x, ts = toy_eps_fn(seed=41), randn(42, 2, 4, 5, 5), ddim_timesteps(20)
    xs_ddim, xs_ddpm = [], []
    sample_ddim(eps_fn, x, ts, AC, eta=1.0, generator=torch.Generator().manual_seed(43),
                callback=lambda i, t, x, x0: xs_ddim.append(x))
    sample_ddpm(eps_fn, x, ts, AC, generator=torch.Generator().manual_seed(43),
                callback=lambda i, t, x, x0: xs_ddpm.append(x))
    assert max(rel_error(a, b) for a, b in zip(xs_ddim[:-1], xs_ddpm[:-1])) < 1e-12


def plms_transcription(model, img, ddim_timesteps, alphacums):
    """CompVis plms.py `plms_sampling` + `p_sample_plms` (η = 0, no guidance), transcribed
    with the original names; ddim_timesteps ascending, as make_ddim_timesteps returns them."""
    b = img.shape[0]
    alphas = alphacums[ddim_timesteps]
    alphas_prev = torch.tensor([alphacums[0].item()] + alphacums[ddim_timesteps[:-1]].tolist(), dtype=torch.float64)
    sqrt_one_minus_alphas = torch.sqrt(1. - alphas)
    sigmas = 0. * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))

    def get_x_prev_and_pred_x0(x, e_t, index):
        a_t = torch.full((b, 1, 1, 1), alphas[index].item(), dtype=torch.float64)
        a_prev = torch.full((b, 1, 1, 1), alphas_prev[index].item(), dtype=torch.float64)
        sigma_t = torch.full((b, 1, 1, 1), sigmas[index].item(), dtype=torch.float64)
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), sqrt_one_minus_alphas[index].item(), dtype=torch.float64)
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1. - a_prev - sigma_t**2).sqrt() * e_t
        noise = sigma_t * torch.randn_like(x)
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt + noise
        return x_prev, pred_x0

    time_range = ddim_timesteps.flip(0).tolist()
    total_steps = len(time_range)
    old_eps = []
    for i, step in enumerate(time_range):
        index = total_steps - i - 1
        ts = torch.full((b,), step, dtype=torch.long)
        t_next = torch.full((b,), time_range[min(i + 1, len(time_range) - 1)], dtype=torch.long)
        e_t = model(img, ts)
        if len(old_eps) == 0:
            x_prev, pred_x0 = get_x_prev_and_pred_x0(img, e_t, index)
            e_t_next = model(x_prev, t_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        elif len(old_eps) >= 3:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        img, pred_x0 = get_x_prev_and_pred_x0(img, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return img


@pytest.mark.parametrize("steps", [1, 2, 3, 8, 50])
def test_plms_matches_the_original(steps):
    eps_fn, x, ts = toy_eps_fn(seed=51), randn(52, 2, 4, 5, 5), ddim_timesteps(steps)
    calls = []

    def counting_eps_fn(x, t):
        calls.append(int(t[0]))
        return eps_fn(x, t)

    out = sample_plms(counting_eps_fn, x, ts, AC)
    assert rel_error(out, plms_transcription(eps_fn, x, ts.flip(0), AC)) < 1e-12
    # The first step calls the model twice (at t_0, then t_1, or t_0 again if alone), the rest once.
    ts = ts.tolist()
    assert calls == [ts[0], ts[min(1, len(ts) - 1)]] + ts[1:]


def test_samplers_with_the_true_noise_recover_x0():
    """If eps_fn returns the very ε that made x_t from x0, every step predicts x0 exactly and
    stays on the line sqrt(ā) x0 + sqrt(1 - ā) ε. DDIM/PLMS end at ā_0 (the quirk), not at x0."""
    x0, eps = randn(61, 2, 4, 5, 5), randn(62, 2, 4, 5, 5)
    ts = ddim_timesteps(25)
    x_t = add_noise(x0, eps, int(ts[0]), AC)
    for sampler in (sample_ddim, sample_plms):
        preds = []
        out = sampler(lambda x, t: eps, x_t, ts, AC, callback=lambda i, t, x, p: preds.append(p))
        assert max(rel_error(p, x0) for p in preds) < 1e-12
        assert rel_error(out, add_noise(x0, eps, 0, AC)) < 1e-12
    # DDPM's last step goes to ā = 1: its mean is x0 itself, whatever step it starts from.
    assert rel_error(sample_ddpm(lambda x, t: eps, x_t, ts[:1], AC), x0) < 1e-12


def test_add_noise_per_image_timesteps():
    x0, noise, t = randn(71, 2, 4, 5, 5), randn(72, 2, 4, 5, 5), torch.tensor([10, 900])
    out = add_noise(x0, noise, t, AC)
    for b in range(2):
        a = AC[t[b]]
        assert rel_error(out[b], a.sqrt() * x0[b] + (1 - a).sqrt() * noise[b]) < 1e-14


def fake_unet(x, t, cond):
    """Depends on x, t and both conditioning entries, so that mixing up halves, orders or
    entries changes the result."""
    scale = cond["context"].mean(dim=(1, 2))[:, None, None, None]
    return x * scale + cond["concat"] + 1e-3 * t[:, None, None, None]


def conditioning(seed, batch):
    return {"context": randn(seed, batch, 77, 8), "concat": randn(seed + 1, batch, 4, 5, 5)}


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_cfg_is_one_batched_call_with_the_formula(scale):
    x, t = randn(81, 3, 4, 5, 5), torch.tensor([5, 500, 950])
    cond, uncond = conditioning(82, 3), conditioning(84, 3)
    batches = []

    def model(x, t, cond):
        batches.append({key: value.shape[0] for key, value in cond.items()} | {"x": x.shape[0]})
        return fake_unet(x, t, cond)

    out = cfg(model, cond, uncond, scale)(x, t)
    eps_c, eps_u = fake_unet(x, t, cond), fake_unet(x, t, uncond)
    assert batches == [{"x": 6, "context": 6, "concat": 6}]
    assert rel_error(out, eps_u + scale * (eps_c - eps_u)) < 1e-14
    # One unconditional entry of batch 1 serves a batch of prompts.
    first = {key: value[:1] for key, value in uncond.items()}
    out1 = cfg(fake_unet, cond, first, scale)(x, t)
    eps_u1 = fake_unet(x, t, {key: value.expand_as(cond[key]) for key, value in first.items()})
    assert rel_error(out1, eps_u1 + scale * (eps_c - eps_u1)) < 1e-14



def test_cfg_of_contexts_of_different_lengths_is_two_calls_with_the_formula():
    """A negative prompt of fewer chunks, not padded (A1111 without "Pad conds")."""
    x, t = randn(85, 3, 4, 5, 5), torch.tensor([7, 400, 990])
    cond = conditioning(86, 3) | {"context": randn(87, 3, 154, 8)}
    batches = []

    def model(x, t, cond):
        batches.append((x.shape[0], cond["context"].shape[:2]))
        return fake_unet(x, t, cond)

    for uncond in (conditioning(88, 3), {k: v[:1] for k, v in conditioning(89, 3).items()}):
        batches.clear()
        out = cfg(model, cond, uncond, 5.0)(x, t)
        assert batches == [(3, (3, 77)), (3, (3, 154))]
        eps_c = fake_unet(x, t, cond)
        eps_u = fake_unet(x, t, {k: v.expand(3, *v.shape[1:]) for k, v in uncond.items()})
        assert rel_error(out, eps_u + 5.0 * (eps_c - eps_u)) < 1e-14

def test_cfg_scale_one_skips_the_unconditional_half():
    x, t, cond = randn(91, 2, 4, 5, 5), torch.tensor([1, 981]), conditioning(92, 2)
    batches = []

    def model(x, t, cond):
        batches.append(x.shape[0])
        return fake_unet(x, t, cond)

    out = cfg(model, cond, conditioning(94, 2), 1.0)(x, t)
    assert batches == [2] and torch.equal(out, fake_unet(x, t, cond))


@pytest.mark.parametrize("interval", [(200, 1000), (100.5, 600)])
def test_cfg_interval_guides_inside_and_runs_the_conditional_model_alone_outside(interval):
    """Guidance in a limited interval: low ≤ t ≤ high (both ends included) is the guided
    prediction, one batched call; every other t the conditional model alone, one call of B."""
    low, high = interval
    cond, uncond = conditioning(98, 2), conditioning(99, 2)
    batches = []

    def model(x, t, cond):
        batches.append(x.shape[0])
        return fake_unet(x, t, cond)

    eps_fn = cfg(model, cond, uncond, 4.0, interval)
    x = randn(100, 2, 4, 5, 5)
    for step in (0, low - 0.5, low, (low + high) / 2, high, high + 0.5, 999):
        t = torch.full((2,), step, dtype=torch.float64)
        batches.clear()
        out = eps_fn(x, t)
        inside = low <= step <= high
        expected = cfg(fake_unet, cond, uncond, 4.0 if inside else 1.0)(x, t)
        assert batches == ([4] if inside else [2]), step
        assert torch.equal(out, expected), step


def test_cfg_refuses_mismatched_conditioning():
    cond, uncond = conditioning(95, 2), {"context": randn(97, 2, 77, 8)}
    with pytest.raises(ValueError, match="same entries"):
        cfg(fake_unet, cond, uncond, 7.5)


@pytest.mark.parametrize("steps", [0, -1, 1000, 1001])
def test_ddim_timesteps_rejects_bad_step_counts(steps):
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(steps)


@pytest.mark.parametrize("timesteps", [[1, 21], [21, 21, 1], [1000, 1], [21, -1], [], [[21]], [21.0, 1.0]])
@pytest.mark.parametrize("sampler", [sample_ddim, sample_plms, sample_ddpm])
def test_samplers_reject_bad_timesteps(sampler, timesteps):
    with pytest.raises(ValueError, match="timesteps"):
        sampler(toy_eps_fn(seed=101), randn(102, 1, 4, 5, 5), timesteps, AC)


def test_ddim_rejects_negative_eta():
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(toy_eps_fn(seed=111), randn(112, 1, 4, 5, 5), ddim_timesteps(5), AC, eta=-0.1)


@pytest.mark.parametrize("steps,eta", [(10, 0.0), (50, 0.0), (25, 0.5)])
def test_v_prediction_ddim_matches_diffusers(steps, eta):
    """A v-predicting model wrapped by eps_from_v, against DDIMScheduler(prediction_type=
    "v_prediction") fed the raw v: SD 2 768-v sampling."""
    toy = toy_eps_fn(seed=31)

    def v_model(x, t, cond):
        return toy(x, t) + cond["offset"]  # a constant offset, to see cond passed through

    context = randn(32, 2, 4, 5, 5)
    x = randn(33, 2, 4, 5, 5)
    eps_fn = lambda x, t: eps_from_v(v_model, AC)(x, t, {"offset": context})  # noqa: E731
    out = sample_ddim(eps_fn, x, ddim_timesteps(steps), AC, eta=eta,
                      generator=torch.Generator().manual_seed(34))
    sched = diffusers_ddim(steps)
    sched.register_to_config(prediction_type="v_prediction")
    g, ref = torch.Generator().manual_seed(34), x
    for t in sched.timesteps:
        v = v_model(ref, torch.full((2,), int(t)), {"offset": context})
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype) if eta > 0 else None
        ref = sched.step(v, t, ref, eta=eta, variance_noise=noise).prev_sample
    assert rel_error(out, ref) < 1e-12
