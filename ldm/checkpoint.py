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
    SDXL base:    text_encoder.<name>    <->  conditioner.embedders.0.transformer.text_model.<name>
                  text_encoder_2.<name>  <->  conditioner.embedders.1.model.<name>   (bigG)
    SDXL refiner: text_encoder_2.<name>  <->  conditioner.embedders.0.model.<name>   (bigG)

`IGNORED` lists what the original stores that ldm does not need. Files are never read through
pickle's arbitrary code execution: `torch.load(..., weights_only=True)` only.

Reading copies the weights into memory: safetensors tensor by tensor (pread, no mapping), a .ckpt
whole (as torch does by default). With `mmap=True` tensors are views of the mapped file instead:
less time and memory, but the file must not change while the model lives, since touching a page
of a mapping whose file was truncated or rewritten in place kills the process with SIGBUS.
Hostile files are refused before they cost memory: a zip's declared sizes are checked before
torch reads an entry, and every weight is checked for its dtype and for NaN/infinity as it is read.
"""
import errno
import hashlib
import json
import os
import pickle
import stat
import warnings
import zipfile
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
# The text encoders of each family (ModelConfig.text_encoder): SD 1.x's CLIP, SD 2.x's
# OpenCLIP, and SDXL's sgm "conditioner", whose embedders are numbered in the order they run.
TEXT_PREFIXES = {
    "clip": {"text_encoder": PREFIXES["text_encoder"]},
    "open_clip": {"text_encoder": "cond_stage_model.model."},
    "sdxl": {"text_encoder": "conditioner.embedders.0.transformer.text_model.",
             "text_encoder_2": "conditioner.embedders.1.model."},
    "sdxl-refiner": {"text_encoder_2": "conditioner.embedders.0.model."},
}
# SDXL files store no noise schedule: the sgm denoiser computes it (SD's, as for SD 1/2).
SDXL_FAMILIES = ("sdxl", "sdxl-refiner")
EMA_PREFIX = "model_ema."
POSITION_IDS = "embeddings.position_ids"
# Stored by the original but derived or unused here; the schedule buffers are checked, not loaded.
IGNORED = frozenset({
    PREFIXES["text_encoder"] + POSITION_IDS, LEGACY_TEXT_PREFIX + POSITION_IDS,
    TEXT_PREFIXES["sdxl"]["text_encoder"] + POSITION_IDS,
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


def name_map(models, *, use_ema=False, family="clip", text_prefix=None):
    """{our name: original name} for every tensor of `models` ({"unet": UNet, "vae": …, …}).

    family: the text encoders' (ModelConfig.text_encoder), which sets their prefixes
    (TEXT_PREFIXES); text_prefix: another prefix for "text_encoder" (older SD 1 files).
    Generated from the modules themselves (works on the meta device), so it covers each
    parameter exactly once by construction.
    """
    prefixes = {**PREFIXES, **TEXT_PREFIXES[family]}
    if text_prefix is not None:
        prefixes["text_encoder"] = text_prefix
    rows = {}
    for component, module in models.items():
        prefix = prefixes[component]
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


def sha256_file(path):
    """Hex sha256 of a file's bytes, read in 16 MiB blocks (checkpoints exceed memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def open_checkpoint(path, *, mmap=False):
    """Open a `.safetensors` or `.ckpt` file; the container is told by its bytes, not its name.

    mmap: let the tensors be views of the mapped file (see the module docstring).
    Raises FileNotFoundError, IsADirectoryError or CheckpointError saying what `path` is.
    """
    path = Path(path)
    _require_regular_file(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return _open_torch_zip(path, mmap)
    if len(head) == 9 and head[8:9] == b"{":  # 8-byte header length, then the JSON header
        return _open_safetensors(path, mmap)
    raise CheckpointError(path, "is neither a safetensors file nor a torch .ckpt (zip) file")


# What a path can be besides a regular file; opening a FIFO to read it would block forever.
_NOT_FILES = [(stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")]


def _require_regular_file(path):
    try:
        mode = path.stat().st_mode  # follows symbolic links
    except FileNotFoundError:
        if path.is_symlink():
            raise FileNotFoundError(f"checkpoint {path} is a symbolic link to "
                                    f"{os.readlink(path)}, which does not exist") from None
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(path, "is a symbolic link loop (it never reaches a "
                                        "file)") from None
        raise
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"checkpoint {path} is a directory; ldm loads one .safetensors "
                                "or .ckpt file")
    for test, kind in _NOT_FILES:
        if test(mode):
            raise CheckpointError(path, f"is {kind}, not a regular file; copy it to a file "
                                        "first")


STATE_DICT = "state dict"


def open_state_dict(tensors):
    """Tensors already in memory, {original name: tensor}, seen as a checkpoint (no file).

    Non-tensor entries are skipped as in a .ckpt; the tensors are handed on, not copied.
    """
    tensors = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    return Checkpoint(STATE_DICT, shapes, tensors.__getitem__)


def _open_safetensors(path, mmap):
    try:
        f = safe_open(str(path), framework="pt", backend="mmap" if mmap else "pread")
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


# A state dict's pickle holds names and storage references, about 1 KB per tensor: SD 1.5's is
# under 1 MB, a training checkpoint with optimizer state a few MB. Anything far larger is not a
# checkpoint's pickle, and torch would allocate its declared size before parsing it.
MAX_PICKLE_BYTES = 64 * 2**20
# DEFLATE cannot expand its input more than 1032-fold (RFC 1951: 258 bytes per 2-bit match code).
DEFLATE_MAX_RATIO = 1032


def _open_torch_zip(path, mmap):
    compressed = _check_zip_sizes(path)
    # torch maps a .ckpt's records in place, which holds only for stored entries: a compressed
    # entry mapped would be its compressed bytes taken for weights. And given a path ending in
    # .safetensors, torch.load reads it as safetensors: a file object keeps it to the zip.
    mapped = mmap and not compressed and path.suffix != ".safetensors"
    try:
        with torch.serialization.safe_globals(_HARMLESS_GLOBALS), open(path, "rb") as f:
            obj = torch.load(path if mapped else f, map_location="cpu", weights_only=True,
                             mmap=mapped)
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


def _check_zip_sizes(path):
    """Refuse a zip whose declared sizes are absurd for a checkpoint or do not add up, before
    torch reads (and allocates) any entry. Returns whether any entry is compressed."""
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as e:
        raise CheckpointError(path, f"is not a readable zip archive ({e})") from e
    for entry in entries:
        problem = _entry_problem(entry)
        if problem:
            raise CheckpointError(path, f"entry {entry.filename} {problem}; refused unread")
    stored = sum(entry.compress_size for entry in entries)
    if stored > path.stat().st_size:
        raise CheckpointError(path, f"its entries declare {stored:,} bytes, more than the "
                                    f"{path.stat().st_size:,} the file holds (truncated?)")
    return any(entry.compress_type != zipfile.ZIP_STORED for entry in entries)


def _entry_problem(entry):
    size, packed = entry.file_size, entry.compress_size
    if entry.filename.rsplit("/", 1)[-1] == "data.pkl" and size > MAX_PICKLE_BYTES:
        return (f"(the pickle) declares {size:,} bytes, and a state dict's pickle is a few MB "
                f"(limit {MAX_PICKLE_BYTES:,}): not a checkpoint (a pickle bomb?)")
    if entry.compress_type == zipfile.ZIP_STORED and size != packed:
        return f"is stored uncompressed but declares {size:,} bytes in {packed:,}"
    if entry.compress_type == zipfile.ZIP_DEFLATED and size > DEFLATE_MAX_RATIO * packed + 1024:
        return (f"declares {size:,} bytes from {packed:,} compressed, more than DEFLATE can "
                "expand to")
    if entry.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return f"uses compression method {entry.compress_type}, which torch cannot read"
    return None


def _unsafe_globals(path):
    try:
        with torch.serialization.safe_globals(_HARMLESS_GLOBALS), open(path, "rb") as f:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
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

    Casting one tensor at a time keeps peak memory near a single copy of the weights. Every
    tensor ldm loads is a floating-point weight (the integer tensors the releases store,
    position_ids and num_updates, are IGNORED): CheckpointError names any other, and any weight
    holding NaN or infinity, which would only show as black images.
    """
    prefix = component + "."
    out = {}
    for ours, original in rows.items():
        if ours.startswith(prefix):
            tensor = ckpt.read(original)
            if not tensor.is_floating_point():
                raise CheckpointError(ckpt.path, f"tensor {original} holds {tensor.dtype} "
                                                 "values, where a floating-point weight belongs")
            loaded = tensor.to(device=device, dtype=dtype)
            _check_finite(ckpt.path, original, tensor, loaded)
            out[ours[len(prefix):]] = loaded
    return out


def _check_finite(path, name, stored, loaded):
    # A sum is finite when every term is, unless the sum itself overflows: one pass and no bool
    # tensor, ~15 ms per 128M weights against ~0.5 s for isfinite(t).all(), which only confirms.
    if torch.isfinite(loaded.sum()) or torch.isfinite(loaded).all():
        return
    bad = int((~torch.isfinite(stored)).sum())
    if bad:
        raise CheckpointError(path, f"tensor {name} holds {bad:,} NaN or infinite value(s) of "
                                    f"{stored.numel():,}")
    raise CheckpointError(path, f"tensor {name} does not fit in {loaded.dtype}: its largest "
                                f"magnitude {stored.abs().max().item():.3g} overflows to infinity")


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
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the directory {path.parent} does not exist")
    if extra_entries and path.suffix != ".ckpt":
        raise ValueError(f"extra_entries need a .ckpt file (a pickle), got {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    states = {component: module.state_dict() for component, module in models.items()}
    family = json.loads(config_json).get("text_encoder", "clip")
    rows = name_map(models, family=family)
    tensors = {orig: _plain(states, ours) for ours, orig in rows.items()}
    clip_prefix = TEXT_PREFIXES[family].get("text_encoder")
    if family in ("clip", "sdxl"):  # as the releases store it, for tools that expect it
        positions = states["text_encoder"]["embeddings.position_embedding.weight"].shape[0]
        tensors[clip_prefix + POSITION_IDS] = torch.arange(positions).unsqueeze(0)
    if family not in SDXL_FAMILIES:  # SDXL files have none, and a round trip adds nothing
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
