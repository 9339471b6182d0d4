"""The training loop that training from scratch (`ldm.train`) and fine-tuning (`ldm.finetune`)
share: the settings (`TrainConfig`), the diffusion objective, the U-Net's EMA, the optimisation
step (gradient accumulation, autocast, clipping, DDP), gradient checkpointing, samples and the
progress bar.

The objective is Stable Diffusion's: ε-prediction (or v for SD 2's 768-v models)
    loss = ‖ε − ε_θ(x_t, t, text(c))‖²,  x_t = √ᾱ_t z₀ + √(1 − ᾱ_t) ε,  t ~ U{0, …, 999},
with text(c) the conditioning sampling builds for caption c: SD's context, SDXL's context and
y (pooled text and the image's sizes, `SDXLObjective`). Optionally each sample's loss is
weighted by Min-SNR-γ (Hang et al. 2023, arXiv:2303.09556; kohya's `--min_snr_gamma`,
diffusers' `--snr_gamma`): min(SNR_t, γ) / SNR_t for ε (/ (SNR_t + 1) for v), SNR_t =
ᾱ_t / (1 − ᾱ_t). Measured on x₀, ε-MSE weighs step t by SNR_t, in the thousands at low noise;
the weight caps that at γ, so that the low-noise steps, whose gradients pull against the
others', do not dominate training (the paper's reading).
Each step's data and noise come from a generator seeded by (seed, step) alone, so a run resumed
from a checkpoint continues exactly as if never stopped.

Data parallelism (torch.distributed: gloo on CPUs, NCCL on GPUs): every rank draws the same
global batch, keeps its slice, and DDP averages the gradients, so a run's result does not depend
on the process count. Gradient accumulation (`grad_accum` N) splits each rank's slice again into
N micro-batches whose gradients add up: the batch, hence the result, stays the same.
"""
import contextlib
import math
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

from ldm import sdxl
from ldm.data import codec
from ldm.images import to_pil
from ldm.lora_training import LoRANetwork
from ldm.models.vae import DiagonalGaussian
from ldm.pipeline import StableDiffusion


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the defaults train the shipped tiny-shapes model."""
    vae_steps: int = 10000
    vae_batch: int = 8
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6      # per element; SD's 1e-6 on sums is ~1e-7 per element
    vae_codec_share: float = 0.5  # of each autoencoder batch: generic pictures (ldm.data.codec)
    vae_edge_weight: float = 8.0  # edge pixels' extra weight in its loss (AutoencoderObjective)
    latent_std: float = 0.25     # std of the scaled latents z₀ the diffusion sees (SD: 1)
    steps: int = 4000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.1    # the cosine decays to lr · min_lr_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    uncond_prob: float = 0.1
    min_snr_gamma: float | None = None  # Min-SNR-γ loss weights (γ = 5 in the paper); None: SD's
    # t = ⌊T · u^p⌋, u ~ U(0, 1): p = 1 is SD's uniform t; p > 1 trains the low-noise steps
    # more often (p = 2: t < 100 a third of the time instead of a tenth).
    timestep_power: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 500
    grad_accum: int = 1          # micro-batches per step: the batch is split, not multiplied
    precision: str = "fp32"      # "bf16": autocast; "fp16": autocast and a grad scaler (CUDA)
    # The autoencoder stage's (None: `precision`'s): bf16 trains the shipped autoencoder 1.5-2.5×
    # faster than float32 on CPUs with bf16 units; the U-Net stage stays float32.
    vae_precision: str | None = "bf16"
    grad_checkpointing: bool = False  # recompute activations in the backward pass

    def __post_init__(self):
        for name in ("precision", "vae_precision"):
            value = getattr(self, name)
            if value not in PRECISIONS and not (name == "vae_precision" and value is None):
                raise ValueError(f"{name} must be one of {sorted(PRECISIONS)}, got {value!r}")
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) \
                or self.grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive int, got {self.grad_accum!r}")
        if not 0 <= self.vae_codec_share <= 1:
            raise ValueError(f"vae_codec_share must be in [0, 1], got {self.vae_codec_share!r}")
        if not self.vae_edge_weight >= 0:
            raise ValueError(f"vae_edge_weight must be >= 0, got {self.vae_edge_weight!r}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0 (or None), got {self.min_snr_gamma!r}")
        if not self.timestep_power > 0:
            raise ValueError(f"timestep_power must be > 0, got {self.timestep_power!r}")

    @property
    def total_steps(self):
        return self.vae_steps + self.steps

    def stage_precision(self, stage):
        """The precision of stage "autoencoder" or "diffusion"."""
        if stage == "autoencoder" and self.vae_precision is not None:
            return self.vae_precision
        return self.precision


def draw_timesteps(batch, num_timesteps, power, generator):
    """(batch,) int64 training timesteps t = ⌊T · u^power⌋, u ~ U(0, 1), T = num_timesteps.
    power 1 draws them uniformly, as SD (with torch.randint, so the shipped recipe's draws stay
    those it was trained with)."""
    if power == 1:
        return torch.randint(0, num_timesteps, (batch,), generator=generator)
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    return (u.pow(power) * num_timesteps).long().clamp(max=num_timesteps - 1)


def edge_pixels(images, threshold=0.02):
    """images (B, C, H, W) -> (B, 1, H, W) bool: pixels that differ from the mean of their
    3 × 3 neighbourhood (the image's own pixels only, at the border) by more than `threshold`
    in some channel."""
    mean = F.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)
    return (images - mean).abs().amax(1, keepdim=True) > threshold


def edge_weights(images, edge_weight):
    """images (B, C, H, W) -> (B, 1, H, W) float: 1 + edge_weight on edge pixels, else 1."""
    return 1 + edge_weight * edge_pixels(images).float()


# The autocast dtype of each `precision` (None: none, fp32 throughout).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


class DiffusionObjective(nn.Module):
    """latents z₀ (B, 4, h, w), text, t (B,), noise ε (B, 4, h, w) -> scalar MSE of the U-Net's
    prediction: of ε, or for `prediction` "v" (SD 2 768-v) of v = √ᾱ_t ε − √(1 − ᾱ_t) z₀
    (Salimans & Ho 2022); with `min_snr_gamma`, each sample's MSE weighted by Min-SNR-γ.

    What depends on the model's kind is two functions: `text_inputs(pipe, captions, sizes)`,
    the tokens the Trainer makes of a micro-batch's captions (no gradients: CPU work), and
    `conditioning(text)`, the dict the U-Net takes, built here, in the forward pass, because
    the text encoders may be trained (and DDP must see them as submodules). For SD 1.x/2.x the
    text is the ids (B, 77) and the dict {"context": text_encoder(ids)}; `SDXLObjective` is
    SDXL's. `diffusion_objective(pipe)` picks the kind."""

    def __init__(self, text_encoder, unet, alphas_cumprod, prediction="eps", min_snr_gamma=None):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet
        self.alphas_cumprod = alphas_cumprod  # float64 (T,); not a buffer, DDP need not sync it
        self.prediction, self.min_snr_gamma = prediction, min_snr_gamma

    @staticmethod
    def text_inputs(pipe, captions, sizes):
        """B captions -> ids (B, 77) (longer captions truncated). sizes: unused here."""
        return pipe.tokenizer(captions)

    def conditioning(self, ids):
        return {"context": self.text_encoder(ids)}  # the conditioning dict, as when sampling

    def forward(self, latents, text, t, noise):
        alpha_bar = self.alphas_cumprod.to(t.device)[t].to(latents.dtype)[:, None, None, None]
        noisy = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise  # (B, 4, h, w)
        cond = self.conditioning(text)
        target = noise
        if self.prediction == "v":
            target = alpha_bar.sqrt() * noise - (1.0 - alpha_bar).sqrt() * latents
        output = self.unet(noisy, t, **cond)
        if self.min_snr_gamma is None:
            return F.mse_loss(output, target)
        per_sample = (output - target).pow(2).mean(dim=(1, 2, 3))   # (B,)
        return (self.min_snr_weights(t) * per_sample).mean()

    def min_snr_weights(self, t):
        """t (B,) -> the Min-SNR-γ weights (B,) float32 of the module docstring."""
        alpha_bar = self.alphas_cumprod.to(t.device)[t]           # float64
        snr = alpha_bar / (1.0 - alpha_bar)
        capped = snr.clamp(max=self.min_snr_gamma)
        return (capped / (snr + 1.0 if self.prediction == "v" else snr)).float()


class SDXLObjective(DiffusionObjective):
    """SDXL base's objective: text = (CLIP-L ids (B, 77), bigG ids (B, 77), numbers (B, 6)),
    the conditioning `sdxl.conditioning`'s {"context": (B, 77, 2048), "y": (B, 2816)}: what
    `encode_prompt` builds for the caption, with the image's own sizes (micro-conditioning).
    One 77-token chunk per caption: longer captions are truncated, as kohya and diffusers'
    SDXL trainers do by default."""

    def __init__(self, pipe, min_snr_gamma=None):
        if pipe.is_refiner:  # its y holds an aesthetic score, and it has no CLIP-L
            raise ValueError("SDXLObjective trains the SDXL base, not the refiner")
        super().__init__(pipe.text_encoder, pipe.unet, pipe.alphas_cumprod, pipe.config.prediction,
                         min_snr_gamma)
        self.text_encoder_2 = pipe.text_encoder_2

    @staticmethod
    def text_inputs(pipe, captions, sizes):
        """B captions, sizes [(original (h, w), crop (top, left), target (h, w))] × B ->
        (ids (B, 77), ids_2 (B, 77), numbers (B, 6) float32)."""
        numbers = torch.tensor([[*original, *crop, *target] for original, crop, target in sizes],
                               dtype=torch.float32)
        return pipe.tokenizer(captions), pipe.tokenizer_2(captions), numbers

    def conditioning(self, text):
        return sdxl.conditioning(self.text_encoder, self.text_encoder_2, *text)


def objective_kind(pipe):
    """The DiffusionObjective class of `pipe`'s kind (SDXL base, or SD 1.x/2.x)."""
    return SDXLObjective if isinstance(pipe, sdxl.StableDiffusionXL) else DiffusionObjective


def diffusion_objective(pipe, min_snr_gamma=None):
    """The objective that trains `pipe`'s U-Net (and text encoders, where they are trained)."""
    if objective_kind(pipe) is SDXLObjective:
        return SDXLObjective(pipe, min_snr_gamma)
    return DiffusionObjective(pipe.text_encoder, pipe.unet, pipe.alphas_cumprod,
                              pipe.config.prediction, min_snr_gamma)


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


class Trainer:
    """The optimisation loop of `train` and `finetune`: the state, the data, the checkpointing
    (`save`, a function of nothing, or None) and the rank's share of each batch.

    `run(stage, objective, params, lr, first, last, inputs)` optimises one stage;
    `autoencoder_inputs(step)` / `diffusion_inputs(step)` are the micro-batches of a step,
    drawn from a generator seeded by (seed, step) alone, so a resumed run sees the same data."""

    def __init__(self, state, config, data, save, progress, on_step=None, finetuning=False):
        self.state, self.config, self.data, self._save = state, config, data, save
        self.on_step = on_step
        self.rank, self.world = rank_and_world()
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
        stages = ("diffusion",) if finetuning else ("autoencoder", "diffusion")
        if any(config.stage_precision(stage) == "fp16" for stage in stages) \
                and self.device.type != "cuda":
            raise ValueError("precision fp16 needs a CUDA device (float16 gradients need a "
                             "grad scaler); on the CPU use bf16")
        self.show_progress = progress and self.rank == 0

    def run(self, stage, objective, params, lr, first, last, inputs, after_step=None):
        """Optimise `objective(*micro_batch)` over `inputs(step)` for steps [state.step, last)
        of a stage that spans [first, last); checkpoint on the way."""
        c, state = self.config, self.state
        model = self._parallel(objective)
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=c.weight_decay)
        precision = c.stage_precision(stage)
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        if state.optimizer_stage == stage and state.optimizer_state is not None:
            optimizer.load_state_dict(state.optimizer_state)
            if scaler is not None and state.scaler_state:
                scaler.load_state_dict(state.scaler_state)
        bar = Progress(stage, first, last, enabled=self.show_progress)
        for step in range(state.step, last):
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step - first, last - first, c.warmup, c.min_lr_ratio)
            loss = optimization_step(model, optimizer, params, inputs(step), grad_clip=c.grad_clip,
                                     precision=precision, scaler=scaler)
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

    def autoencoder_inputs(self, step):
        generator, batch, pieces = self._batch(step, self.config.vae_batch)
        images = batch.images
        generic = round(self.config.vae_codec_share * len(images))
        if generic:  # the batch's last pictures replaced, the same on every rank
            images = torch.cat([images[:len(images) - generic],
                                codec.pictures(generic, generator, images.shape[-1])])
        noise = torch.randn(self._latent_shape(batch), generator=generator)
        inputs = [(self._on_device(images[p]), self._on_device(noise[p])) for p in pieces]
        if not self.config.vae_edge_weight:
            return inputs
        # The whole batch's mean weight, so that the pieces' losses average to the batch's.
        mean = edge_weights(images, self.config.vae_edge_weight).mean().to(self.device)
        return [(*piece, mean) for piece in inputs]

    def diffusion_inputs(self, step):
        c, pipe = self.config, self.state.pipe
        generator, batch, pieces = self._batch(step, c.batch)
        shape = self._latent_shape(batch)
        dropped = torch.rand(c.batch, generator=generator) < c.uncond_prob
        t = draw_timesteps(c.batch, len(pipe.alphas_cumprod), c.timestep_power, generator)
        noise = torch.randn(shape, generator=generator)
        posterior_noise = torch.randn(shape, generator=generator)
        # A dropped caption is the empty one, encoded, for every kind: ldm's SD training did
        # so, and kohya's and diffusers' SDXL trainers do (sgm trained SDXL with the text's
        # encoding zeroed instead, which ldm's sampler gives the base for an empty negative
        # prompt); the sizes are kept, as kohya and diffusers keep them.
        captions = ["" if drop else text for drop, text in zip(dropped.tolist(), batch.captions)]
        sizes = self._sizes(batch, shape)
        return [self._diffusion_piece(batch, p, captions, sizes, t, noise, posterior_noise)
                for p in pieces]

    @torch.no_grad()
    def _diffusion_piece(self, batch, piece, captions, sizes, t, noise, posterior_noise):
        """(z₀, text, t, ε) of one micro-batch: latents drawn from the VAE's posterior, text
        the model kind's tokens (DiffusionObjective.text_inputs)."""
        pipe = self.state.pipe
        if getattr(batch, "latents", None) is not None:  # from a LatentCache.for_vae
            posterior = DiagonalGaussian(batch.latents[piece].to(self.device))
        else:
            posterior = pipe.vae.encode(self._on_device(batch.images[piece]))
        latents = posterior.sample(noise=posterior_noise[piece].to(self.device)) * pipe.scale_factor
        text = objective_kind(pipe).text_inputs(pipe, captions[piece], sizes[piece])
        text = text.to(self.device) if torch.is_tensor(text) else tuple(
            x.to(self.device) for x in text)
        return latents, text, t[piece].to(self.device), self._on_device(noise[piece])

    def _sizes(self, batch, latent_shape):
        """[(original (h, w), crop (top, left), target (h, w))] per image: SDXL's size
        conditioning. The batch's `original_sizes` and `crop_coords` where it has them
        (ImageFolder's), else the training size uncropped."""
        factor = self.state.pipe.vae.config.downsampling_factor
        target = (latent_shape[2] * factor, latent_shape[3] * factor)
        n = latent_shape[0]
        originals = getattr(batch, "original_sizes", None) or [target] * n
        crops = getattr(batch, "crop_coords", None) or [(0, 0)] * n
        return [(tuple(o), tuple(c), target) for o, c in zip(originals, crops)]

    def _on_device(self, x):
        return x.to(self.device).contiguous(memory_format=self.layout)

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


def rank_and_world():
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
        if stage == "diffusion" and step % every == 0 and rank_and_world()[0] == 0:
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
