"""The CLIP ViT-L/14 text encoder that conditions Stable Diffusion 1.x.

Token ids -> token + learned position embeddings -> `layers` pre-LayerNorm transformer blocks
(causal self-attention, quick-GELU MLP) -> final LayerNorm. SD 1.x feeds the U-Net's
cross-attention with the whole last hidden state, one 768-vector per token, not CLIP's pooled
and projected embedding. As in CompVis (which passes only `input_ids`), there is a causal mask
and no padding mask: padding tokens attend to the prompt and are used as context.

Module and parameter names are those of the checkpoint (HF-transformers naming, prefix
`cond_stage_model.transformer.text_model.` removed), so weights load without renaming.
The checkpoint's `embeddings.position_ids` buffer (always 0..76) is not registered.

Axis letters: B batch, T tokens, C width, H heads, D head size.
"""
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ldm.kernels import attention


@dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters; the defaults are CLIP ViT-L/14's text tower (123,060,480 parameters)."""
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    eps: float = 1e-5

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    @property
    def head_size(self):
        return self.width // self.heads

    @property
    def mlp_width(self):
        return self.width * self.mlp_ratio


# Vocabulary and positions stay those of the real tokenizer, so real token ids fit.
CLIP_TINY = CLIPTextConfig(width=32, layers=2, heads=2)


class Embeddings(nn.Module):
    """ids (B, T) -> token embedding + position embedding of positions 0..T-1, (B, T, C)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention, (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
            nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x):
        q, k, v = (rearrange(proj(x), "b t (h d) -> b h t d", h=self.heads)  # (B, H, T, D)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, causal=True)  # (B, H, T, D)
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))  # (B, T, C)


class MLP(nn.Module):
    """fc1 -> quick-GELU -> fc2, (B, T, C) -> (B, T, C)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        h = self.fc1(x)
        # OpenAI CLIP was trained with this sigmoid approximation of GELU, not the exact GELU.
        return self.fc2(h * torch.sigmoid(1.702 * h))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln1(x)), then x + mlp(ln2(x)); (B, T, C)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    """The stack of blocks; a module of its own only so the names read `encoder.layers.{i}`."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextModel(nn.Module):
    """Token ids (B, T), T <= max_positions -> last hidden state after final LayerNorm (B, T, C).

    `layers` runs only the first `layers` blocks before the final LayerNorm (None: all of them);
    `layers=cfg.layers - 1` is the "penultimate layer" of SD 2 and of clip-skip 2.
    """

    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, ids, layers=None):
        return self.final_layer_norm(self.hidden_states(ids, layers)[-1])

    def hidden_states(self, ids, layers=None):
        """[embeddings, after block 1, …, after block `layers`] (None: all), each (B, T, C),
        without the final LayerNorm: transformers' `output_hidden_states`. SDXL's context takes
        `hidden_states(ids)[-2]`, the state after 11 of 12 blocks as it is."""
        check_token_ids(ids, self.cfg.max_positions)
        states = [self.embeddings(ids)]  # (B, T, C)
        for layer in self.encoder.layers[:layers]:
            states.append(layer(states[-1]))
        return states


def check_token_ids(ids, max_positions):
    """Raise a ValueError unless ids is a (B, T) integer tensor with T <= max_positions."""
    if ids.ndim != 2:
        raise ValueError(f"ids must have shape (B, T), got rank {ids.ndim}: {tuple(ids.shape)}")
    if ids.is_floating_point():
        raise ValueError(f"ids must be integer token ids, got dtype {ids.dtype}")
    if ids.shape[1] > max_positions:
        raise ValueError(f"ids have {ids.shape[1]} tokens, more than the {max_positions} "
                         "positions the model has")
