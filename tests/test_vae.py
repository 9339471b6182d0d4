"""Tests of the KL autoencoder: checkpoint names, shapes, and parity against diffusers."""
import pytest
import torch

from ldm.models.vae import VAE_TINY, AutoencoderKL, VAEConfig

from helpers import MANIFESTS, randomize_

PREFIX = "first_stage_model."
TOLERANCE = 1e-5


def _manifest_shapes(name):
    """{name without prefix: shape} for the VAE rows of a manifest."""
    shapes = {}
    for line in (MANIFESTS / name).read_text().splitlines():
        key, shape, _dtype = line.split("\t")
        if key.startswith(PREFIX):
            shapes[key[len(PREFIX):]] = tuple(int(s) for s in shape.split(",") if s)
    return shapes


def test_state_dict_matches_sd15_checkpoint_names_and_shapes():
    expected = _manifest_shapes("sd15_emaonly.tsv")
    assert len(expected) == 248
    with torch.device("meta"):
        vae = AutoencoderKL(VAEConfig())
    found = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert sorted(set(found) - set(expected)) == [], "keys not in the checkpoint"
    assert sorted(set(expected) - set(found)) == [], "checkpoint keys we lack"
    wrong = {k: (found[k], expected[k]) for k in expected if found[k] != expected[k]}
    assert wrong == {}
    assert sum(v.numel() for v in vae.parameters()) == 83_653_863  # manifests/README.md


def test_downsampling_factor():
    assert VAEConfig().downsampling_factor == 8
    assert VAE_TINY.downsampling_factor == 2


def test_tiny_shapes_and_seeded_sampling():
    torch.manual_seed(0)
    vae = AutoencoderKL(VAE_TINY).eval()
    images = torch.rand(2, 3, 16, 12) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(images)
        assert posterior.mean.shape == posterior.logvar.shape == posterior.std.shape == (2, 4, 8, 6)
        assert torch.equal(posterior.mode(), posterior.mean)
        a = posterior.sample(torch.Generator().manual_seed(1))
        b = posterior.sample(torch.Generator().manual_seed(1))
        c = posterior.sample(torch.Generator().manual_seed(2))
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
        assert vae.decode(a).shape == (2, 3, 16, 12)


def test_logvar_is_clamped_as_the_original():
    from ldm.models.vae import DiagonalGaussian
    moments = torch.cat([torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 50.0)], dim=1)
    moments[:, 4:, 0, 0] = -100.0
    logvar = DiagonalGaussian(moments).logvar
    assert logvar.max() == 20.0 and logvar.min() == -30.0


@pytest.mark.parametrize("shape, message", [
    ((1, 4, 16, 16), "images must have shape"),      # wrong channel count
    ((1, 3, 15, 16), "multiples of the downsampling factor 2"),
    ((3, 16, 16), "images must have shape"),         # no batch axis
])
def test_encode_rejects_bad_shapes(shape, message):
    vae = AutoencoderKL(VAE_TINY)
    with pytest.raises(ValueError, match=message):
        vae.encode(torch.zeros(shape))


def test_decode_rejects_wrong_latent_channels():
    vae = AutoencoderKL(VAE_TINY)
    with pytest.raises(ValueError, match=r"z must have shape \(B, 4, H, W\), found \(1, 3, 4, 4\)"):
        vae.decode(torch.zeros(1, 3, 4, 4))


# ---- parity against diffusers, through diffusers' own original-to-diffusers converter ----

def _diffusers_twin(vae):
    """diffusers.AutoencoderKL holding our weights, converted from the original naming."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    config = vae.config
    levels = len(config.ch_mult)
    kwargs = dict(in_channels=config.in_channels, out_channels=config.out_channels,
                  down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels,
                  block_out_channels=tuple(config.level_channels),
                  layers_per_block=config.num_res_blocks, latent_channels=config.z_channels,
                  norm_num_groups=config.norm_groups)
    checkpoint = {PREFIX + k: v for k, v in vae.state_dict().items()}
    converted = convert_ldm_vae_checkpoint(checkpoint, kwargs)
    reference = diffusers.AutoencoderKL(**kwargs).eval()
    reference.load_state_dict(converted, strict=True)
    return reference


def _rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def _check_parity(config, image_size, seed):
    vae = randomize_(AutoencoderKL(config), seed).eval()
    reference = _diffusers_twin(vae)
    generator = torch.Generator().manual_seed(seed + 1)
    images = torch.rand(2, 3, image_size, image_size, generator=generator) * 2 - 1
    side = image_size // config.downsampling_factor
    z = torch.randn(2, config.z_channels, side, side, generator=generator)
    with torch.no_grad():
        ours, theirs = vae.encode(images), reference.encode(images).latent_dist
        errors = {"mean": _rel_err(ours.mean, theirs.mean),
                  "logvar": _rel_err(ours.logvar, theirs.logvar),
                  "decode": _rel_err(vae.decode(z), reference.decode(z).sample)}
    print(f"relative errors vs diffusers ({image_size}² images): {errors}")
    assert all(e <= TOLERANCE for e in errors.values()), errors


def test_parity_with_diffusers_tiny():
    _check_parity(VAE_TINY, image_size=16, seed=1234)


@pytest.mark.slow
def test_parity_with_diffusers_sd15():
    _check_parity(VAEConfig(), image_size=64, seed=4321)
