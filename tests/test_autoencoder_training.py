"""Stage 1's options: codec pictures (ldm.data.codec) in the autoencoder's batches, and its loss
weighing edge pixels more (AutoencoderObjective's edge_weight)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from ldm import train, training
from ldm.data import codec, shapes
from ldm.models.vae import AutoencoderKL

from helpers import fresh_seed
from test_train import FEW_STEPS, MICRO

pytestmark = pytest.mark.usefixtures("one_thread")


def test_codec_pictures_are_flat_objects_on_a_flat_background():
    seed = fresh_seed()
    images = codec.pictures(6, torch.Generator().manual_seed(seed))
    again = codec.pictures(6, torch.Generator().manual_seed(seed))
    assert images.shape == (6, 3, 64, 64) and torch.equal(images, again)
    assert images.min() >= -1 and images.max() <= 1
    for image in images:
        # the background and 1-3 objects, each one flat colour (an object may hide another)
        colours = image.flatten(1).T.unique(dim=0)
        assert 2 <= len(colours) <= 4, (seed, len(colours))
    assert codec.pictures(2, torch.Generator().manual_seed(seed), size=32).shape == (2, 3, 32, 32)


def test_polygon_mask_fills_by_the_even_odd_rule():
    centres = torch.arange(64, dtype=torch.float32) + 0.5
    grid = torch.meshgrid(centres, centres, indexing="ij")
    square = codec._polygon_mask(grid, [10.0, 30.0, 30.0, 10.0], [12.0, 12.0, 32.0, 32.0])
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[12:32, 10:30] = True
    assert torch.equal(square, expected)
    # a pentagram drawn in one stroke: its middle pentagon is crossed twice, so outside
    angles = [math.pi / 2 + 4 * math.pi * k / 5 for k in range(5)]
    star = codec._polygon_mask(grid, [32 + 20 * math.cos(a) for a in angles],
                               [32 - 20 * math.sin(a) for a in angles])
    assert not star[32, 32] and star[32 - 16, 32] and star.sum() < 0.5 * math.pi * 20 ** 2


def test_spiky_vertices_alternate_between_outer_and_inner_radii():
    g = torch.Generator().manual_seed(fresh_seed())
    for _ in range(20):
        xs, ys = codec._spiky_vertices(30.0, 30.0, 10.0, g)
        radii = [math.hypot(x - 30, y - 30) for x, y in zip(xs, ys)]
        assert len(radii) % 2 == 0 and 6 <= len(radii) <= 16
        assert all(8 - 1e-5 <= r <= 10 + 1e-5 for r in radii[0::2])
        assert all(2.5 - 1e-5 <= r <= 6 + 1e-5 for r in radii[1::2])


def _differs_from_a_neighbour(images):
    """Reference for edge_pixels on pictures whose colours are ≥ 0.5 apart in some channel:
    a pixel is on an edge when one of its (up to 8) neighbours has another colour."""
    b, c, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1), value=float("nan"))
    neighbours = F.unfold(padded, 3).view(b, c, 9, h, w)
    differs = ((neighbours - images[:, :, None]).abs() > 0).any(1)   # NaN (outside) is not > 0
    return differs.any(1, keepdim=True)


def test_edge_pixels_are_those_next_to_another_colour():
    g = torch.Generator().manual_seed(fresh_seed())
    # the default world's pictures: palette colours, every pair ≥ 0.71 apart (×2 in [-1, 1])
    images = shapes.training_batch(8, g).images
    edges = training.edge_pixels(images)
    assert edges.shape == (8, 1, 64, 64)
    assert torch.equal(edges, _differs_from_a_neighbour(images))
    assert 0 < edges.float().mean() < 0.2


def test_edge_weighted_loss_is_the_weighted_mean_of_l1_and_l2():
    seed = fresh_seed()
    torch.manual_seed(seed)
    vae = AutoencoderKL(MICRO.vae)
    images = shapes.training_batch(4, torch.Generator().manual_seed(seed)).images
    noise = torch.randn(4, MICRO.vae.z_channels, 32, 32)
    plain = train.AutoencoderObjective(vae, 1e-3)(images, noise)
    assert torch.equal(plain, train.AutoencoderObjective(vae, 1e-3, 0.0)(images, noise))
    weighted = train.AutoencoderObjective(vae, 1e-3, 5.0)(images, noise)
    with torch.no_grad():
        posterior = vae.encode(images)
        error = vae.decode(posterior.sample(noise=noise)) - images
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - posterior.logvar).mean()
    w = torch.where(_differs_from_a_neighbour(images), 6.0, 1.0).expand_as(error)
    expected = (w * error.abs()).sum() / w.sum() + (w * error ** 2).sum() / w.sum() + 1e-3 * kl
    assert abs(weighted.item() - expected.item()) <= 1e-6 * expected.item()
    assert abs(plain.item() - (error.abs().mean() + error.pow(2).mean() + 1e-3 * kl).item()) \
        <= 1e-6 * plain.item()


def test_edge_weighted_loss_of_a_split_batch_averages_to_the_whole_batchs():
    """Halves of a batch (two processes, or two micro-batches) weighted by the whole batch's
    mean weight, as the Trainer passes it, average to the whole batch's loss; normalised by
    their own means they would not (their edges differ)."""
    seed = fresh_seed()
    torch.manual_seed(seed)
    objective = train.AutoencoderObjective(AutoencoderKL(MICRO.vae), 1e-3, 8.0)
    images = codec.pictures(4, torch.Generator().manual_seed(seed), 32)
    noise = torch.randn(4, MICRO.vae.z_channels, 16, 16)
    whole = objective(images, noise).item()
    mean = training.edge_weights(images, 8.0).mean()
    halves = [objective(images[s], noise[s], mean).item() for s in (slice(0, 2), slice(2, 4))]
    assert abs(sum(halves) / 2 - whole) <= 1e-6 * whole
    own = [objective(images[s], noise[s]).item() for s in (slice(0, 2), slice(2, 4))]
    assert abs(sum(own) / 2 - whole) > 1e-4 * whole


def _autoencoder_batch(config, step=3):
    state = train.new_state(MICRO, config)
    trainer = training.Trainer(state, config, shapes.training_batch, None, progress=False)
    return torch.cat([images for images, *_ in trainer.autoencoder_inputs(step)])


def test_codec_share_replaces_the_end_of_each_autoencoder_batch():
    config = dataclasses.replace(FEW_STEPS, vae_batch=8, vae_codec_share=0.0,
                                 seed=fresh_seed() % 1000)
    world = _autoencoder_batch(config)
    mixed = _autoencoder_batch(dataclasses.replace(config, vae_codec_share=0.25))
    assert torch.equal(mixed[:6], world[:6])
    generic = mixed[6:]
    assert not any(torch.equal(a, b) for a in generic for b in world)
    # not pictures of the world: no colour of its palette
    palette = torch.tensor(list(shapes.RGB.values())) * 2 - 1
    for image in generic:
        colours = image.flatten(1).T.unique(dim=0)
        assert (torch.cdist(colours, palette).min(1).values > 1e-3).all()
    # as every rank draws it, and the same on a second call
    accumulated = _autoencoder_batch(dataclasses.replace(config, vae_codec_share=0.25,
                                                         grad_accum=2))
    assert torch.equal(accumulated, mixed)
    assert torch.equal(_autoencoder_batch(dataclasses.replace(config, vae_codec_share=1.0)),
                       codec.pictures(8, _generator_after_data(config)))


def _generator_after_data(config, step=3):
    """The step's generator once the world's batch is drawn: where the codec pictures start."""
    g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
    shapes.training_batch(config.vae_batch, g)
    return g


def test_train_config_refuses_bad_autoencoder_options():
    with pytest.raises(ValueError, match="vae_codec_share"):
        training.TrainConfig(vae_codec_share=1.5)
    with pytest.raises(ValueError, match="vae_edge_weight"):
        training.TrainConfig(vae_edge_weight=-1.0)
    with pytest.raises(ValueError, match="vae_precision must be one of"):
        training.TrainConfig(vae_precision="bf32")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):  # stage 1's alone too
        train.train(MICRO, dataclasses.replace(FEW_STEPS, vae_precision="fp16"),
                    shapes.training_batch, progress=False)


@pytest.mark.parametrize("vae_precision, wanted", [("bf16", ["bf16", "fp32"]),
                                                    (None, ["fp32", "fp32"]),
                                                    ("fp32", ["fp32", "fp32"])])
def test_each_stage_runs_at_its_own_precision(monkeypatch, vae_precision, wanted):
    """vae_precision sets the autoencoder stage's autocast (None: `precision`'s); the U-Net
    stage keeps `precision`."""
    seen = {}
    step = training.optimization_step

    def spy(*args, precision, **kwargs):
        seen.setdefault(len(seen), precision)
        return step(*args, precision=precision, **kwargs)

    monkeypatch.setattr(training, "optimization_step", spy)
    config = dataclasses.replace(FEW_STEPS, vae_steps=1, steps=1, vae_precision=vae_precision)
    train.train(MICRO, config, shapes.training_batch, progress=False)
    assert [seen[0], seen[1]] == wanted


def test_autoencoder_trains_with_codec_pictures_and_edge_weight(tmp_path):
    config = dataclasses.replace(FEW_STEPS, steps=0, vae_codec_share=0.5, vae_edge_weight=8.0)
    seen = []
    state = train.train(MICRO, config, shapes.training_batch, progress=False,
                        on_step=lambda stage, step, loss, state: seen.append(loss))
    assert len(seen) == config.vae_steps and all(math.isfinite(x) for x in seen)
    start = train.new_state(MICRO, config).pipe.vae.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in state.pipe.vae.state_dict().items())
