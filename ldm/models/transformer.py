"""The U-Net's spatial transformer: self-attention over pixels, cross-attention to the text.

A SpatialTransformer treats every pixel of a (B, C, h, w) feature map as a token:

    out = x + proj_out(blocks(proj_in(norm(x)), context))
    where blocks = [BasicTransformerBlock] × depth run on the (B, N = h·w, C) token sequence
    (the map is flattened to tokens after proj_in for SD 1, before it for SD 2).

    BasicTransformerBlock (pre-norm, one residual per sub-layer):
        x = x + attn1(norm1(x))            self-attention: pixels attend to pixels
        x = x + attn2(norm2(x), context)   cross-attention: pixels attend to the 77 text tokens
        x = x + ff(norm3(x))               GEGLU feed-forward, 4× wide

Names mirror CompVis `ldm/modules/attention.py`, so checkpoint tensors load by name.
SD 1.x projects in and out with 1×1 convolutions; SD 2.x (`use_linear=True`) with Linear
layers applied after flattening. Both compute the same function family; only the weight
shapes differ ((C, C, 1, 1) versus (C, C)).

Axis letters: B batch, C channels, h/w height/width, N pixel tokens (h·w), M context tokens,
H heads, D head size.
"""
from einops import rearrange
from torch import nn

from ldm.kernels import GroupNorm32, attention, geglu


class CrossAttention(nn.Module):
    """Multi-head attention from `x` to `context` (to `x` itself when context is None).

    x: (B, N, query_dim), context: (B, M, context_dim) -> (B, N, query_dim).
    Queries, keys and values have no bias (as in the original); the output projection has.
    The attention itself is `attend`, which `ldm.attention.override` replaces per layer.
    """

    def __init__(self, query_dim, heads, head_dim, context_dim=None, dropout=0.0):
        super().__init__()
        inner_dim = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        # a Sequential only to keep the checkpoint name `to_out.0`
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), dropout_layer(dropout))

    def forward(self, x, context=None):
        context = x if context is None else context
        q = rearrange(self.to_q(x), "b n (h d) -> b h n d", h=self.heads)  # (B, H, N, D)
        k = rearrange(self.to_k(context), "b m (h d) -> b h m d", h=self.heads)  # (B, H, M, D)
        v = rearrange(self.to_v(context), "b m (h d) -> b h m d", h=self.heads)  # (B, H, M, D)
        out = self.attend(q, k, v)  # (B, H, N, D)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # (B, N, query_dim)

    def attend(self, q, k, v):
        """softmax(q kᵀ / √D) v: q (B, H, N, D), k and v (B, H, M, D) -> (B, H, N, D).

        The place to observe or replace this layer's attention: `ldm.attention.override`
        shadows this method on the layers it selects with a function of q, k, v.
        """
        return attention(q, k, v)


class GEGLU(nn.Module):
    """One Linear to 2·dim_out, split in half, value · gelu(gate) (Shazeer 2020, "GLU Variants").

    x: (..., dim_in) -> (..., dim_out).
    """

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        return geglu(self.proj(x))  # value · gelu(gate), value first as in the original


class FeedForward(nn.Module):
    """GEGLU to 4·dim, dropout, Linear back to dim. x: (..., dim) -> (..., dim).

    `net` keeps the original's indices: net.0 = GEGLU, net.1 = Dropout (Identity at p = 0),
    net.2 = Linear.
    """

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), dropout_layer(dropout),
                                 nn.Linear(inner_dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, feed-forward; each pre-LayerNorm with a residual.

    x: (B, N, dim), context: (B, M, context_dim) -> (B, N, dim).
    """

    def __init__(self, dim, heads, head_dim, context_dim, dropout=0.0):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, head_dim, dropout=dropout)  # self-attention
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim, dropout)  # to the text
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on `context`.

    x: (B, C, h, w), context: (B, M, context_dim) -> (B, C, h, w).
    `use_linear` picks SD 2's Linear projections instead of SD 1's 1×1 convolutions.
    """

    def __init__(self, channels, heads, head_dim, context_dim, depth=1, groups=32,
                 use_linear=False, dropout=0.0):
        super().__init__()
        inner_dim = heads * head_dim
        self.use_linear = use_linear
        self.norm = GroupNorm32(groups, channels, eps=1e-6)  # 1e-6 here, 1e-5 in the ResBlocks
        self.proj_in = _projection(channels, inner_dim, use_linear)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, head_dim, context_dim, dropout)
            for _ in range(depth))
        # zero-initialised, as in the original: the block starts as the identity
        self.proj_out = zero_init(_projection(inner_dim, channels, use_linear))

    def forward(self, x, context):
        _, _, h, w = x.shape
        tokens = self._project_in(self.norm(x))  # (B, N, inner_dim)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self._project_out(tokens, h, w)

    def _project_in(self, x):
        if self.use_linear:
            return self.proj_in(rearrange(x, "b c h w -> b (h w) c"))
        return rearrange(self.proj_in(x), "b c h w -> b (h w) c")

    def _project_out(self, tokens, h, w):
        if self.use_linear:
            return rearrange(self.proj_out(tokens), "b (h w) c -> b c h w", h=h, w=w)
        return self.proj_out(rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w))


def _projection(dim_in, dim_out, use_linear):
    """SD 2's Linear on tokens, or SD 1's 1×1 convolution on the map (same maths, other shape)."""
    return nn.Linear(dim_in, dim_out) if use_linear else nn.Conv2d(dim_in, dim_out, 1)


def dropout_layer(p):
    """nn.Dropout(p), or nn.Identity when p = 0 (every SD config): an eval-mode dropout still
    dispatches an operator per call, ~70 per U-Net forward of pure host time. Either keeps
    the layer's index in its nn.Sequential, hence the checkpoint names."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def zero_init(module):
    """Zero a layer's parameters and return it (the original's `zero_module`)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module
