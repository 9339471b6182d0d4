"""`ldm.load` and `ldm.save`: a StableDiffusion from / to an original-layout checkpoint file.

The file format and the name map live in `ldm/checkpoint.py`; this module decides which model a
file holds, builds it on the meta device (no memory, no init time) and fills it tensor by tensor.
"""
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from ldm import checkpoint, precision
from ldm import offload as offloading  # not `offload`: load's argument has that name
from ldm.checkpoint import CheckpointError
from ldm.config import PRESETS, ConfigError, ModelConfig
from ldm.pipeline import StableDiffusion
from ldm.sdxl import StableDiffusionXL

# The small model the project trains and ships (issue: embedded default model).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "tiny-shapes.safetensors"

def load(path=None, *, device="cpu", dtype="auto", use_ema=True, strict=False,
         config=None, mmap=False, offload=None):
    """Load an original-layout checkpoint (.safetensors or .ckpt) into a `StableDiffusion`.

    path: the file; or a dict {original name: tensor} already in memory (its tensors are used as
    they are where dtype and device already match); None loads the small model shipped in weights/.
    device: where the weights go ("cpu", "cuda", "cuda:1", a torch.device; not "meta").
    dtype: "auto" (default: the fastest that keeps images right on `device`, see
    `ldm.precision`: bfloat16 on a CPU with AMX, float32 on other CPUs, float16 on CUDA,
    bfloat16 there for SDXL), torch.float32 / float16 / bfloat16, or a name in
    precision.DTYPES ("fp16", …). The U-Net and VAE are put in the memory layout measured
    faster for that device and dtype (`precision.optimize`).
    use_ema: when the file holds EMA copies of the U-Net (`model_ema.*`), load those.
    strict: refuse files with unexpected tensors instead of warning.
    config: a preset name or ModelConfig to use instead of the one detected from the file: SD
    2.x files do not say whether they predict v (768-v, preset "sd21") or ε (512 "base",
    "sd21-base"); detection goes by the file name ("512" or "base" in it: ε), else v (a dict
    has no name: v).
    mmap: let the weights (those kept in the file's dtype, on the CPU) be views of the mapped
    file rather than copies: less time and memory, but the file must not change while the model
    is loaded (truncating or rewriting it in place kills the process with SIGBUS). The default
    copies, so the file may be replaced or deleted at any time.
    offload: "model" or "sequential" keeps the weights in CPU memory and brings each network
    ("model") or each layer ("sequential") to `device` only while it runs, for a GPU smaller
    than the model (`StableDiffusion.enable_offload`); dtype "auto" is then `device`'s.
    Raises CheckpointError naming the file and the tensor or config field on bad files
    (missing, misshapen, non-float or non-finite tensors, a malformed embedded config, a zip
    with absurd sizes), FileNotFoundError / IsADirectoryError for paths that are no file, and
    ValueError naming the argument for a bad device or dtype.
    """
    device = _device(device)
    precision.resolve_dtype(dtype, device)  # a bad dtype is refused before the file is read
    if offload is not None and offload not in offloading.MODES:
        raise ValueError(f"offload must be None or one of "
                         f"{', '.join(map(repr, offloading.MODES))}, got {offload!r}")
    ckpt = _open(path, mmap)
    config = detect_config(ckpt) if config is None else _preset(config)
    dtype = precision.resolve_dtype(dtype, device, family=config.text_encoder)
    pipe = _build(ckpt, config)
    networks = pipe.networks()
    rows = checkpoint.name_map(networks, use_ema=use_ema and _has_ema(ckpt),
                               family=config.text_encoder, text_prefix=_text_prefix(ckpt, config))
    shapes = {f"{c}.{n}": tuple(t.shape) for c, m in networks.items()
              for n, t in m.state_dict().items()}
    checkpoint.check_tensors(ckpt, rows, shapes, strict=strict)
    checkpoint.check_schedule(ckpt)
    home = torch.device("cpu") if offload else device
    for component, module in networks.items():
        weights = checkpoint.read_component(ckpt, rows, component, device=home, dtype=dtype)
        module.load_state_dict(weights, strict=True, assign=True)
    pipe = precision.optimize(pipe.eval())
    if offload:
        pipe.enable_offload(offload, device=device)
    return pipe


def save(pipe, path, *, overwrite=False):
    """Write `pipe` in the original layout (the format follows the suffix), never half-written.

    The U-Net is written under `model.diffusion_model.*` (as in the EMA-only releases); the config
    travels in the file, so `load(save(pipe))` rebuilds the same model. Refuses to replace an
    existing file unless `overwrite`.
    """
    checkpoint.save_checkpoint(path, pipe.networks(), pipe.config.to_json(), overwrite=overwrite)


def detect_config(ckpt):
    """The ModelConfig of an opened checkpoint: stored by ldm, else told apart by tensor shapes."""
    if ckpt.config_json is not None:
        try:
            return ModelConfig.from_json(ckpt.config_json)
        except ConfigError as e:
            raise CheckpointError(ckpt.path, f"its embedded config ({checkpoint.CONFIG_KEY}) is "
                                             f"invalid: {e}") from None
    unet = checkpoint.PREFIXES["unet"]
    first_conv = ckpt.shapes.get(unet + "input_blocks.0.0.weight")
    if first_conv is None:
        raise CheckpointError(ckpt.path, "holds no Stable Diffusion U-Net (no tensor "
                              f"{unet}input_blocks.0.0.weight)")
    label_emb = ckpt.shapes.get(unet + "label_emb.0.0.weight")
    if label_emb is not None:
        return PRESETS[_sdxl_family(ckpt, first_conv, label_emb)]
    cross_attn = ckpt.shapes.get(unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    sd2 = ckpt.has_prefix(checkpoint.TEXT_PREFIXES["open_clip"]["text_encoder"]) or (
        cross_attn is not None and cross_attn[1] == 1024)
    families = {(4, False): "sd15", (9, False): "sd15-inpainting", (4, True): "sd21",
                (9, True): "sd2-inpainting"}
    family = families.get((first_conv[1], sd2))
    if family is None:
        raise CheckpointError(ckpt.path, f"has a U-Net with {first_conv[1]} input channels "
                              f"({'SD 2.x' if sd2 else 'SD 1.x'}); ldm knows 4 (text to image) "
                              "and 9 (inpainting)")
    file_name = ckpt.path.name if isinstance(ckpt.path, Path) else ""
    if family == "sd21" and re.search(r"(?<!\d)512(?!\d)|base", file_name, re.I):
        family = "sd21-base"
    return PRESETS[family]


# SDXL's U-Net takes the vector y through label_emb: (time embedding width, y width) tells
# the base from the refiner (../shared/manifests/SDXL.md).
SDXL_LABEL_EMB = {(1280, 2816): "sdxl", (1536, 2560): "sdxl-refiner"}


def _sdxl_family(ckpt, first_conv, label_emb):
    """"sdxl" or "sdxl-refiner" from the U-Net's shapes, with its text encoders present; a
    CheckpointError for any other SDXL-like file (inpainting, other variants)."""
    family = SDXL_LABEL_EMB.get(tuple(label_emb))
    if family is None or first_conv[1] != 4:
        raise CheckpointError(ckpt.path, f"has an SDXL-like U-Net (label_emb.0.0.weight "
                              f"{list(label_emb)}, {first_conv[1]} input channels) that is "
                              "neither SDXL 1.0 base ([1280, 2816], 4) nor refiner ([1536, "
                              "2560], 4); ldm does not know this variant")
    for component, prefix in checkpoint.TEXT_PREFIXES[family].items():
        if not ckpt.has_prefix(prefix):
            raise CheckpointError(ckpt.path, f"is an {family} file without its text encoder "
                                  f"{component} (no tensor named {prefix}*)")
    return family


def _open(path, mmap):
    if isinstance(path, Mapping):
        return checkpoint.open_state_dict(path)
    path = DEFAULT_CHECKPOINT if path is None else Path(path)
    if path == DEFAULT_CHECKPOINT and not path.exists():
        raise FileNotFoundError(f"no checkpoint named, and the default model {path} is not there")
    return checkpoint.open_checkpoint(path, mmap=mmap)


def _build(ckpt, config):
    """The model of `config` on the meta device (no memory, no init time)."""
    try:
        with torch.device("meta"):
            return pipeline_class(config)(config)
    except Exception as e:  # a config read from a file is hostile input; any failure is the file's
        if ckpt.config_json is None:
            raise
        raise CheckpointError(ckpt.path, f"its embedded config ({checkpoint.CONFIG_KEY}) "
                                         f"builds no model: {e!r}") from e


def pipeline_class(config):
    """StableDiffusionXL for the SDXL families, else StableDiffusion."""
    sdxl = config.text_encoder in checkpoint.SDXL_FAMILIES
    return StableDiffusionXL if sdxl else StableDiffusion


def _device(device):
    """`device` as a torch.device, once a tensor is known to fit there."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got "
                         f"{device!r} ({e})") from None
    if device.type == "meta":  # holds shapes only: nothing to generate with
        raise ValueError("device 'meta' holds no weights; load on 'cpu' or an accelerator")
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:  # torch's CUDA stub asserts when none is built
        raise ValueError(f"device {str(device)!r} cannot hold the weights here: {e}") from None
    return device


def _preset(config):
    if isinstance(config, ModelConfig):
        return config
    if config not in PRESETS:
        raise ValueError(f"config must be a ModelConfig or one of {list(PRESETS)}, got {config!r}")
    return PRESETS[config]


def _has_ema(ckpt):
    return any(name.startswith(checkpoint.EMA_PREFIX) and name not in checkpoint.IGNORED
               for name in ckpt.shapes)


def _text_prefix(ckpt, config):
    """SD 1 files saved by older transformers lack `text_model.`; None: the family's prefix."""
    if (config.text_encoder == "clip" and not ckpt.has_prefix(checkpoint.PREFIXES["text_encoder"])
            and ckpt.has_prefix(checkpoint.LEGACY_TEXT_PREFIX)):
        return checkpoint.LEGACY_TEXT_PREFIX
    return None  # check_tensors names whatever is missing
