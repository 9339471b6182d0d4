"""Observe or replace the attention of any layer: one function per layer, swapped by name.

Every attention layer of the U-Net (`CrossAttention`: attn1 over the pixels, attn2 to the text)
and of the VAE (`AttnBlock`) computes q, k, v and hands them to its `attend(q, k, v)` method,
whose default is `ldm.kernels.attention`, softmax(q kᵀ / √D) v. `override` shadows that method
on the layers you name with a function of your own, and puts it back when you are done:

    def attend(q, k, v, *, layer):   # q (B, H, N, D), k and v (B, H, M, D) -> (B, H, N, D)
        ...                          # layer: its name, "middle_block.1.transformer_blocks.0.attn2"

    with ldm.attention.override(pipe.unet, attend, layers="attn2"):   # every cross-attention
        pipe.txt2img("a red circle")

Layers are chosen by a glob over their names or a dotted suffix ("attn2", "middle_block.*"), or
by a predicate; `attention_layers(model)` lists the names. The layer still projects in and out
itself; without an override its forward is the default, the same operators, and it traces as
one graph under torch.compile. Three ready-made pieces, each a few lines: `AttentionStore`
records the softmax maps, `reweight` scales one token's column as Prompt-to-Prompt does, and
`attention_probs` is the softmax they share.

Caveats: a U-Net replayed from CUDA graphs (`pipe.cuda_graphs`) runs what was recorded, so turn
them off while overriding. The text encoders' causal attention has no `attend`: their maps are
not spatial, and a replacement would have to keep the causal mask.

tinygrad's per-layer attention function is the model here; diffusers spreads the same idea over
attention-processor classes.

Axis letters: B batch, H heads, N query tokens, M key tokens (77 text tokens in attn2), D head size.
"""
import functools
import math
from fnmatch import fnmatchcase

import torch


def attention_layers(model, layers=None):
    """{name: module} of the attention layers of `model` that `layers` selects, in model order.

    An attention layer is any module with an `attend(q, k, v)` method. `layers`: None (all),
    a name pattern, or a predicate on names. A pattern is a glob over the whole name or over a
    dotted suffix of it: "attn2" selects every cross-attention, "middle_block.*" the layers of
    the middle block, "output_blocks.[34].*attn2" two blocks' cross-attention.
    Raises ValueError, with some of the names, when nothing matches.
    """
    found = {name: m for name, m in model.named_modules() if callable(getattr(m, "attend", None))}
    if layers is None:
        return found
    selects = layers if callable(layers) else (
        lambda name: fnmatchcase(name, layers) or fnmatchcase(name, "*." + layers))
    chosen = {name: m for name, m in found.items() if selects(name)}
    if not chosen:
        examples = ", ".join(list(found)[:4]) + (", …" if len(found) > 4 else "")
        raise ValueError(f"no attention layer of {type(model).__name__} matches {layers!r}; "
                         f"it has {len(found)}, named like: {examples or '(none)'}")
    return chosen


class Override:
    """Handle of an `override`: leave its `with` block, or call `remove()`, to undo it."""

    def __init__(self, undo):
        self._undo = undo  # [(module, its own `attend` before, or None)]

    def remove(self):
        for module, previous in self._undo:
            if previous is None:
                del module.attend  # uncovers the class's method: the default attention
            else:
                module.attend = previous
        self._undo = []

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.remove()


def override(model, fn, layers=None):
    """Make the selected attention layers of `model` call `fn(q, k, v, layer=name)`.

    model: any module (a U-Net, a VAE, the whole pipeline); layers: as in `attention_layers`.
    fn gets q (B, H, N, D), k and v (B, H, M, D) and returns (B, H, N, D); `layer` is the
    layer's name within `model`. Returns an `Override`: use it in a `with` statement (undone on
    exit, exceptions included) or call its `remove()`. Overrides nest; undo them in reverse.
    """
    undo = []
    for name, module in attention_layers(model, layers).items():
        undo.append((module, module.__dict__.get("attend")))
        # An instance attribute shadows the class's `attend` method for this layer only.
        module.attend = functools.partial(fn, layer=name)
    return Override(undo)


def attention_probs(q, k, scale=None):
    """softmax(q kᵀ · scale) over the keys, in float32 (float64 if given float64).

    q: (B, H, N, D), k: (B, H, M, D) -> (B, H, N, M); `scale` defaults to 1/√D. Row n is how
    query n spreads its attention over the M keys: non-negative, summing to 1.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp16 maps would round the small weights
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return (q.to(dtype) @ k.to(dtype).transpose(-1, -2) * scale).softmax(dim=-1)


class AttentionStore:
    """An attention function that records its softmax maps, per layer and call, on the CPU.

        store = AttentionStore(average_heads=True)
        with override(pipe.unet, store, layers="attn2"):
            pipe.txt2img("a red circle")
        store.maps["middle_block.1.transformer_blocks.0.attn2"]  # [(B, N, M) per call]

    maps[name] lists one (B, H, N, M) tensor per call of that layer, or (B, N, M) averaged over
    heads with `average_heads` (H times less memory: SD 1.5's attn2 maps at 64×64 are 2.5 M
    numbers per head and image). With a sampler, call i of a layer is U-Net evaluation i; under
    classifier-free guidance its batch is [unconditional; prompt], or the prompt's alone at the
    steps a `cfg_interval` leaves unguided (the shipped model's below t = 200), so the prompt's
    maps are the last B of every call. The layer's output is
    probs @ v, the default attention up to float rounding.
    """

    def __init__(self, average_heads=False):
        self.average_heads = average_heads
        self.maps = {}

    def __call__(self, q, k, v, *, layer):
        probs = attention_probs(q, k)  # (B, H, N, M)
        kept = probs.mean(dim=1) if self.average_heads else probs
        self.maps.setdefault(layer, []).append(kept.cpu())
        return (probs @ v.to(probs.dtype)).to(q.dtype)


def reweight(tokens, factor):
    """An attention function that scales the attention to some keys (Prompt-to-Prompt).

    Hertz et al. 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control", §3.2:
    multiplying the cross-attention column of a word by c (no renormalisation) strengthens
    (c > 1) or weakens (c < 1) its effect on the image. tokens: an index or a list of indices
    among the M keys, e.g. `ldm.tokenizer` positions of the word in the 77; install on attn2.
    """
    def attend(q, k, v, *, layer):
        probs = attention_probs(q, k)  # (B, H, N, M)
        probs[..., tokens] *= factor  # the columns of the chosen keys
        return (probs @ v.to(probs.dtype)).to(q.dtype)
    return attend
