"""Tiled VAE decode and encode (ldm.vae_tiling): tiles agree, and with exact statistics the
tiled result is the untiled one (ours, and diffusers') up to float rounding.

Why tiles agree is tested piece by piece: the halos are the receptive fields measured by
autograd; with fixed shared statistics the tiling is invisible; exact statistics make it
the untiled decode; and each cure is needed (a halo one latent pixel short, or per-tile
statistics as in naive tiling, is measurably wrong).
"""
import math

import pytest
import torch

from ldm import vae_tiling
from ldm.models.vae import VAE_TINY, AutoencoderKL, VAEConfig
from ldm.vae_tiling import (SharedGroupNorm, Window, auto_tiling, decode_tiled,
                            decoder_halo, encode_tiled, encoder_halo, estimate_memory,
                            free_memory)

from helpers import randomize_, rel_error

EXACT = 1e-5  # fp32; measured 2e-7 .. 9e-7
MID = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8)       # f = 4
SD_SHAPED = VAEConfig(ch=4, ch_mult=(1, 2, 4, 4), num_res_blocks=2, norm_groups=2)  # f = 8
CONFIGS = {"tiny": VAE_TINY, "mid": MID, "sd-shaped": SD_SHAPED}


def _vae(config, seed):
    return randomize_(AutoencoderKL(config), seed).eval()


def _latents(config, batch, h, w, seed):
    """Latents with content that differs across the image and between the images."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, config.z_channels, h, w, generator=g)
    ramp = torch.linspace(-2, 2, w) * torch.arange(1, batch + 1).view(batch, 1, 1, 1)
    return z + ramp


def _images(config, batch, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    f = config.downsampling_factor
    x = torch.rand(batch, config.in_channels, h * f, w * f, generator=g) * 2 - 1
    x[:, :, : h * f // 3] *= 0.2  # a calm band: its own statistics differ from the rest's
    return x


# --------------------------------------------------------------------------- halos
def _fixed_stats(norms, batch):
    """GroupNorm statistics that do not depend on the input: the layers become local."""
    return {n: (torch.zeros(batch, n.num_groups), torch.ones(batch, n.num_groups)) for n in norms}


def _support(grad, axis):
    """Indices along `axis` (of a (1, C, H, W) gradient) where it is non-zero."""
    other = (1, 3) if axis == 2 else (1, 2)
    return grad.abs().sum(dim=(0,) + other).nonzero().flatten()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_halo_is_the_receptive_field_measured_by_autograd(name):
    config = CONFIGS[name]
    f = config.downsampling_factor
    vae = _vae(config, 1)
    _, tiled, norms = vae_tiling._decoder_stages(vae)
    h = torch.randn(1, config.level_channels[-1], 31, 31, requires_grad=True)
    reach = 0
    with SharedGroupNorm(norms, _fixed_stats(norms, 1)):
        for offset in range(f):  # every output pixel of latent pixel 15
            h.grad = None
            tiled(h)[0, :, 15 * f + offset, 15 * f + offset].sum().backward()
            rows = _support(h.grad, 2)
            reach = max(reach, 15 - rows.min().item(), rows.max().item() - 15)
    print(f"{name}: decoder reach {reach} latent px, halo {decoder_halo(config)} px")
    assert reach * f == decoder_halo(config)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encoder_halo_is_the_receptive_field_measured_by_autograd(name):
    config = CONFIGS[name]
    f = config.downsampling_factor
    vae = _vae(config, 2)
    tiled, _, norms = vae_tiling._encoder_stages(vae)
    side = 31 * f
    x = torch.randn(1, 3, side, side, requires_grad=True)
    with SharedGroupNorm(norms, _fixed_stats(norms, 1)):
        tiled(x)[0, :, 15, 15].sum().backward()
    rows = _support(x.grad, 2)
    left, right = 15 * f - rows.min().item(), rows.max().item() - 15 * f
    print(f"{name}: encoder reach left {left} right {right} px, halo {encoder_halo(config)} px")
    # A tile needs `left` pixels before its core and right − (f − 1) after it.
    assert encoder_halo(config) == math.ceil(max(left, right - f + 1) / f) * f


# --------------------------------------------------------------------------- the split
def test_the_two_halves_compose_to_the_whole_networks():
    vae = _vae(SD_SHAPED, 3)
    z, x = _latents(SD_SHAPED, 2, 5, 7, 4), _images(SD_SHAPED, 2, 5, 7, 5)
    whole, tiled, _ = vae_tiling._decoder_stages(vae)
    enc_tiled, enc_whole, _ = vae_tiling._encoder_stages(vae)
    with torch.no_grad():
        assert torch.equal(tiled(whole(z)), vae.decode(z))
        assert torch.equal(enc_whole(enc_tiled(x)), vae.quant_conv(vae.encoder(x)))


def test_one_tile_is_the_whole_decode_bit_for_bit():
    vae = _vae(MID, 6)
    z = _latents(MID, 2, 9, 11, 7)
    with torch.no_grad():
        ref = vae.decode(z)
    assert torch.equal(decode_tiled(vae, z, 11 * 4), ref)
    assert torch.equal(decode_tiled(vae, z, None), ref)


# --------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name, batch, h, w, tile", [
    ("tiny", 2, 37, 29, 16),       # odd sizes; 16 px tiles do not divide them
    ("mid", 2, 23, 18, 32),        # f = 4
    ("mid", 1, 40, 9, 24),         # one column of tiles, a narrow image
    ("sd-shaped", 2, 13, 10, 56),  # SD's structure: 4 levels, 19 norms in the tiled part
])
def test_exact_tiled_decode_equals_the_untiled_decode(name, batch, h, w, tile):
    config = CONFIGS[name]
    vae = _vae(config, 10)
    z = _latents(config, batch, h, w, 11)
    with torch.no_grad():
        ref = vae.decode(z)
    out = decode_tiled(vae, z, tile)  # exact=True is the default
    error = rel_error(out, ref)
    print(f"{name} {tuple(z.shape)} tile {tile}: relative error {error:.1e}")
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert error < EXACT


@pytest.mark.parametrize("name, batch, h, w, tile", [
    ("tiny", 2, 37, 29, 16),
    ("mid", 2, 23, 18, 32),
    ("sd-shaped", 1, 13, 10, 56),
])
def test_exact_tiled_encode_equals_the_untiled_encode(name, batch, h, w, tile):
    config = CONFIGS[name]
    vae = _vae(config, 12)
    x = _images(config, batch, h, w, 13)
    with torch.no_grad():
        ref = vae.encode(x)
    out = encode_tiled(vae, x, tile)
    errors = rel_error(out.mean, ref.mean), rel_error(out.logvar, ref.logvar)
    print(f"{name} {tuple(x.shape)} tile {tile}: relative errors mean, logvar {errors}")
    assert max(errors) < EXACT


def test_tiled_decode_equals_the_untiled_decode_of_diffusers():
    """The reference nobody here wrote: diffusers' AutoencoderKL, untiled, same weights."""
    from test_vae import _diffusers_twin  # our weights in diffusers' model
    vae = _vae(MID, 14)
    reference = _diffusers_twin(vae)
    z = _latents(MID, 2, 21, 17, 15)
    with torch.no_grad():
        theirs = reference.decode(z).sample
    error = rel_error(decode_tiled(vae, z, 24), theirs)
    print(f"tiled ldm vs untiled diffusers: relative error {error:.1e}")
    assert error < EXACT


# --------------------------------------------------------------------------- tiles agree
def test_with_shared_statistics_the_tiling_is_invisible():
    """Whatever the statistics (here a sample's, not the image's), every tile uses the same,
    so the output does not depend on where the tiles are cut."""
    vae = _vae(MID, 16)
    z = _latents(MID, 2, 30, 26, 17)
    _, tiled, norms = vae_tiling._decoder_stages(vae)
    with torch.no_grad():
        h = vae_tiling._decoder_stages(vae)[0](z)
        windows = vae_tiling._sample(30, 26, vae_tiling.Grid(8, 4, 1, 4), area=3 * 16 ** 2)
        assert 1 < len(windows) < 6  # a real sample, not the whole image
        stats, _ = vae_tiling._exact(tiled, norms, h, windows, 1)
        with SharedGroupNorm(norms, stats):  # the whole image in one piece
            whole = tiled(h)
        outs = []
        for tile in (4, 7, 13):
            grid = vae_tiling.Grid(tile, 4, in_scale=1, out_scale=4)
            tiles = [Window(r, c) for r in vae_tiling._spans(30, grid)
                     for c in vae_tiling._spans(26, grid)]
            out = torch.empty_like(whole)
            with SharedGroupNorm(norms, stats) as shared:
                for t in tiles:
                    shared.window = t
                    out[..., t.rows.start * 4:t.rows.stop * 4, t.cols.start * 4:t.cols.stop * 4] \
                        = t.core_of(tiled(t.crop(h, 1)))
            outs.append(out)
    for out in outs:
        assert rel_error(out, whole) < EXACT
    assert rel_error(whole, vae.decode(z)) > 1e-3  # the sample's statistics are not the image's


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_halo_short_of_the_receptive_field_is_not_exact(name):
    """One latent pixel short is measurable in the small VAEs; in SD's shape the outermost
    pixels of the receptive field weigh ~1e-7 in the decoder and ~3e-5 in the encoder (the
    effective field is smaller than the theoretical one), so there the halo goes entirely."""
    config = CONFIGS[name]
    f = config.downsampling_factor
    vae = _vae(config, 18)
    z, x = _latents(config, 1, 18, 18, 19), _images(config, 1, 18, 18, 20)
    with torch.no_grad():
        ref, ref_enc = vae.decode(z), vae.encode(x).mean
    sd = name == "sd-shaped"
    halo, halo_enc = (0, 0) if sd else (decoder_halo(config) - f, encoder_halo(config) - f)
    short = rel_error(decode_tiled(vae, z, 6 * f, halo=halo), ref)
    short_enc = rel_error(encode_tiled(vae, x, 6 * f, halo=halo_enc).mean, ref_enc)
    print(f"{name}: decoder halo {halo} px: {short:.1e}; encoder halo {halo_enc} px: "
          f"{short_enc:.1e}")
    assert short > 10 * EXACT and short_enc > 10 * EXACT


def test_naive_tiling_with_per_tile_statistics_is_far_from_untiled():
    """What the cures are for: tiles decoded on their own (halo included, so no seams from
    the convolutions) still differ, because each normalises with its own statistics."""
    vae = _vae(MID, 21)
    z = _latents(MID, 1, 24, 24, 22)
    with torch.no_grad():
        ref = vae.decode(z)
        halo = decoder_halo(MID) // 4
        naive = torch.empty_like(ref)
        for r in vae_tiling._spans(24, vae_tiling.Grid(8, halo, 1, 4)):
            for c in vae_tiling._spans(24, vae_tiling.Grid(8, halo, 1, 4)):
                t = Window(r, c)
                naive[..., r.start * 4:r.stop * 4, c.start * 4:c.stop * 4] = t.core_of(
                    vae.decode(t.crop(z, 1)))
    naive_error, ours = rel_error(naive, ref), rel_error(decode_tiled(vae, z, 32), ref)
    print(f"per-tile statistics {naive_error:.1e}, shared exact statistics {ours:.1e}")
    assert naive_error > 1e-2 and ours < EXACT


def test_sample_statistics_cover_the_whole_image_when_it_is_small():
    """exact=False measures a sample; an image within the sample's area is all sample."""
    vae = _vae(MID, 23)
    z = _latents(MID, 2, 20, 14, 24)
    with torch.no_grad():
        ref = vae.decode(z)
    assert rel_error(decode_tiled(vae, z, 32, exact=False, sample=100), ref) < EXACT
    approximate = decode_tiled(vae, z, 32, exact=False, sample=0.5)
    assert torch.isfinite(approximate).all() and approximate.shape == ref.shape


def test_bfloat16_tiles_stay_within_bfloat16_rounding_of_float32():
    vae = _vae(MID, 25)
    z = _latents(MID, 1, 20, 20, 26)
    with torch.no_grad():
        ref = vae.decode(z)
    out = decode_tiled(vae.to(torch.bfloat16), z.bfloat16(), 32)
    assert out.dtype == torch.bfloat16
    error = rel_error(out.float(), ref)
    print(f"bf16 tiled vs fp32 untiled: {error:.1e}")
    assert error < 3e-2


# --------------------------------------------------------------------------- the AttnBlock fix
def test_vae_attention_gets_contiguous_qkv():
    """Strided q/k/v send the CPU's scaled_dot_product_attention to its math path, which
    holds all N² scores (benchmarks/vae_tiling.py --attention)."""
    from ldm.attention import override
    vae = _vae(VAE_TINY, 27)
    seen = []

    def record(q, k, v, *, layer):
        seen.append([t.is_contiguous() for t in (q, k, v)])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    with override(vae, record), torch.no_grad():
        vae.decode(torch.randn(1, 4, 6, 5))
    assert seen == [[True, True, True]]


# --------------------------------------------------------------------------- memory
def test_memory_estimate_and_automatic_tiling():
    sd, gib = VAEConfig(), 2**30
    whole = estimate_memory(sd, 1024, 1024)
    assert 3.5 * gib < whole < 4.5 * gib  # measured: 3.87 GiB peak above the baseline
    exact, sampled = (estimate_memory(sd, 1024, 1024, tile_size=512, exact=e) for e in (True, False))
    assert sampled < exact < whole / 1.5
    assert auto_tiling(sd, 512, 512, torch.float32, 2 * gib) == {"tile_size": None}
    plan = auto_tiling(sd, 2048, 2048, torch.float32, 6 * gib)
    assert plan["exact"] and plan["tile_size"] % 64 == 0
    assert estimate_memory(sd, 2048, 2048, **plan) <= 6 * gib
    assert estimate_memory(sd, 2048, 2048, tile_size=plan["tile_size"] + 64) > 6 * gib
    with pytest.warns(UserWarning, match="statistics come from a sample"):
        plan = auto_tiling(sd, 4096, 4096, torch.float32, 3.5 * gib)  # exact does not fit
    assert plan["exact"] is False and estimate_memory(sd, 4096, 4096, **plan) <= 3.5 * gib
    with pytest.warns(UserWarning):
        half = auto_tiling(sd, 4096, 4096, torch.bfloat16, 3.5 * gib)
    assert (half["sample"], half["tile_size"]) > (plan["sample"], plan["tile_size"])
    with pytest.raises(ValueError, match="available_bytes=1000000 is too small"):
        auto_tiling(sd, 4096, 4096, torch.float32, 10**6)


def test_free_memory_of_the_cpu_and_of_unknown_devices():
    import platform
    free = free_memory("cpu")
    if platform.system() == "Linux":
        assert isinstance(free, int) and 0 < free < 2**50
    assert free_memory("meta") is None


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, message", [
    (dict(tile_size=0), "tile_size must be None or a positive multiple of 4"),
    (dict(tile_size=-8), "tile_size must be"),
    (dict(tile_size=30), r"tile_size .* got 30"),
    (dict(tile_size=32.0), r"tile_size .* got 32.0"),
    (dict(tile_size=True), "tile_size must be"),
    (dict(tile_size="512"), "tile_size must be"),
    (dict(tile_size=32, halo=-4), "halo must be None or a non-negative multiple of 4"),
    (dict(tile_size=32, halo=6), r"halo .* got 6"),
    (dict(tile_size=32, exact=False, sample=0), "sample must be a positive number"),
    (dict(tile_size=32, exact=False, sample=float("nan")), "sample must be"),
    (dict(tile_size=32, exact=False, sample=float("inf")), "sample must be"),
    (dict(tile_size=32, exact=False, sample=True), "sample must be"),
])
def test_bad_arguments_are_named(kwargs, message):
    vae = AutoencoderKL(MID).eval()
    with pytest.raises(ValueError, match=message):
        decode_tiled(vae, torch.zeros(1, 4, 8, 8), **kwargs)
    with pytest.raises(ValueError, match=message):
        encode_tiled(vae, torch.zeros(1, 3, 32, 32), **kwargs)


def test_bad_inputs_are_named():
    vae = AutoencoderKL(MID).eval()
    with pytest.raises(ValueError, match=r"z must have shape \(B, 4, H, W\)"):
        decode_tiled(vae, torch.zeros(1, 3, 8, 8), 32)
    with pytest.raises(ValueError, match="images: H and W must be multiples of .* 4"):
        encode_tiled(vae, torch.zeros(1, 3, 30, 32), 32)
