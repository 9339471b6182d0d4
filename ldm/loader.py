"""`ldm.load` and `ldm.save`: a StableDiffusion from / to an original-layout checkpoint file.

The file format and the name map live in `ldm/checkpoint.py`; this module decides which model a
file holds, builds it on the meta device (no memory, no init time) and fills it tensor by tensor.
"""
from pathlib import Path

import torch

from ldm import checkpoint
from ldm.checkpoint import CheckpointError
from ldm.config import PRESETS, ModelConfig
from ldm.pipeline import StableDiffusion

# The small model the project trains and ships (issue: embedded default model).
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "weights" / "tiny-shapes.safetensors"


def load(path=None, *, device="cpu", dtype=torch.float32, use_ema=True, strict=False):
    """Load an original-layout checkpoint (.safetensors or .ckpt) into a `StableDiffusion`.

    path: the file; None loads the small model shipped in weights/.
    use_ema: when the file holds EMA copies of the U-Net (`model_ema.*`), load those.
    strict: refuse files with unexpected tensors instead of warning.
    Raises CheckpointError (naming the file and each missing/misshapen tensor) on bad files.
    """
    path = DEFAULT_CHECKPOINT if path is None else Path(path)
    if path == DEFAULT_CHECKPOINT and not path.exists():
        raise FileNotFoundError(f"no checkpoint named, and the default model {path} is not there")
    ckpt = checkpoint.open_checkpoint(path)
    config = detect_config(ckpt)
    with torch.device("meta"):
        pipe = StableDiffusion(config)
    networks = pipe.networks()
    rows = checkpoint.name_map(networks, use_ema=use_ema and _has_ema(ckpt),
                               text_prefix=_text_prefix(ckpt))
    shapes = {f"{c}.{n}": tuple(t.shape) for c, m in networks.items()
              for n, t in m.state_dict().items()}
    checkpoint.check_tensors(ckpt, rows, shapes, strict=strict)
    checkpoint.check_schedule(ckpt)
    for component, module in networks.items():
        weights = checkpoint.read_component(ckpt, rows, component, device=device, dtype=dtype)
        module.load_state_dict(weights, strict=True, assign=True)
    return pipe.eval()


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
        return ModelConfig.from_json(ckpt.config_json)
    unet = checkpoint.PREFIXES["unet"]
    first_conv = ckpt.shapes.get(unet + "input_blocks.0.0.weight")
    if first_conv is None:
        raise CheckpointError(ckpt.path, "holds no Stable Diffusion U-Net (no tensor "
                              f"{unet}input_blocks.0.0.weight)")
    cross_attn = ckpt.shapes.get(unet + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if ckpt.has_prefix("cond_stage_model.model.") or (cross_attn and cross_attn[1] == 1024):
        raise CheckpointError(ckpt.path, "is a Stable Diffusion 2.x checkpoint (OpenCLIP ViT-H "
                              "text encoder, 1024-wide context); ldm loads SD 1.x only so far")
    families = {4: "sd15", 9: "sd15-inpainting"}
    if first_conv[1] not in families:
        raise CheckpointError(ckpt.path, f"has a U-Net with {first_conv[1]} input channels; "
                              "ldm knows 4 (SD 1.x) and 9 (SD 1.5 inpainting)")
    return PRESETS[families[first_conv[1]]]


def _has_ema(ckpt):
    return any(name.startswith(checkpoint.EMA_PREFIX) and name not in checkpoint.IGNORED
               for name in ckpt.shapes)


def _text_prefix(ckpt):
    if ckpt.has_prefix(checkpoint.PREFIXES["text_encoder"]):
        return checkpoint.PREFIXES["text_encoder"]
    if ckpt.has_prefix(checkpoint.LEGACY_TEXT_PREFIX):
        return checkpoint.LEGACY_TEXT_PREFIX
    return checkpoint.PREFIXES["text_encoder"]  # check_tensors then names what is missing
