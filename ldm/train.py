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

Data parallelism (torch.distributed, gloo): every rank draws the same global batch, keeps its
slice, and DDP averages the gradients, so a run's result does not depend on the process count.
"""
import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ldm import checkpoint
from ldm.data import shapes
from ldm.loader import load
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

    @property
    def total_steps(self):
        return self.vae_steps + self.steps


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
    """latents z₀ (B, 4, h, w), ids (B, 77), t (B,), noise ε (B, 4, h, w) -> scalar ε-MSE."""

    def __init__(self, text_encoder, unet, alphas_cumprod):
        super().__init__()
        self.text_encoder, self.unet = text_encoder, unet
        self.alphas_cumprod = alphas_cumprod  # float64 (T,); not a buffer, DDP need not sync it

    def forward(self, latents, ids, t, noise):
        alpha_bar = self.alphas_cumprod[t].to(latents.dtype)[:, None, None, None]  # (B, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1.0 - alpha_bar).sqrt() * noise
        cond = {"context": self.text_encoder(ids)}  # the conditioning dict, as when sampling
        return F.mse_loss(self.unet(noisy, t, **cond), noise)


@dataclass
class TrainingState:
    """Everything a checkpoint holds: the model, the U-Net's EMA, the step, the optimiser."""
    pipe: StableDiffusion
    ema: EMA
    step: int = 0                    # optimisation steps done, both stages counted
    optimizer_state: dict | None = None
    optimizer_stage: str | None = None


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
    trainer = _Trainer(state, train_config, data, path, progress, on_step)
    if state.step < train_config.vae_steps:
        trainer.train_autoencoder()
    if state.step < train_config.total_steps:
        trainer.train_diffusion()
    trainer.save()
    return state


class _Trainer:
    """The two training loops of `train`, sharing the state, the data and the checkpointing."""

    def __init__(self, state, config, data, path, progress, on_step=None):
        self.state, self.config, self.data, self.path = state, config, data, path
        self.on_step = on_step
        self.rank, self.world = _world()
        if config.vae_batch % self.world or config.batch % self.world:
            raise ValueError(f"batch sizes {config.vae_batch}, {config.batch} must be multiples "
                             f"of the {self.world} processes")
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

    def _loop(self, stage, objective, params, lr, first, last, inputs, after_step=None):
        """Optimise `objective(*inputs(step))` for steps [state.step, last) of a stage that
        spans [first, last); checkpoint on the way."""
        c, state = self.config, self.state
        model = DistributedDataParallel(objective) if self.world > 1 else objective
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=c.weight_decay)
        if state.optimizer_stage == stage and state.optimizer_state is not None:
            optimizer.load_state_dict(state.optimizer_state)
        bar = Progress(stage, first, last, enabled=self.show_progress)
        for step in range(state.step, last):
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_factor(step - first, last - first, c.warmup, c.min_lr_ratio)
            loss = model(*inputs(step))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the ranks here
            nn.utils.clip_grad_norm_(params, c.grad_clip)
            optimizer.step()
            if after_step is not None:
                after_step()
            state.step = step + 1
            state.optimizer_state, state.optimizer_stage = optimizer.state_dict(), stage
            bar.update(state.step, loss.item())
            if self.on_step is not None:
                self.on_step(stage, state.step, loss.item(), state)
            if state.step % c.checkpoint_every == 0 and state.step < last:
                self.save()
        bar.close()

    def _batch(self, step, batch_size):
        """The step's generator and global batch, and the slice of it that is this rank's."""
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + step)
        batch = self.data(batch_size, generator)
        per_rank = batch_size // self.world
        return generator, batch, slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def _latent_shape(self, batch):
        vae = self.state.pipe.vae.config
        if getattr(batch, "latents", None) is not None:  # cached posterior moments (B, 2z, h, w)
            return (batch.latents.shape[0], vae.z_channels, *batch.latents.shape[2:])
        images, factor = batch.images, vae.downsampling_factor
        return (images.shape[0], vae.z_channels, images.shape[2] // factor, images.shape[3] // factor)

    def _autoencoder_inputs(self, step):
        generator, batch, mine = self._batch(step, self.config.vae_batch)
        noise = torch.randn(self._latent_shape(batch), generator=generator)
        return _channels_last(batch.images[mine]), noise[mine]

    def _diffusion_inputs(self, step):
        c, pipe = self.config, self.state.pipe
        generator, batch, mine = self._batch(step, c.batch)
        shape = self._latent_shape(batch)
        dropped = torch.rand(c.batch, generator=generator) < c.uncond_prob
        t = torch.randint(0, len(pipe.alphas_cumprod), (c.batch,), generator=generator)
        noise = torch.randn(shape, generator=generator)
        posterior_noise = torch.randn(shape, generator=generator)
        captions = ["" if drop else text for drop, text in zip(dropped.tolist(), batch.captions)]
        with torch.no_grad():
            if getattr(batch, "latents", None) is not None:  # from a LatentCache.for_vae
                posterior = DiagonalGaussian(batch.latents[mine])
            else:
                posterior = pipe.vae.encode(_channels_last(batch.images[mine]))
            latents = posterior.sample(noise=posterior_noise[mine]) * pipe.scale_factor
        return latents, pipe.tokenizer(captions[mine]), t[mine], _channels_last(noise[mine])

    def _set_scale_factor(self, value):
        pipe = self.state.pipe
        pipe.config = dataclasses.replace(pipe.config, scale_factor=value)
        pipe.scale_factor = value
        log.info("scale_factor = %.5f", value)

    def save(self):
        if self.path is not None and self.rank == 0:
            save_training_checkpoint(self.path, self.state)


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
    posterior = vae.encode(_channels_last(batch.images))
    z = posterior.sample(torch.Generator().manual_seed(seed))
    return latent_std / z.std().item()


def _channels_last(x):
    return x.contiguous(memory_format=torch.channels_last)


def _world():
    """(rank, world size): (0, 1) unless torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
                         contents.get("ldm.optimizer_stage"))


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


# -- command line -------------------------------------------------------------------------------

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


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m ldm.train", description="Train a latent "
                                "diffusion model from scratch: the autoencoder, then the U-Net "
                                "with its text encoder.")
    p.add_argument("--preset", default="tiny-shapes", choices=sorted(RECIPES))
    p.add_argument("--out", required=True, help="inference weights (.safetensors), written at the end")
    p.add_argument("--checkpoint", help="training checkpoint (.ckpt) to write and resume from; "
                   "default: OUT with the suffix .train.ckpt")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="dtype of the weights in OUT")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        p.add_argument("--" + field.name.replace("_", "-"), type=field.type,
                       default=getattr(defaults, field.name))
    p.add_argument("--threads", type=int, help="torch threads per process "
                   "(default: CPU cores / processes)")
    return p.parse_args(argv)


def main(argv=None):
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = _world()
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    model_config, data = RECIPES[args.preset]
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    ckpt = Path(args.checkpoint) if args.checkpoint else Path(args.out).with_suffix(".train.ckpt")
    if rank == 0:
        log.info("training %s on %d process(es): %s", args.preset, world,
                 json.dumps(dataclasses.asdict(config)))
    start = time.monotonic()
    state = train(model_config, config, data, ckpt)
    if rank == 0:
        export(state, args.out, getattr(torch, args.dtype))
        log.info("wrote %s (%.1f MB) after %.1f min", args.out,
                 Path(args.out).stat().st_size / 1e6, (time.monotonic() - start) / 60)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
