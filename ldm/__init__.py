"""ldm: a readable, from-scratch latent diffusion (Stable Diffusion) library.

    import ldm
    pipe = ldm.load("v1-5-pruned-emaonly.safetensors")
    store = ldm.attention.AttentionStore()      # or any attention fn(q, k, v, *, layer)
    with ldm.attention.override(pipe.unet, store, layers="attn2"):
        pipe.txt2img("a red circle")           # store.maps: the cross-attention maps
"""
from ldm import attention
from ldm.checkpoint import CheckpointError
from ldm.config import PRESETS, ModelConfig
from ldm.loader import load, save
from ldm.parameters import Parameters, format_parameters, parse_parameters
from ldm.pipeline import StableDiffusion
from ldm.rng import randn
from ldm.sdxl import StableDiffusionXL

__all__ = ["CheckpointError", "ModelConfig", "PRESETS", "Parameters", "StableDiffusion",
           "StableDiffusionXL", "attention", "format_parameters", "load", "parse_parameters",
           "randn", "save"]
