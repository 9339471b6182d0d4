"""The KL-regularised autoencoder of Stable Diffusion 1.x ("KL-f8"), as in CompVis
`ldm/modules/diffusionmodules/model.py` and `ldm/models/autoencoder.py`.

The diffusion runs in the latent space of this autoencoder: a 512×512 RGB image becomes a
4×64×64 latent (8× smaller per side, 48× fewer numbers), and the decoder maps latents back.
Parameter names are the checkpoint's own, with `first_stage_model.` removed.

Axis letters: B batch, C channels, H W image height and width, h w latent height and width
(H/8, W/8 for SD), N tokens (h·w at the lowest resolution).

Architecture with the SD numbers (`VAEConfig()`), for a 512×512 image:

    Encoder                                                  resolution
      conv_in                              3 ->  128         512²
      down.0   2 ResnetBlocks            128 ->  128, downsample  512² -> 256²
      down.1   2 ResnetBlocks            128 ->  256, downsample  256² -> 128²
      down.2   2 ResnetBlocks            256 ->  512, downsample  128² ->  64²
      down.3   2 ResnetBlocks            512 ->  512          64²
      mid      ResnetBlock, AttnBlock (1 head, 4096 tokens of 512), ResnetBlock
      norm_out, SiLU, conv_out           512 ->    8  (mean and logvar of 4 channels)
    quant_conv (1×1)                       8 ->    8          64²
    post_quant_conv (1×1)                  4 ->    4          64²
    Decoder
      conv_in                              4 ->  512          64²
      mid      ResnetBlock, AttnBlock, ResnetBlock
      up.3     3 ResnetBlocks            512 ->  512, upsample    64² -> 128²
      up.2     3 ResnetBlocks            512 ->  512, upsample   128² -> 256²
      up.1     3 ResnetBlocks            512 ->  256, upsample   256² -> 512²
      up.0     3 ResnetBlocks            256 ->  128          512²
      norm_out, SiLU, conv_out           128 ->    3          512²

The decoder's `up` list is indexed by resolution level like the encoder's `down`, so `up.3`
runs first. A ResnetBlock is GroupNorm-SiLU-conv3×3 twice plus a shortcut (a 1×1 conv
`nin_shortcut` where the channel count changes). The latent scale factor 0.18215 is not
part of the autoencoder: the pipeline applies it.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ldm.kernels import GroupNorm32, GroupNormSiLU, attention


@dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of the autoencoder; the defaults are SD 1.x's."""
    ch: int = 128                       # channels of the full-resolution level
    ch_mult: tuple = (1, 2, 4, 4)       # channels of level i = ch * ch_mult[i]
    num_res_blocks: int = 2             # per encoder level; the decoder has one more
    z_channels: int = 4                 # latent channels
    in_channels: int = 3
    out_channels: int = 3
    norm_groups: int = 32
    norm_eps: float = 1e-6              # the original's GroupNorm eps (not PyTorch's 1e-5)

    @property
    def downsampling_factor(self):
        """Image side / latent side: one halving between consecutive levels (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def level_channels(self):
        """Output channels of each resolution level, full resolution first."""
        return [self.ch * m for m in self.ch_mult]


VAE_TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, norm_groups=8)


def _group_norm(channels, config, silu):
    """GroupNorm with float32 statistics, followed by SiLU (one module) if `silu`."""
    norm = GroupNormSiLU if silu else GroupNorm32
    return norm(config.norm_groups, channels, eps=config.norm_eps)


class ResnetBlock(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H, W). The original's dropout (0 at inference) is omitted."""

    def __init__(self, in_channels, out_channels, config):
        super().__init__()
        self.norm1 = _group_norm(in_channels, config, silu=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels, config, silu=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # The residual needs matching channels: a 1×1 ("network-in-network") conv only then.
        self.nin_shortcut = (nn.Conv2d(in_channels, out_channels, 1)
                             if in_channels != out_channels else nn.Identity())

    def forward(self, x):
        h = self.conv1(self.norm1(x))  # norm1, norm2: GroupNorm then SiLU
        h = self.conv2(self.norm2(h))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h·w positions: (B, C, h, w) -> (B, C, h, w).

    q, k, v and proj_out are 1×1 convs, as in the checkpoint; the head size is C.
    """

    def __init__(self, channels, config):
        super().__init__()
        self.norm = _group_norm(channels, config, silu=False)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        # q, k, v live only inside this call, so they are freed before proj_out runs: at a
        # 4096² image (N = 262,144 tokens) each is 0.5 GB in float32.
        out = self.attend(*self.qkv(self.norm(x)))  # (B, 1, N, C)
        out = rearrange(out, "b 1 (h w) c -> b c h w", h=x.shape[2])  # (B, 1, N, C) -> (B, C, h, w)
        return x + self.proj_out(out)

    def qkv(self, h):
        """Normalised (B, C, h, w) -> q, k, v, each (B, 1, N, C): one head whose tokens are the
        positions. Contiguous, not the channel-strided views rearrange makes: given those,
        scaled_dot_product_attention on the CPU leaves its fused kernel for the math path,
        which holds all B·N² scores (760 MB at N = 9216 against 23 MB, and 4× slower;
        benchmarks/vae_tiling.py --attention)."""
        return tuple(rearrange(conv(h), "b c h w -> b 1 (h w) c").contiguous()
                     for conv in (self.q, self.k, self.v))

    def attend(self, q, k, v):
        """softmax(q kᵀ / √C) v over (B, 1, N, C) tensors; `ldm.attention.override` replaces it."""
        return attention(q, k, v)  # default scale 1/sqrt(C), the original's int(c)**(-0.5)


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2) by a stride-2 3×3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # The original pads only right and bottom (0, 1, 0, 1), not 1 on every side: output i
        # sees inputs 2i..2i+2. Symmetric padding would shift the grid and break parity.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """(B, C, H, W) -> (B, C, 2H, 2W): nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: ResnetBlocks `block.{j}`, then at most one resampler, registered
    under the original's name (`downsample` in the encoder, `upsample` in the decoder)."""

    def __init__(self, in_channels, out_channels, num_blocks, config, **resampler):
        super().__init__()
        self.block = nn.Sequential(*[ResnetBlock(in_channels if j == 0 else out_channels,
                                                 out_channels, config) for j in range(num_blocks)])
        for name, module in resampler.items():
            self.add_module(name, module)

    def forward(self, x):
        for module in self.children():  # registration order: blocks, then the resampler
            x = module(x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution: (B, C, h, w) -> same."""

    def __init__(self, channels, config):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, config)
        self.attn_1 = AttnBlock(channels, config)
        self.block_2 = ResnetBlock(channels, channels, config)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2·z_channels, h, w): mean and log-variance, stacked."""

    def __init__(self, config):
        super().__init__()
        chs = config.level_channels
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        levels, in_ch = [], config.ch
        for i, out_ch in enumerate(chs):
            resampler = {"downsample": Downsample(out_ch)} if i < len(chs) - 1 else {}
            levels.append(Level(in_ch, out_ch, config.num_res_blocks, config, **resampler))
            in_ch = out_ch
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(in_ch, config)
        self.norm_out = _group_norm(in_ch, config, silu=True)
        self.conv_out = nn.Conv2d(in_ch, 2 * config.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(self.norm_out(h))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_channels, H, W)."""

    def __init__(self, config):
        super().__init__()
        chs = config.level_channels
        in_ch = chs[-1]
        self.conv_in = nn.Conv2d(config.z_channels, in_ch, 3, padding=1)
        self.mid = MidBlock(in_ch, config)
        levels = []
        for i in reversed(range(len(chs))):  # lowest resolution first, as they run
            resampler = {"upsample": Upsample(chs[i])} if i > 0 else {}
            levels.append(Level(in_ch, chs[i], config.num_res_blocks + 1, config, **resampler))
            in_ch = chs[i]
        # Stored by resolution level like the encoder (up.0 = full resolution), as the checkpoint is.
        self.up = nn.ModuleList(reversed(levels))
        self.norm_out = _group_norm(in_ch, config, silu=True)
        self.conv_out = nn.Conv2d(in_ch, config.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(self.norm_out(h))


class DiagonalGaussian:
    """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))), per latent element.

    moments: (B, 2·z_channels, h, w), mean then log-variance along channels.
    """

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)  # each (B, z_channels, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)  # the original's clamp, keeps exp() finite

    @property
    def std(self):
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator=None, noise=None):
        """mean + std · ε: (B, z_channels, h, w). ε is `noise` if given, else drawn from
        `generator` (which must live on the latents' device)."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator,
                                device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean


class AutoencoderKL(nn.Module):
    """encode: images (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over (B, 4, H/8, W/8);
    decode: raw latents (B, 4, h, w) (not multiplied by 0.18215) -> images (B, 3, 8h, 8w)."""

    def __init__(self, config=VAEConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, 1)

    def encode(self, images):
        _check_input("images", images, self.config.in_channels, self.config.downsampling_factor)
        return DiagonalGaussian(self.quant_conv(self.encoder(images)))

    def decode(self, z):
        _check_input("z", z, self.config.z_channels, 1)
        return self.decoder(self.post_quant_conv(z))


def _check_input(name, x, channels, multiple):
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must have shape (B, {channels}, H, W), found {tuple(x.shape)}")
    height, width = x.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(f"{name}: H and W must be multiples of the downsampling factor "
                         f"{multiple}, found {height}×{width}")
