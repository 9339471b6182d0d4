"""Whole-model configurations: which U-Net, VAE and text encoder make up one Stable Diffusion.

Each component has its own frozen dataclass beside its module (`UNetConfig`, `VAEConfig`,
`CLIPTextConfig`, `OpenCLIPTextConfig`) whose defaults are the SD 1.5 (text: SD 2) numbers;
this file only combines them into the named presets. Variants are made with
`dataclasses.replace`.
"""
import dataclasses
import json
from dataclasses import dataclass, field

from ldm.models.clip_text import CLIP_TINY, CLIPTextConfig
from ldm.models.open_clip_text import OpenCLIPTextConfig
from ldm.models.unet import UNET_SD15_INPAINTING, UNET_SD21, UNET_TINY, UNetConfig
from ldm.models.vae import VAE_TINY, VAEConfig

# SD 1.x/2.x latents are scaled by this constant so that they have roughly unit variance
# (CompVis `scale_factor`); it belongs to the pipeline, not to the VAE.
SD_SCALE_FACTOR = 0.18215


@dataclass(frozen=True)
class SamplingDefaults:
    """What a model generates with when the caller does not say: the SD script's defaults, or
    what a model card recommends."""
    steps: int = 50
    sampler: str = "ddim"
    cfg_scale: float = 7.5


# The text encoder families: SD 1.x's CLIP ViT-L/14, SD 2.x's OpenCLIP ViT-H/14.
TEXT_CONFIGS = {"clip": CLIPTextConfig, "open_clip": OpenCLIPTextConfig}


@dataclass(frozen=True)
class ModelConfig:
    """One latent diffusion model: the three networks plus the latent scale factor.

    text_encoder: "clip" (SD 1.x) or "open_clip" (SD 2.x), the family `text` configures.
    prediction: what the U-Net predicts, "eps" (noise) or "v" (SD 2 768-v).
    """
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: CLIPTextConfig | OpenCLIPTextConfig = field(default_factory=CLIPTextConfig)
    text_encoder: str = "clip"
    prediction: str = "eps"
    scale_factor: float = SD_SCALE_FACTOR
    image_size: int = 512  # the native (training) resolution: the default height and width
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self):
        if self.text_encoder not in TEXT_CONFIGS:
            raise ValueError(f"text_encoder must be one of {list(TEXT_CONFIGS)}, "
                             f"got {self.text_encoder!r}")
        expected = TEXT_CONFIGS[self.text_encoder]
        if not isinstance(self.text, expected):
            raise ValueError(f"text_encoder {self.text_encoder!r} needs text={expected.__name__}"
                             f"(…), got {type(self.text).__name__}")
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {self.prediction!r}")

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Inverse of `to_json`; lists become tuples again so configs stay hashable."""
        raw = json.loads(text)
        parts = {"unet": UNetConfig, "vae": VAEConfig, "sampling": SamplingDefaults,
                 "text": TEXT_CONFIGS[raw.get("text_encoder", "clip")]}
        kwargs = {k: _build(parts[k], v) if k in parts else v for k, v in raw.items()}
        return cls(**kwargs)


def _build(config_cls, values):
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {config_cls.__name__} fields {sorted(unknown)}")
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# The shipped model (weights/tiny-shapes.safetensors): the SD architecture at toy size, a KL-f4
# autoencoder (64×64 images <-> 4×16×16 latents) and a CLIP text encoder learned from scratch
# with the real tokenizer. The text width is small because its 49408-row token embedding is
# most of the file. scale_factor is measured after the autoencoder is trained (1 / latent std);
# the sampling defaults are those the model card measures.
TINY_SHAPES = ModelConfig(
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                    attention_levels=(1, 2), num_heads=2, context_dim=64, norm_groups=8),
    vae=VAEConfig(ch=16, ch_mult=(1, 2, 4), num_res_blocks=1, norm_groups=8),
    text=CLIPTextConfig(width=64, layers=2, heads=2),
    scale_factor=1.0,
    image_size=64,
    sampling=SamplingDefaults(steps=25, sampler="ddpm", cfg_scale=3.0),
)

# SD 2.0 / 2.1: the same U-Net layout with 64-wide heads, OpenCLIP text, and either v-prediction
# at 768×768 ("768-v") or ε at 512×512 ("base"); the files do not say which (see ldm.load).
SD21 = ModelConfig(unet=UNET_SD21, text=OpenCLIPTextConfig(), text_encoder="open_clip",
                   prediction="v", image_size=768)

PRESETS = {
    "sd15": ModelConfig(),  # also SD 1.4, 1.2, 1.1: the same network
    "sd15-inpainting": ModelConfig(unet=UNET_SD15_INPAINTING),
    "sd21": SD21,  # v2-1_768-ema-pruned, v2-0 768-v
    "sd21-base": dataclasses.replace(SD21, prediction="eps", image_size=512),
    # 512-inpainting-ema: the 512 base model with SD 1.5 inpainting's 9 input channels
    "sd2-inpainting": dataclasses.replace(SD21, prediction="eps", image_size=512,
                                          unet=dataclasses.replace(UNET_SD21, in_channels=9)),
    "tiny": ModelConfig(unet=UNET_TINY, vae=VAE_TINY, text=CLIP_TINY),
    "tiny-shapes": TINY_SHAPES,
}
