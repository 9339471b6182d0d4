"""LoRA files as people bring them (kohya/A1111, diffusers/PEFT, LyCORIS), merged into the weights.

A LoRA holds, for some Linear or Conv2d weights W (out, in[, kh, kw]), a low-rank update

    ΔW = up · down · alpha / rank      up (out, r[, 1, 1]), down (r, in[, kh, kw]), rank r

(up · down: the flattened matrices (out, r) @ (r, in·kh·kw), reshaped to W's shape; kohya's
LoRAModule.merge_to, A1111's rebuild_conventional). A file without alpha means alpha = rank.
Loading with a multiplier m (A1111's `<lora:name:m>`) sets W ← W + m · ΔW; several LoRAs add up.
LyCORIS spells ΔW otherwise: LoHa (w1_a w1_b) ⊙ (w2_a w2_b), LoKr kron(w1, w2) (`delta`).

Merged, generating costs nothing extra. Undoing is exact: the first time a LoRA touches a weight
its original is copied to the CPU, and every change recomputes the weight from that copy as
fp32(original) + Σ m_i · ΔW_i, rounded once to the weight's dtype; a weight no LoRA touches any
more gets its original back bit for bit. So `unload_lora` of one LoRA leaves exactly what loading
only the others (in their order) would, and `unload_loras` restores the model bit-identically.

Files name layers by the library that trained them, never by ours (the original CompVis names).
SD 1.5's first self-attention query, ours `input_blocks.1.1.transformer_blocks.0.attn1.to_q`:

    kohya, SD 1/2   lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight
    kohya, SDXL     lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.…  (original paths)
    kohya, text     lora_te_text_model_encoder_layers_0_self_attn_q_proj.…  (SDXL: lora_te1_/te2_)
    diffusers/PEFT  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight

(kohya: .lora_down.weight, .lora_up.weight, .alpha; PEFT: lora_A = down, lora_B = up.)

kohya writes a module path with "." replaced by "_", which cannot be undone by string edits
(to_q, ff_net_0_proj), so names are never parsed: `original_name_map` generates every name each
style gives each of our layers, from the networks themselves, and files are looked up in it.
SD 1/2 kohya files use diffusers' U-Net paths (kohya trains them on a diffusers-layout U-Net),
SDXL ones the original paths; both are accepted for every model, as ComfyUI and A1111 do.
Text-encoder names are transformers' CLIP paths for every encoder, also for SD 2's and SDXL's
OpenCLIP, whose fused attention weight `in_proj_weight` (q; k; v stacked) takes q_proj, k_proj
and v_proj updates in its three thirds of rows.

Axis letters: r rank; out/in a weight's output/input features.
"""
import contextlib
import hashlib
import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ldm.checkpoint import STATE_DICT, open_checkpoint, open_state_dict
from ldm.models.unet import Downsample, ResBlock, Upsample
from ldm.models.transformer import SpatialTransformer


class LoRAError(ValueError):
    """A LoRA file that cannot be applied to this model; the message names the file."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")


# ------------------------------------------------------------------------------------------ names
@dataclass(frozen=True)
class Target:
    """The weight one file module updates: `network` ("unet", "text_encoder", "text_encoder_2"),
    `param` its name there, and `rows` (start, stop) when it is one third of a fused q; k; v."""
    network: str
    param: str
    rows: tuple | None = None

    def __str__(self):
        rows = f"[{self.rows[0]}:{self.rows[1]}]" if self.rows else ""
        return f"{self.network}.{self.param}{rows}"


# diffusers groups the U-Net's blocks by level (down_blocks.{level}, up_blocks.{level counted
# from the bottom}); inside a ResBlock and a down/up-sampler it names the layers otherwise. The
# transformers' inner names (proj_in, transformer_blocks.0.attn1.to_q, ff.net.0.proj) are the same.
UNET_TOP_NAMES = {"time_embed.0": "time_embedding.linear_1",
                  "time_embed.2": "time_embedding.linear_2",
                  "label_emb.0.0": "add_embedding.linear_1",  # SDXL
                  "label_emb.0.2": "add_embedding.linear_2",
                  "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2",
                "skip_connection": "conv_shortcut"}
SAMPLER_NAMES = {"op": "conv", "conv": "conv"}  # Downsample.op, Upsample.conv
# OpenCLIP's layers under transformers' CLIP names (kohya trains SD 2 with transformers' CLIP).
OPEN_CLIP_NAMES = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
                   "mlp.c_proj": "mlp.fc2"}
QKV = ("q_proj", "k_proj", "v_proj")  # the thirds of in_proj_weight, in order
# kohya's prefix of each network (SDXL's first text encoder: lora_te1).
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}


def original_name_map(networks, style="kohya"):
    """{the module name a `style` file uses: the Target (our weight) it updates}, one row per
    layer a LoRA can update, in the networks' order: the names a file of that style is written
    with. style: "kohya" (`lora_unet_…`; SD 1/2 U-Nets under diffusers' paths, SDXL under the
    original ones, chosen by whether `networks` has a "text_encoder_2") or "peft" (`unet.…`,
    diffusers' paths). networks: {"unet": UNet, "text_encoder": …, …} (a "vae" is skipped).
    """
    if style not in ("kohya", "peft"):
        raise ValueError(f"style must be 'kohya' or 'peft', got {style!r}")
    sdxl = "text_encoder_2" in networks
    rows = {}
    for target, names in _layer_names(networks).items():
        network = target.network
        if style == "peft":
            rows[f"{network}.{names['diffusers']}"] = target
        else:
            path = names["original"] if network == "unet" and sdxl else names["diffusers"]
            prefix = "lora_te1" if network == "text_encoder" and sdxl else KOHYA_PREFIXES[network]
            rows[_kohya(prefix, path)] = target
    return rows


def accepted_names(networks):
    """{every module name a file may use: Target}: both styles, both U-Net path conventions,
    lora_te/lora_te1, and text paths with and without transformers' `text_model.` level."""
    names = {}
    for target, paths in _layer_names(networks).items():
        network, spellings = target.network, set(paths.values())
        if network != "unet":
            spellings |= {p.removeprefix("text_model.") for p in spellings}
        prefixes = (["lora_te", "lora_te1"] if network == "text_encoder"
                    else [KOHYA_PREFIXES[network]])
        for path in spellings:
            names[f"{network}.{path}"] = target
            names.update({_kohya(prefix, path): target for prefix in prefixes})
    return names


def _kohya(prefix, path):
    return f"{prefix}_{path.replace('.', '_')}"


def _layer_names(networks):
    """{Target: {"original": our module path, "diffusers": diffusers'/transformers' path}} for
    every Linear and Conv2d of the U-Net and text encoders, and each third of OpenCLIP's fused
    in_proj_weight."""
    rows = {}
    for network, module in networks.items():
        if network == "unet":
            rows.update(_unet_names(module))
        elif network.startswith("text_encoder"):
            rows.update(_text_names(network, module))
    return rows


def _unet_names(unet):
    blocks = _unet_block_names(unet)
    rows = {}
    for name, layer in unet.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            theirs = UNET_TOP_NAMES.get(name) or _in_block(name, blocks)
            rows[Target("unet", f"{name}.weight")] = {"original": name, "diffusers": theirs}
    return rows


def _in_block(name, blocks):
    """A layer's diffusers path from its block's (`blocks`) and the rest of its name."""
    parts = name.split(".")
    for cut in (3, 2):  # input_blocks.1.0 | middle_block.0
        prefix, rest = ".".join(parts[:cut]), ".".join(parts[cut:])
        if prefix in blocks:
            theirs, renames = blocks[prefix]
            for ours, new in renames.items():
                if rest == ours or rest.startswith(ours + "."):
                    rest = new + rest[len(ours):]
                    break
            return f"{theirs}.{rest}"
    raise ValueError(f"U-Net layer {name} is in no block of the U-Net's structure")


def _unet_block_names(unet):
    """{our layer prefix: (diffusers prefix, inner renames)}, read off the blocks themselves:
    "input_blocks.1.1" -> "down_blocks.0.attentions.0", "input_blocks.3.0" ->
    "down_blocks.0.downsamplers.0", "middle_block.2" -> "mid_block.resnets.1", … Within a level
    diffusers counts the ResBlocks and transformers (j); a block that down- or upsamples ends
    the level."""
    names = {}
    for ours, theirs, first in (("input_blocks", "down_blocks", 1),
                                ("output_blocks", "up_blocks", 0)):
        blocks = getattr(unet, ours)
        level, j = 0, 0
        for n in range(first, len(blocks)):  # input_blocks.0 is conv_in (UNET_TOP_NAMES)
            samples = False
            for k, layer in enumerate(blocks[n]):
                kind, renames = _layer_kind(layer)
                samples |= kind.endswith("samplers")
                where = f"{kind}.0" if kind.endswith("samplers") else f"{kind}.{j}"
                names[f"{ours}.{n}.{k}"] = (f"{theirs}.{level}.{where}", renames)
            level, j = (level + 1, 0) if samples else (level, j + 1)
    counts = {}
    for k, layer in enumerate(unet.middle_block):
        kind, renames = _layer_kind(layer)
        names[f"middle_block.{k}"] = (f"mid_block.{kind}.{counts.get(kind, 0)}", renames)
        counts[kind] = counts.get(kind, 0) + 1
    return names


def _layer_kind(layer):
    """diffusers' list for a block layer, and the inner renames of its layers."""
    if isinstance(layer, ResBlock):
        return "resnets", RESNET_NAMES
    if isinstance(layer, SpatialTransformer):
        return "attentions", {}
    if isinstance(layer, Downsample):
        return "downsamplers", SAMPLER_NAMES
    if isinstance(layer, Upsample):
        return "upsamplers", SAMPLER_NAMES
    raise ValueError(f"no diffusers name for a U-Net block layer of type {type(layer).__name__}")


def _text_names(network, model):
    """CLIP (ours are transformers' names less `text_model.`) or OpenCLIP (renamed; in_proj
    split in thirds)."""
    rows = {}
    open_clip = hasattr(model, "transformer")
    for name, layer in model.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            theirs = _open_clip_name(name) if open_clip else name
            if theirs is not None:
                rows[Target(network, f"{name}.weight")] = {
                    "original": name, "diffusers": f"text_model.{theirs}"}
        if open_clip and hasattr(layer, "in_proj_weight"):  # transformer.resblocks.{i}.attn
            i = name.split(".")[2]
            width = layer.in_proj_weight.shape[1]
            for third, proj in enumerate(QKV):
                third_rows = (third * width, (third + 1) * width)
                target = Target(network, f"{name}.in_proj_weight", third_rows)
                rows[target] = {"original": f"{name}.{proj}",
                                "diffusers": f"text_model.encoder.layers.{i}.self_attn.{proj}"}
    return rows


def _open_clip_name(name):
    """transformer.resblocks.{i}.<layer> -> encoder.layers.{i}.<transformers' layer>; None for
    layers transformers' CLIP has not (none of the default LoRA targets)."""
    match = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", name)
    if match and match.group(2) in OPEN_CLIP_NAMES:
        return f"encoder.layers.{match.group(1)}.{OPEN_CLIP_NAMES[match.group(2)]}"
    return None


# ---------------------------------------------------------------------------------- reading files
# How files spell the parts of one layer's update: (key ending, part). kohya/A1111 and LyCORIS,
# PEFT (lora_A = down, lora_B = up), diffusers' older LoRA layers and attention processors.
KEY_ENDINGS = [
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "old_down"), ("_lora.up.weight", "old_up"),
    (".alpha", "alpha"), (".scale", "scale"),
    *((f".hada_{p}", f"hada_{p}") for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")),
    *((f".lokr_{p}", f"lokr_{p}") for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")),
    (".dora_scale", "dora_scale"),
]
# The parts that make each kind of update; a module with none of these is not understood.
KINDS = {"lora": {"down", "up"}, "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
         "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"}}
# diffusers' old attention-processor names (`attn1.processor.to_out_lora.up.weight`, text
# `self_attn.to_q_lora…`) as module paths: (pattern, replacement).
OLD_DIFFUSERS_NAMES = [(r"\.processor\.", "."), (r"(attn[12])\.to_out$", r"\1.to_out.0"),
                       (r"self_attn\.to_([qkv])$", r"self_attn.\1_proj"),
                       (r"self_attn\.to_out$", "self_attn.out_proj")]
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoraConfig kwargs, "unet.lora_alpha", …


@dataclass
class Adapter:
    """One layer's update as stored: `kind` "lora", "loha" or "lokr", its `tensors` by part
    ("down", "up", "alpha", "hada_w1_a", …) and the `alpha` PEFT metadata gives (else None)."""
    kind: str
    tensors: dict
    alpha: float | None = None
    rslora: bool = False  # PEFT's rank-stabilised scaling alpha / √r

    def delta(self):
        """ΔW (fp32), alpha / rank applied, in the layer's natural shape: (out, in) for a
        Linear, (out, in, kh, kw) for a Conv2d (LoRA, LoHa, LoKr)."""
        return DELTAS[self.kind](self)

    def out_in(self):
        """(out features, in features·kh·kw) without computing ΔW, for shape checks."""
        return SHAPES[self.kind](self.tensors)


@dataclass
class LoRAFile:
    """What `read` found: {module name as the file spells it: Adapter}, the file's metadata."""
    path: Path | str
    adapters: dict
    metadata: dict = field(default_factory=dict)


def read(path):
    """Parse a LoRA file (.safetensors, or a .pt/.ckpt torch zip read with weights_only), or a
    dict {key: tensor} already in memory, into a LoRAFile. Raises FileNotFoundError,
    CheckpointError (not a readable file) or LoRAError (keys that are no LoRA part, incomplete
    layers), naming the file."""
    ckpt = open_state_dict(path) if isinstance(path, Mapping) else open_checkpoint(path)
    path = ckpt.path
    metadata = _safetensors_metadata(ckpt.path)
    parts = {}
    unknown = []
    for key in ckpt.shapes:
        module, part = _split_key(key)
        if module is None:
            unknown.append(key)
        else:
            parts.setdefault(module, {})[part] = ckpt.read(key)
    if unknown:
        raise LoRAError(path, f"{len(unknown)} key(s) are no LoRA part this reader knows: "
                              f"{_listing(unknown)}")
    if not parts:
        raise LoRAError(path, "holds no tensors")
    peft = _peft_config(metadata)
    return LoRAFile(path, {module: _adapter(path, module, tensors, peft)
                           for module, tensors in parts.items()}, metadata)


def _split_key(key):
    for ending, part in KEY_ENDINGS:
        if key.endswith(ending):
            module = key[: -len(ending)]
            if part.startswith("old_"):  # attn1.processor.to_q_lora.down.weight
                part = part.removeprefix("old_")
                for pattern, new in OLD_DIFFUSERS_NAMES:
                    module = re.sub(pattern, new, module)
            return module, part
    return None, None


def _safetensors_metadata(path):
    if path == STATE_DICT:
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # a .pt file: no metadata
        return {}


def _peft_config(metadata):
    """diffusers' saved LoraConfig kwargs, {"unet": {"lora_alpha": 8, "r": 4, …}, …}."""
    try:
        flat = json.loads(metadata.get(PEFT_METADATA_KEY, "{}"))
    except ValueError:
        return {}
    config = {}
    for key, value in flat.items():
        network, _, name = key.partition(".")
        config.setdefault(network, {})[name] = value
    return config


def _adapter(path, module, tensors, peft):
    for part, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise LoRAError(path, f"{module}'s {part} holds {tensor.dtype} values that are not "
                                  "all finite numbers")
    if "dora_scale" in tensors:
        raise LoRAError(path, f"{module} is a DoRA layer (dora_scale), which ldm does not merge")
    kinds = [kind for kind, needs in KINDS.items() if needs & tensors.keys()]
    if len(kinds) != 1:
        raise LoRAError(path, f"{module} has parts {sorted(tensors)}, which make no LoRA, LoHa "
                              "or LoKr layer")
    adapter = Adapter(kinds[0], tensors)
    missing = _missing_parts(adapter)
    if missing:
        raise LoRAError(path, f"{module} lacks {', '.join(missing)}")
    network, _, rest = module.partition(".")
    if network in peft and "alpha" not in tensors:
        adapter.alpha, adapter.rslora = _peft_alpha(peft[network], rest)
    return adapter


def _missing_parts(adapter):
    t = adapter.tensors
    if adapter.kind == "lokr":
        return [f"lokr_{w} (or lokr_{w}_a and _b)" for w in ("w1", "w2")
                if f"lokr_{w}" not in t and not {f"lokr_{w}_a", f"lokr_{w}_b"} <= t.keys()]
    return sorted(KINDS[adapter.kind] - t.keys())


def _peft_alpha(config, module):
    """PEFT's alpha for one module: alpha_pattern's entry whose pattern ends its name, else
    lora_alpha (PEFT's get_pattern_key); None where the config has none."""
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
    return alpha, bool(config.get("use_rslora"))


# ----------------------------------------------------------------------------------- the maths
def _scale(adapter, rank):
    """alpha / rank; a file's own `scale` wins (A1111), no alpha (or 0) means alpha = rank."""
    t = adapter.tensors
    if "scale" in t:
        return float(t["scale"])
    alpha = float(t["alpha"]) if "alpha" in t else adapter.alpha
    if not alpha:
        return 1.0
    return alpha / math.sqrt(rank) if adapter.rslora else alpha / rank


def _lora_delta(adapter):
    t = {k: v.float() for k, v in adapter.tensors.items()}
    up, down = t["up"].flatten(1), t["down"].flatten(1)  # (out, r), (r, in·kh·kw)
    if "mid" in t:  # LoCon's Tucker core (r, r, kh, kw) between 1×1 up and down
        delta = torch.einsum("i n, n m k l, m j -> i j k l", up, t["mid"], down)
    else:
        delta = (up @ down).reshape(up.shape[0], *t["down"].shape[1:])
    return delta * _scale(adapter, t["down"].shape[0])


def _loha_delta(adapter):
    """LoHa (LyCORIS loha.py): (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r, r = w1_b's rows; with
    Tucker cores t1, t2 (r, r, kh, kw) each factor is einsum(t, w_b, w_a) (w_a then (r, out))."""
    t = {k: v.float() for k, v in adapter.tensors.items()}
    factors = []
    for i in ("1", "2"):
        a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
        core = t.get(f"hada_t{i}")
        factors.append(a @ b if core is None else
                       torch.einsum("i j k l, j r, i p -> p r k l", core, b, a))
    return factors[0] * factors[1] * _scale(adapter, t["hada_w1_b"].shape[0])


def _lokr_delta(adapter):
    """LoKr (LyCORIS lokr.py): kron(w1, w2) · scale; either factor stored whole or as a_ @ b_
    (w2 also with a Tucker core t2). scale = alpha / r with r the rank of the factored one, 1
    when both are whole (LyCORIS, A1111, ComfyUI and sd.cpp agree)."""
    t = {k: v.float() for k, v in adapter.tensors.items()}
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", t["lokr_t2"], t["lokr_w2_b"],
                          t["lokr_w2_a"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if w2.ndim == 4:  # a convolution: kron over (out, in), the kernel from w2
        w1 = w1[:, :, None, None]
    factored = t.get("lokr_w1_b", t.get("lokr_w2_b"))
    scale = 1.0 if factored is None else _scale(adapter, factored.shape[0])
    return torch.kron(w1, w2.contiguous()) * scale  # (kron views its inputs)


def _lora_shape(t):
    kernel = t["mid"][0, 0].numel() if "mid" in t else 1  # the Tucker core holds the kernel
    return t["up"].shape[0], t["down"][0].numel() * kernel


def _loha_shape(t):
    if "hada_t1" in t:
        return t["hada_w1_a"].shape[1], t["hada_w1_b"].shape[1] * t["hada_t1"][0, 0].numel()
    return t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1]


def _lokr_shape(t):
    def dims(w):
        if f"lokr_{w}" in t:
            m = t[f"lokr_{w}"]
            return m.shape[0], m[0].numel()
        if w == "w2" and "lokr_t2" in t:
            return t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1] * t["lokr_t2"][0, 0].numel()
        return t[f"lokr_{w}_a"].shape[0], t[f"lokr_{w}_b"][0].numel()
    (o1, i1), (o2, i2) = dims("w1"), dims("w2")
    return o1 * o2, i1 * i2


DELTAS = {"lora": _lora_delta, "loha": _loha_delta, "lokr": _lokr_delta}
SHAPES = {"lora": _lora_shape, "loha": _loha_shape, "lokr": _lokr_shape}


# ------------------------------------------------------------------------------------- merging
@dataclass
class Loaded:
    """One LoRA merged into a pipe: its `name` (the file's stem, A1111's), `path`, the
    `multiplier`s of the U-Net and of the text encoders, A1111's `hash` (the "Lora hashes"
    infotext: sha256 of a .safetensors' data after its header, of a whole .pt; 12 hex digits)
    and {Target: Adapter} it updates."""
    name: str
    path: Path | str
    multiplier: float
    text_multiplier: float
    hash: str
    targets: dict = field(repr=False, default_factory=dict)

    def multiplier_of(self, target):
        return self.multiplier if target.network == "unet" else self.text_multiplier


@dataclass
class _State:
    """What is merged into a pipe: the LoRAs in load order and the original of every weight any
    of them touched (on the CPU, in the weight's dtype)."""
    loaded: list = field(default_factory=list)
    originals: dict = field(default_factory=dict)  # (network, param) -> tensor


def load_lora(pipe, path, multiplier=1.0, *, text_multiplier=None, strict=True):
    """Merge the LoRA file at `path` into `pipe`'s weights, with `multiplier` (A1111's weight)
    for the U-Net and `text_multiplier` (default: the same) for the text encoders. Several
    LoRAs add up; `unload_lora` / `unload_loras` undo exactly (module docstring).

    Nothing is changed unless the whole file applies: a module that matches no layer of this
    model is an error listing them (strict=False: a warning, and those modules are skipped); an
    update whose shape is not its layer's, an SDXL LoRA on SD 1.5 say, is an error naming the
    module and both shapes. Returns the `Loaded` record (name, multipliers, A1111 hash).
    """
    multiplier = _finite("multiplier", multiplier)
    text_multiplier = multiplier if text_multiplier is None else _finite("text_multiplier",
                                                                         text_multiplier)
    lora = read(path)
    networks = _networks(pipe)
    targets, modules = _resolve(lora, networks, strict)
    _check_shapes(lora.path, targets, modules, networks)
    loaded = Loaded(Path(str(lora.path)).stem, lora.path, multiplier, text_multiplier,
                    file_hash(lora.path), targets)
    state = _state(pipe)
    state.loaded.append(loaded)
    _update(state, networks, {(t.network, t.param) for t in targets})
    return loaded


def unload_lora(pipe, loaded):
    """Take one LoRA (the record `load_lora` returned) out again; the others stay."""
    state = _state(pipe)
    if not any(item is loaded for item in state.loaded):
        raise ValueError(f"LoRA {loaded.name} is not loaded in this pipe")
    state.loaded = [item for item in state.loaded if item is not loaded]
    _update(state, _networks(pipe), {(t.network, t.param) for t in loaded.targets})


def unload_loras(pipe):
    """Take every LoRA out: each touched weight gets its original values back, bit for bit."""
    state = _state(pipe)
    state.loaded = []
    _update(state, _networks(pipe), set(state.originals))


def loaded_loras(pipe):
    """The `Loaded` records of the LoRAs merged into `pipe`, in load order."""
    return list(_state(pipe).loaded)


def _networks(pipe):
    return pipe.networks()  # {"unet": …, "text_encoder": …, …}


def _state(pipe):
    # Kept on the pipe itself, so that it lives and dies with the weights it describes.
    if not isinstance(getattr(pipe, "_lora_state", None), _State):
        pipe._lora_state = _State()
    return pipe._lora_state


def _update(state, networks, params):
    """Recompute each (network, param) in `params` from its original plus every loaded LoRA's
    updates, in fp32, rounded once; a weight no LoRA touches gets the original back as it was."""
    params_of = {name: dict(module.named_parameters()) for name, module in networks.items()}
    for network, param in sorted(params):
        weight = params_of[network][param]
        key = (network, param)
        if key not in state.originals:
            state.originals[key] = weight.detach().to("cpu", copy=True)
        original = state.originals[key]
        updates = [(lora.multiplier_of(t), t, a) for lora in state.loaded
                   for t, a in lora.targets.items() if (t.network, t.param) == key]
        with torch.no_grad():
            if not updates:
                weight.copy_(original)
                del state.originals[key]
                continue
            total = original.to(weight.device, torch.float32, copy=True)
            for multiplier, target, adapter in updates:
                rows = slice(*target.rows) if target.rows else slice(None)
                delta = adapter.delta().to(weight.device)
                total[rows] += multiplier * delta.reshape(total[rows].shape)
            weight.copy_(total)


def _resolve(lora, networks, strict):
    """({Target: Adapter}, {Target: the file's module name}) of the file's modules that match
    this model; unmatched ones raise or warn."""
    names = accepted_names(networks)
    targets, modules, unmatched = {}, {}, []
    for module, adapter in lora.adapters.items():
        target = names.get(module)
        if target is None:
            unmatched.append(module)
        elif target in targets:
            raise LoRAError(lora.path, f"updates {target} twice, as {modules[target]} and "
                                       f"{module}")
        else:
            targets[target], modules[target] = adapter, module
    if unmatched:
        message = (f"{len(unmatched)} of its {len(lora.adapters)} module(s) match no layer of "
                   f"this model ({_family_hint(lora, networks)}): {_listing(unmatched)}")
        if strict:
            raise LoRAError(lora.path, message + "; strict=False loads the rest")
        warnings.warn(f"{lora.path}: skipping {message}", stacklevel=3)
    if not targets:
        raise LoRAError(lora.path, "none of its modules match a layer of this model "
                                   f"({_family_hint(lora, networks)})")
    return targets, modules


def _check_shapes(path, targets, modules, networks):
    """Every update must have its weight's (out, in·kh·kw); a Linear's update fits a 1×1
    convolution and back (SD 1 and SD 2 differ only so in proj_in/proj_out)."""
    params = {name: dict(module.named_parameters()) for name, module in networks.items()}
    wrong = []
    for target, adapter in targets.items():
        weight = params[target.network][target.param]
        rows = weight[slice(*target.rows)] if target.rows else weight
        out, inputs = adapter.out_in()
        if (out, inputs) != (rows.shape[0], rows[0].numel()):
            wrong.append(f"{modules[target]} updates a ({out}, {inputs}) weight, but "
                         f"{target} is {tuple(rows.shape)}")
    if wrong:
        widths = {adapter.out_in()[1] for target, adapter in targets.items()
                  if target.param.endswith("attn2.to_k.weight")}
        raise LoRAError(path, f"does not fit this model ({_hint(widths, networks)}): "
                              f"{len(wrong)} update(s) of the wrong shape: {_listing(wrong, 5)}")


# Cross-attention reads the text at this width in each family: a LoRA's attn2.to_k says whose.
CONTEXT_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}


def _family_hint(lora, networks):
    widths = {adapter.out_in()[1] for module, adapter in lora.adapters.items()
              if re.search(r"attn2[._]to_k$", module)}
    return _hint(widths, networks)


def _hint(widths, networks):
    """Whose LoRA this is, told by the text width its cross-attention keys read."""
    ours = networks["unet"].config.context_dim if "unet" in networks else None
    model = CONTEXT_FAMILIES.get(ours, "an unknown family")
    if len(widths) == 1 and widths != {ours}:
        width = widths.pop()
        theirs = CONTEXT_FAMILIES.get(width, "no family ldm knows")
        return (f"a LoRA for {theirs}: its cross-attention reads {width}-wide text; this "
                f"model, {model}, reads {ours}")
    return f"this model: {model}"


def file_hash(path):
    """A1111's LoRA hash (12 hex digits): sha256 of a .safetensors' bytes after its header
    (sd-webui-additional-networks' "addnet" hash), of the whole file otherwise."""
    if path == STATE_DICT:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        if f.read(1) == b"{":
            f.seek(8 + int.from_bytes(head, "little"))
        else:
            f.seek(0)
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _finite(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _listing(items, limit=10):
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


# ---------------------------------------------------------------------------- A1111 prompt tags
LORA_TAG = re.compile(r"<lora:([^>]+)>")


@dataclass(frozen=True)
class LoRATag:
    """`<lora:name:te[:unet]>` as A1111 reads it (extra_networks_lora.py): the first number is
    the text encoders' multiplier, the second the U-Net's (default: the first); `te=`, `unet=`
    name them."""
    name: str
    text_multiplier: float = 1.0
    multiplier: float = 1.0


def prompt_loras(prompt):
    """(the prompt without its `<lora:…>` tags, [LoRATag]): A1111's extra-network syntax."""
    tags = []
    for body in LORA_TAG.findall(prompt):
        items = body.split(":")
        positional = [i for i in items[1:] if "=" not in i]
        named = dict(i.split("=", 1) for i in items[1:] if "=" in i)
        try:
            te = float(named.get("te", positional[0] if positional else 1.0))
            unet = float(named.get("unet", positional[1] if len(positional) > 1 else te))
        except ValueError:
            raise ValueError(f"<lora:{body}>: multipliers must be numbers") from None
        tags.append(LoRATag(items[0], te, unet))
    return LORA_TAG.sub("", prompt), tags


def find_lora(name, lora_dir):
    """The file `name` names in `lora_dir` (name, or name + .safetensors/.pt/.ckpt), as A1111
    looks LoRAs up by file stem. Raises FileNotFoundError listing what it tried."""
    folder = Path(lora_dir)
    tried = [folder / name] + [folder / f"{name}{suffix}"
                               for suffix in (".safetensors", ".pt", ".ckpt")]
    for path in tried:
        if path.is_file():
            return path
    raise FileNotFoundError(f"LoRA {name!r} not found in {folder} (tried "
                            f"{', '.join(p.name for p in tried)})")


def batch_lora_tags(prompts):
    """(the prompts without their `<lora:…>` tags, [LoRATag]) for a batch of prompts, whose
    tags must agree: A1111 applies the first prompt's tags to its whole batch and drops the
    others' unread; here a batch whose prompts name different LoRAs is a ValueError."""
    stripped, found = zip(*(prompt_loras(prompt) for prompt in prompts))
    for index, tags in enumerate(found[1:], start=1):
        if Counter(tags) != Counter(found[0]):
            raise ValueError(f"prompt {index} has other <lora:…> tags than prompt 0: the LoRAs "
                             "are merged into the weights, the same for the whole batch "
                             "(generate these prompts in separate calls)")
    return list(stripped), list(found[0])


@contextlib.contextmanager
def tags_applied(pipe, tags, lora_dir):
    """Merge the LoRAs `tags` name (files in `lora_dir`, A1111's models/Lora) for the body of
    the `with`, then take them out again (exactly, see `unload_lora`). A tag naming a LoRA the
    pipe already has merged with the same multipliers is already in effect and is skipped."""
    merged = {item.name: item for item in loaded_loras(pipe)}
    missing = []
    for tag in tags:
        done = merged.get(tag.name)
        if done is None:
            missing.append(tag)
        elif (done.multiplier, done.text_multiplier) != (tag.multiplier, tag.text_multiplier):
            raise ValueError(f"<lora:{tag.name}:…> asks for multipliers (text "
                             f"{tag.text_multiplier:g}, U-Net {tag.multiplier:g}), but {tag.name} "
                             f"is loaded with (text {done.text_multiplier:g}, U-Net "
                             f"{done.multiplier:g}): unload it first, or drop the tag")
    if missing and lora_dir is None:
        raise ValueError(f"the prompt's <lora:…> tags name {', '.join(t.name for t in missing)}: "
                         "set pipe.lora_dir to the folder of LoRA files (A1111's models/Lora), "
                         "or load them with pipe.load_lora")
    paths = [find_lora(tag.name, lora_dir) for tag in missing]  # all found before any merge
    applied = []
    try:
        for tag, path in zip(missing, paths):
            applied.append(load_lora(pipe, path, tag.multiplier,
                                     text_multiplier=tag.text_multiplier))
        yield applied
    finally:
        for item in reversed(applied):
            unload_lora(pipe, item)
