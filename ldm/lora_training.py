"""Training LoRAs: low-rank adapters around a frozen model, written as kohya/A1111 files.

    network = LoRANetwork(pipe, LoRAConfig(rank=8))   # adapters attached; pipe's weights untouched
    optimizer = torch.optim.AdamW(network.parameters())   # … train (ldm.finetune.finetune does) …
    network.save("style.safetensors", metadata={"ss_output_name": "style"})
    other.load_lora("style.safetensors")              # ldm, A1111, ComfyUI, diffusers all read it

Each adapted layer y = W x (Linear or Conv2d) gets kohya's LoRAModule beside it:

    y = W x + up(down(x)) · multiplier · alpha / rank
    down  Linear(in, r), or Conv2d(in, r) with W's kernel, stride and padding  (kaiming-uniform)
    up    Linear(r, out), or a 1×1 Conv2d(r, out)                              (zeros)

so training starts exactly at the base model, and merged the update is ΔW = up·down·alpha/rank
(`ldm.lora`'s formula), which is what the file stores as `.lora_down.weight`, `.lora_up.weight`
and `.alpha`. The base layer is not replaced: a forward hook adds the update to its output, so
the model's parameter names and its state_dict stay the checkpoint's. OpenCLIP's fused q; k; v
weight (SD 2's text encoder) has no layer of its own per third: a parametrization adds the three
thirds' ΔW to it instead (while attached, that one weight is named `parametrizations.…`).

Targets (kohya's networks/lora.py):
    default      every Linear and 1×1 conv inside the U-Net's transformers ("LoRA-LierLa"):
                 proj_in, proj_out, attn1/attn2 to_q, to_k, to_v, to_out.0, ff.net.0.proj,
                 ff.net.2; `targets` narrows or changes them by name ending (PEFT's rule)
    text_encoder every Linear of the text encoder's attention and MLP (the layers it runs)
    conv_rank    ("LoRA-C3Lier", LoCon) every layer of the ResBlocks and down/up-samplers: the
                 3×3 convs at conv_rank / conv_alpha, the 1×1 skip and the time-embedding
                 Linear at rank / alpha
The modules are named as kohya names them (`ldm.lora.original_name_map`: lora_unet_down_blocks_0_
attentions_0_transformer_blocks_0_attn1_to_q, lora_te_text_model_encoder_layers_0_mlp_fc1), so
the network's state_dict is the file.
"""
import hashlib
import io
import json
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import parametrize

from ldm import lora
from ldm.checkpoint import sha256_file
from ldm.models.transformer import SpatialTransformer
from ldm.models.unet import Downsample, ResBlock, Upsample

# kohya's LoRA-LierLa layers of a transformer, as name endings (diffusers' train_text_to_image_
# lora trains only the first four: to_q, to_k, to_v, to_out.0).
DEFAULT_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                   "ff.net.2")
CONV_BLOCKS = (ResBlock, Downsample, Upsample)  # kohya's ResnetBlock2D, Downsample2D, Upsample2D
NETWORK_MODULE = "networks.lora"  # what kohya writes as ss_network_module for these files


@dataclass(frozen=True)
class LoRAConfig:
    """Which layers get adapters and how large. alpha None: alpha = rank (a scale of 1; kohya's
    own default is alpha 1). conv_rank None: no convolution adapters; conv_alpha None:
    conv_alpha = conv_rank."""
    rank: int = 4
    alpha: float | None = None
    targets: tuple = DEFAULT_TARGETS
    text_encoder: bool = False
    conv_rank: int | None = None
    conv_alpha: float | None = None

    def __post_init__(self):
        for name in ("rank", "conv_rank"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"LoRAConfig.{name} must be a positive int, got {value!r}")
        for name in ("alpha", "conv_alpha"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and
                                          math.isfinite(value) and value > 0):
                raise ValueError(f"LoRAConfig.{name} must be a positive number, got {value!r}")
        if isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets):
            raise ValueError(f"LoRAConfig.targets must be a sequence of layer-name endings, got "
                             f"{self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))

    def size(self, conv):
        """(rank, alpha) of a linear-like layer, or of a 3×3 convolution when `conv`."""
        if conv:
            return self.conv_rank, float(self.conv_alpha or self.conv_rank)
        return self.rank, float(self.alpha or self.rank)


class LoRAModule(nn.Module):
    """The update of one layer (module docstring): x -> up(down(x)) · multiplier · alpha / rank,
    x (B, …, in) for a Linear, (B, in, h, w) for a Conv2d."""

    def __init__(self, layer, rank, alpha):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1:
                raise ValueError(f"cannot adapt a grouped convolution ({layer})")
            self.lora_down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride,
                                       layer.padding, layer.dilation, bias=False)
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # nn.Linear's init
        nn.init.zeros_(self.lora_up.weight)  # ΔW = 0: training starts at the base model
        # A buffer, so that state_dict holds `.alpha` as kohya's files do.
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / rank
        self.multiplier = 1.0

    def forward(self, x):
        return self.lora_up(self.lora_down(x)) * (self.multiplier * self.scale)

    def add_to_output(self, layer, args, output):
        """Forward hook of the adapted layer: its output plus this update. (A bound method, so
        that a deep copy of the model hooks the copied adapter, not this one.)"""
        return output + self(args[0].to(self.lora_down.weight.dtype)).to(output.dtype)

    def delta(self):
        """ΔW · multiplier in the layer's weight shape, (out, in) or (out, in, kh, kw)."""
        up, down = self.lora_up.weight, self.lora_down.weight
        flat = up.flatten(1) @ down.flatten(1)  # (out, r) @ (r, in·kh·kw)
        return flat.reshape(up.shape[0], *down.shape[1:]) * (self.multiplier * self.scale)


class _FusedThirds(nn.Module):
    """Parametrization of OpenCLIP's in_proj_weight (3C, C): W + [ΔW_q; ΔW_k; ΔW_v], a third
    without an adapter adding zeros. The adapters are held in a plain list, so that their
    parameters are registered once, in the LoRANetwork."""

    def __init__(self, thirds):
        super().__init__()
        self.thirds = thirds  # [LoRAModule | None] × 3, q, k, v

    def forward(self, weight):
        width = weight.shape[1]
        deltas = [torch.zeros(width, width, dtype=weight.dtype, device=weight.device)
                  if third is None else third.delta().to(weight.dtype) for third in self.thirds]
        return weight + torch.cat(deltas)


class LoRANetwork(nn.Module):
    """LoRA adapters for `pipe`'s U-Net and text encoder(s) (a StableDiffusion, or a dict of
    networks), chosen by `config` (module docstring), attached at construction.

    Its modules are named by kohya's names, so `state_dict()` is a kohya file's tensors.
    `attached` tells whether the adapters act on the model; `detach()` / `attach()` remove and
    restore them (the model's own weights are never changed). Raises ValueError when no layer
    matches the targets.
    """

    def __init__(self, pipe, config=LoRAConfig()):
        super().__init__()
        self.config = config
        self.model_config = getattr(pipe, "config", None)  # a ModelConfig, for the metadata
        networks = pipe.networks() if hasattr(pipe, "networks") else dict(pipe)
        self._networks = {k: v for k, v in networks.items() if k != "vae"}  # not submodules
        self._targets = {}  # kohya name -> Target
        chosen = _chosen_layers(self._networks, config)
        for name, target in lora.original_name_map(self._networks, "kohya").items():
            if target in chosen:
                layer, conv = chosen[target]
                rank, alpha = config.size(conv)
                weight = _weight(self._networks, target)
                module = LoRAModule(layer, rank, alpha).to(weight.device)
                self.add_module(name, module)
                self._targets[name] = target
        if not self._targets:
            raise ValueError(f"no layer of this model matches the LoRA targets {config.targets}")
        self._handles = []
        self.attach()

    @property
    def attached(self):
        return bool(self._handles)

    def targets(self):
        """{kohya module name: ldm.lora.Target (the weight it updates)}."""
        return dict(self._targets)

    def attach(self):
        if self.attached:
            return
        fused = {}
        for name, target in self._targets.items():
            module = getattr(self, name)
            if target.rows is None:
                layer = _layer(self._networks, target)
                self._handles.append(layer.register_forward_hook(module.add_to_output))
            else:  # a third of OpenCLIP's in_proj_weight
                thirds = fused.setdefault((target.network, target.param), [None] * 3)
                thirds[target.rows[0] // (target.rows[1] - target.rows[0])] = module
        for (network, param), thirds in fused.items():
            owner, attribute = _owner(self._networks[network], param)
            parametrize.register_parametrization(owner, attribute, _FusedThirds(thirds),
                                                 unsafe=True)
            self._handles.append(_Unparametrize(owner, attribute))

    def detach(self):
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []

    def set_multiplier(self, multiplier):
        for name in self._targets:
            getattr(self, name).multiplier = float(multiplier)

    @torch.no_grad()
    def deltas(self):
        """{Target: ΔW (fp32, the weight's shape or its third's)}: what merging adds."""
        return {target: getattr(self, name).delta().float()
                for name, target in self._targets.items()}

    def kohya_metadata(self):
        """The ss_* keys kohya writes about the network itself and the model it is for (the
        latter only when the network was built from a pipe, which knows its config)."""
        c, model = self.config, self.model_config
        metadata = {"ss_network_module": NETWORK_MODULE, "ss_network_dim": str(c.rank),
                    "ss_network_alpha": str(float(c.alpha or c.rank))}
        if model is not None:
            metadata["ss_base_model_version"] = base_model_version(model)
            metadata["ss_v2"] = str(model.text_encoder == "open_clip")
        if c.conv_rank is not None:  # kohya's --network_args "conv_dim=…" "conv_alpha=…"
            metadata["ss_network_args"] = json.dumps(
                {"conv_dim": str(c.conv_rank), "conv_alpha": str(float(c.conv_alpha or
                                                                      c.conv_rank))})
        return metadata

    def save(self, path, *, metadata=None, dtype=torch.float16):
        """Write the adapters as a kohya LoRA .safetensors, atomically: the tensors in `dtype`,
        `metadata` (ss_* training facts; values made strings) plus the network's own ss_*
        keys and kohya's sshs_model_hash / sshs_legacy_hash (A1111's "addnet" hashes)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"a LoRA file must end in .safetensors, got {path}")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot write {path}: the directory {path.parent} does "
                                    "not exist")
        tensors = {k: v.detach().to("cpu", dtype).contiguous()
                   for k, v in self.state_dict().items()}
        metadata = {k: str(v) for k, v in (metadata or {}).items()}
        metadata.update(self.kohya_metadata())
        metadata.update(safetensors_hashes(tensors, metadata))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:  # written whole, then renamed: a reader never sees half a file
            safetensors.torch.save_file(tensors, str(tmp), metadata)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path


class _Unparametrize:
    """A handle that removes a parametrization, keeping the original weight as it was."""

    def __init__(self, owner, attribute):
        self.owner, self.attribute = owner, attribute

    def remove(self):
        parametrize.remove_parametrizations(self.owner, self.attribute,
                                            leave_parametrized=False)


def _chosen_layers(networks, config):
    """{Target: (layer, whether it is a 3×3 conv of the conv group)} of the layers `config`
    adapts. For the thirds of a fused q; k; v weight, the layer is a stand-in Linear (C -> C)."""
    chosen = {}
    unet = networks.get("unet")
    if unet is not None:
        for block_name, block in unet.named_modules():
            if isinstance(block, SpatialTransformer):
                for name, layer in _layers(block, block_name):
                    if any(name == t or name.endswith("." + t) for t in config.targets):
                        chosen[lora.Target("unet", f"{name}.weight")] = (layer, False)
            elif isinstance(block, CONV_BLOCKS) and config.conv_rank is not None:
                for name, layer in _layers(block, block_name):
                    big = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
                    chosen[lora.Target("unet", f"{name}.weight")] = (layer, big)
    if config.text_encoder:
        for target in lora.original_name_map(networks, "kohya").values():
            if target.network.startswith("text_encoder") and _runs(networks, target):
                chosen[target] = (_text_layer(networks, target), False)
    return chosen


def _layers(block, block_name):
    for name, layer in block.named_modules(prefix=block_name):
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            yield name, layer


def text_blocks_run(networks, name):
    """How many blocks of text encoder `name` the model runs: SD 2 stops OpenCLIP one block
    early; SDXL stops CLIP-L one block early (its context is the penultimate state) but runs
    all of bigG (its pooled text is the last state's)."""
    encoder = networks[name]
    if "text_encoder_2" in networks:  # SDXL
        return encoder.cfg.layers - (1 if name == "text_encoder" else 0)
    return encoder.cfg.layers - getattr(encoder.cfg, "skip_last", 0)


def _runs(networks, target):
    """Whether a text layer is one the text encoder runs (`text_blocks_run`): a LoRA on a block
    that never runs would never be trained."""
    used = text_blocks_run(networks, target.network)
    for word in ("layers", "resblocks"):
        parts = target.param.split(".")
        if word in parts:
            return int(parts[parts.index(word) + 1]) < used
    return True


def _text_layer(networks, target):
    if target.rows is None:
        return _layer(networks, target)
    width = target.rows[1] - target.rows[0]
    with torch.device("meta"):  # only its shape is read
        return nn.Linear(width, width, bias=False)


def _layer(networks, target):
    return networks[target.network].get_submodule(target.param.removesuffix(".weight"))


def _owner(module, param):
    path, _, attribute = param.rpartition(".")
    return module.get_submodule(path), attribute


def _weight(networks, target):
    owner, attribute = _owner(networks[target.network], target.param)
    return getattr(owner, attribute)


def base_model_version(model_config):
    """kohya's ss_base_model_version: sd_v1, sd_v2 (ε), sd_v2_v (v-prediction), sdxl_base_v1-0
    (model_util.get_model_version_str_for_sd1_sd2 and sdxl_train_util)."""
    if model_config.text_encoder in ("sdxl", "sdxl-refiner"):
        return "sdxl_base_v1-0"
    if model_config.text_encoder == "open_clip":
        return "sd_v2_v" if model_config.prediction == "v" else "sd_v2"
    return "sd_v1"


def safetensors_hashes(tensors, metadata):
    """kohya's sshs_model_hash and sshs_legacy_hash (train_util.precalculate_safetensors_hashes):
    of the file these tensors make with only the ss_* metadata, the sha256 of its bytes after
    the header (A1111's addnet hash; the data does not depend on the header), and the first 8
    hex digits of the sha256 of its 64 KiB at offset 1 MiB (empty for a smaller file)."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(tensors, ss_only)
    header = int.from_bytes(data[:8], "little")
    legacy = io.BytesIO(data)
    legacy.seek(0x100000)
    return {"sshs_model_hash": hashlib.sha256(data[8 + header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(legacy.read(0x10000)).hexdigest()[:8]}


def kohya_training_metadata(config, network, steps, *, started_at, output_name, init=None,
                            resolution=None, num_images=None, cache_latents=False, world=1):
    """The ss_* keys kohya's train_network.py writes that describe a run, those with an honest
    value here (LoRANetwork.save adds the network's own, ss_network_*): `config` the
    ldm.training.TrainConfig it ran with, `steps` the steps done, `started_at` a time.time(),
    `init` the checkpoint it started from (its name and A1111's hashes of it), the data's
    `resolution` (H, W) and `num_images`, `world` the number of processes. Values are
    strings, as in kohya's files."""
    metadata = {
        "ss_session_id": secrets.randbelow(2**31), "ss_training_started_at": started_at,
        "ss_training_finished_at": time.time(), "ss_output_name": output_name,
        "ss_learning_rate": config.lr, "ss_unet_lr": config.lr,
        "ss_max_train_steps": config.steps, "ss_steps": steps,
        "ss_lr_warmup_steps": config.warmup, "ss_lr_scheduler": "cosine_with_min_lr",
        "ss_optimizer": f"torch.optim.adamw.AdamW(weight_decay={config.weight_decay})",
        "ss_max_grad_norm": config.grad_clip,
        "ss_mixed_precision": {"fp32": "no"}.get(config.precision, config.precision),
        "ss_gradient_checkpointing": config.grad_checkpointing,
        "ss_gradient_accumulation_steps": config.grad_accum,
        "ss_batch_size_per_device": config.batch // (world * config.grad_accum),
        "ss_total_batch_size": config.batch, "ss_seed": config.seed,
        "ss_caption_dropout_rate": config.uncond_prob,  # kohya's: the caption becomes ""
        "ss_cache_latents": cache_latents,
        "ss_training_comment": "trained with ldm (python -m ldm.train)"}
    if network.config.text_encoder:
        metadata["ss_text_encoder_lr"] = config.lr
    if resolution is not None:  # kohya's order: (width, height)
        metadata["ss_resolution"] = (resolution[1], resolution[0])
    if num_images is not None:
        metadata["ss_num_train_images"] = num_images
    if init is not None and Path(init).is_file():
        metadata.update(ss_sd_model_name=Path(init).name, ss_sd_model_hash=_legacy_hash(init),
                        ss_new_sd_model_hash=sha256_file(init))
    return {k: str(v) for k, v in metadata.items()}


def _legacy_hash(path):
    """A1111's old model hash (kohya's train_util.model_hash): sha256 of 64 KiB at 1 MiB."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
