"""Teaching the shipped model purple and the star (issue 13 part 7): latents fitted to the frozen
decoder (ldm/latent_targets.py), the fine-tuning flags that use them (--world, --only,
--fit-latents, --replay), and the shipped LoRA weights/tiny-shapes-purple-star.safetensors.

Fitting is for autoencoders that never saw a colour: the first shipped one turned a purple
background blue. Today's was trained on generic pictures of every colour besides shapes world,
so fitting only refines what its encoder gives (checked here: it decodes closer to the picture).
"""
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ldm
from ldm import judge, train
from ldm.data import shapes
from ldm.data.shapes import Prompt
from ldm.latent_targets import (LatentTargets, encode_targets, encoded, fit_latents, fit_targets,
                                mixed, point_moments)
from ldm.models.vae import DiagonalGaussian

from helpers import fresh_seed

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_LORA = ROOT / "weights" / "tiny-shapes-purple-star.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return ldm.load(dtype=torch.float32)


def purple_backgrounds(seed, n=4):
    """n images on a purple background (objects of the default world's colours and shapes)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [Prompt(shapes.COLOURS[i % 6], shapes.SHAPES[i % 3], background="purple")
               for i in range(n)]
    return shapes.EXTENDED.batch_for(prompts, g)


def test_fitted_latent_decodes_closer_than_the_encoders(pipe):
    batch = purple_backgrounds(fresh_seed())
    vae = pipe.vae
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        round_trip = vae.decode(vae.encode(batch.images).mean)
    z = fit_latents(vae, batch.images, steps=80)
    with torch.no_grad():
        fitted = vae.decode(z)
    assert all(judge.read_image(x).background == "purple" for x in fitted)
    assert (fitted - batch.images).abs().mean() < 0.9 * (round_trip - batch.images).abs().mean()
    # Only z was optimised: the autoencoder is bit for bit the shipped one, with no gradients.
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())
    assert all(p.grad is None for p in vae.parameters())


def test_prior_weight_keeps_the_latent_near_the_encoders(pipe):
    images = purple_backgrounds(fresh_seed(), n=2).images
    with torch.no_grad():
        start = pipe.vae.encode(images).mean
    free = fit_latents(pipe.vae, images, steps=15, prior_weight=0.0)
    held = fit_latents(pipe.vae, images, steps=15, prior_weight=10.0)
    assert (held - start).norm() < 0.5 * (free - start).norm()
    assert torch.equal(fit_latents(pipe.vae, images, steps=0), start)  # 0 steps: the encoder's


def test_fit_targets_keeps_only_what_the_judge_accepts(pipe):
    # The default world's pictures (which the autoencoder draws right), one mislabelled.
    batch = shapes.training_batch(3, torch.Generator().manual_seed(0))
    batch.captions[1] = "a purple star on a white background"  # what its image is not
    targets = fit_targets(pipe.vae, batch, keep=judge.accepts, steps=5)
    assert targets.captions == [batch.captions[0], batch.captions[2]]
    assert targets.moments.shape == (2, 8, 16, 16)
    with pytest.raises(ValueError, match="no fitted latent"):
        fit_targets(pipe.vae, batch, keep=lambda image, caption: False, steps=0)


def test_point_moments_sample_to_the_point():
    z = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(fresh_seed())) * 4
    sample = DiagonalGaussian(point_moments(z)).sample(torch.Generator().manual_seed(1))
    assert (sample - z).abs().max() < 1e-5


def test_latent_targets_batch_and_mixed_replay(pipe):
    moments = torch.randn(5, 8, 16, 16)
    targets = LatentTargets(moments, [f"caption {i}" for i in range(5)])
    batch = targets.batch(7, torch.Generator().manual_seed(fresh_seed()))
    for caption, latent in zip(batch.captions, batch.latents):  # pairs stay pairs
        assert torch.equal(latent, moments[int(caption.split()[1])])
    data = mixed(targets.batch, encoded(shapes.training_batch, pipe.vae), share=0.25)
    batch = data(8, torch.Generator().manual_seed(fresh_seed()))
    assert batch.latents.shape == (8, 8, 16, 16)
    assert all(c.startswith("caption") for c in batch.captions[:6])
    assert all(shapes.DEFAULT.parse_caption(c) for c in batch.captions[6:])
    assert mixed(targets.batch, None, 0.0)(4, torch.Generator()).captions[0].startswith("caption")
    with pytest.raises(ValueError, match="replay share"):
        mixed(targets.batch, targets.batch, 1.5)


def test_a_pool_holds_the_encoders_moments_of_its_pictures(pipe):
    """encode_targets (--pool) stores what `encoded` computes at each step, chunk by chunk."""
    batch = shapes.NEW_CONCEPTS.training_batch(5, torch.Generator().manual_seed(fresh_seed()))
    pool = encode_targets(pipe.vae, batch, batch_size=2)
    assert pool.captions == list(batch.captions)
    on_the_fly = encoded(lambda n, g: batch, pipe.vae)(5, None).latents
    assert pool.moments.shape == on_the_fly.shape == (5, 8, 16, 16)
    error = (pool.moments - on_the_fly).norm() / on_the_fly.norm()
    assert error < 1e-5, f"relative error {error:.2e}"


@pytest.mark.parametrize("argv, message", [
    (["--only", "purple"], "need --world"),
    (["--pool", "8"], "need --world"),
    (["--world", "shapes", "--pool", "0"], "--pool needs N >= 1"),
    (["--world", "shapes", "--pool", "8", "--fit-latents", "8"], "give one"),
    (["--world", "shapes+purple", "--data", "x"], "give one"),
    (["--world", "shapes", "--replay", "2"], "--replay must be"),
    (["--world", "shapes", "--fit-latents", "0"], "--fit-latents needs"),
])
def test_world_flags_refuse_bad_combinations(argv, message, capsys):
    with pytest.raises(SystemExit):
        train.main(["--init", "weights/tiny-shapes.safetensors", "--out", "x.safetensors",
                    *argv])
    assert message in capsys.readouterr().err


def test_world_flag_refuses_an_unknown_world(capsys):
    with pytest.raises(SystemExit):
        train.main(["--world", "shapes+pink", "--out", "x.safetensors"])
    assert "--world: unknown world 'shapes+pink'" in capsys.readouterr().err


class Started(Exception):
    pass


@pytest.mark.parametrize("argv, words", [([], set()),
                                         (["--world", "shapes+purple+star"], {"purple", "star"})])
def test_world_flag_trains_from_scratch_on_that_world(argv, words, monkeypatch):
    """Without --init, --world replaces the recipe's data, for both stages (one data function)."""
    def started(model_config, train_config, data, *rest, **kwargs):
        generator = torch.Generator().manual_seed(fresh_seed())
        captions = data(256, generator).captions
        raise Started({w for c in captions for w in c.split()} & {"purple", "star"})
    monkeypatch.setattr(train, "train", started)
    with pytest.raises(Started) as seen:
        train.main([*argv, "--out", "never-written.safetensors", "--threads", "1"])
    # 256 captions of the larger world name purple and the star (each in ~1/5 of them) at least
    # once but for a chance of ~1e-20.
    assert seen.value.args[0] == words


# Pictures drawn at each step, or fixed ones: the fitting keeps the latents that decode right
# (up to 4), a pool keeps all.
@pytest.mark.parametrize("fixed, images", [([], None),
                                           (["--fit-latents", "4", "--fit-steps", "3"], range(5)),
                                           (["--pool", "6"], [6])])
def test_world_flags_train_a_lora(tmp_path, fixed, images):
    out = tmp_path / "new.safetensors"
    train.main(["--init", str(ROOT / "weights/tiny-shapes.safetensors"), "--out", str(out),
                "--world", "shapes+purple+star", "--only", "purple", "star", *fixed,
                "--replay", "0.5", "--lora-rank", "2",
                "--lora-text-encoder", "--steps", "2", "--batch", "4", "--threads", "1"])
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    if images is not None:
        assert int(metadata["ss_num_train_images"]) in images
    assert any(k.startswith("lora_te_") for k in keys)
    assert any(k.startswith("lora_unet_") for k in keys)


# -- the shipped LoRA -------------------------------------------------------------------------

def test_shipped_lora_loads_onto_the_shipped_model_and_changes_it():
    pipe = ldm.load(dtype=torch.float32)
    with torch.no_grad():
        before = pipe.txt2img("a purple star", seed=0, steps=4, output_type="tensor",
                              progress=False)
    loaded = pipe.load_lora(SHIPPED_LORA)  # strict: a module matching no layer is an error
    with safe_open(str(SHIPPED_LORA), "pt") as f:
        modules = {k.split(".")[0] for k in f.keys()}
        metadata = f.metadata()
    assert len(loaded.targets) == len(modules)
    assert SHIPPED_LORA.stat().st_size < 1_000_000
    assert metadata["ss_base_model_version"] == "sd_v1"
    with torch.no_grad():
        after = pipe.txt2img("a purple star", seed=0, steps=4, output_type="tensor",
                             progress=False)
    assert (after - before).abs().mean() > 0.05
    pipe.unload_loras()
    with torch.no_grad():
        again = pipe.txt2img("a purple star", seed=0, steps=4, output_type="tensor",
                             progress=False)
    assert torch.equal(again, before)


@pytest.mark.slow
def test_shipped_lora_draws_purple_and_stars():
    """Held-out prompts naming purple or star, 2 samples each at the default settings: the
    shipped model gets almost none right; the LoRA nearly all (its card, 34 × 8 images, two
    seeds: 96.5 %; the issue's target is 85 %)."""
    pipe = ldm.load()
    prompts = [p for f in shapes.FAMILIES for p in shapes.NEW_CONCEPTS.held_out_prompts(f)]
    # the card: 3.3 % of 272 images (8 a prompt); these 68 at seed 5: 10.3 %; the LoRA's 96.5 %
    assert judge.accuracy(judge.evaluate(pipe, prompts, samples=2, seed=5))["all"] < 0.25
    pipe.load_lora(SHIPPED_LORA)
    assert judge.accuracy(judge.evaluate(pipe, prompts, samples=2, seed=5))["all"] >= 0.85
