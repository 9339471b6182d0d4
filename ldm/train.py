"""Training a latent diffusion model from scratch: first the autoencoder, then the U-Net jointly
with its text encoder (LDM, Rombach et al. 2022, with Stable Diffusion's objective).

    python -m ldm.train --preset tiny-shapes --out weights/tiny-shapes.safetensors
    torchrun --nproc_per_node 2 -m ldm.train --preset tiny-shapes --out …   # data-parallel

Stage 1, the autoencoder (`vae_steps` steps): per-element reconstruction L1 + L2 plus
    kl_weight · KL(q(z|x) ‖ N(0, I)), z drawn from the posterior (no GAN or perceptual loss).
    Then scale_factor = latent_std / std(z) (LDM's `scale_by_std`, which found SD's 0.18215,
    aims at latent_std = 1). A smaller latent_std lowers the signal-to-noise ratio at every t
    (the "input scaling" of Chen 2023, arXiv:2301.10972): SD's schedule ends at ᾱ_T = 0.0047,
    not 0, and in a small latent the channel means of x_T still tell a flat background's colour
    (60 % of the time at t = 999 for unit-variance 16×16 latents, 27 % at 0.25, chance 17 %);
    a model trained on that reads the background from the starting noise, not from the text.
Stage 2, the latent diffusion (`steps` steps), the autoencoder frozen: ε-prediction
    loss = ‖ε − ε_θ(x_t, t, text(c))‖²,  x_t = √ᾱ_t z₀ + √(1 − ᾱ_t) ε,  t ~ U{0, …, 999},
    on SD's schedule, z₀ = scale_factor · z. The caption is replaced by "" with probability
    `uncond_prob`, so that one network also learns the unconditional ε that classifier-free
    guidance extrapolates from.
Both: AdamW, linear warm-up then cosine decay, gradient-norm clipping; stage 2 keeps an EMA of
the U-Net weights (CompVis LitEma's warm-up), which is what sampling uses.

Checkpoints (`.ckpt`) are Lightning-like: "state_dict" in the original layout with the EMA copies
as `model_ema.*` (so `ldm.load` reads them, EMA by default), plus "global_step" and
"optimizer_states". Training resumes from one and continues exactly as if never stopped: each
step's data and noise come from a generator seeded by (seed, step) alone.

Data parallelism (torch.distributed: gloo on CPUs, NCCL on GPUs): every rank draws the same
global batch, keeps its slice, and DDP averages the gradients, so a run's result does not depend
on the process count. Gradient accumulation (`grad_accum` N) splits each rank's slice again into
N micro-batches whose gradients add up: the batch, hence the result, stays the same.

Fine-tuning (`finetune`, `python -m ldm.train --init FILE`) starts from any checkpoint ldm loads
and runs stage 2 only, on all of the U-Net's weights (and the text encoder's, if asked; `--ema`
keeps the U-Net's EMA and writes it) or on a LoRA (`ldm.lora_training`) with the model frozen;
its resumable state is a folder (`state_dir`: the trained weights, the optimiser, the step, the
RNG states), its result a model file or a kohya LoRA file.

    python -m ldm.train --init weights/tiny-shapes.safetensors --lora-rank 8 --out my.safetensors
    python -m ldm.train --init v1-5.safetensors --data photos/ --resolution 512 \
        --cache-latents cache/ --lora-rank 16 --precision bf16 --grad-checkpointing \
        --out my.safetensors
    python -m ldm.train --init weights/tiny-shapes.safetensors --world shapes+purple+star \
        --only purple star --fit-latents 128 --replay 0.25 --lora-rank 8 --lora-text-encoder \
        --lora-conv-rank 8 --out new-words.safetensors   # words the encoder cannot encode:
                                                          # ldm.latent_targets
"""
import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ldm import checkpoint, latent_targets
from ldm.data import shapes
from ldm.data.folder import ImageFolder, LatentCache
from ldm.images import to_pil
from ldm.loader import load
from ldm.lora_training import (DEFAULT_TARGETS, LoRAConfig, LoRANetwork,
                               kohya_training_metadata)
from ldm.models.vae import DiagonalGaussian
from ldm.pipeline import StableDiffusion

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the defaults train the shipped tiny-shapes model."""
    vae_steps: int = 2000
    vae_batch: int = 8
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6      # per element; SD's 1e-6 on sums is ~1e-7 per element
    latent_std: float = 0.25     # std of the scaled latents z₀ the diffusion sees (SD: 1)
    steps: int = 4000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1    # the cosine decays to lr · min_lr_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    uncond_prob: float = 0.1
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    grad_accum: int = 1          # micro-batches per step: the batch is split, not multiplied
    precision: str = "fp32"      # "bf16": autocast; "fp16": autocast and a grad scaler (CUDA)
    grad_checkpointing: bool = False  # recompute activations in the backward pass

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got "
                             f"{self.precision!r}")
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) \
                or self.grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive int, got {self.grad_accum!r}")

    @property
    def total_steps(self):
        return self.vae_steps + self.steps


# The autocast dtype of each `precision` (None: none, fp32 throughout).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# What `--preset` trains: the architecture and the data (TrainConfig's defaults are its settings).
RECIPES = {"tiny-shapes": (shapes.TINY_SHAPES_CONFIG, shapes.training_batch)}


class EMA:
    """Exponential moving average of a module's weights (CompVis `LitEma`).

    The n-th update uses decay min(decay, (1 + n) / (10 + n)), so that the average is not
    dominated by the random initialisation during the first few hundred steps.
    """

    def __init__(self, module, decay):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module):
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, value in module.state_dict().items():
            self.shadow[name].lerp_(value.detach(), 1.0 - decay)


class AutoencoderObjective(nn.Module):
    """images (B, 3, H, W), noise (B, z, h, w) -> scalar loss (reconstruction + weighted KL)."""

    def __init__(self, vae, kl_weight):
        super().__init__()
        self.vae, self.kl_weight = vae, kl_weight

    def forward(self, images, noise):
        posterior = self.vae.encode(images)
        z = posterior.sample(noise=noise)  # mean + std · noise: gradients reach both
        error = self.vae.decode(z) - images
        reconstruction = error.abs().mean() + error.pow(2).mean()
        # KL(N(μ, σ²) ‖ N(0, 1)) per latent element.
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1.0 - posterior.logvar).mean()
        return reconstruction + self.kl_weight * kl


class DiffusionObjective(nn.Module):
    """latents z₀ (B, 4, h, w), ids (B, 77), t (B,), noise ε (B, 4, h, w) -> scalar MSE of the
    U-Net's prediction: of ε, or for `prediction` "v" (SD 2 768-v) of
    v = √ᾱ_t ε − √(1 − ᾱ_t) z₀ (Salimans & Ho 2022)."""

    def __init__(self, text_encoder, unet, alphas_cumprod, prediction="eps"):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet
        self.alphas_cumprod = alphas_cumprod  # float64 (T,); not a buffer, DDP need not sync it
        self.prediction = prediction

    def forward(self, latents, ids, t, noise):
        alpha_bar = self.alphas_cumprod.to(t.device)[t].to(latents.dtype)[:, None, None, None]
        noisy = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise  # (B, 4, h, w)
        cond = {"context": self.text_encoder(ids)}  # the conditioning dict, as when sampling
        target = noise
        if self.prediction == "v":
            target = alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * latents
        return F.mse_loss(self.unet(noisy, t, **cond), target)


@dataclass
class TrainingState:
    """Everything a checkpoint holds: the model, the U-Net's EMA (None when fine-tuning without
    `ema`), the step, the optimiser; when fine-tuning a LoRA, its `network` (attached to `pipe`)."""
    pipe: StableDiffusion
    ema: EMA | None
    step: int = 0                    # optimisation steps done, both stages counted
    optimizer_state: dict | None = None
    optimizer_stage: str | None = None
    network: LoRANetwork | None = None
    scaler_state: dict | None = None  # fp16's GradScaler


def new_state(model_config, train_config):
    with torch.random.fork_rng():  # the initial weights depend on the seed alone
        torch.manual_seed(train_config.seed)
        pipe = StableDiffusion(model_config)
    return TrainingState(pipe, EMA(pipe.unet, train_config.ema_decay))


def train(model_config, train_config, data, checkpoint_path=None, progress=True,
          on_step=None):
    """Train both stages (or what is left of them after the checkpoint), return the state.

    data(batch_size, generator) -> an object with `.images` (B, 3, H, W) in [-1, 1] and
    `.captions` (B str). When torch.distributed is initialised, trains data-parallel; only
    rank 0 writes `checkpoint_path` (every `checkpoint_every` steps and at the end).
    on_step(stage, step, loss, state), after every optimisation step on every rank: stage is
    "autoencoder" or "diffusion", step counts both stages (1 after the first), loss is this
    rank's float; for logging, or sampling from `state.pipe` / `state.ema` along the way.
    """
    path = None if checkpoint_path is None else Path(checkpoint_path)
    if path is not None and path.exists():
        state = load_training_checkpoint(path, train_config.ema_decay)
        log.info("resuming %s at step %d", path, state.step)
    else:
        state = new_state(model_config, train_config)
    for module in state.pipe.networks().values():
        # Small-channel convolutions run several times faster on CPU in this layout.
        module.to(memory_format=torch.channels_last).train()
    if train_config.grad_checkpointing:
        enable_gradient_checkpointing(state.pipe)
    save = None if path is None else lambda: save_training_checkpoint(path, state)
    trainer = _Trainer(state, train_config, data, save, progress, on_step)
    try:
        if state.step < train_config.vae_steps:
            trainer.train_autoencoder()
        if state.step < train_config.total_steps:
            trainer.train_diffusion()
        trainer.save()
    finally:
        disable_gradient_checkpointing(state.pipe)
    return state


def finetune(pipe, config, data, *, lora=None, train_text_encoder=False, ema=False,
             state_dir=None, resume=None, progress=True, on_step=None):
    """Fine-tune `pipe` (a model from any checkpoint, `ldm.load(…, dtype=torch.float32)`) in
    place for `config.steps` steps of the diffusion objective; returns the TrainingState.

    lora: a LoRAConfig: train a LoRA (`state.network`, left attached to pipe, so that pipe
    generates with it; `state.network.save(path)` writes the kohya file) with every weight of
    the model frozen. None: train the U-Net's weights, and the text encoder's with
    `train_text_encoder`. The autoencoder is never trained.
    ema: with full fine-tuning, keep an EMA of the U-Net's weights (`config.ema_decay`, LitEma's
    warm-up, as from scratch) and end with `pipe.unet` holding it: the weights to sample and
    export (the raw ones are in the state folder, to resume from).
    data(batch_size, generator): as for `train` (`ImageFolder.batch`, `shapes.training_batch`).
    config: steps, batch, lr, warmup, min_lr_ratio, weight_decay, grad_clip, uncond_prob, seed,
    checkpoint_every, grad_accum, precision, grad_checkpointing, ema_decay (the vae_* fields,
    kl_weight and latent_std are not used).
    state_dir: a folder rank 0 writes the resumable state to (`save_finetune_state`) every
    `checkpoint_every` steps and at the end. resume: such a folder to continue from, with
    `pipe` loaded from the same checkpoint and the same lora / train_text_encoder (ValueError
    otherwise; a changed `config` is logged); with the same config, the run ends exactly where
    an uninterrupted one would.
    on_step: as for `train` (stage "diffusion", step from 1).
    """
    _check_finetunable(pipe)
    if ema and lora is not None:
        raise ValueError("ema is for full fine-tuning: a LoRA's few weights are trained as they "
                         "are")
    pipe.vae.eval().requires_grad_(False)
    network, params = _trainable(pipe, lora, train_text_encoder, config.seed)
    settings = _settings(pipe, config, lora, train_text_encoder, ema)
    state = TrainingState(pipe, EMA(pipe.unet, config.ema_decay) if ema else None,
                          network=network)
    if resume is not None:
        load_finetune_state(resume, state, settings)
        log.info("resuming %s at step %d", resume, state.step)
    if config.grad_checkpointing:
        enable_gradient_checkpointing(pipe)
    save = None if state_dir is None else lambda: save_finetune_state(state_dir, state, settings)
    trainer = _Trainer(state, config, data, save, progress, on_step, finetuning=True)
    try:
        trainer.finetune(params)
        trainer.save()
    finally:
        disable_gradient_checkpointing(pipe)
    if ema:
        pipe.unet.load_state_dict(state.ema.shadow)
    return state


def _check_finetunable(pipe):
    c = pipe.config
    if c.text_encoder in ("sdxl", "sdxl-refiner"):
        raise ValueError("fine-tuning SDXL is not supported yet: its U-Net also takes y (pooled "
                         "text and image sizes), which the training objective does not build")
    if c.unet.in_channels != c.unet.out_channels:
        raise ValueError(f"fine-tuning an inpainting model ({c.unet.in_channels} input "
                         "channels) is not supported: its objective needs masks")
    wrong = {str(p.dtype) for m in pipe.networks().values() for p in m.parameters()
             if p.dtype != torch.float32}
    if wrong:
        raise ValueError(f"the model's weights must be float32 to train (autocast gives bf16 "
                         f"or fp16 speed: precision=), got {sorted(wrong)}; load it with "
                         "ldm.load(path, dtype=torch.float32)")


def _trainable(pipe, lora, train_text_encoder, seed):
    """(LoRANetwork or None, the parameters to optimise); everything else frozen."""
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    if lora is not None:
        if train_text_encoder:
            raise ValueError("train_text_encoder is for full fine-tuning; a LoRA adapts the "
                             "text encoder with LoRAConfig(text_encoder=True)")
        with torch.random.fork_rng(devices=[]):  # the adapters' initialisation: the seed's
            torch.manual_seed(seed)
            network = LoRANetwork(pipe, lora)
        return network, list(network.parameters())
    pipe.unet.requires_grad_(True).train()
    if train_text_encoder:
        for p in _text_parameters_used(pipe.text_encoder):
            p.requires_grad_(True)
        pipe.text_encoder.train()
    networks = (pipe.unet, pipe.text_encoder)
    return None, [p for m in networks for p in m.parameters() if p.requires_grad]


def _text_parameters_used(encoder):
    """The text encoder's parameters that reach the context: not OpenCLIP's projection, logit
    scale or the blocks SD 2 skips (DDP insists that every trained parameter gets a gradient)."""
    cfg = encoder.cfg
    unused = set()
    if hasattr(encoder, "transformer"):  # OpenCLIP
        used = cfg.layers - cfg.skip_last
        unused = {id(p) for block in encoder.transformer.resblocks[used:]
                  for p in block.parameters()}
        unused |= {id(encoder.text_projection), id(encoder.logit_scale)}
    return [p for p in encoder.parameters() if id(p) not in unused]


def _settings(pipe, config, lora, train_text_encoder, ema):
    """What a resumed run must share with the one that wrote the state (and its TrainConfig,
    which may change), as JSON."""
    return json.dumps({"model": json.loads(pipe.config.to_json()),
                       "lora": None if lora is None else dataclasses.asdict(lora),
                       "train_text_encoder": train_text_encoder, "ema": ema,
                       "config": dataclasses.asdict(config)}, sort_keys=True)


class _Trainer:
    """The training loops of `train` and `finetune`, sharing the state, the data and the
    checkpointing (`save`, a function of nothing, or None)."""

    def __init__(self, state, config, data, save, progress, on_step=None, finetuning=False):
        self.state, self.config, self.data, self._save = state, config, data, save
        self.on_step = on_step
        self.rank, self.world = _world()
        self.device = state.pipe.device
        # Inputs in the U-Net's layout (channels_last from `train`; `finetune` keeps ldm.load's).
        conv = state.pipe.unet.input_blocks[0][0].weight
        self.layout = (torch.channels_last if conv.is_contiguous(memory_format=torch.channels_last)
                       and not conv.is_contiguous() else torch.contiguous_format)
        batches = {"batch": config.batch} if finetuning else {  # fine-tuning: stage 2 alone
            "vae_batch": config.vae_batch, "batch": config.batch}
        for name, batch in batches.items():
            if batch % (self.world * config.grad_accum):
                raise ValueError(f"{name} {batch} must be a multiple of the {self.world} "
                                 f"process(es) × grad_accum {config.grad_accum}")
        if config.precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (float16 gradients need a "
                             "grad scaler); on the CPU use bf16")
        self.show_progress = progress and self.rank == 0

    def train_autoencoder(self):
        c, vae = self.config, self.state.pipe.vae
        objective = AutoencoderObjective(vae, c.kl_weight)
        self._loop("autoencoder", objective, list(vae.parameters()), c.vae_lr, 0, c.vae_steps,
                   self._autoencoder_inputs)
        self._set_scale_factor(measure_scale_factor(vae, self.data, c.latent_std))
        self.save()

    def train_diffusion(self):
        c, pipe = self.config, self.state.pipe
        pipe.vae.eval().requires_grad_(False)
        objective = DiffusionObjective(pipe.text_encoder, pipe.unet, pipe.alphas_cumprod)
        params = [*pipe.text_encoder.parameters(), *pipe.unet.parameters()]
        self._loop("diffusion", objective, params, c.lr, c.vae_steps, c.total_steps,
                   self._diffusion_inputs, after_step=lambda: self.state.ema.update(pipe.unet))

    def finetune(self, params):
        c, pipe = self.config, self.state.pipe
        objective = DiffusionObjective(pipe.text_encoder, pipe.unet, pipe.alphas_cumprod,
                                       pipe.config.prediction)
        if self.state.network is not None:
            objective.lora = self.state.network  # a submodule, so that DDP averages its grads
        ema = self.state.ema
        self._loop("diffusion", objective, params, c.lr, 0, c.steps, self._diffusion_inputs,
                   after_step=None if ema is None else lambda: ema.update(pipe.unet))

    def _loop(self, stage, objective, params, lr, first, last, inputs, after_step=None):
        """Optimise `objective(*micro_batch)` over `inputs(step)` for steps [state.step, last)
        of a stage that spans [first, last); checkpoint on the way."""
        c, state = self.config, self.state
        model = self._parallel(objective)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=c.weight_decay)
        scaler = torch.amp.GradScaler("cuda") if c.precision == "fp16" else None
        if state.optimizer_stage == stage and state.optimizer_state is not None:
            optimizer.load_state_dict(state.optimizer_state)
            if scaler is not None and state.scaler_state:
                scaler.load_state_dict(state.scaler_state)
        bar = Progress(stage, first, last, enabled=self.show_progress)
        for step in range(state.step, last):
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step - first, last - first, c.warmup, c.min_lr_ratio)
            loss = optimization_step(model, optimizer, params, inputs(step), grad_clip=c.grad_clip,
                                     precision=c.precision, scaler=scaler)
            if after_step is not None:
                after_step()
            state.step = step + 1
            state.optimizer_state, state.optimizer_stage = optimizer.state_dict(), stage
            state.scaler_state = None if scaler is None else scaler.state_dict()
            bar.update(state.step, loss)
            if self.on_step is not None:
                self.on_step(stage, state.step, loss, state)
            if state.step % c.checkpoint_every == 0 and state.step < last:
                self.save()
        bar.close()

    def _parallel(self, objective):
        if self.world == 1:
            return objective
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(objective, device_ids=ids)

    def _batch(self, step, batch_size):
        """The step's generator and global batch, and this rank's share of it in `grad_accum`
        micro-batches (slices of the global batch)."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        batch = self.data(batch_size, generator)
        per_rank = batch_size // self.world
        size = per_rank // self.config.grad_accum
        start = self.rank * per_rank
        pieces = [slice(start + i * size, start + (i + 1) * size)
                  for i in range(self.config.grad_accum)]
        return generator, batch, pieces

    def _latent_shape(self, batch):
        vae = self.state.pipe.vae.config
        if getattr(batch, "latents", None) is not None:  # cached posterior moments (B, 2z, h, w)
            return (batch.latents.shape[0], vae.z_channels, *batch.latents.shape[2:])
        images, factor = batch.images, vae.downsampling_factor
        return (images.shape[0], vae.z_channels, images.shape[2] // factor, images.shape[3] // factor)

    def _autoencoder_inputs(self, step):
        generator, batch, pieces = self._batch(step, self.config.vae_batch)
        noise = torch.randn(self._latent_shape(batch), generator=generator)
        return [(self._on_device(batch.images[p]), self._on_device(noise[p])) for p in pieces]

    def _diffusion_inputs(self, step):
        c, pipe = self.config, self.state.pipe
        generator, batch, pieces = self._batch(step, c.batch)
        shape = self._latent_shape(batch)
        dropped = torch.rand(c.batch, generator=generator) < c.uncond_prob
        t = torch.randint(0, len(pipe.alphas_cumprod), (c.batch,), generator=generator)
        noise = torch.randn(shape, generator=generator)
        posterior_noise = torch.randn(shape, generator=generator)
        captions = ["" if drop else text for drop, text in zip(dropped.tolist(), batch.captions)]
        return [self._diffusion_piece(batch, p, captions, t, noise, posterior_noise)
                for p in pieces]

    @torch.no_grad()
    def _diffusion_piece(self, batch, piece, captions, t, noise, posterior_noise):
        """(z₀, ids, t, ε) of one micro-batch: latents drawn from the VAE's posterior."""
        pipe = self.state.pipe
        if getattr(batch, "latents", None) is not None:  # from a LatentCache.for_vae
            posterior = DiagonalGaussian(batch.latents[piece].to(self.device))
        else:
            posterior = pipe.vae.encode(self._on_device(batch.images[piece]))
        latents = posterior.sample(noise=posterior_noise[piece].to(self.device)) * pipe.scale_factor
        ids = pipe.tokenizer(captions[piece]).to(self.device)
        return latents, ids, t[piece].to(self.device), self._on_device(noise[piece])

    def _on_device(self, x):
        return x.to(self.device).contiguous(memory_format=self.layout)

    def _set_scale_factor(self, value):
        pipe = self.state.pipe
        pipe.config = dataclasses.replace(pipe.config, scale_factor=value)
        pipe.scale_factor = value
        log.info("scale_factor = %.5f", value)

    def save(self):
        if self._save is not None and self.rank == 0:
            self._save()


def optimization_step(model, optimizer, params, micro_batches, *, grad_clip, precision="fp32",
                      scaler=None):
    """One optimiser step on a batch given as a list of equal micro-batches (argument tuples of
    `model`, which returns a mean loss): the gradient of the mean of their losses, which is the
    whole batch's. Under DDP the ranks average gradients once, after the last micro-batch.
    precision "bf16"/"fp16" runs the forward passes under autocast; `scaler` (a GradScaler,
    for fp16) scales the loss and skips steps whose gradients overflowed. The gradient norm is
    clipped to `grad_clip`. Returns the mean loss (float)."""
    optimizer.zero_grad(set_to_none=True)
    device_type = params[0].device.type
    losses = []
    for i, inputs in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with _autocast(precision, device_type):
                loss = model(*inputs)
            share = loss / len(micro_batches)  # exact for one micro-batch: x / 1 == x
            (share if scaler is None else scaler.scale(share)).backward()
        losses.append(loss.detach().float())
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip the true gradients
    nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    return torch.stack(losses).mean().item()


def _autocast(precision, device_type):
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype)


def lr_factor(step, total, warmup, min_ratio):
    """Multiplier of the base learning rate: linear warm-up over `warmup` steps, then a cosine
    from 1 down to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def measure_scale_factor(vae, data, latent_std=1.0, num_images=256, seed=1234):
    """latent_std / std of posterior samples z of `num_images` fresh images (LDM's
    scale_by_std, for latent_std = 1)."""
    batch = data(num_images, torch.Generator().manual_seed(seed))
    posterior = vae.encode(_channels_last(batch.images.to(next(vae.parameters()).device)))
    z = posterior.sample(torch.Generator().manual_seed(seed))
    return latent_std / z.std().item()


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def _world():
    """(rank, world size): (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# -- gradient checkpointing ---------------------------------------------------------------------

def enable_gradient_checkpointing(pipe):
    """Store only the inputs of each U-Net block and text-encoder layer in the forward pass and
    recompute the rest in the backward pass (torch.utils.checkpoint, non-reentrant): less
    memory for about one more forward pass. Gradients are unchanged; the weights' names too
    (each block's `forward` is wrapped on the instance; `disable_gradient_checkpointing`
    unwraps). Without gradients (sampling), blocks run as usual."""
    for module in _checkpoint_units(pipe):
        module.forward = types.MethodType(_checkpointed_forward, module)


def disable_gradient_checkpointing(pipe):
    for module in _checkpoint_units(pipe):
        module.__dict__.pop("forward", None)


def _checkpoint_units(pipe):
    unet = pipe.unet
    units = [*unet.input_blocks, unet.middle_block, *unet.output_blocks]
    for name, encoder in pipe.networks().items():
        if name.startswith("text_encoder"):
            units += list(encoder.encoder.layers if hasattr(encoder, "encoder")
                          else encoder.transformer.resblocks)
    return units


def _checkpointed_forward(self, *args, **kwargs):
    # The class's forward, bound to this module: a deep copy of the module binds its copy.
    forward = type(self).forward.__get__(self)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


# -- checkpoints --------------------------------------------------------------------------------

def save_training_checkpoint(path, state):
    """Write `state` as a Lightning-like .ckpt in the original layout, atomically.

    state_dict: every network under its original name, the U-Net's EMA under `model_ema.*`
    (with LitEma's `decay` and `num_updates`), the schedule buffers and `scale_factor`.
    """
    path = Path(path)
    if path.suffix != ".ckpt":
        raise ValueError(f"training checkpoints are .ckpt files (they hold the optimiser), got {path}")
    unet_prefix = checkpoint.PREFIXES["unet"]
    ema = {checkpoint.ema_name(unet_prefix + name): value
           for name, value in state.ema.shadow.items()}
    ema["model_ema.decay"] = torch.tensor(state.ema.decay, dtype=torch.float32)
    ema["model_ema.num_updates"] = torch.tensor(state.ema.num_updates, dtype=torch.int32)
    entries = {"global_step": state.step, "ldm.optimizer_stage": state.optimizer_stage,
               "optimizer_states": [state.optimizer_state] if state.optimizer_state else []}
    if state.scaler_state:
        entries["ldm.scaler_state"] = state.scaler_state
    checkpoint.save_checkpoint(
        path, state.pipe.networks(), state.pipe.config.to_json(), overwrite=True,
        extra_tensors={**ema, "scale_factor": torch.tensor(state.pipe.scale_factor)},
        extra_entries=entries)


def load_training_checkpoint(path, ema_decay=None):
    """Read a checkpoint written by `save_training_checkpoint` back into a TrainingState."""
    pipe = load(path, use_ema=False)
    contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    tensors = contents["state_dict"]
    stored_decay = tensors["model_ema.decay"].item()
    ema = EMA(pipe.unet, stored_decay if ema_decay is None else ema_decay)
    ema.num_updates = int(tensors["model_ema.num_updates"])
    prefix = checkpoint.PREFIXES["unet"]
    for name in ema.shadow:
        ema.shadow[name] = tensors[checkpoint.ema_name(prefix + name)].clone()
    optimizer_states = contents.get("optimizer_states") or [None]
    return TrainingState(pipe, ema, contents["global_step"], optimizer_states[0],
                         contents.get("ldm.optimizer_stage"),
                         scaler_state=contents.get("ldm.scaler_state"))


def export(state, path, dtype=torch.float16):
    """Write the model for inference: EMA U-Net as the main weights (as the "emaonly"
    releases), all weights cast to `dtype`, with the config in the file."""
    unet = copy.deepcopy(state.pipe.unet)
    unet.load_state_dict(state.ema.shadow)
    networks = {"unet": unet, "vae": copy.deepcopy(state.pipe.vae),
                "text_encoder": copy.deepcopy(state.pipe.text_encoder)}
    for module in networks.values():
        module.to(dtype=dtype, memory_format=torch.contiguous_format)
    checkpoint.save_checkpoint(path, networks, state.pipe.config.to_json(), overwrite=True)


STATE_FILE = "state.pt"  # in a fine-tuning state folder


def save_finetune_state(directory, state, settings):
    """Write a fine-tuning run's resumable state to `directory`/state.pt, atomically: the trained
    weights (the LoRA's, or the trained networks' in full, and the U-Net's EMA), the optimiser
    and grad-scaler states, the step, the RNG states and `settings` (what a resumed run must
    share)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    contents = {"step": state.step, "weights": _trained_weights(state),
                "ema_updates": None if state.ema is None else state.ema.num_updates,
                "optimizer": state.optimizer_state, "scaler": state.scaler_state,
                "rng": {"cpu": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                        else []},
                "settings": settings}
    path = directory / STATE_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:  # written whole, then renamed: an interrupted save leaves the previous state
        torch.save(contents, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_finetune_state(directory, state, settings):
    """Put the state `save_finetune_state` wrote in `directory` into `state` (whose pipe is the
    base model, freshly loaded). Raises FileNotFoundError without a state file and ValueError
    when its settings (model, LoRA, text encoder) are not `settings`."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"resume: {directory} holds no {STATE_FILE} (the folder a "
                                "fine-tuning run writes its state to)")
    contents = torch.load(path, map_location="cpu", weights_only=True)
    saved, wanted = json.loads(contents["settings"]), json.loads(settings)
    different = sorted(k for k in wanted if k != "config" and saved.get(k) != wanted[k])
    if different:
        raise ValueError(f"resume: {path} was written by a run with other {', '.join(different)}"
                         f": {json.dumps({k: saved.get(k) for k in different})[:300]}")
    changed = {k: (v, wanted["config"][k]) for k, v in saved.get("config", {}).items()
               if wanted["config"].get(k) != v}
    if changed:  # allowed (a longer run, another checkpoint interval), but not silently
        log.warning("resume: settings changed since %s (was, now): %s", path, changed)
    weights = contents["weights"]
    if state.network is not None:
        state.network.load_state_dict(weights["lora"])
    else:
        for name, tensors in weights.items():
            if name != "unet_ema":
                getattr(state.pipe, name).load_state_dict(tensors)
    if state.ema is not None:
        state.ema.shadow = {k: v.clone() for k, v in weights["unet_ema"].items()}
        state.ema.num_updates = contents["ema_updates"]
    state.step = contents["step"]
    state.optimizer_state, state.optimizer_stage = contents["optimizer"], "diffusion"
    state.scaler_state = contents["scaler"]
    torch.set_rng_state(contents["rng"]["cpu"])
    if contents["rng"]["cuda"] and torch.cuda.device_count() == len(contents["rng"]["cuda"]):
        torch.cuda.set_rng_state_all(contents["rng"]["cuda"])


def _trained_weights(state):
    if state.network is not None:
        return {"lora": state.network.state_dict()}
    networks = {"unet": state.pipe.unet, "text_encoder": state.pipe.text_encoder}
    weights = {name: module.state_dict() for name, module in networks.items()
               if any(p.requires_grad for p in module.parameters())}
    if state.ema is not None:
        weights["unet_ema"] = state.ema.shadow
    return weights


def export_model(pipe, path, dtype=torch.float16):
    """Write `pipe`'s weights for inference in `dtype`, with its config (what full fine-tuning
    produces; `ldm.load` reads it)."""
    networks = {name: copy.deepcopy(module).to(dtype=dtype, memory_format=torch.contiguous_format)
                for name, module in pipe.networks().items()}
    checkpoint.save_checkpoint(path, networks, pipe.config.to_json(), overwrite=True)


# -- samples during training --------------------------------------------------------------------

def sample_grid(pipe, prompts, *, seed=0, columns=None):
    """One image per prompt, from `seed` at the model's sampling defaults, as one PIL image:
    a grid in reading order, `columns` wide (default: the square root, rounded up)."""
    modes = {name: module.training for name, module in pipe.networks().items()}
    pipe.eval()
    try:
        images = pipe.txt2img(list(prompts), seed=seed, output_type="tensor", progress=False)
    finally:
        for name, module in pipe.networks().items():
            module.train(modes[name])
    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = -(-n // columns)
    blank = images.new_full((rows * columns - n, *images.shape[1:]), -1.0)  # black
    grid = rearrange(torch.cat([images, blank]), "(r k) c h w -> 1 c (r h) (k w)", k=columns)
    return to_pil(grid)[0]


def sample_every(every, prompts, folder, *, seed=0):
    """An on_step hook for `train` / `finetune`: every `every` diffusion steps, rank 0 writes
    `sample_grid(prompts)` to folder/step-000100.png."""
    if every < 1 or not prompts:
        raise ValueError(f"sample_every needs every >= 1 and prompts, got {every}, {prompts!r}")
    folder = Path(folder)

    def on_step(stage, step, loss, state):
        if stage == "diffusion" and step % every == 0 and _world()[0] == 0:
            folder.mkdir(parents=True, exist_ok=True)
            sample_grid(state.pipe, prompts, seed=seed).save(folder / f"step-{step:06d}.png")
    return on_step


# -- progress -----------------------------------------------------------------------------------

class Progress:
    """A progress bar with the running loss, on stderr: redrawn in place on a terminal, one
    line every `every_s` seconds in a log file."""

    def __init__(self, name, first, last, enabled=True, every_s=30.0):
        self.name, self.first, self.last, self.enabled = name, first, last, enabled
        self.interactive = sys.stderr.isatty()
        self.every_s = 0.2 if self.interactive else every_s
        self.start = self.shown = time.monotonic()
        self.begin_step, self.loss = None, None

    def update(self, step, loss):
        self.loss = loss if self.loss is None else 0.98 * self.loss + 0.02 * loss
        self.begin_step = step - 1 if self.begin_step is None else self.begin_step
        now = time.monotonic()
        if self.enabled and (now - self.shown >= self.every_s or step == self.last):
            self.shown = now
            self._draw(step, now - self.start)

    def _draw(self, step, elapsed):
        done, total = step - self.first, self.last - self.first
        rate = (step - self.begin_step) / max(elapsed, 1e-9)
        eta = (self.last - step) / max(rate, 1e-9)
        width = 30
        filled = int(width * done / max(total, 1))
        text = (f"{self.name} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} "
                f"{rate:.2f} it/s, {elapsed / 60:.1f} min, eta {eta / 60:.1f} min, "
                f"loss {self.loss:.4f}")
        sys.stderr.write(("\r" + text) if self.interactive else text + "\n")
        sys.stderr.flush()

    def close(self):
        if self.enabled and self.interactive:
            sys.stderr.write("\n")


# -- command line -------------------------------------------------------------------------------

# TrainConfig fields that only training from scratch uses.
SCRATCH_ONLY = ("vae_steps", "vae_batch", "vae_lr", "kl_weight", "latent_std")
# Fine-tuning's defaults where the from-scratch recipe's do not fit (lr: LoRA, full).
FINETUNE_DEFAULTS = {"steps": 1000, "batch": 8, "warmup": 50}
FINETUNE_LR = {True: 1e-4, False: 1e-5}


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m ldm.train", description="Train a latent "
                                "diffusion model from scratch (the autoencoder, then the U-Net "
                                "with its text encoder), or fine-tune one (--init): all of its "
                                "U-Net, or a LoRA.")
    p.add_argument("--preset", default="tiny-shapes", choices=sorted(RECIPES),
                   help="what to train from scratch (without --init)")
    p.add_argument("--init", help="checkpoint to fine-tune: any file ldm.load reads "
                   "(weights/tiny-shapes.safetensors, SD 1.x/2.x)")
    p.add_argument("--out", required=True, help="written at the end: the model (.safetensors "
                   "or .ckpt), or with --lora-rank the LoRA (.safetensors, kohya's format)")
    p.add_argument("--checkpoint", help="from scratch: training checkpoint (.ckpt) to write and "
                   "resume from; default: OUT with the suffix .train.ckpt")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"],
                   help="dtype of the weights in OUT")
    g = p.add_argument_group("fine-tuning (with --init)")
    g.add_argument("--lora-rank", type=int, help="train a LoRA of this rank, the model frozen")
    g.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank, scale 1)")
    g.add_argument("--lora-targets", nargs="+", default=list(DEFAULT_TARGETS), metavar="NAME",
                   help="U-Net transformer layers to adapt, by name ending (default: kohya's, "
                   f"{' '.join(DEFAULT_TARGETS)})")
    g.add_argument("--lora-text-encoder", action="store_true",
                   help="also adapt the text encoder's attention and MLP")
    g.add_argument("--lora-conv-rank", type=int, help="also adapt the ResBlocks' and samplers' "
                   "layers (LoCon), 3×3 convolutions at this rank")
    g.add_argument("--lora-conv-alpha", type=float, help="their alpha (default: conv rank)")
    g.add_argument("--ema", action="store_true", help="full fine-tuning: keep an EMA of the "
                   "U-Net (--ema-decay, default 0.999) and write it as the U-Net")
    g.add_argument("--train-text-encoder", action="store_true",
                   help="full fine-tuning: train the text encoder too (default: U-Net only)")
    g.add_argument("--data", help="a folder of captioned images (ldm.data.folder.ImageFolder) "
                   "to train on; default: shapes world")
    g.add_argument("--world", help="without --data: the shapes world to train on, e.g. "
                   "'shapes+purple+star' (ldm.data.shapes.world; default: 'shapes')")
    g.add_argument("--only", nargs="+", default=[], metavar="WORD", help="with --world: only "
                   "its captions that name one of these words (e.g. --only purple star)")
    g.add_argument("--fit-latents", type=int, metavar="N", help="with --world: train on N "
                   "fixed images whose latents are fitted to the frozen decoder "
                   "(ldm.latent_targets), kept if the judge reads their decoding right; for "
                   "words the encoder cannot encode")
    g.add_argument("--fit-steps", type=int, default=100, help="Adam steps per fitted latent")
    g.add_argument("--replay", type=float, metavar="SHARE", help="with --world: this share of "
                   "every batch from the default shapes world (encoded as usual), so that the "
                   "model keeps what it knew")
    g.add_argument("--resolution", type=int, help="with --data: the training size (default: "
                   "the model's image size)")
    g.add_argument("--cache-latents", metavar="DIR", help="with --data: keep the images' "
                   "latents in DIR, encoded once")
    g.add_argument("--state-dir", help="where the resumable state is written (default: OUT "
                   "with the suffix .state)")
    g.add_argument("--resume", metavar="DIR", help="continue the run whose state is in DIR")
    s = p.add_argument_group("samples during training")
    s.add_argument("--sample-every", type=int, help="every N steps, an image grid of "
                   "--sample-prompts (OUT with the suffix .samples/step-N.png)")
    s.add_argument("--sample-prompts", nargs="+", default=[], metavar="PROMPT")
    s.add_argument("--sample-seed", type=int, default=0)
    t = p.add_argument_group("optimisation (defaults: the shipped model's recipe from scratch; "
                             f"fine-tuning: {FINETUNE_DEFAULTS}, lr 1e-4 LoRA / 1e-5 full)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type is bool or field.type == "bool":
            t.add_argument(flag, action="store_true", default=None)
        elif field.name == "precision":
            t.add_argument(flag, choices=sorted(PRECISIONS))
        else:
            t.add_argument(flag, type=field.type)
    p.add_argument("--device", help="cpu or cuda (default: cuda if there is one); under "
                   "torchrun each process takes the GPU of its LOCAL_RANK")
    p.add_argument("--threads", type=int, help="torch threads per process "
                   "(default: CPU cores / processes)")
    args = p.parse_args(argv)
    _check_modes(p, args)
    return args


def _check_modes(parser, args):
    given = lambda name: getattr(args, name) not in (None, False, [])  # noqa: E731
    if args.init is None:
        needs_init = [n for n in ("lora_rank", "lora_alpha", "lora_text_encoder", "lora_conv_rank",
                                  "lora_conv_alpha", "train_text_encoder", "ema", "data",
                                  "resolution", "cache_latents", "state_dir", "resume", "world",
                                  "only", "fit_latents", "replay") if given(n)]
        if needs_init:
            parser.error(f"--{needs_init[0].replace('_', '-')} needs --init (fine-tuning)")
    else:
        scratch = [n for n in SCRATCH_ONLY + ("checkpoint",) if given(n)]
        if scratch:
            parser.error(f"--{scratch[0].replace('_', '-')} is for training from scratch, not "
                         "with --init")
        if args.lora_rank is None and any(given(n) for n in ("lora_alpha", "lora_text_encoder",
                                                             "lora_conv_rank", "lora_conv_alpha")):
            parser.error("the --lora-* options need --lora-rank")
        if args.lora_rank is not None and args.ema:
            parser.error("--ema is for full fine-tuning, not with --lora-rank")
        if args.ema_decay is not None and not args.ema:
            parser.error("--ema-decay with --init needs --ema")
    if (args.resolution or args.cache_latents) and not args.data:
        parser.error("--resolution and --cache-latents need --data")
    if args.world is None and any(given(n) for n in ("only", "fit_latents", "replay")):
        parser.error("--only, --fit-latents and --replay need --world")
    if args.world is not None and args.data:
        parser.error("--world and --data are two sources of data: give one")
    if args.replay is not None and not 0 <= args.replay <= 1:
        parser.error(f"--replay must be a share in [0, 1], got {args.replay}")
    if args.fit_latents is not None and (args.fit_latents < 1 or args.fit_steps < 0):
        parser.error("--fit-latents needs N >= 1 and --fit-steps >= 0")
    if args.sample_every is not None and not args.sample_prompts:
        parser.error("--sample-every needs --sample-prompts")


def _train_config(args):
    """TrainConfig from the flags given; the others from the mode's defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name) is not None}
    if args.init is not None:
        defaults = {**FINETUNE_DEFAULTS, "lr": FINETUNE_LR[args.lora_rank is not None]}
        given = {**defaults, **given}
    return TrainConfig(**given)


def _start_processes(args):
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); (rank, world, device)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.type == "cuda":  # torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = _world()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    return rank, world, device


def main(argv=None):
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    rank, world, device = _start_processes(args)
    config = _train_config(args)
    on_step = None
    if args.sample_every:
        on_step = sample_every(args.sample_every, args.sample_prompts,
                               Path(args.out).with_suffix(".samples"), seed=args.sample_seed)
    start = time.monotonic()
    if args.init is None:
        _train_main(args, config, rank, world, on_step)
    else:
        _finetune_main(args, config, rank, world, device, on_step)
    if rank == 0:
        log.info("wrote %s (%.1f MB) after %.1f min", args.out,
                 Path(args.out).stat().st_size / 1e6, (time.monotonic() - start) / 60)
    if dist.is_initialized():
        dist.destroy_process_group()


def _train_main(args, config, rank, world, on_step):
    model_config, data = RECIPES[args.preset]
    ckpt = Path(args.checkpoint) if args.checkpoint else Path(args.out).with_suffix(".train.ckpt")
    if rank == 0:
        log.info("training %s on %d process(es): %s", args.preset, world,
                 json.dumps(dataclasses.asdict(config)))
    state = train(model_config, config, data, ckpt, on_step=on_step)
    if rank == 0:
        export(state, args.out, getattr(torch, args.dtype))


def _finetune_main(args, config, rank, world, device, on_step):
    pipe = load(args.init, device=device, dtype=torch.float32)
    data, facts = _finetune_data(args, pipe, rank)
    lora = None
    if args.lora_rank is not None:
        lora = LoRAConfig(args.lora_rank, args.lora_alpha, tuple(args.lora_targets),
                          args.lora_text_encoder, args.lora_conv_rank, args.lora_conv_alpha)
    state_dir = args.state_dir or args.resume or Path(args.out).with_suffix(".state")
    if rank == 0:
        log.info("fine-tuning %s (%s) on %d process(es): %s", args.init,
                 "LoRA" if lora else "all weights", world, json.dumps(dataclasses.asdict(config)))
    started = time.time()
    state = finetune(pipe, config, data, lora=lora, train_text_encoder=args.train_text_encoder,
                     ema=args.ema, state_dir=state_dir, resume=args.resume, on_step=on_step)
    if rank != 0:
        return
    dtype = getattr(torch, args.dtype)
    if lora is None:
        export_model(pipe, args.out, dtype)
    else:
        metadata = kohya_training_metadata(config, state.network, state.step, started_at=started,
                                           init=args.init, output_name=Path(args.out).stem,
                                           world=world, **facts)
        state.network.save(args.out, metadata=metadata, dtype=dtype)


def _finetune_data(args, pipe, rank):
    """(data function, facts for the LoRA's metadata): shapes world, or --data's folder."""
    if args.world is not None:
        return _world_data(args, pipe)
    if args.data is None:
        return shapes.training_batch, {"resolution": (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)}
    resolution = args.resolution or pipe.config.image_size
    factor = pipe.vae.config.downsampling_factor
    if resolution % factor:
        raise SystemExit(f"--resolution {resolution} must be a multiple of {factor}, the "
                         "autoencoder's downsampling")
    cache = None if args.cache_latents is None else LatentCache.for_vae(args.cache_latents,
                                                                        pipe.vae)
    folder = ImageFolder(args.data, resolution, latents=cache)
    if cache is not None:  # encoded ahead, once: rank 0 first, then the others find them
        if rank == 0:
            log.info("encoded %d image(s) into %s", folder.cache_latents(), args.cache_latents)
        if dist.is_initialized():
            dist.barrier()
    return folder.batch, {"resolution": folder.size, "num_images": len(folder),
                          "cache_latents": cache is not None}


def _world_data(args, pipe):
    """--world's data function: the world's captions (naming --only's words), from images drawn
    on the fly or from --fit-latents' fitted latents, with a --replay share of the default
    world. Every rank builds the same data (the fitting is seeded by --seed)."""
    from ldm import judge  # shapes-world only: it reads the fitted latents' decodings
    try:
        world = shapes.world(args.world).naming(*args.only)
    except ValueError as error:
        raise SystemExit(f"--world / --only: {error}")
    facts = {"resolution": (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)}
    data = world.training_batch
    if args.fit_latents is not None:
        # Its small-channel convolutions run faster in this layout on CPUs (weights unchanged).
        pipe.vae.to(memory_format=torch.channels_last)
        generator = torch.Generator().manual_seed(args.seed or 0)
        started = time.monotonic()
        targets = latent_targets.fit_targets(pipe.vae, world.training_batch(args.fit_latents,
                                                                            generator),
                                             keep=judge.accepts, steps=args.fit_steps)
        log.info("fitted %d latents to the decoder in %.1f min, kept %d", args.fit_latents,
                 (time.monotonic() - started) / 60, len(targets))
        data, facts["num_images"] = targets.batch, len(targets)
    if args.replay:
        replay = latent_targets.encoded(shapes.training_batch, pipe.vae)
        data = latent_targets.mixed(latent_targets.encoded(data, pipe.vae)
                                    if args.fit_latents is None else data, replay, args.replay)
    return data, facts


if __name__ == "__main__":
    main()
