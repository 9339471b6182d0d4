"""The original CompVis/Stability checkpoint layout: its names, reading it safely, writing it back.

A checkpoint is one flat dict of tensors (`.safetensors`, or a `.ckpt` torch zip pickle with the
dict under "state_dict"). Our modules are named after the original ones, so the whole name map is
the prefix table below plus two rules:

    ours                                  original
    unet.<name>                      <->  model.diffusion_model.<name>
    vae.<name>                       <->  first_stage_model.<name>
    text_encoder.<name>              <->  cond_stage_model.transformer.text_model.<name>
                                          (older files: cond_stage_model.transformer.<name>)
    text_encoder.<name> (SD 2.x)     <->  cond_stage_model.model.<name>   (OpenCLIP)
    unet.<name> (EMA weights)        <->  model_ema.diffusion_model<name without dots>

`IGNORED` lists what the original stores that ldm does not need. Files are read one tensor at a
time (safetensors is memory-mapped, .ckpt is opened with mmap=True) and never through pickle's
arbitrary code execution: `torch.load(..., weights_only=True)` only.
"""
import json
import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm import schedule

PREFIXES = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "text_encoder": "cond_stage_model.transformer.text_model.",
}
# Text encoders saved by older transformers versions lack the `text_model.` level.
LEGACY_TEXT_PREFIX = "cond_stage_model.transformer."
# The text encoder of each family (ModelConfig.text_encoder): SD 1.x's CLIP, SD 2.x's OpenCLIP.
TEXT_PREFIXES = {"clip": PREFIXES["text_encoder"], "open_clip": "cond_stage_model.model."}
EMA_PREFIX = "model_ema."
POSITION_IDS = "embeddings.position_ids"
# Stored by the original but derived or unused here; the schedule buffers are checked, not loaded.
IGNORED = frozenset({
    PREFIXES["text_encoder"] + POSITION_IDS, LEGACY_TEXT_PREFIX + POSITION_IDS,
    "model_ema.decay", "model_ema.num_updates", "lvlb_weights", "logvar", "scale_factor",
    *schedule.checkpoint_buffers(),
})
# The config of a model that is not one of the SD presets (our own small models) travels in the
# file: safetensors metadata, or a plain string beside "state_dict" in a .ckpt.
CONFIG_KEY = "ldm.config"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file and the problem."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")


def ema_name(original_unet_name):
    """`model.diffusion_model.X.Y` -> `model_ema.diffusion_modelXY` (the original EMA naming).

    Not invertible by string edits (`blocks100` could be 1.00 or 10.0), hence built this way only.
    """
    return EMA_PREFIX + original_unet_name.removeprefix("model.").replace(".", "")


def name_map(models, *, use_ema=False, text_prefix=PREFIXES["text_encoder"]):
    """{our name: original name} for every tensor of `models` ({"unet": UNet, "vae": …, …}).

    Generated from the modules themselves (works on the meta device), so it covers each
    parameter exactly once by construction.
    """
    rows = {}
    for component, module in models.items():
        prefix = text_prefix if component == "text_encoder" else PREFIXES[component]
        for name in module.state_dict():
            original = prefix + name
            if component == "unet" and use_ema:
                original = ema_name(original)
            rows[f"{component}.{name}"] = original
    return rows


@dataclass
class Checkpoint:
    """An opened checkpoint: tensor shapes known up front, tensors read one by one."""
    path: Path | str    # the file, or STATE_DICT for tensors handed over in memory
    shapes: dict        # original name -> tuple shape
    read: callable      # original name -> torch.Tensor (on CPU, as stored)
    config_json: str | None = None

    def has_prefix(self, prefix):
        return any(name.startswith(prefix) for name in self.shapes)


def open_checkpoint(path):
    """Open a `.safetensors` or `.ckpt` file; the container is told by its bytes, not its name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return _open_torch_zip(path)
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return _open_safetensors(path)
    raise CheckpointError(path, "is neither a safetensors file nor a torch .ckpt (zip) file")


STATE_DICT = "state dict"


def open_state_dict(tensors):
    """Tensors already in memory, {original name: tensor}, seen as a checkpoint (no file).

    Non-tensor entries are skipped as in a .ckpt; the tensors are handed on, not copied.
    """
    tensors = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    return Checkpoint(STATE_DICT, shapes, tensors.__getitem__)


def _open_safetensors(path):
    try:
        f = safe_open(str(path), framework="pt")
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(path, f"is not a readable safetensors file ({e})") from e
    return Checkpoint(path, shapes, f.get_tensor, metadata.get(CONFIG_KEY))


class _LightningExtra:
    """Stands in for a Lightning object pickled beside the weights (callback state): it keeps the
    pickled data and runs nothing. Lets real training checkpoints load with weights_only."""

    def __setstate__(self, state):
        self.state = state


# Globals that real SD/LDM .ckpt files carry besides tensors, each mapped onto something inert.
_HARMLESS_GLOBALS = [
    (_LightningExtra, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_LightningExtra, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
]


def _open_torch_zip(path):
    try:
        with torch.serialization.safe_globals(_HARMLESS_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # weights_only refuses any global it does not know, so nothing in the file has run.
        raise CheckpointError(path, f"refused: its pickle asks for {_unsafe_globals(path)}, code "
                              "that a tensor checkpoint does not need; nothing was run") from e
    except Exception as e:
        raise CheckpointError(path, f"is not a readable torch checkpoint ({e})") from e
    tensors = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(tensors, dict):
        raise CheckpointError(path, "holds no state_dict of tensors")
    tensors = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    return Checkpoint(path, shapes, tensors.__getitem__, obj.get(CONFIG_KEY))


def _unsafe_globals(path):
    try:
        with torch.serialization.safe_globals(_HARMLESS_GLOBALS):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # a damaged pickle: say so rather than guess
        return "globals it could not even list"
    return ", ".join(names) or "unknown globals"


def check_tensors(ckpt, rows, expected_shapes, *, strict=False):
    """Raise on missing or misshapen tensors (naming each); warn (or raise if strict) on extras.

    rows: {our name: original name}; expected_shapes: {our name: tuple}.
    """
    missing = [orig for ours, orig in rows.items() if orig not in ckpt.shapes]
    wrong = [f"{orig}: expected {expected_shapes[ours]}, found {ckpt.shapes[orig]}"
             for ours, orig in rows.items()
             if orig in ckpt.shapes and ckpt.shapes[orig] != expected_shapes[ours]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_listing(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape: {_listing(wrong)}")
    if problems:
        raise CheckpointError(ckpt.path, "; ".join(problems))
    unexpected = [name for name in ckpt.shapes if not _known(name, set(rows.values()))]
    if unexpected:
        message = f"{len(unexpected)} unexpected tensor(s): {_listing(unexpected)}"
        if strict:
            raise CheckpointError(ckpt.path, message)
        warnings.warn(f"{ckpt.path}: ignoring {message}", stacklevel=3)


def _known(name, used):
    # The U-Net copy not chosen (EMA or raw) is expected in a full-EMA file, not "unexpected".
    return (name in used or name in IGNORED or name.startswith(EMA_PREFIX)
            or name.startswith(PREFIXES["unet"]))


def _listing(items, limit=10):
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def read_component(ckpt, rows, component, *, device=None, dtype=None):
    """{module-local name: tensor} for one component, each tensor cast and moved on its own.

    Casting one tensor at a time keeps peak memory near a single copy of the weights.
    """
    prefix = component + "."
    out = {}
    for ours, original in rows.items():
        if ours.startswith(prefix):
            tensor = ckpt.read(original)
            cast = dtype if dtype is not None and tensor.is_floating_point() else None
            out[ours[len(prefix):]] = tensor.to(device=device, dtype=cast)
    return out


def check_schedule(ckpt):
    """Warn if the file's alphas_cumprod is not the SD schedule our samplers assume."""
    if "alphas_cumprod" not in ckpt.shapes:
        return
    stored = ckpt.read("alphas_cumprod").double()
    ours = schedule.alphas_cumprod(len(stored))
    error = ((stored - ours).norm() / ours.norm()).item()
    if error > 1e-5:
        warnings.warn(f"{ckpt.path}: its alphas_cumprod differs from the SD schedule "
                      f"(relative error {error:.2e}); sampling uses the SD schedule", stacklevel=3)


def save_checkpoint(path, models, config_json, *, overwrite=False, extra_tensors=None,
                    extra_entries=None):
    """Write `models` in the original layout, with the SD schedule buffers, atomically.

    The container follows the suffix (.safetensors or .ckpt). An existing file is kept unless
    `overwrite`; the data goes to a temporary file that is renamed only once complete.
    `extra_tensors` {original name: tensor} join the state dict (training: model_ema.*);
    `extra_entries` join the top level of a .ckpt (training: global_step, optimizer_states).
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"path {path} must end in .safetensors or .ckpt")
    if extra_entries and path.suffix != ".ckpt":
        raise ValueError(f"extra_entries need a .ckpt file (a pickle), got {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    states = {component: module.state_dict() for component, module in models.items()}
    family = json.loads(config_json).get("text_encoder", "clip")
    rows = name_map(models, text_prefix=TEXT_PREFIXES[family])
    tensors = {orig: _plain(states, ours) for ours, orig in rows.items()}
    if family == "clip":  # written like the releases do, for tools that expect it; ldm ignores it
        positions = states["text_encoder"]["embeddings.position_embedding.weight"].shape[0]
        tensors[PREFIXES["text_encoder"] + POSITION_IDS] = torch.arange(positions).unsqueeze(0)
    tensors.update(schedule.checkpoint_buffers())
    tensors.update({name: t.detach().to("cpu").contiguous()
                    for name, t in (extra_tensors or {}).items()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        if path.suffix == ".safetensors":
            save_file(tensors, str(tmp), metadata={"format": "pt", CONFIG_KEY: config_json})
        else:
            torch.save({"state_dict": tensors, CONFIG_KEY: config_json, **(extra_entries or {})},
                       tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _plain(states, ours):
    component, name = ours.split(".", 1)
    # safetensors refuses non-contiguous tensors.
    return states[component][name].detach().to("cpu").contiguous()
