"""Tiled VAE decode and encode whose tiles agree: images of any size in bounded memory.

The decoder's activations grow with the image: SD's decoder at 1024² peaks near 4 GB in
float32 (256 channels × 1024² floats, several alive at once), at 4096² near 60 GB. So a
large image is decoded (and encoded) in tiles. Naive tiling, which decodes each piece of the
latent on its own and pastes the pieces, leaves seams and colour shifts between tiles, for
three reasons, and each has a cure:

1. Convolutions see past a tile's edge: a pixel near the edge depends on latents in the
   neighbouring tile, which a tile on its own replaces by zero padding. Cure: give each tile
   a *halo* of its neighbours' input as wide as the receptive field of the tiled layers
   (`decoder_halo`, `encoder_halo`), and keep only the tile's *core*.
2. GroupNorm normalises with the mean and variance of each (image, group) over ALL
   positions; a tile on its own measures its own, so a tile of sky, normalised by sky
   statistics, comes out with other colours than the untiled image. Cure: every tile uses
   the same statistics. Once the mean μ and variance σ² are fixed, GroupNorm is an affine
   map per channel, y = x·γ/√(σ²+eps) + (β − μ·γ/√(σ²+eps)), that can run on any piece
   of the image (`_normalise`).
3. The mid-block self-attention mixes all positions. Cure: it runs whole (see below).

With the three cures every output pixel is the same function of the latent, whatever the
tiling, so tiles agree by construction and there are no seams. What remains is where the
shared statistics come from. The exact ones are the whole image's: norm k's are the mean
and variance of its input over every tile, an input that depends on the statistics of norms
1..k-1. Holding every activation of every tile until they are known would cost what tiling
saves, so there are two ways, chosen by `exact`:

    exact=True   all tiles go through one ResnetBlock (a "piece") before any enters the
                 next; their activations wait in between. Within a piece, norm k's
                 statistics come from running every tile up to norm k only (its input
                 depends on the statistics of earlier norms alone, known by then) and
                 merging the tiles' cores (Chan's parallel variance, float64). Equal to
                 the untiled decode up to float rounding. Memory: the waiting activations,
                 one activation of the whole image at the widest checkpoint (SD: 128
                 channels at full resolution, 0.5 GB at 1024² in float32, more where crops
                 overlap), plus one tile. Time: the convolutions before a norm run again to
                 measure it (measured: benchmarks/RESULTS.md).
    exact=False  the same, but on a sample of windows spread over the image (`sample`
                 tiles' worth of crops) instead of all tiles: its activations are what
                 waits. Then the tiles run one at a time with the sample's statistics.
                 Memory bounded by `sample` and the tile, whatever the image size, and still
                 seamless (every tile uses the same statistics), but the sample's statistics
                 are not the image's: the measured differences from the untiled decode are
                 in benchmarks/RESULTS.md. An image within the sample's area is all sample.

Only the layers above the latent resolution are tiled. Those at the latent resolution (the
decoder's conv_in, mid-block and lowest up-level ResnetBlocks; the encoder's lowest
down-level ResnetBlocks, mid-block and output) run on the whole latent with ordinary
GroupNorm and attention: 1/8 of the image's side with SD, 512² positions for a 4096²
image. So the mid-block attention stays global and exact, and the halo the tiled layers need
is halved. The price is memory and time that grow with the latent: at a 4096² image about
2.7 GB in float32 (the attention's x, q, k, v and output, 0.5 GB each) and 262,144² dot
products of length 512.

Axis letters: B batch, C channels, G groups, H W image height and width, h w latent height
and width (H/f, W/f; f the VAE's downsampling factor, 8 for SD).
"""
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm.kernels import GroupNormSiLU
from ldm.models.vae import DiagonalGaussian, _check_input


# --------------------------------------------------------------------------- public API
@torch.no_grad()
def decode_tiled(vae, z, tile_size, *, exact=True, sample=8.0, halo=None):
    """Raw latents z (B, z_channels, h, w) -> images (B, out_channels, f·h, f·w), as
    `vae.decode(z)` (no 0.18215 scaling here).

    tile_size: side of a tile's core in image pixels, a positive multiple of f; the tiles
    are spread evenly, so none exceeds it. None decodes whole.
    exact: GroupNorm statistics of the whole image (True) or of a sample of it (False); see
    the module docstring. sample: with exact=False, the sample's area, in tiles (more is
    closer to the image's statistics, and holds more memory).
    halo: context around each tile in image pixels, a multiple of f; None: the receptive
    field of the tiled layers (`decoder_halo`), which makes the tiling exact.
    """
    _check_input("z", z, vae.config.z_channels, 1)
    if tile_size is None:
        return vae.decode(z)
    f = vae.config.downsampling_factor
    tile, sample = _check_tile_size(tile_size, f), _check_sample(sample)
    halo = _check_halo(decoder_halo(vae.config) if halo is None else halo, f)  # latent px
    whole, tiled, norms = _decoder_stages(vae)
    h = whole(z)  # (B, C, h, w): every layer at the latent resolution, attention included
    return _run_tiled(tiled, norms, h, Grid(tile, halo, in_scale=1, out_scale=f),
                      vae.config.out_channels, exact, sample)


@torch.no_grad()
def encode_tiled(vae, images, tile_size, *, exact=True, sample=8.0, halo=None):
    """Images (B, in_channels, H, W) in [-1, 1] -> DiagonalGaussian over
    (B, z_channels, H/f, W/f), as `vae.encode(images)`; H and W multiples of f.
    tile_size, exact, sample, halo: as in `decode_tiled` (halo default `encoder_halo`)."""
    f = vae.config.downsampling_factor
    _check_input("images", images, vae.config.in_channels, f)
    if tile_size is None:
        return vae.encode(images)
    tile, sample = _check_tile_size(tile_size, f), _check_sample(sample)
    halo = _check_halo(encoder_halo(vae.config) if halo is None else halo, f)  # latent px
    tiled, whole, norms = _encoder_stages(vae)
    channels = vae.config.level_channels[-2] if f > 1 else vae.config.ch
    h = _run_tiled(tiled, norms, images, Grid(tile, halo, in_scale=f, out_scale=1),
                   channels, exact, sample)
    return DiagonalGaussian(whole(h))  # latent-resolution layers, attention included


def decoder_halo(config):
    """Receptive field of the decoder's tiled layers, in image pixels (a multiple of f).

    Walk back from one output pixel: conv_out reaches 1 pixel, each ResnetBlock 2 (two 3×3
    convs); an Upsample's conv reaches 1 more at the finer grid, and its nearest-neighbour
    ×2 (pixel p comes from p // 2) halves the reach, rounding up, on the coarser grid.
    """
    reach = 1                                     # conv_out, at full resolution
    for _ in range(len(config.ch_mult) - 1):      # the levels below the top, finest first
        reach += 2 * (config.num_res_blocks + 1)  # the level's ResnetBlocks
        reach = math.ceil((reach + 1) / 2)        # the Upsample that feeds it
    return reach * config.downsampling_factor


def encoder_halo(config):
    """Receptive field of the encoder's tiled layers, in image pixels (a multiple of f).

    Walk back from latent pixel j, whose own image pixels are f·j .. f·j + f − 1: a
    Downsample's stride-2 conv, padded only on the right and bottom, makes output i depend on
    inputs 2i..2i+2; each ResnetBlock reaches 2 pixels, conv_in 1. A tile needs `left` pixels
    before its first latent pixel's and `right − f + 1` after its last one's; the larger,
    rounded up to a multiple of f (tiles start on the latent grid).
    """
    left = right = 0                              # at the latent grid
    for _ in range(len(config.ch_mult) - 1):      # the levels that end in a Downsample
        left, right = 2 * left, 2 * right + 2
        left, right = left + 2 * config.num_res_blocks, right + 2 * config.num_res_blocks
    left, right = left + 1, right + 1             # conv_in
    f = config.downsampling_factor
    return math.ceil(max(left, right - f + 1) / f) * f


# --------------------------------------------------------------------------- memory
# Peak memory of a decoder or encoder run, as a multiple of its largest activation: measured
# with SD's VAE in float32 on the CPU, 3.9× at 512² and 3.8× at 1024² (benchmarks/vae_tiling.py).
PEAK_PER_ACTIVATION = 4.0
# At the latent resolution the mid-block attention holds x, q, k, v and its output.
PEAK_PER_LATENT_ACTIVATION = 6.0


def estimate_memory(vae_config, height, width, dtype=torch.float32, *, batch=1, tile_size=None,
                    exact=True, sample=8.0, encode=False):
    """Estimated peak bytes of activations (weights not counted) to decode to (or, with
    `encode`, encode) `batch` images of height×width pixels, whole or in tiles of `tile_size`
    (exact, sample: as for `decode_tiled`).

    The widest activation above the latent resolution, over the whole image or over one
    tile and its halo, times PEAK_PER_ACTIVATION; or, if larger, the layers at the latent
    resolution, which always run whole, times PEAK_PER_LATENT_ACTIVATION; plus the output,
    the activation handed between the two halves, and in tiles the activations that wait
    between pieces (the crops of all tiles, or of the sample, at the widest checkpoint).
    """
    f, chs = vae_config.downsampling_factor, vae_config.level_channels
    scalar = torch.empty((), dtype=dtype).element_size() * batch  # bytes per pixel and channel
    latent = chs[-1] * (height // f) * (width // f) * scalar
    out = (2 * vae_config.z_channels * (height // f) * (width // f) if encode
           else vae_config.out_channels * height * width) * scalar
    waiting, run_h, run_w = 0, height, width
    if tile_size is not None:
        halo = (encoder_halo if encode else decoder_halo)(vae_config)
        run_h, run_w = (min(n, tile_size + 2 * halo) for n in (height, width))
        crops = math.prod(n + 2 * halo * (math.ceil(n / tile_size) - 1) for n in (height, width))
        if not exact:  # the sample's crops, unless the sample is the whole image
            sampled = sample * (tile_size + 2 * halo) ** 2
            crops = height * width if sampled >= height * width else min(crops, sampled)
        waiting = _widest(vae_config, encode, checkpoint=True) * crops * scalar
    running = _widest(vae_config, encode) * run_h * run_w * scalar * PEAK_PER_ACTIVATION
    return int(max(running + latent + waiting, latent * PEAK_PER_LATENT_ACTIVATION) + out)


def _widest(vae_config, encode, checkpoint=False):
    """Channels per full-resolution pixel of the widest activation above the latent
    resolution: level i runs at 1/2^i of the side (1/4^i of the pixels) with chs[i]
    channels, and in the decoder the Upsample feeding level i brings chs[i + 1]. Between
    pieces (`checkpoint`) only the ResnetBlocks' outputs wait, chs[i] at level i."""
    chs = vae_config.level_channels
    if len(chs) == 1:
        return chs[0]
    return max((chs[i] if encode or checkpoint else max(chs[i], chs[i + 1])) / 4 ** i
               for i in range(len(chs) - 1))


def auto_tiling(vae_config, height, width, dtype, available_bytes, *, batch=1, encode=False):
    """How to decode (or `encode`) within `available_bytes` of activations, as keyword
    arguments for `decode_tiled` / `encode_tiled`:

        {"tile_size": None}                               whole fits
        {"tile_size": t, "exact": True}                   else: the largest t that fits
        {"tile_size": t, "exact": False, "sample": s}     else: the largest sample s of
                                                          16, 8, 4, 2, 1, then largest t

    Tile sizes are multiples of 8·f pixels, at least 4 halos where the image allows (smaller
    tiles spend most of their work on the halo). Raises ValueError naming available_bytes
    when nothing fits (the latent-resolution layers, which run whole, are too large).
    """
    kwargs = dict(batch=batch, encode=encode)
    if estimate_memory(vae_config, height, width, dtype, **kwargs) <= available_bytes:
        return {"tile_size": None}
    step = 8 * vae_config.downsampling_factor
    smallest = min(4 * (encoder_halo if encode else decoder_halo)(vae_config),
                   max(height, width) // step * step)
    tiles = range(max(height, width) // step * step, max(smallest, step) - 1, -step)
    plans = [{"tile_size": t, "exact": True} for t in tiles] + [
        {"tile_size": t, "exact": False, "sample": s} for s in (16.0, 8.0, 4.0, 2.0, 1.0)
        for t in tiles]
    for plan in plans:
        if estimate_memory(vae_config, height, width, dtype, **plan, **kwargs) <= available_bytes:
            if not plan["exact"]:
                warnings.warn(f"{height}×{width} images do not fit in {available_bytes / 2**30:.1f} "
                              f"GiB with exact tiling: GroupNorm statistics come from a sample "
                              f"of {plan['sample']:g} tiles' area, and the image may differ "
                              f"from the untiled decode by several /255 (benchmarks/RESULTS.md)",
                              stacklevel=2)
            return plan
    raise ValueError(f"available_bytes={available_bytes} is too small for {height}×{width} "
                     f"images in tiles of at least {smallest} px (memory estimates: "
                     f"ldm.vae_tiling.estimate_memory)")


def free_memory(device):
    """Bytes that activations may still take on `device`: the free memory of a CUDA device
    (torch.cuda.mem_get_info), the MemAvailable of /proc/meminfo for the CPU on Linux; None
    where unknown (another OS, another device), meaning: do not tile automatically."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


# --------------------------------------------------------------------------- the two halves
def _norms(*modules):
    return [m for module in modules for m in module.modules() if isinstance(m, nn.GroupNorm)]


def _decoder_stages(vae):
    """(whole, tiled, norms of tiled): the decoder split where the resolution first rises;
    tiled(whole(z)) is vae.decode(z). `tiled` is a Sequential of pieces, one per ResnetBlock
    (the Upsample before a level goes with the level's first block, so that what passes
    between pieces is never an upsampled activation; norm_out and conv_out go with the last)."""
    dec = vae.decoder
    top = dec.up[-1]

    def whole(z):  # (B, z_channels, h, w) -> (B, C, h, w)
        return top.block(dec.mid(dec.conv_in(vae.post_quant_conv(z))))

    pieces, pending = [], [getattr(top, "upsample", nn.Identity())]  # no Upsample when f = 1
    for level in reversed(dec.up[:-1]):  # the levels above the latent resolution, as they run
        for block in level.block:
            pieces.append(nn.Sequential(*pending, block))
            pending = []
        pending = [getattr(level, "upsample", nn.Identity())]
    pieces.append(nn.Sequential(*pending, dec.norm_out, dec.conv_out))
    tiled = nn.Sequential(*pieces)  # (B, C, h, w) -> (B, out_channels, f·h, f·w)
    return whole, tiled, _norms(tiled)


def _encoder_stages(vae):
    """(tiled, whole, norms of tiled): the encoder split where the resolution reaches the
    latent's; whole(tiled(x)) is quant_conv(encoder(x)), the posterior's moments. `tiled` is a
    Sequential of pieces, one per ResnetBlock (conv_in goes with the first, each Downsample
    with the block before it)."""
    enc = vae.encoder
    pieces, pending = [], [enc.conv_in]
    for level in enc.down[:-1]:  # the levels that end in a Downsample
        blocks = list(level.block)
        for block in blocks:
            after = [level.downsample] if block is blocks[-1] else []
            pieces.append(nn.Sequential(*pending, block, *after))
            pending = []
    tiled = nn.Sequential(*pieces, *pending)  # (B, in_channels, H, W) -> (B, C, h, w)

    def whole(h):  # (B, C, h, w) -> (B, 2·z_channels, h, w)
        h = enc.mid(enc.down[-1](h))
        return vae.quant_conv(enc.conv_out(enc.norm_out(h)))

    return tiled, whole, _norms(tiled)


# --------------------------------------------------------------------------- tiles
@dataclass(frozen=True)
class Grid:
    """How tiles are cut, in latent pixels (tile: a core's side at most; halo), and how x and
    the output relate to the latent grid (x has in_scale, the output out_scale pixels per
    latent pixel)."""
    tile: int
    halo: int
    in_scale: int
    out_scale: int


@dataclass(frozen=True)
class Span:
    """A window along one axis, in latent pixels: the core [start, stop) it writes and the
    crop [crop_start, crop_stop) it reads (the core and its halo, inside the image)."""
    start: int
    stop: int
    crop_start: int
    crop_stop: int


@dataclass(frozen=True)
class Window:
    """A tile, or a window of the sample: its Span along the rows and along the columns."""
    rows: Span
    cols: Span

    def crop(self, x, scale):
        """The crop of x, which has `scale` pixels per latent pixel."""
        r, c = self.rows, self.cols
        return x[..., r.crop_start * scale:r.crop_stop * scale,
                 c.crop_start * scale:c.crop_stop * scale]

    def core_of(self, y):
        """The core of y, an activation of the crop at any resolution (the encoder's halve
        it, the decoder's double it): along each axis, y.shape / crop length pixels per
        latent pixel."""
        (r0, r1, rows), (c0, c1, cols) = (
            (s.start - s.crop_start, s.stop - s.crop_start, s.crop_stop - s.crop_start)
            for s in (self.rows, self.cols))
        height, width = y.shape[-2:]
        return y[..., r0 * height // rows:r1 * height // rows,
                 c0 * width // cols:c1 * width // cols]


def _spans(length, grid):
    """Split `length` latent pixels into the fewest cores of at most grid.tile, as even as
    possible (no sliver at the end), each with grid.halo pixels of context on both sides."""
    n = math.ceil(length / grid.tile)
    edges = [round(i * length / n) for i in range(n + 1)]
    return [Span(a, b, max(0, a - grid.halo), min(length, b + grid.halo))
            for a, b in zip(edges, edges[1:])]


def _run_tiled(stage, norms, x, grid, out_channels, exact, sample):
    """Run `stage` (a Sequential of pieces) over x tile by tile with shared GroupNorm
    statistics: x (B, C, in_scale·h, in_scale·w) -> (B, out_channels, out_scale·h, out_scale·w)."""
    h, w = x.shape[-2] // grid.in_scale, x.shape[-1] // grid.in_scale
    tiles = [Window(r, c) for r in _spans(h, grid) for c in _spans(w, grid)]
    if len(tiles) == 1:
        return stage(x)  # the one tile is the whole image, its statistics the image's
    if exact:
        _, results = _exact(stage, norms, x, tiles, grid.in_scale)
    else:
        windows = _sample(h, w, grid, sample * (grid.tile + 2 * grid.halo) ** 2)
        stats, _ = _exact(stage, norms, x, windows, grid.in_scale)
        results = _sweep(stage, norms, stats, x, tiles, grid.in_scale)
    out = x.new_empty(x.shape[0], out_channels, h * grid.out_scale, w * grid.out_scale)
    for tile, y in zip(tiles, results):
        out[..., _core(tile.rows, grid.out_scale), _core(tile.cols, grid.out_scale)] = \
            tile.core_of(y)
    return out


def _core(span, scale):
    return slice(span.start * scale, span.stop * scale)


def _exact(stage, norms, x, windows, in_scale):
    """(statistics, outputs): each norm's statistics over the cores of `windows` (the tiles,
    or a sample), and each window's output crop, computed with them. Piece by piece.

    All windows go through one piece (a ResnetBlock) before any enters the next; their
    activations wait in between. A piece's first norm is measured by running every window
    up to it, then its next norm likewise, and so on: norm k's input depends only on the
    statistics of the norms before it, known by then. With the piece's statistics known,
    every window runs the piece to its end.
    """
    stats, states = {}, [window.crop(x, in_scale) for window in windows]
    with SharedGroupNorm(norms, stats) as shared:
        for piece in stage:
            shared.stop_at_unknown = True
            for _ in _norms(piece):  # measure the piece's norms, in order
                for window, state in zip(windows, states):
                    shared.window = window
                    try:
                        piece(state)
                    except _ReachedUnknownNorm:
                        pass
                shared.publish()
            shared.stop_at_unknown = False
            for i, window in enumerate(windows):  # advance, dropping each input as we go
                shared.window = window
                states[i] = piece(states[i])
    return stats, states


def _sweep(stage, norms, stats, x, tiles, in_scale):
    """Each tile's output crop, one tile at a time, with the shared statistics `stats`."""
    with SharedGroupNorm(norms, stats) as shared:
        for tile in tiles:
            shared.window = tile
            yield stage(tile.crop(x, in_scale))


def _sample(h, w, grid, area):
    """Sample windows over an h×w latent for the statistics: cores of side tile/2 (at least
    2·halo) at jittered places of an even lattice, as many as fit `area` latent pixels² of
    crops; the whole image if that fits. Seeded, so an image always gets the same sample."""
    side = max(2 * grid.halo, grid.tile // 2, 1)
    if h * w <= area or h <= side or w <= side:
        return [Window(Span(0, h, 0, h), Span(0, w, 0, w))]
    count = max(1, int(area // (side + 2 * grid.halo) ** 2))
    ny = max(1, min(h // side, round(math.sqrt(count * h / w))))
    nx = max(1, min(w // side, count // ny))
    generator = torch.Generator().manual_seed(0)
    windows = []
    for i in range(ny):
        for j in range(nx):
            dy, dx = torch.rand(2, generator=generator).tolist()
            windows.append(Window(_sample_span(i, ny, h, side, grid.halo, dy),
                                  _sample_span(j, nx, w, side, grid.halo, dx)))
    return windows


def _sample_span(i, n, length, side, halo, jitter):
    """A core of `side` at a jittered place in cell i of n along `length`, and its crop."""
    lo, hi = round(i * length / n), round((i + 1) * length / n)
    start = min(lo + round(jitter * max(0, hi - lo - side)), length - side)
    return Span(start, start + side, max(0, start - halo), min(length, start + side + halo))


# --------------------------------------------------------------------------- shared GroupNorm
class _ReachedUnknownNorm(Exception):
    """Stops a forward at the first norm whose statistics are not known yet."""


class SharedGroupNorm:
    """While active (`with`), every GroupNorm in `norms` normalises with the statistics
    `stats[norm]`, the same for every tile.

    A norm whose statistics are not known yet measures them on the core of `window`, the
    tile or sample window whose crop is running, and merges them per image into running
    sums. Then, by default, it publishes them and normalises with them (a whole image in one
    window measures every norm in one run); while `stop_at_unknown`, it stops the forward
    instead, and the caller publishes once every window has been measured.

    stats: {norm: (mean, var)}, each (B, G) float32, filled in place.
    """

    def __init__(self, norms, stats):
        self.norms, self.stats = norms, stats
        self.window, self.stop_at_unknown, self.device = None, False, None
        self.sums = {}  # norm -> (count, mean, M2), each (B, G) float64

    def __enter__(self):
        for norm in self.norms:  # an instance attribute shadows the class's forward
            norm.forward = lambda x, norm=norm: self.forward(norm, x)
        return self

    def __exit__(self, *exc_info):
        for norm in self.norms:
            del norm.forward

    def forward(self, norm, x):
        """(B, C, H, W) -> same: GroupNorm (then SiLU for a GroupNormSiLU)."""
        if norm not in self.stats:
            self._measure(norm, self.window.core_of(x))
            if self.stop_at_unknown:
                raise _ReachedUnknownNorm
            self.publish()
        mean, var = self.stats[norm]
        return _normalise(x, norm, mean, var, silu=isinstance(norm, GroupNormSiLU))

    def _measure(self, norm, core):
        """Merge the mean and variance of `core` (B, C, h, w) into norm's running sums, by
        Chan et al.'s parallel variance (robust where E[x²] − E[x]² would cancel)."""
        # float64 on the CPU: the sums are tiny, and not every device has float64 (MPS)
        mean, var = (t.to("cpu", torch.float64) for t in _group_stats(core, norm.num_groups))
        count = core[0].numel() // norm.num_groups  # values per (image, group)
        self.device = core.device
        if norm not in self.sums:
            self.sums[norm] = (count, mean, var * count)
            return
        n_a, mean_a, m2_a = self.sums[norm]
        n = n_a + count
        delta = mean - mean_a
        self.sums[norm] = (n, mean_a + delta * count / n,
                           m2_a + var * count + delta ** 2 * n_a * count / n)

    def publish(self):
        """Turn the running sums into the statistics every tile will use."""
        for norm, (n, mean, m2) in self.sums.items():
            self.stats[norm] = (mean.to(self.device, torch.float32),
                                (m2 / n).to(self.device, torch.float32))
        self.sums = {}


def _group_stats(x, groups):
    """Mean and (biased) variance of each (image, group) of x (B, C, ...): two (B, G) float32."""
    var, mean = torch.var_mean(x.float().reshape(x.shape[0], groups, -1), dim=-1, correction=0)
    return mean, var


def _normalise(x, norm, mean, var, silu):
    """GroupNorm of x (B, C, H, W) with the given mean, var (B, G), then SiLU if `silu`.

    With μ and σ² fixed, GroupNorm is one affine map per (image, channel):
    y = x·scale + shift, scale = γ/√(σ²+eps), shift = β − μ·scale. Computed in float32 (as
    GroupNorm32 does) and returned in x's dtype.
    """
    batch, channels = x.shape[:2]
    groups = norm.num_groups
    gamma = norm.weight.float().view(groups, channels // groups)                   # (G, C/G)
    scale = gamma * (var + norm.eps).rsqrt()[..., None]                             # (B, G, C/G)
    shift = norm.bias.float().view(groups, channels // groups) - mean[..., None] * scale
    y = torch.addcmul(shift.reshape(batch, channels, 1, 1), x, scale.reshape(batch, channels, 1, 1))
    return (F.silu(y, inplace=True) if silu else y).to(x.dtype)


# --------------------------------------------------------------------------- arguments
def _check_tile_size(tile_size, factor):
    """tile_size in image pixels -> latent pixels."""
    if type(tile_size) is not int or tile_size <= 0 or tile_size % factor:
        raise ValueError(f"tile_size must be None or a positive multiple of {factor} (the VAE's "
                         f"downsampling factor), in image pixels; got {tile_size!r}")
    return tile_size // factor


def _check_halo(halo, factor):
    """halo in image pixels -> latent pixels."""
    if type(halo) is not int or halo < 0 or halo % factor:
        raise ValueError(f"halo must be None or a non-negative multiple of {factor} (the VAE's "
                         f"downsampling factor), in image pixels; got {halo!r}")
    return halo // factor


def _check_sample(sample):
    if isinstance(sample, bool) or not isinstance(sample, (int, float)) \
            or not 0 < sample < math.inf:
        raise ValueError(f"sample must be a positive number of tiles' worth of area, "
                         f"got {sample!r}")
    return float(sample)
