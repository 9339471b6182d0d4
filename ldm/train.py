"""Training a latent diffusion model from scratch: first the autoencoder, then the U-Net jointly
with its text encoder (LDM, Rombach et al. 2022, with Stable Diffusion's objective).

    python -m ldm.train --preset tiny-shapes --out weights/tiny-shapes.safetensors
    torchrun --nproc_per_node 2 -m ldm.train --preset tiny-shapes --out …   # data-parallel

Stage 1, the autoencoder (`vae_steps` steps): per-element reconstruction L1 + L2 plus
    kl_weight · KL(q(z|x) ‖ N(0, I)), z drawn from the posterior (no GAN or perceptual loss).
    Optionally the pixels on an edge weigh more (`vae_edge_weight`), and a share of each batch
    is generic pictures (`vae_codec_share`, `ldm.data.codec`) rather than the world's, so that
    the autoencoder encodes what the world has not shown it yet (thin points: a star).
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
the U-Net weights (CompVis LitEma's warm-up), which is what sampling uses. The loop, the
objective, the EMA, data parallelism and gradient accumulation are `ldm.training`'s.

Checkpoints (`.ckpt`) are Lightning-like: "state_dict" in the original layout with the EMA copies
as `model_ema.*` (so `ldm.load` reads them, EMA by default), plus "global_step" and
"optimizer_states". Training resumes from one and continues exactly as if never stopped.

Fine-tuning from a checkpoint (`python -m ldm.train --init FILE`, the same command line) is
`ldm.finetune`.
"""
import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ldm import checkpoint, finetune
from ldm.data import shapes
from ldm.loader import load
from ldm.lora_training import DEFAULT_TARGETS
from ldm.pipeline import StableDiffusion
from ldm.training import (EMA, PRECISIONS, TrainConfig, Trainer, TrainingState,
                          diffusion_objective, disable_gradient_checkpointing, edge_weights,
                          enable_gradient_checkpointing, rank_and_world, sample_every)

log = logging.getLogger(__name__)


# What `--preset` trains: the architecture and the data (TrainConfig's defaults are its settings).
RECIPES = {"tiny-shapes": (shapes.TINY_SHAPES_CONFIG, shapes.training_batch)}


class AutoencoderObjective(nn.Module):
    """images (B, 3, H, W), noise (B, z, h, w) -> scalar loss (reconstruction + weighted KL).

    edge_weight w > 0: the reconstruction error of each pixel on an edge of the image (one that
    differs from the mean of its 3 × 3 neighbourhood by more than 0.02 in some channel) counts
    1 + w times, the weights normalised to mean 1. A thin point is all edge: unweighted, its few
    pixels cost too little for an f = 4 decoder to keep it rather than blur it away.
    `weight_mean`, the mean of the weights over the step's whole batch (`edge_weights`), makes
    the loss of a batch split over processes or micro-batches average to the unsplit batch's;
    None: this batch's own mean.
    """

    def __init__(self, vae, kl_weight, edge_weight=0.0):
        super().__init__()
        self.vae, self.kl_weight, self.edge_weight = vae, kl_weight, edge_weight

    def forward(self, images, noise, weight_mean=None):
        posterior = self.vae.encode(images)
        z = posterior.sample(noise=noise)  # mean + std · noise: gradients reach both
        error = self.vae.decode(z) - images
        if self.edge_weight:
            weight = edge_weights(images, self.edge_weight)   # (B, 1, H, W)
            weight = weight / (weight.mean() if weight_mean is None else weight_mean)
            reconstruction = (weight * error.abs()).mean() + (weight * error.pow(2)).mean()
        else:
            reconstruction = error.abs().mean() + error.pow(2).mean()
        # KL(N(μ, σ²) ‖ N(0, 1)) per latent element.
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1.0 - posterior.logvar).mean()
        return reconstruction + self.kl_weight * kl


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
    trainer = Trainer(state, train_config, data, save, progress, on_step)
    try:
        if state.step < train_config.vae_steps:
            _train_autoencoder(trainer)
        if state.step < train_config.total_steps:
            _train_diffusion(trainer)
        trainer.save()
    finally:
        disable_gradient_checkpointing(state.pipe)
    return state


def _train_autoencoder(trainer):
    c, state = trainer.config, trainer.state
    vae = state.pipe.vae
    objective = AutoencoderObjective(vae, c.kl_weight, c.vae_edge_weight)
    trainer.run("autoencoder", objective, list(vae.parameters()), c.vae_lr, 0, c.vae_steps,
                trainer.autoencoder_inputs)
    _set_scale_factor(state.pipe, measure_scale_factor(vae, trainer.data, c.latent_std))
    trainer.save()


def _train_diffusion(trainer):
    c, state = trainer.config, trainer.state
    pipe = state.pipe
    pipe.vae.eval().requires_grad_(False)
    objective = diffusion_objective(pipe, c.min_snr_gamma)  # as fine-tuning builds it
    params = [*pipe.text_encoder.parameters(), *pipe.unet.parameters()]
    trainer.run("diffusion", objective, params, c.lr, c.vae_steps, c.total_steps,
                trainer.diffusion_inputs, after_step=lambda: state.ema.update(pipe.unet))


def _set_scale_factor(pipe, value):
    pipe.config = dataclasses.replace(pipe.config, scale_factor=value)
    pipe.scale_factor = value
    log.info("scale_factor = %.5f", value)


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
    pipe = load(path, use_ema=False, dtype=torch.float32)  # the weights train in float32
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


# -- command line -------------------------------------------------------------------------------

# TrainConfig fields that only training from scratch uses.
SCRATCH_ONLY = ("vae_steps", "vae_batch", "vae_lr", "kl_weight", "vae_codec_share",
                "vae_edge_weight", "latent_std", "vae_precision")
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
    p.add_argument("--world", help="the shapes world to train on, from scratch or (without "
                   "--data) fine-tuning, e.g. 'shapes+purple+star' (ldm.data.shapes.world; "
                   "default: 'shapes')")
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
    g.add_argument("--only", nargs="+", default=[], metavar="WORD", help="with --world: only "
                   "its captions that name one of these words (e.g. --only purple star)")
    g.add_argument("--fit-latents", type=int, metavar="N", help="with --world: train on N "
                   "fixed images whose latents are fitted to the frozen decoder "
                   "(ldm.latent_targets), kept if the judge reads their decoding right; for "
                   "words the encoder cannot encode")
    g.add_argument("--fit-steps", type=int, default=100, help="Adam steps per fitted latent")
    g.add_argument("--pool", type=int, metavar="N", help="with --world: train on N pictures "
                   "drawn and encoded once, not new ones encoded at every step (a LoRA step of "
                   "the shipped model a quarter faster)")
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
        elif field.name in ("precision", "vae_precision"):
            t.add_argument(flag, choices=sorted(PRECISIONS))
        elif field.name == "min_snr_gamma":
            t.add_argument(flag, type=float, metavar="GAMMA")
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
                                  "resolution", "cache_latents", "state_dir", "resume", "only",
                                  "fit_latents", "pool", "replay") if given(n)]
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
    if args.world is None and any(given(n) for n in ("only", "fit_latents", "pool", "replay")):
        parser.error("--only, --fit-latents, --pool and --replay need --world")
    if args.fit_latents is not None and args.pool is not None:
        parser.error("--pool and --fit-latents are two fixed sets of latents: give one")
    if args.pool is not None and args.pool < 1:
        parser.error(f"--pool needs N >= 1, got {args.pool}")
    if args.world is not None and args.data:
        parser.error("--world and --data are two sources of data: give one")
    if args.world is not None:
        try:
            shapes.world(args.world)
        except ValueError as error:
            parser.error(f"--world: {error}")
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
    rank, world = rank_and_world()
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
        finetune.command(args, config, rank, world, device, on_step)
    if rank == 0:
        log.info("wrote %s (%.1f MB) after %.1f min", args.out,
                 Path(args.out).stat().st_size / 1e6, (time.monotonic() - start) / 60)
    if dist.is_initialized():
        dist.destroy_process_group()


def _train_main(args, config, rank, processes, on_step):
    model_config, data = RECIPES[args.preset]
    if args.world is not None:  # a larger shapes world: both stages, the autoencoder too, see it
        data = shapes.world(args.world).training_batch
    ckpt = Path(args.checkpoint) if args.checkpoint else Path(args.out).with_suffix(".train.ckpt")
    if rank == 0:
        log.info("training %s on %d process(es): %s", args.preset, processes,
                 json.dumps(dataclasses.asdict(config)))
    state = train(model_config, config, data, ckpt, on_step=on_step)
    if rank == 0:
        export(state, args.out, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
