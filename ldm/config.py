"""Whole-model configurations: which U-Net, VAE and text encoder make up one Stable Diffusion.

Each component has its own frozen dataclass beside its module (`UNetConfig`, `VAEConfig`,
`CLIPTextConfig`, `OpenCLIPTextConfig`) whose defaults are the SD 1.5 (text: SD 2) numbers;
this file only combines them into the named presets. Variants are made with
`dataclasses.replace`.
"""
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field

from ldm.arguments import check_cfg_interval
from ldm.models.clip_text import CLIP_TINY, CLIPTextConfig
from ldm.models.open_clip_text import OPEN_CLIP_BIGG, OpenCLIPTextConfig
from ldm.models.unet import (UNET_SD15_INPAINTING, UNET_SD21, UNET_SDXL, UNET_SDXL_REFINER,
                             UNET_TINY, UNetConfig)
from ldm.models.vae import VAE_TINY, VAEConfig
from ldm.samplers import resolve

# SD 1.x/2.x latents are scaled by this constant so that they have roughly unit variance
# (CompVis `scale_factor`); it belongs to the pipeline, not to the VAE. SDXL's VAE has its own.
SD_SCALE_FACTOR = 0.18215
SDXL_SCALE_FACTOR = 0.13025


@dataclass(frozen=True)
class SamplingDefaults:
    """What a model generates with when the caller does not say: the SD script's defaults, or
    what a model card recommends. cfg_interval: (low, high) whole timesteps, guidance only
    where low ≤ t ≤ high (`samplers.cfg`); None: at every step."""
    steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 7.5
    cfg_interval: tuple | None = None


# The text encoder families, (config of `text`, config of `text_2`): SD 1.x's CLIP ViT-L/14,
# SD 2.x's OpenCLIP ViT-H/14, SDXL base's CLIP ViT-L/14 + OpenCLIP ViT-bigG/14, and the SDXL
# refiner's bigG alone (in the second slot, as diffusers names it: text_encoder_2).
TEXT_CONFIGS = {"clip": (CLIPTextConfig, None), "open_clip": (OpenCLIPTextConfig, None),
                "sdxl": (CLIPTextConfig, OpenCLIPTextConfig),
                "sdxl-refiner": (None, OpenCLIPTextConfig)}


@dataclass(frozen=True)
class ModelConfig:
    """One latent diffusion model: the three networks plus the latent scale factor.

    text_encoder: the family of text encoders, which `text` and `text_2` configure: "clip"
    (SD 1.x), "open_clip" (SD 2.x), "sdxl" (CLIP-L `text` + bigG `text_2`), "sdxl-refiner"
    (bigG `text_2` only, `text` None).
    prediction: what the U-Net predicts, "eps" (noise) or "v" (SD 2 768-v).
    """
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: CLIPTextConfig | OpenCLIPTextConfig | None = field(default_factory=CLIPTextConfig)
    text_2: OpenCLIPTextConfig | None = None
    text_encoder: str = "clip"
    prediction: str = "eps"
    scale_factor: float = SD_SCALE_FACTOR
    image_size: int = 512  # the native (training) resolution: the default height and width
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self):
        if self.text_encoder not in TEXT_CONFIGS:
            raise ValueError(f"text_encoder must be one of {list(TEXT_CONFIGS)}, "
                             f"got {self.text_encoder!r}")
        for name, expected in zip(("text", "text_2"), TEXT_CONFIGS[self.text_encoder]):
            value = getattr(self, name)
            if not (value is None if expected is None else isinstance(value, expected)):
                wanted = "None" if expected is None else f"{expected.__name__}(…)"
                raise ValueError(f"text_encoder {self.text_encoder!r} needs {name}={wanted}, "
                                 f"got {type(value).__name__}")
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Inverse of `to_json`, for text read from a file: every field present, none unknown,
        each of its type, and the whole buildable (`check`); lists become tuples again so
        configs stay hashable. Raises ConfigError naming the field."""
        if not isinstance(text, str):
            raise ConfigError("", f"is a {type(text).__name__}, not JSON text")
        try:
            raw = json.loads(text)
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the stack
            raise ConfigError("", f"is not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError("", f"must be a JSON object, got {_shown(raw)}")
        raw = {**ADDED_FIELDS, **raw}
        if isinstance(raw.get("unet"), dict):
            raw["unet"] = {**ADDED_UNET_FIELDS, **raw["unet"]}
        if isinstance(raw.get("sampling"), dict):
            raw["sampling"] = {**ADDED_SAMPLING_FIELDS, **raw["sampling"]}
        encoder = raw["text_encoder"]
        if not isinstance(encoder, str) or encoder not in TEXT_CONFIGS:
            raise ConfigError("text_encoder", f"must be one of {list(TEXT_CONFIGS)}, got "
                                              f"{_shown(encoder)}")
        text, text_2 = TEXT_CONFIGS[encoder]
        parts = {"unet": UNetConfig, "vae": VAEConfig, "sampling": SamplingDefaults,
                 "text": text, "text_2": text_2}
        values = _typed(cls, raw, "", parts)
        check(_unchecked(cls, {k: _unchecked(parts[k], v) if k in parts and v is not None
                               else v for k, v in values.items()}))
        return _build(cls, {k: _build(parts[k], v, k) if k in parts and v is not None else v
                            for k, v in values.items()}, "")


# Fields that files written before they existed lack (weights/tiny-shapes.safetensors among
# them), with what those files meant; every other field must be in the file.
ADDED_FIELDS = {"text_encoder": "clip", "prediction": "eps", "text_2": None}
ADDED_UNET_FIELDS = {"middle_transformer_depth": None, "adm_in_channels": None}  # SDXL's
ADDED_SAMPLING_FIELDS = {"cfg_interval": None}  # guidance at every step


class ConfigError(ValueError):
    """A config that describes no buildable model; `field` is its dotted name
    ("unet.norm_groups"), "" for the whole."""

    def __init__(self, field, problem):
        self.field = field
        super().__init__(f"{field}: {problem}" if field else problem)


def _typed(config_cls, values, prefix, parts=None):
    """`values` (a JSON object) checked against `config_cls`'s fields: all there, no others, each
    of its annotated type (`parts`: the nested configs, checked in turn). Returns the values
    with lists as tuples."""
    if not isinstance(values, dict):
        raise ConfigError(prefix, f"must be a JSON object, got {_shown(values)}")
    names = [f.name for f in dataclasses.fields(config_cls)]
    for name in values:
        if name not in names:
            raise ConfigError(_join(prefix, name), f"is not a field of {config_cls.__name__} "
                                                   f"(its fields: {', '.join(names)})")
    for name in names:
        if name not in values:
            raise ConfigError(_join(prefix, name), "is missing")
    hints = typing.get_type_hints(config_cls)
    parts = parts or {}
    for name, part in parts.items():  # a text encoder slot the family leaves empty
        if part is None and values[name] is not None:
            raise ConfigError(name, f"must be null for text_encoder {values['text_encoder']!r}")
    return {name: _typed(parts[name], values[name], name) if parts.get(name) is not None
            else _value(_join(prefix, name), values[name], hints[name]) if name not in parts
            else None for name in names}


def _value(field_name, value, hint):
    """`value` if it is of type `hint` (int, float, str, bool, a tuple of ints, `int | None`)."""
    kinds = typing.get_args(hint) or (hint,)  # `int | None` -> (int, NoneType)
    is_int = type(value) is int  # bool is an int subclass, and never a size
    for kind in kinds:
        if ((kind is int and is_int) or (kind is str and type(value) is str)
                or (kind is bool and type(value) is bool) or (kind is type(None) and value is None)
                # JSON has NaN and Infinity; no config field means either
                or (kind is float and _finite_number(value))):
            return value
        if kind is tuple and type(value) is list and all(type(v) is int for v in value):
            return tuple(value)
    wanted = " or ".join("a list of integers" if k is tuple else "null" if k is type(None)
                         else k.__name__ for k in kinds)
    raise ConfigError(field_name, f"must be {wanted}, got {_shown(value)}")


def _finite_number(value):
    if type(value) is int:  # may be too large for a float
        return abs(value) < 2 ** 1023
    return type(value) is float and math.isfinite(value)


def _unchecked(config_cls, values):
    """A `config_cls` whose __post_init__ has not run, for `check` to name the field at fault
    before the dataclass's own checks fail less precisely (or divide by zero)."""
    config = object.__new__(config_cls)
    for name, value in values.items():
        object.__setattr__(config, name, value)  # frozen dataclasses refuse plain setattr
    return config


def _build(config_cls, values, prefix):
    try:
        return config_cls(**values)
    except ValueError as e:  # the dataclasses' own checks (heads dividing the width, …)
        raise ConfigError(prefix, str(e)) from None


# Far above any SD-family model; they keep a hostile config from making the model's build (on
# the meta device: no memory for weights, but Python objects per layer) or its default image
# absurdly large.
MAX_DEPTH = 1024   # blocks per level, transformer layers, text layers
MAX_LEVELS = 8     # U-Net and VAE resolution levels
MAX_IMAGE_SIZE = 16384


def check(config):
    """Raise ConfigError (naming the field) unless `config` builds a model that can generate:
    sizes positive, channel counts divisible by their norm groups and heads, the image size a
    multiple of the latent grid, a known default sampler."""
    _check_unet(config.unet)
    _check_vae(config.vae)
    for name in ("text", "text_2"):
        if getattr(config, name) is not None:
            _check_text(getattr(config, name), name)
    if config.prediction not in ("eps", "v"):
        raise ConfigError("prediction", f"must be 'eps' or 'v', got {config.prediction!r}")
    _positive("scale_factor", config.scale_factor)
    multiple = config.vae.downsampling_factor * config.unet.size_multiple
    _positive("image_size", config.image_size, MAX_IMAGE_SIZE)
    if config.image_size % multiple:
        raise ConfigError("image_size", f"must be a multiple of {multiple} (VAE downsampling "
                                        f"times U-Net levels), got {config.image_size}")
    _check_sampling(config.sampling)


def _check_unet(c):
    for name in ("in_channels", "out_channels", "model_channels", "context_dim", "norm_groups"):
        _positive(f"unet.{name}", getattr(c, name))
    _positive("unet.num_res_blocks", c.num_res_blocks, MAX_DEPTH)
    _levels("unet.channel_mult", c.channel_mult)
    _check_depths(c)
    if c.adm_in_channels is not None:
        _positive("unet.adm_in_channels", c.adm_in_channels)
    if (c.num_heads is None) == (c.head_dim is None):
        raise ConfigError("unet.head_dim", "set exactly one of unet.num_heads and unet.head_dim, "
                                           f"got {c.num_heads} and {c.head_dim}")
    for name in ("num_heads", "head_dim"):
        if getattr(c, name) is not None:
            _positive(f"unet.{name}", getattr(c, name))
    if not 0 <= c.dropout < 1:
        raise ConfigError("unet.dropout", f"must be in [0, 1), got {c.dropout}")
    for level in c.attention_levels:
        if not 0 <= level < c.num_levels:
            raise ConfigError("unet.attention_levels", f"level {level} is not one of the "
                                                       f"{c.num_levels} levels")
    for level in range(c.num_levels):
        where = f"level {level}"
        _divides("unet.norm_groups", c.norm_groups, c.level_channels(level), where)
        if level in c.attention_levels:
            heads = "unet.num_heads" if c.num_heads is not None else "unet.head_dim"
            _divides(heads, c.num_heads or c.head_dim, c.level_channels(level), where)


def _check_depths(c):
    depths = c.transformer_depth
    if isinstance(depths, tuple):
        if len(depths) != c.num_levels or min(depths, default=0) < 0 or max(depths) > MAX_DEPTH:
            raise ConfigError("unet.transformer_depth", f"must be one number, or {c.num_levels} "
                              f"(one per level) in [0, {MAX_DEPTH}], got {list(depths)}")
        for level in c.attention_levels:
            if 0 <= level < c.num_levels and depths[level] == 0:
                raise ConfigError("unet.transformer_depth", f"is 0 at level {level}, one of "
                                  "unet.attention_levels")
    else:
        _positive("unet.transformer_depth", depths, MAX_DEPTH)
    if c.middle_transformer_depth is not None:
        _positive("unet.middle_transformer_depth", c.middle_transformer_depth, MAX_DEPTH)
    elif isinstance(depths, tuple) and depths[-1] == 0:
        raise ConfigError("unet.middle_transformer_depth", "must be set when the last level's "
                          "transformer_depth is 0 (the middle block always has attention)")


def _check_vae(c):
    for name in ("ch", "z_channels", "in_channels", "out_channels", "norm_groups"):
        _positive(f"vae.{name}", getattr(c, name))
    _positive("vae.num_res_blocks", c.num_res_blocks, MAX_DEPTH)
    _levels("vae.ch_mult", c.ch_mult)
    _positive("vae.norm_eps", c.norm_eps)
    for level, channels in enumerate(c.level_channels):
        _divides("vae.norm_groups", c.norm_groups, channels, f"level {level}")


def _check_text(c, slot="text"):
    for name in ("vocab_size", "max_positions", "width", "heads", "mlp_ratio"):
        _positive(f"{slot}.{name}", getattr(c, name))
    _positive(f"{slot}.layers", c.layers, MAX_DEPTH)
    _positive(f"{slot}.eps", c.eps)
    _divides(f"{slot}.heads", c.heads, c.width, f"{slot}.width")
    skip_last = getattr(c, "skip_last", 0)  # OpenCLIP's only
    if not 0 <= skip_last < c.layers:
        raise ConfigError(f"{slot}.skip_last", f"must be in [0, {c.layers}), got {skip_last}")


def _check_sampling(s):
    try:
        sampler, _ = resolve(s.sampler)
    except ValueError as e:
        raise ConfigError("sampling.sampler", str(e)) from None
    _positive("sampling.steps", s.steps, sampler.max_steps)
    try:
        check_cfg_interval(s.cfg_interval)
    except (TypeError, ValueError) as e:
        raise ConfigError("sampling.cfg_interval", str(e)) from None


def _positive(name, value, limit=None):
    if value <= 0 or (limit is not None and value > limit):
        bound = f"in [1, {limit}]" if limit is not None else "positive"
        raise ConfigError(name, f"must be {bound}, got {value}")


def _levels(name, multipliers):
    if not 1 <= len(multipliers) <= MAX_LEVELS or min(multipliers) <= 0:
        raise ConfigError(name, f"must be 1 to {MAX_LEVELS} positive multipliers, got "
                                f"{list(multipliers)}")


def _divides(name, divisor, channels, where):
    if channels % divisor:
        raise ConfigError(name, f"{divisor} does not divide the {channels} channels of {where}")


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


def _shown(value, limit=40):
    """A JSON value as it appears in the file, cut short (it may be huge)."""
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


# The shipped model (weights/tiny-shapes.safetensors): the SD architecture at toy size, a KL-f4
# autoencoder (64×64 images <-> 4×16×16 latents) and a CLIP text encoder learned from scratch
# with the real tokenizer. The text width is small because its 49408-row token embedding is
# most of the file. scale_factor is measured after the autoencoder is trained (1 / latent std);
# the sampling defaults are those the model card measures.
TINY_SHAPES = ModelConfig(
    unet=UNetConfig(model_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_levels=(1, 2), num_heads=2, context_dim=64, norm_groups=8),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8),
    text=CLIPTextConfig(width=64, layers=2, heads=2),
    scale_factor=1.0,
    image_size=64,
    sampling=SamplingDefaults(steps=25, sampler="ddpm", cfg_scale=5.0,
                              cfg_interval=(200, 1000)),
)

# SD 2.0 / 2.1: the same U-Net layout with 64-wide heads, OpenCLIP text, and either v-prediction
# at 768×768 ("768-v") or ε at 512×512 ("base"); the files do not say which (see ldm.load).
SD21 = ModelConfig(unet=UNET_SD21, text=OpenCLIPTextConfig(), text_encoder="open_clip",
                   prediction="v", image_size=768)

# SDXL 1.0 base and refiner (sgm's sd_xl_base.yaml / sd_xl_refiner.yaml), at 1024×1024. Both
# sample on SD's noise schedule with ε-prediction; the defaults are sgm's demo: 40 Euler steps
# at guidance 5.
SDXL = ModelConfig(unet=UNET_SDXL, text=CLIPTextConfig(), text_2=OPEN_CLIP_BIGG,
                   text_encoder="sdxl", scale_factor=SDXL_SCALE_FACTOR, image_size=1024,
                   sampling=SamplingDefaults(steps=40, sampler="euler", cfg_scale=5.0))
SDXL_REFINER = dataclasses.replace(SDXL, unet=UNET_SDXL_REFINER, text=None,
                                   text_encoder="sdxl-refiner")

PRESETS = {
    "sd15": ModelConfig(),  # also SD 1.4, 1.2, 1.1: the same network
    "sd15-inpainting": ModelConfig(unet=UNET_SD15_INPAINTING),
    "sd21": SD21,  # v2-1_768-ema-pruned, v2-0 768-v
    "sd21-base": dataclasses.replace(SD21, prediction="eps", image_size=512),
    # 512-inpainting-ema: the 512 base model with SD 1.5 inpainting's 9 input channels
    "sd2-inpainting": dataclasses.replace(SD21, prediction="eps", image_size=512,
                                          unet=dataclasses.replace(UNET_SD21, in_channels=9)),
    "sdxl": SDXL,  # sd_xl_base_1.0
    "sdxl-refiner": SDXL_REFINER,  # sd_xl_refiner_1.0
    "tiny": ModelConfig(unet=UNET_TINY, vae=VAE_TINY, text=CLIP_TINY),
    "tiny-shapes": TINY_SHAPES,
}
