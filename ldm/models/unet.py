"""The Stable Diffusion U-Net: predicts the noise ε in a latent x_t, given t and the text.

    eps = unet(x, t, context)     x (B, 4, h, w), t (B,), context (B, 77, 768) -> (B, 4, h, w)
    eps = unet(x, t, **cond)      cond = {"context": …} (+ "concat" for inpainting models,
                                  + "y" (B, adm_in_channels) for SDXL)

A hand-written copy of CompVis `openaimodel.UNetModel` as SD configures it; parameter names
are the checkpoint's with `model.diffusion_model.` removed. The SD 1.5 blocks, for a 64×64
latent (a 512×512 image). "Res" = ResBlock, "Attn" = SpatialTransformer, channels are
in → out, and each output block first concatenates the skip of the input block named:

    input_blocks   level  res   channels       layers
      0              0     64   4 → 320        conv 3×3
      1, 2           0     64   320 → 320      Res, Attn
      3              0     64→32  320          Downsample (conv stride 2)
      4              1     32   320 → 640      Res (1×1 skip conv), Attn
      5              1     32   640 → 640      Res, Attn
      6              1     32→16  640          Downsample
      7              2     16   640 → 1280     Res (1×1 skip conv), Attn
      8              2     16   1280 → 1280    Res, Attn
      9              2     16→8   1280         Downsample
      10, 11         3      8   1280 → 1280    Res                       (no attention)
    middle_block           8   1280            Res, Attn, Res
    output_blocks  level  res   channels (h + skip → out)     skip from input
      0, 1           3      8   1280 + 1280 → 1280  Res                   11, 10
      2              3    8→16  1280 + 1280 → 1280  Res, Upsample         9
      3, 4           2     16   1280 + 1280 → 1280  Res, Attn             8, 7
      5              2   16→32  1280 + 640 → 1280   Res, Attn, Upsample   6
      6              1     32   1280 + 640 → 640    Res, Attn             5
      7              1     32   640 + 640 → 640     Res, Attn             4
      8              1   32→64  640 + 320 → 640     Res, Attn, Upsample   3
      9              0     64   640 + 320 → 320     Res, Attn             2
      10, 11         0     64   320 + 320 → 320     Res, Attn             1, 0
    out                    64   320 → 4        GroupNormSiLU, conv 3×3

Every ResBlock also receives the timestep embedding (sinusoids → time_embed MLP, 1280 wide);
every Attn receives the text context. SD 2.x changes only the config: 64-dim heads instead
of 8 heads, context 1024, Linear instead of 1×1-conv projections in the transformers.

SDXL changes the config too, plus one input. Three levels (320/640/1280; the refiner four,
384/768/1536/1536), no attention at level 0, and a stack of transformer blocks per
SpatialTransformer that grows with depth (`transformer_depth` per level: base 0/2/10 and 10 in
the middle, refiner 0/4/4/0 and 4). The new input is `y`, a vector of pooled text and image-size
numbers (`ldm.sdxl`) that `label_emb` maps to the time embedding's width and adds to it:
every ResBlock then sees "which timestep, which prompt, which size".

Axis letters: B batch, C channels, h/w latent height/width, M context tokens.
"""
import math
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ldm.kernels import GroupNormSiLU
from ldm.models.transformer import SpatialTransformer, dropout_layer, zero_init


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of the U-Net; the defaults are SD 1.5's (and 1.4's, 1.x's).

    `attention_levels` are the levels (0 = full latent resolution) whose blocks carry a
    SpatialTransformer; CompVis writes the same as `attention_resolutions: [4, 2, 1]`, the
    downsampling factors 2**level. Set exactly one of `num_heads` (SD 1: 8 heads at every
    width) or `head_dim` (SD 2: 64 channels per head, so 5/10/20/20 heads).
    `transformer_depth`: BasicTransformerBlocks per SpatialTransformer, one number for every
    attention level or one per level (SDXL: (0, 2, 10)); `middle_transformer_depth` the middle
    block's (None: the last entry of `transformer_depth`, as in sgm). `adm_in_channels`:
    width of the extra conditioning vector `y` (SDXL's "ADM" input: 2816 base, 2560
    refiner); None for SD 1/2, which have none.
    """
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple = (0, 1, 2)
    num_heads: int | None = 8
    head_dim: int | None = None
    context_dim: int = 768
    transformer_depth: int | tuple = 1
    middle_transformer_depth: int | None = None
    adm_in_channels: int | None = None
    use_linear_proj: bool = False
    norm_groups: int = 32
    dropout: float = 0.0

    def __post_init__(self):
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads and head_dim, got "
                             f"num_heads={self.num_heads}, head_dim={self.head_dim}")

    @property
    def time_embed_dim(self):
        return 4 * self.model_channels

    @property
    def num_levels(self):
        return len(self.channel_mult)

    @property
    def size_multiple(self):
        """h and w must be multiples of this: one halving per level but the last."""
        return 2 ** (self.num_levels - 1)

    def level_channels(self, level):
        return self.model_channels * self.channel_mult[level]

    def depth(self, level):
        """Transformer blocks at `level` (0 where the level has no attention); "middle" for the
        middle block."""
        depths = self.transformer_depth
        if level == "middle":  # sgm's default: the last entry, attention there or not
            if self.middle_transformer_depth is not None:
                return self.middle_transformer_depth
            return depths if isinstance(depths, int) else depths[-1]
        if level not in self.attention_levels:
            return 0
        return depths if isinstance(depths, int) else depths[level]

    def attention_shape(self, channels):
        """(heads, head size) of a transformer on `channels` channels."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.head_dim, self.head_dim


UNET_SD15_INPAINTING = replace(UNetConfig(), in_channels=9)  # latent 4 + mask 1 + masked latent 4
UNET_SD21 = replace(UNetConfig(), num_heads=None, head_dim=64, context_dim=1024,
                    use_linear_proj=True)  # 2.0 / 2.1, 512-base and 768-v alike
# SDXL 1.0 (sgm's sd_xl_base.yaml / sd_xl_refiner.yaml): no attention at full resolution.
UNET_SDXL = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), num_heads=None,
                       head_dim=64, context_dim=2048, transformer_depth=(0, 2, 10),
                       middle_transformer_depth=10, adm_in_channels=2816, use_linear_proj=True)
UNET_SDXL_REFINER = replace(UNET_SDXL, model_channels=384, channel_mult=(1, 2, 4, 4),
                            context_dim=1280, transformer_depth=(0, 4, 4, 0),
                            middle_transformer_depth=4, adm_in_channels=2560)
# Every block type (ResBlock with and without skip conv, transformer, down, up) at toy size.
UNET_TINY = UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                       attention_levels=(1,), num_heads=2, context_dim=32, norm_groups=8)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first.

    t: (B,) -> (B, dim) float32: [cos(t·f_0), …, cos(t·f_{k-1}), sin(t·f_0), …] with
    k = dim // 2 and f_i = max_period^(-i/k), the CompVis order (diffusers' flip_sin_to_cos).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    args = t[:, None].float() * torch.exp(exponent / half)[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)


class IndexedSequential(nn.Sequential):
    """nn.Sequential built from {index: layer}, keeping the original Sequential's indices.

    The original's (GroupNorm32, SiLU) pair is one GroupNormSiLU at the norm's index, so the
    layers after it keep their numbers, hence the checkpoint names (`out_layers.3.weight`), and
    `[i]` is the layer of index i as in the original code (`in_layers[2]` is the conv), not the
    i-th layer. forward runs the layers in order, as any nn.Sequential.
    """

    def __init__(self, layers):
        super().__init__(OrderedDict((str(i), layer) for i, layer in layers.items()))

    def __getitem__(self, index):
        if isinstance(index, int):
            return self._modules[self._name(index)]
        return super().__getitem__(index)  # a slice: an IndexedSequential of the same names

    def __setitem__(self, index, module):
        setattr(self, self._name(index), module)

    def _name(self, index):
        # Only existing indices: a new name would run last, whatever its number.
        if str(index) not in self._modules:
            raise IndexError(f"{index} is none of this Sequential's indices {list(self._modules)}")
        return str(index)


class ResBlock(nn.Module):
    """Two 3×3 convs with the timestep embedding added in between, plus a skip.

    x: (B, C_in, h, w), emb: (B, emb_dim) -> (B, C_out, h, w). The skip is the identity, or a
    1×1 conv when the channel count changes. The Sequentials keep the original's indices
    (IndexedSequential): in_layers = 0 GroupNormSiLU, 2 conv; out_layers = 0 GroupNormSiLU,
    2 dropout, 3 conv.
    """

    def __init__(self, in_channels, out_channels, emb_dim, groups=32, dropout=0.0):
        super().__init__()
        self.in_layers = IndexedSequential({0: GroupNormSiLU(groups, in_channels),
                                            2: conv3x3(in_channels, out_channels)})
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        self.out_layers = IndexedSequential({
            0: GroupNormSiLU(groups, out_channels), 2: dropout_layer(dropout),
            3: zero_init(conv3x3(out_channels, out_channels))})  # zero init: starts as identity
        self.skip_connection = (nn.Identity() if in_channels == out_channels
                                else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C_out) -> (B, C_out, 1, 1)
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Halve h and w with a stride-2 3×3 conv. x: (B, C, h, w) -> (B, C, h/2, w/2)."""

    def __init__(self, channels):
        super().__init__()
        self.op = conv3x3(channels, channels, stride=2)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size`, then a 3×3 conv. (B, C, h, w) -> (B, C, *size).

    `size` is the next skip's (h', w'): 2h × 2w when the latent divides evenly, else one less
    (a 65-wide latent went down as 65 → 33, so 33 must come back to 65, not 66).
    """

    def __init__(self, channels):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNetBlock(nn.Sequential):
    """One row of the block table: layers run in order, each given what it needs.

    x: (B, C, h, w), emb: (B, time_embed_dim), context: (B, M, context_dim) -> (B, C', h', w').
    A ResBlock gets (x, emb), a SpatialTransformer (x, context), an Upsample (x, size), anything
    else x alone (CompVis `TimestepEmbedSequential`).
    """

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """ε-prediction U-Net (see the module docstring for its blocks).

    forward(x, t, context, concat=None, y=None): x (B, C_x, h, w), any h, w (multiples of
    `config.size_multiple` take the exact ×2 path of the original); t (B,) or a scalar, int or
    float; context (B, M, context_dim) -> (B, out_channels, h, w) in x's dtype. `concat`
    (B, in_channels − C_x, h, w): extra input channels stacked after x's (an inpainting model's
    mask and masked-image latents; CompVis's "c_concat"). `y` (B, adm_in_channels): SDXL's
    pooled-text-and-sizes vector, required exactly when the config has `adm_in_channels`.
    The keyword names are the keys of the
    conditioning dict the pipeline, guidance and training pass around: unet(x, t, **cond).
    """

    def __init__(self, config=UNetConfig()):
        super().__init__()
        self.config = c = config
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, c.time_embed_dim), nn.SiLU(),
                                        nn.Linear(c.time_embed_dim, c.time_embed_dim))
        if c.adm_in_channels is not None:
            # a Sequential in a Sequential only for the checkpoint names `label_emb.0.{0,2}`
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(c.adm_in_channels, c.time_embed_dim), nn.SiLU(),
                nn.Linear(c.time_embed_dim, c.time_embed_dim)))
        self.input_blocks, skip_channels = _input_blocks(c)
        ch = skip_channels[-1]
        self.middle_block = UNetBlock(_res_block(c, ch, ch),
                                      _transformer(c, ch, c.depth("middle")),
                                      _res_block(c, ch, ch))
        self.output_blocks = _output_blocks(c, skip_channels)
        self.out = IndexedSequential({0: GroupNormSiLU(c.norm_groups, c.model_channels),
                                      2: zero_init(conv3x3(c.model_channels, c.out_channels))})

    def forward(self, x, t, context, concat=None, y=None):
        if concat is not None:
            if concat.ndim != 4 or concat.shape[0] != x.shape[0] or concat.shape[2:] != x.shape[2:]:
                raise ValueError(f"concat must be ({x.shape[0]}, C, {x.shape[2]}, {x.shape[3]}) "
                                 f"like x, got {tuple(concat.shape)}")
            x = torch.cat([x, concat], dim=1)  # (B, in_channels, h, w)
        t = self._check_inputs(x, t, context, y)
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))  # (B, time_embed_dim)
        skips = []
        for block in self.input_blocks:
            x = block(x, emb, context)
            skips.append(x)
        x = self.middle_block(x, emb, context)
        for block in self.output_blocks:
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, h, w)
            # An Upsample in this block must land on the size of the skip that comes next.
            x = block(x, emb, context, size=skips[-1].shape[-2:] if skips else None)
        return self.out(x)

    def _check_inputs(self, x, t, context, y):
        """Raise a ValueError naming the bad argument; return t as a (B,) tensor."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x (with concat, if given) must be (B, {c.in_channels}, h, w), "
                             f"got {tuple(x.shape)}")
        batch = x.shape[0]
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != c.context_dim:
            raise ValueError(f"context must be ({batch}, M, {c.context_dim}), "
                             f"got {tuple(context.shape)}")
        if c.adm_in_channels is None and y is not None:
            raise ValueError("y was given, but this U-Net takes no vector conditioning "
                             "(adm_in_channels is None)")
        expected_y = (batch, c.adm_in_channels)
        if c.adm_in_channels is not None and (y is None or tuple(y.shape) != expected_y):
            got = "none" if y is None else tuple(y.shape)
            raise ValueError(f"y must be ({batch}, {c.adm_in_channels}) (SDXL's pooled text and "
                             f"size conditioning), got {got}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(batch)  # one timestep for the whole batch
        if t.shape != (batch,):
            raise ValueError(f"t must be a scalar or ({batch},), got {tuple(t.shape)}")
        return t


def _res_block(c, in_channels, out_channels):
    return ResBlock(in_channels, out_channels, c.time_embed_dim, c.norm_groups, c.dropout)


def _transformer(c, channels, depth):
    heads, head_dim = c.attention_shape(channels)
    return SpatialTransformer(channels, heads, head_dim, c.context_dim, depth,
                              c.norm_groups, c.use_linear_proj, c.dropout)


def _input_blocks(c):
    """The encoder half: conv_in, then per level `num_res_blocks` × (Res [+ Attn]) and a
    Downsample (except at the last level). Returns the blocks and each one's output channels,
    which are the channels of the skips the decoder will concatenate."""
    blocks = [UNetBlock(nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1))]
    skip_channels = [c.model_channels]
    ch = c.model_channels
    for level in range(c.num_levels):
        for _ in range(c.num_res_blocks):
            layers = [_res_block(c, ch, c.level_channels(level))]
            ch = c.level_channels(level)
            if c.depth(level):
                layers.append(_transformer(c, ch, c.depth(level)))
            blocks.append(UNetBlock(*layers))
            skip_channels.append(ch)
        if level != c.num_levels - 1:
            blocks.append(UNetBlock(Downsample(ch)))
            skip_channels.append(ch)
    return nn.ModuleList(blocks), skip_channels


def _output_blocks(c, skip_channels):
    """The decoder half, levels in reverse: per level `num_res_blocks + 1` × (Res [+ Attn]),
    each eating one skip (last in, first out); the level's last block ends with an Upsample
    (except at level 0)."""
    skips = list(skip_channels)
    ch = skips[-1]
    blocks = []
    for level in reversed(range(c.num_levels)):
        for i in range(c.num_res_blocks + 1):
            layers = [_res_block(c, ch + skips.pop(), c.level_channels(level))]
            ch = c.level_channels(level)
            if c.depth(level):
                layers.append(_transformer(c, ch, c.depth(level)))
            if level > 0 and i == c.num_res_blocks:
                layers.append(Upsample(ch))
            blocks.append(UNetBlock(*layers))
    return nn.ModuleList(blocks)
