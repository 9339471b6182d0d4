"""Fine-tuning any checkpoint ldm loads, on the diffusion objective of `ldm.training` (stage 2
alone, the autoencoder frozen): all of the U-Net's weights (and the text encoder's, if asked;
`ema=True` keeps the U-Net's EMA and ends with it), or a LoRA (`ldm.lora_training`) with the
model frozen. Its resumable state is a folder (`state_dir`: the trained weights, the optimiser,
the step, the RNG states), its result a model file or a kohya LoRA file. The command line is
`ldm.train`'s, with `--init FILE` (SD 1.x/2.x, the shipped model, SDXL base):

    python -m ldm.train --init weights/tiny-shapes.safetensors --lora-rank 8 --out my.safetensors
    python -m ldm.train --init v1-5.safetensors --data photos/ --resolution 512 \
        --cache-latents cache/ --lora-rank 16 --precision bf16 --grad-checkpointing \
        --out my.safetensors
    python -m ldm.train --init weights/tiny-shapes.safetensors --world shapes+purple+star \
        --only purple star --fit-latents 128 --replay 0.25 --lora-rank 8 --lora-text-encoder \
        --lora-conv-rank 8 --out new-words.safetensors   # words the encoder cannot encode:
                                                          # ldm.latent_targets
"""
import copy
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ldm import checkpoint, latent_targets
from ldm.data import shapes
from ldm.data.folder import ImageFolder, LatentCache
from ldm.loader import load
from ldm.lora_training import (LoRAConfig, LoRANetwork, kohya_training_metadata,
                               text_blocks_run)
from ldm.training import (EMA, Trainer, TrainingState, diffusion_objective,
                          disable_gradient_checkpointing, enable_gradient_checkpointing)

log = logging.getLogger(__name__)


def finetune(pipe, config, data, *, lora=None, train_text_encoder=False, ema=False,
             state_dir=None, resume=None, progress=True, on_step=None):
    """Fine-tune `pipe` (a model from any checkpoint, `ldm.load(…, dtype=torch.float32)`) in
    place for `config.steps` steps of the diffusion objective; returns the TrainingState.

    lora: a LoRAConfig: train a LoRA (`state.network`, left attached to pipe, so that pipe
    generates with it; `state.network.save(path)` writes the kohya file) with every weight of
    the model frozen. None: train the U-Net's weights, and the text encoder's (SDXL: both
    encoders') with `train_text_encoder`. The autoencoder is never trained. SDXL base trains
    on its own conditioning (`ldm.training.SDXLObjective`: captions truncated to 77 tokens,
    sizes from the batch); the refiner and inpainting models are refused.
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
    trainer = Trainer(state, config, data, save, progress, on_step, finetuning=True)
    objective = diffusion_objective(pipe, config.min_snr_gamma)
    if network is not None:
        objective.lora = network  # a submodule, so that DDP averages its gradients
    after_step = None if state.ema is None else lambda: state.ema.update(pipe.unet)
    try:
        trainer.run("diffusion", objective, params, config.lr, 0, config.steps,
                    trainer.diffusion_inputs, after_step=after_step)
        trainer.save()
    finally:
        disable_gradient_checkpointing(pipe)
    if ema:
        pipe.unet.load_state_dict(state.ema.shadow)
    return state


def _check_finetunable(pipe):
    c = pipe.config
    if c.text_encoder == "sdxl-refiner":
        raise ValueError("fine-tuning the SDXL refiner is not supported: it was trained on the "
                         "low-noise end of the schedule only, and its y holds an aesthetic "
                         "score no caption folder gives; fine-tune the SDXL base")
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
    encoders = _text_encoders(pipe)
    pipe.unet.requires_grad_(False)
    for encoder in encoders.values():
        encoder.requires_grad_(False)
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
        for name, encoder in encoders.items():
            for p in _text_parameters_used(pipe.networks(), name):
                p.requires_grad_(True)
            encoder.train()
    networks = (pipe.unet, *encoders.values())
    return None, [p for m in networks for p in m.parameters() if p.requires_grad]


def _text_encoders(pipe):
    """{"text_encoder": …}; SDXL: {"text_encoder": CLIP-L, "text_encoder_2": bigG}."""
    return {name: module for name, module in pipe.networks().items()
            if name.startswith("text_encoder")}


def _text_parameters_used(networks, name):
    """The parameters of text encoder `name` that reach the conditioning (DDP insists that every
    trained parameter gets a gradient): not the blocks the model skips (`text_blocks_run`), nor
    OpenCLIP's logit scale; nor the final norm where the last block is skipped (SD 2 normalises
    its penultimate state with ln_final, SDXL's CLIP-L takes it as it is), nor OpenCLIP's
    projection outside SDXL (whose pooled text is projected)."""
    encoder, sdxl = networks[name], "text_encoder_2" in networks
    run = text_blocks_run(networks, name)
    if hasattr(encoder, "transformer"):  # OpenCLIP
        unused = [*encoder.transformer.resblocks[run:], encoder.logit_scale]
        unused += [] if sdxl else [encoder.text_projection]
    else:  # CLIP
        unused = [*encoder.encoder.layers[run:]]
        unused += [encoder.final_layer_norm] if sdxl else []
    ids = {id(p) for item in unused
           for p in ([item] if isinstance(item, torch.nn.Parameter) else item.parameters())}
    return [p for p in encoder.parameters() if id(p) not in ids]


def _settings(pipe, config, lora, train_text_encoder, ema):
    """What a resumed run must share with the one that wrote the state (and its TrainConfig,
    which may change), as JSON."""
    return json.dumps({"model": json.loads(pipe.config.to_json()),
                       "lora": None if lora is None else dataclasses.asdict(lora),
                       "train_text_encoder": train_text_encoder, "ema": ema,
                       "config": dataclasses.asdict(config)}, sort_keys=True)


# -- resumable state ----------------------------------------------------------------------------

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
    networks = {"unet": state.pipe.unet, **_text_encoders(state.pipe)}
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


# -- the command line (`python -m ldm.train --init FILE`) ----------------------------------------

def command(args, config, rank, world, device, on_step):
    """`python -m ldm.train --init …` after its flags are read: fine-tune, write --out."""
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
    on the fly, from --pool's drawn and encoded once, or from --fit-latents' fitted latents,
    with a --replay share of the default world. Every rank builds the same data (the pool and
    the fitting are seeded by --seed)."""
    from ldm import judge  # shapes-world only: it reads the fitted latents' decodings
    try:
        world = shapes.world(args.world).naming(*args.only)
    except ValueError as error:
        raise SystemExit(f"--world / --only: {error}")
    facts = {"resolution": (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)}
    data = world.training_batch
    generator = torch.Generator().manual_seed(args.seed or 0)  # a fixed set's pictures
    if args.fit_latents is not None:
        # Its small-channel convolutions run faster in this layout on CPUs (weights unchanged).
        pipe.vae.to(memory_format=torch.channels_last)
        started = time.monotonic()
        targets = latent_targets.fit_targets(pipe.vae, world.training_batch(args.fit_latents,
                                                                            generator),
                                             keep=judge.accepts, steps=args.fit_steps)
        log.info("fitted %d latents to the decoder in %.1f min, kept %d", args.fit_latents,
                 (time.monotonic() - started) / 60, len(targets))
        data, facts["num_images"] = targets.batch, len(targets)
    elif args.pool is not None:
        targets = latent_targets.encode_targets(pipe.vae, world.training_batch(args.pool,
                                                                               generator))
        data, facts["num_images"] = targets.batch, len(targets)
    if args.replay:
        replay = latent_targets.encoded(shapes.training_batch, pipe.vae)
        drawn = args.fit_latents is None and args.pool is None  # pictures, not latents yet
        data = latent_targets.mixed(latent_targets.encoded(data, pipe.vae) if drawn else data,
                                    replay, args.replay)
    return data, facts
