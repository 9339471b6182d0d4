"""ldm: a readable, from-scratch latent diffusion (Stable Diffusion) library.

    import ldm
    pipe = ldm.load("v1-5-pruned-emaonly.safetensors")
"""
from ldm.checkpoint import CheckpointError
from ldm.config import PRESETS, ModelConfig
from ldm.loader import load, save
from ldm.pipeline import StableDiffusion

__all__ = ["CheckpointError", "ModelConfig", "PRESETS", "StableDiffusion", "load", "save"]
