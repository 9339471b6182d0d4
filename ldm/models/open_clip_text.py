"""The OpenCLIP text encoder: ViT-H/14 conditions Stable Diffusion 2.x, ViT-bigG/14 SDXL.

Token ids -> token + learned position embeddings -> pre-LayerNorm transformer blocks (causal
self-attention, exact-GELU MLP) -> final LayerNorm. SD 2 (CompVis/Stability
`FrozenOpenCLIPEmbedder`, layer="penultimate") runs only the first 23 of the 24 blocks, then
`ln_final`: the "penultimate layer". SD 2 does not use CLIP's pooled, projected embedding; SDXL
does (`pooled`), beside the penultimate state without `ln_final` (`hidden_states`).
`logit_scale` is kept only because the checkpoint stores it.

There is a causal mask and no padding mask, as in the original. open_clip's tokenizer pads with
id 0 (not with end-of-text as SD 1's does); the padding tokens attend to the prompt and are used
as context like any other token.

Module and parameter names are those of the checkpoint (open_clip naming, prefix
`cond_stage_model.model.` removed), so weights load without renaming. Attention keeps
`nn.MultiheadAttention`'s names: q, k, v stacked in `in_proj_weight`, then `out_proj`.

Axis letters: B batch, T tokens, C width, H heads, D head size.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.kernels import attention
from ldm.models.clip_text import check_token_ids


@dataclass(frozen=True)
class OpenCLIPTextConfig:
    """Hyper-parameters; the defaults are OpenCLIP ViT-H/14's text tower (354,032,641
    parameters) as SD 2 uses it."""
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: int = 4
    eps: float = 1e-5
    skip_last: int = 1  # blocks left out at the end: 1 is SD 2's penultimate layer

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0 <= self.skip_last < self.layers:
            raise ValueError(f"skip_last must be in [0, {self.layers}), got {self.skip_last}")

    @property
    def head_size(self):
        return self.width // self.heads

    @property
    def mlp_width(self):
        return self.width * self.mlp_ratio


# ViT-bigG/14's text tower, SDXL's second encoder (694,659,841 parameters).
OPEN_CLIP_BIGG = OpenCLIPTextConfig(width=1280, layers=32, heads=20)
# Vocabulary and positions stay those of the real tokenizer, so real token ids fit.
OPEN_CLIP_TINY = OpenCLIPTextConfig(width=32, layers=3, heads=2)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention, (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))  # q; k; v
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # nn.MultiheadAttention's initialisation

    def forward(self, x):
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C)
        q, k, v = (rearrange(t, "b t (h d) -> b h t d", h=self.heads)  # (B, H, T, D)
                   for t in qkv.chunk(3, dim=-1))
        out = attention(q, k, v, causal=True)  # (B, H, T, D)
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))  # (B, T, C)


class MLP(nn.Module):
    """c_fc -> GELU -> c_proj, (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.gelu = nn.GELU()  # the exact (erf) GELU: OpenCLIP does not use OpenAI's quick-GELU
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); (B, T, C)."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The stack of blocks; a module only so the names read `transformer.resblocks.{i}`."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """Token ids (B, T), T <= max_positions -> hidden state after `ln_final` (B, T, C).

    `layers` runs only the first `layers` blocks before `ln_final`; None runs
    `cfg.layers - cfg.skip_last` of them (SD 2: 23 of 24). `layers=cfg.layers` is the last layer.
    """

    def __init__(self, cfg: OpenCLIPTextConfig = OpenCLIPTextConfig()):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        # open_clip's initialisations; the last two parameters are only stored, never used here
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.max_positions, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.text_projection = nn.Parameter(torch.randn(cfg.width, cfg.width) / cfg.width ** 0.5)
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))

    def forward(self, ids, layers=None):
        layers = self.cfg.layers - self.cfg.skip_last if layers is None else layers
        return self.ln_final(self.hidden_states(ids, layers)[-1])

    def hidden_states(self, ids, layers=None):
        """[embeddings, after block 1, …, after block `layers`] (None: all), each (B, T, C),
        without `ln_final`. SDXL's context takes `hidden_states(ids)[-2]` of ViT-bigG, the
        state after 31 of 32 blocks as it is (SD 2 normalises its penultimate state)."""
        check_token_ids(ids, self.cfg.max_positions)
        states = [self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]]
        for block in self.transformer.resblocks[:layers]:
            states.append(block(states[-1]))
        return states

    def pooled(self, last_state, ids):
        """CLIP's text embedding: the last hidden state (B, T, C), `ln_final` applied here, at
        each prompt's end-of-text token (the largest id, 49407), times `text_projection`
        -> (B, C). SDXL conditions on it through the U-Net's `y`."""
        end = ids.argmax(dim=-1)  # (B,)
        final = self.ln_final(last_state)[torch.arange(len(ids), device=ids.device), end]
        return final @ self.text_projection
