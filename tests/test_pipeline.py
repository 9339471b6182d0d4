"""Generation through the pipeline (txt2img, img2img, inpaint) and the command line.

On the tiny preset with random weights: these check the plumbing (seeds, shapes, guidance,
masks, argument errors, files); the sampler math is checked in test_samplers.py and the model
math in the parity tests.
"""
import copy
import io
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

import ldm
from ldm import cli, samplers
from ldm.config import PRESETS
from ldm.models.unet import UNET_TINY
from ldm.samplers.registry import sampler_names
from ldm.samplers.schedules import karras as karras_timesteps

from helpers import TINY_SD2, randomize_

SIZE = 32  # pixels; the tiny VAE downsamples by 2, so 16×16 latents


def random_pipe(config, seed):
    pipe = ldm.StableDiffusion(config)
    for i, module in enumerate(pipe.networks().values()):
        randomize_(module, seed + i)
    return pipe.eval()


@pytest.fixture(scope="module")
def pipe():
    return random_pipe(PRESETS["tiny"], seed=int(torch.randint(1 << 20, ())))


def gen(pipe, prompt="a red circle", **kwargs):
    kwargs = {"steps": 4, "height": SIZE, "width": SIZE, "progress": False, **kwargs}
    return pipe.txt2img(prompt, **kwargs)


def test_txt2img_outputs(pipe):
    images = gen(pipe, num_images=2)
    assert len(images) == 2 and images[0].size == (SIZE, SIZE) and images[0].mode == "RGB"
    latents = gen(pipe, ["a red circle", "a blue square"], output_type="latent", num_images=3)
    assert latents.shape == (6, 4, SIZE // 2, SIZE // 2)
    tensor = gen(pipe, output_type="tensor")
    assert tensor.shape == (1, 3, SIZE, SIZE) and torch.isfinite(tensor).all()


@pytest.mark.parametrize("sampler", sampler_names())
def test_same_seed_same_image_other_seed_other_image(pipe, sampler):
    a = gen(pipe, sampler=sampler, seed=7, output_type="latent")
    b = gen(pipe, sampler=sampler, seed=7, output_type="latent")
    c = gen(pipe, sampler=sampler, seed=8, output_type="latent")
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ddim_with_eta_draws_its_noise_from_the_seed(pipe):
    a, b = (gen(pipe, sampler="ddim", eta=1.0, seed=3, output_type="latent") for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, gen(pipe, sampler="ddim", eta=0.0, seed=3, output_type="latent"))


def test_explicit_latents_are_the_starting_noise(pipe):
    noise = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    from_latents = gen(pipe, latents=noise, output_type="latent")
    from_seed = gen(pipe, seed=3, output_type="latent")  # the documented draw: CPU, float32
    assert torch.equal(from_latents, from_seed)
    with pytest.raises(ValueError, match=r"latents must have shape \(1, 4, 16, 16\)"):
        gen(pipe, latents=noise[:, :, :8])


def test_seedless_runs_differ_and_leave_the_global_generator_alone(pipe):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = gen(pipe, output_type="latent"), gen(pipe, output_type="latent")
    assert not torch.allclose(a, b)
    assert torch.equal(torch.get_rng_state(), before)
    # A generator stands for the seed drawn from it (test_seeds.py)
    s = int(torch.randint(2**63 - 1, (), generator=torch.Generator().manual_seed(9)))
    assert torch.equal(gen(pipe, generator=torch.Generator().manual_seed(9), output_type="latent"),
                       gen(pipe, seed=s, output_type="latent"))


def test_negative_prompt_replaces_the_unconditional_text(pipe):
    plain = gen(pipe, seed=1, output_type="latent")
    negative = gen(pipe, seed=1, negative_prompt="blurry", output_type="latent")
    assert not torch.allclose(plain, negative)
    no_guidance = gen(pipe, seed=1, negative_prompt="blurry", cfg_scale=1.0, output_type="latent")
    assert torch.allclose(no_guidance, gen(pipe, seed=1, cfg_scale=1.0, output_type="latent"))


def test_img2img_strength_sets_how_many_steps_run(pipe):
    image = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))

    def visited(strength, sampler="ddim"):
        calls = []
        pipe.img2img(image, "a red circle", strength=strength, steps=10, seed=0, progress=False,
                     sampler=sampler, callback=lambda i, t, x, x0: calls.append(t))
        return calls
    # 10 DDIM steps visit 901, 801, …, 1; strength 0.5 re-runs the last int(0.5 * 10) of them.
    assert visited(0.5) == [401, 301, 201, 101, 1]
    assert visited(1.0) == list(range(901, 0, -100))
    assert visited(0.01) == [1]  # at least one step
    karras = karras_timesteps(10, pipe.alphas_cumprod).tolist()  # fractional steps
    assert visited(0.5, "dpmpp_2m_karras") == karras[5:]
    assert visited(1.0, "euler_karras") == karras


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m_karras"])
def test_inpainting_with_an_ordinary_model_keeps_the_unmasked_latents(pipe, sampler):
    image = Image.new("RGB", (SIZE, SIZE), (30, 30, 200))
    mask = torch.zeros(SIZE, SIZE)
    mask[:, SIZE // 2:] = 1  # repaint the right half
    a = pipe.inpaint(image, mask, "a red circle", steps=5, seed=4, output_type="latent",
                     sampler=sampler, progress=False)
    b = pipe.inpaint(image, mask, "a green triangle", steps=5, seed=4, output_type="latent",
                     sampler=sampler, progress=False)
    keep, repaint = slice(0, SIZE // 4), slice(SIZE // 4, SIZE // 2)
    assert torch.allclose(a[..., keep], b[..., keep], atol=1e-5)
    assert not torch.allclose(a[..., repaint], b[..., repaint], atol=1e-3)


@pytest.mark.parametrize("in_channels, sampler", [(4, "ddim"), (9, "ddim"), (4, "euler_a_karras")])
def test_v_prediction_model_generates_and_inpaints(in_channels, sampler):
    """SD 2-style: OpenCLIP text (0-padded ids), v converted to ε on the 4-channel latent (at
    fractional steps too), also when a 9-channel inpainting U-Net takes the mask and masked
    image as extra inputs."""
    config = replace(TINY_SD2, unet=replace(TINY_SD2.unet, in_channels=in_channels))
    pipe = random_pipe(config, seed=int(torch.randint(1 << 20, ())))
    assert pipe.tokenizer("a cat")[0, -1] == 0
    image = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., : SIZE // 2, :] = 1
    out = pipe.inpaint(image, mask, "a red circle", steps=3, seed=1, output_type="latent",
                       sampler=sampler, progress=False)
    assert out.shape == (1, 4, SIZE // 2, SIZE // 2) and torch.isfinite(out).all()


def test_inpainting_model_sees_mask_and_masked_image():
    config = replace(PRESETS["tiny"], unet=replace(UNET_TINY, in_channels=9))
    pipe = random_pipe(config, seed=11)
    seen = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, context, concat: (seen.append(torch.cat([x, concat], 1))
                                                       or forward(x, t, context, concat))
    image = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., :8, :] = 1
    out = pipe.inpaint(image, mask, "a circle", steps=3, seed=0, output_type="latent",
                       progress=False)
    assert out.shape == (1, 4, SIZE // 2, SIZE // 2)
    x = seen[0]
    assert x.shape == (2, 9, SIZE // 2, SIZE // 2)  # [uncond, cond] × [latent, mask, masked]
    assert torch.equal(x[:, 4], torch.nn.functional.interpolate(mask, size=(16, 16))[:, 0]
                       .expand(2, -1, -1))
    with pytest.raises(ValueError, match="inpainting checkpoint .* not txt2img"):
        gen(pipe)


@pytest.mark.parametrize("kwargs, message", [
    ({"steps": 0}, "steps must be an integer in"),
    ({"steps": -3}, "steps must be an integer in"),
    ({"sampler": "dpm_fast"}, "unknown sampler 'dpm_fast'; known: ddim, plms, ddpm, euler"),
    ({"sampler": "dpmpp_2m_karras", "steps": 1}, r"steps must be an integer >= 2"),
    ({"height": 31}, "height must be a positive multiple of 2"),
    ({"output_type": "jpeg"}, "output_type must be one of"),
    ({"eta": -1.0}, r"eta must be in \[0, 1\]"),
    ({"num_images": 0}, "num_images must be a positive integer"),
    ({"cfg_interval": (600, 200)}, r"cfg_interval must be \(low, high\) with low < high"),
    ({"cfg_interval": (-1, 200)}, r"cfg_interval\[0\] must be in \[0, 1000\]"),
    ({"cfg_interval": (0, 1200)}, r"cfg_interval\[1\] must be in \[0, 1000\]"),
])
def test_bad_arguments_are_named(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gen(pipe, **kwargs)


def test_a_cfg_interval_that_is_not_a_pair_is_named(pipe):
    for value in (200, "200-1000", (200,), (0, 500, 1000)):
        with pytest.raises(TypeError, match="cfg_interval must be None or a pair"):
            gen(pipe, cfg_interval=value)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_cfg_interval_guides_only_the_steps_inside_it(pipe, sampler):
    """txt2img(cfg_interval=(low, high)) against the sampler run by hand with an eps_fn that
    switches between the guided and the conditional U-Net by t: the same latents."""
    low, high = 300, 800
    made = gen(pipe, sampler=sampler, seed=11, cfg_scale=6.0, cfg_interval=(low, high),
               output_type="latent", steps=6)
    cond, uncond = pipe.encode_prompt("a red circle")

    def unet(x, t, c):
        return pipe.unet(x, t, **c)

    guided = samplers.cfg(unet, cond, uncond, 6.0)
    seen = []

    def eps_fn(x, t):
        seen.append(low <= float(t[0]) <= high)
        return guided(x, t) if seen[-1] else unet(x, t, cond)

    entry, schedule = samplers.resolve(sampler)
    timesteps = samplers.timesteps(entry, schedule, 6, pipe.alphas_cumprod)
    generator = torch.Generator().manual_seed(11)
    x = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=generator)
    options = {"generator": [generator]} if entry.noisy else {}
    with torch.inference_mode():
        expected = entry.sample(eps_fn, x, timesteps, pipe.alphas_cumprod, **options)
    assert any(seen) and not all(seen)  # some steps each way
    assert torch.equal(made, expected)
    everywhere = gen(pipe, sampler=sampler, seed=11, cfg_scale=6.0, output_type="latent", steps=6)
    assert not torch.equal(made, everywhere)


def test_cfg_interval_defaults_to_the_models_and_every_step_is_the_plain_guidance(pipe):
    """config.sampling.cfg_interval is the tasks' default (txt2img, img2img, inpaint); an
    interval holding every timestep is guidance at every step."""
    restricted = copy.copy(pipe)
    restricted.config = replace(pipe.config, sampling=replace(pipe.config.sampling,
                                                              cfg_interval=(0, 500)))
    image, mask = Image.new("RGB", (SIZE, SIZE), (30, 90, 200)), Image.new("L", (SIZE, SIZE), 255)
    tasks = {"txt2img": lambda p, **k: gen(p, **k),
             "img2img": lambda p, **k: p.img2img(image, "a red circle", steps=4, progress=False,
                                                 **k),
             "inpaint": lambda p, **k: p.inpaint(image, mask, "a red circle", steps=4,
                                                 progress=False, **k)}
    for name, task in tasks.items():
        common = dict(seed=3, output_type="latent")
        default = task(restricted, **common)
        assert torch.equal(default, task(pipe, cfg_interval=(0, 500), **common)), name
        assert not torch.equal(default, task(pipe, **common)), name
        assert torch.equal(task(restricted, cfg_interval=(0, 1000), **common),
                           task(pipe, **common)), name


def test_bad_image_arguments_are_named(pipe):
    image = Image.new("RGB", (SIZE, SIZE))
    for strength in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="strength must be in"):
            pipe.img2img(image, "x", strength=strength, steps=2, progress=False)
    with pytest.raises(ValueError, match="mask size .* differs from image size"):
        pipe.inpaint(image, Image.new("L", (SIZE, SIZE + 2)), "x", steps=2, progress=False)
    with pytest.raises(ValueError, match="height must be a positive multiple"):
        pipe.img2img(Image.new("RGB", (SIZE, SIZE + 1)), "x", steps=2, progress=False)


def test_cli_writes_png_with_parameters_and_never_overwrites(pipe, tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny.safetensors"
    ldm.save(pipe, ckpt)
    out = tmp_path / "out.png"
    args = ["txt2img", "a red circle", "--ckpt", str(ckpt), "--steps", "3", "--seed", "5",
            "--height", "32", "--width", "32", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 0
    first = out.read_bytes()
    assert cli.main(args) == 0
    assert out.read_bytes() == first  # kept
    second = tmp_path / "out-1.png"
    assert second.read_bytes() == first  # same seed, same image, next free name
    info = Image.open(out).text
    assert info["prompt"] == "a red circle" and info["seed"] == "5" and info["steps"] == "3"
    assert info["sampler"] == "ddim" and info["size"] == "32x32" and len(info["model_sha256"]) == 64
    assert "Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 32x32" in info["parameters"]
    assert cli.main(args + ["--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-1.png", "out.png", "tiny.safetensors"]


def test_cli_img2img_and_inpaint(pipe, tmp_path):
    ckpt = tmp_path / "tiny.safetensors"
    ldm.save(pipe, ckpt)
    Image.new("RGB", (SIZE, SIZE), (10, 200, 10)).save(tmp_path / "in.png")
    Image.new("L", (SIZE, SIZE), 255).save(tmp_path / "mask.png")
    common = ["--ckpt", str(ckpt), "--steps", "2", "--no-progress"]
    assert cli.main(["img2img", "a circle", "--image", str(tmp_path / "in.png"),
                     "--out", str(tmp_path / "a.png"), *common]) == 0
    assert cli.main(["inpaint", "a circle", "--image", str(tmp_path / "in.png"), "--mask",
                     str(tmp_path / "mask.png"), "--out", str(tmp_path / "b.png"), *common]) == 0
    assert Image.open(tmp_path / "a.png").size == (SIZE, SIZE)
    assert Image.open(tmp_path / "b.png").text["command"] == "inpaint"


def test_cli_config_overrides_the_detected_model(pipe, tmp_path):
    ckpt = tmp_path / "tiny.safetensors"
    ldm.save(pipe, ckpt)
    common = ["txt2img", "a circle", "--ckpt", str(ckpt), "--steps", "1", "--height", "32",
              "--width", "32", "--no-progress"]
    assert cli.main([*common, "--config", "tiny", "--out", str(tmp_path / "a.png")]) == 0
    with pytest.raises(ldm.CheckpointError, match="tiny.safetensors.*shape"):
        cli.main([*common, "--config", "sd15", "--out", str(tmp_path / "b.png")])
    assert not (tmp_path / "b.png").exists()


def test_cli_help_explains_each_command(capsys):
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert "--ckpt" in text and "--seed" in text and "--out" in text
        for name, entry in ldm.samplers.SAMPLERS.items():
            assert f"{name} ({entry.a1111})" in text
        assert all(schedule in text for schedule in ldm.samplers.SCHEDULES)


def test_cli_writes_the_schedule_as_a1111_does(pipe, tmp_path):
    """A PNG's "parameters" name sampler and schedule as A1111 does, so they read back."""
    ckpt = tmp_path / "tiny.safetensors"
    ldm.save(pipe, ckpt)
    common = ["txt2img", "a circle", "--ckpt", str(ckpt), "--steps", "2", "--height", "32",
              "--width", "32", "--no-progress"]
    for args, sampler, schedule in [(["--sampler", "dpmpp_2m_karras"], "dpmpp_2m", "karras"),
                                    (["--sampler", "euler_a", "--schedule", "sgm_uniform"],
                                     "euler_a", "sgm_uniform"),
                                    (["--sampler", "euler"], "euler", "ddim_uniform")]:
        out = tmp_path / f"{sampler}.png"
        assert cli.main([*common, *args, "--out", str(out)]) == 0
        info = Image.open(out).text
        assert (info["sampler"], info["schedule"]) == (sampler, schedule)
        fields = dict(field.split(": ", 1) for field in
                      info["parameters"].splitlines()[-1].split(", "))
        entry, read_back = ldm.samplers.registry.from_a1111(fields["Sampler"],
                                                            fields.get("Schedule type"))
        assert (entry.name, read_back) == (sampler, schedule)


def test_progress_bar_shows_only_on_a_terminal(pipe, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stderr, shown in [(io.StringIO(), False), (Terminal(), True)]:
        monkeypatch.setattr(sys, "stderr", stderr)
        gen(pipe, progress=None, output_type="latent")
        assert ("sampling 4/4" in stderr.getvalue()) == shown
    monkeypatch.setattr(sys, "stderr", Terminal())
    gen(pipe, progress=False, output_type="latent")
    assert sys.stderr.getvalue() == ""


def test_cli_cfg_interval_is_written_and_read_back(pipe, tmp_path):
    """The model's interval is written as "CFG interval: LOW-HIGH"; --cfg-interval overrides it
    (0 1000: every step, written too, so that --from-png does not fall back to the model's) and
    --from-png makes the same image again. A model without one writes none."""
    restricted = copy.copy(pipe)
    restricted.config = replace(pipe.config, sampling=replace(pipe.config.sampling,
                                                              cfg_interval=(0, 500)))
    ckpt, plain = tmp_path / "tiny.safetensors", tmp_path / "plain.safetensors"
    ldm.save(restricted, ckpt)
    ldm.save(pipe, plain)
    common = ["txt2img", "a red circle", "--steps", "3", "--seed", "5", "--height", "32",
              "--width", "32", "--no-progress"]
    runs = {"default.png": [], "every.png": ["--cfg-interval", "0", "1000"],
            "other.png": ["--cfg-interval", "250.5", "900"]}
    for name, flags in runs.items():
        assert cli.main([*common, "--ckpt", str(ckpt), "--out", str(tmp_path / name), *flags]) == 0
    texts = {name: Image.open(tmp_path / name).text["parameters"] for name in runs}
    assert "CFG scale: 7.5, CFG interval: 0-500, Seed: 5" in texts["default.png"]
    assert "CFG interval: 0-1000," in texts["every.png"]
    assert "CFG interval: 250.5-900," in texts["other.png"]
    pixels = {name: Image.open(tmp_path / name).tobytes() for name in runs}
    assert pixels["default.png"] != pixels["every.png"] != pixels["other.png"]
    for name in runs:
        again = tmp_path / f"again-{name}"
        assert cli.main(["txt2img", "--from-png", str(tmp_path / name), "--ckpt", str(ckpt),
                         "--out", str(again), "--no-progress"]) == 0
        assert Image.open(again).tobytes() == pixels[name], name
    assert cli.main([*common, "--ckpt", str(plain), "--out", str(tmp_path / "plain.png")]) == 0
    assert "CFG interval" not in Image.open(tmp_path / "plain.png").text["parameters"]
    with pytest.raises(cli.UsageError, match="--cfg-interval: .* low < high"):
        cli.main([*common, "--ckpt", str(ckpt), "--out", str(tmp_path / "bad.png"),
                  "--cfg-interval", "900", "100"])
    assert not (tmp_path / "bad.png").exists()
