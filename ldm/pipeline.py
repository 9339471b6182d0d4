"""A whole Stable Diffusion model: its four parts, its constants, and generation with them.

    pipe = ldm.load("v1-5-pruned-emaonly.safetensors", device="cuda", dtype=torch.float16)
    ids = pipe.tokenizer(["a photo of an astronaut riding a horse"])   # (B, 77) int64
    ctx = pipe.text_encoder(ids)                                      # (B, 77, 768)
    eps = pipe.unet(x, t, ctx)                                        # x (B, 4, h, w), t (B,)
    z = pipe.vae.encode(images).mean * pipe.scale_factor              # images (B, 3, 8h, 8w)
    images = pipe.vae.decode(z / pipe.scale_factor)

txt2img, img2img and inpaint are the same three stages, each a method of its own:

    cond, uncond = pipe.encode_prompt(prompts, negative)     prompt -> conditioning dicts
    z = pipe.denoise(x_T, cond, uncond, timesteps, ...)       the sampling loop
    images = pipe.decode_latents(z)                           latents -> images

Conditioning is a dict of U-Net keyword inputs, {"context": (B, 77, D)} (+ "concat" for an
inpainting model): it is built here once per prompt, guidance batches every entry, and the
U-Net is called unet(x, t, **cond). A new conditioning input is one more entry built in
`encode_prompt` (or in the task that has it, as inpaint's "concat") and one keyword of the U-Net.

Device and dtype are decided here, once; the model code never names a device. On a GPU,
`pipe.cuda_graphs = True` replays the U-Net's forward from a CUDA graph at every step
(ldm/cuda_graph.py), and `pipe.unet.to(memory_format=torch.channels_last)` spares cuDNN its
layout conversions; both are off by default until a GPU run has measured them.
"""
import copy
import functools
import inspect
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm import arguments, embeddings, hires, lora, offload, samplers, vae_tiling
from ldm import prompts as prompt_lib  # not `prompts`: the methods' locals use that name
from ldm import schedule as noise_schedule
from ldm.config import ModelConfig
from ldm.cuda_graph import CUDAGraphed
from ldm.images import image_shape, mask_to_tensor, to_pil, to_tensor
from ldm.models.clip_text import CLIPTextModel
from ldm.models.open_clip_text import OpenCLIPTextModel
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from ldm.rng import PhiloxGenerator, check_rng, generators as seeded_generators
from ldm.tokenizer import CLIPTokenizer

# Text encoder and tokenizer of each family (ModelConfig.text_encoder): SD 1.x, SD 2.x.
TEXT_ENCODERS = {"clip": (CLIPTextModel, CLIPTokenizer),
                 "open_clip": (OpenCLIPTextModel, CLIPTokenizer.open_clip)}
OUTPUT_TYPES = ("pil", "latent", "tensor")
PIPE_SETTING = object()  # an argument left to the pipeline's attribute of the same meaning
# encode_prompt's keyword options of every model, which the tasks pass through.
PROMPT_OPTIONS = frozenset({"clip_skip", "prompt_syntax", "emphasis", "pad_conds"})


def _lora_tags_applied(task):
    """A task that reads A1111's `<lora:name:m>` tags in its prompt: the LoRAs they name
    (files in `pipe.lora_dir`) are merged for the call and taken out after it, exactly
    (`lora.tags_applied`); the prompt goes on without them. prompt_syntax="plain" reads the
    tags as text, as CompVis would. A1111 reads no tags in the negative prompt: there they are
    a ValueError rather than words for the text encoder."""
    signature = inspect.signature(task)

    @functools.wraps(task)
    def run(self, *args, **kwargs):
        call = signature.bind(self, *args, **kwargs)
        syntax = call.arguments.get("conditioning", {}).get("prompt_syntax", "a1111")
        prompt, negative = call.arguments["prompt"], call.arguments.get("negative_prompt", "")
        if syntax == "plain" or not _texts(prompt) or not _texts(negative):
            return task(self, *args, **kwargs)  # bad arguments: the task names them
        if any(lora.LORA_TAG.search(text) for text in _texts(negative)):
            raise ValueError("negative_prompt: <lora:…> tags are read in the prompt only "
                             "(as A1111): load the LoRA, or move the tag to the prompt")
        stripped, tags = lora.batch_lora_tags(_texts(prompt))
        if not tags:
            return task(self, *args, **kwargs)
        call.arguments["prompt"] = stripped[0] if isinstance(prompt, str) else stripped
        with lora.tags_applied(self, tags, self.lora_dir):
            return task(*call.args, **call.kwargs)
    return run


def _texts(prompt):
    """A prompt argument's strings, or None when it is not a string or a list of them."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    return None


class StableDiffusion(nn.Module):
    """Tokenizer, text encoder, U-Net and VAE of one latent diffusion model, plus its constants.

    `scale_factor` maps VAE latents to the U-Net's unit-variance latents; `alphas_cumprod`
    (float64, (1000,)) is the training noise schedule the samplers use. `cuda_graphs`: replay
    the U-Net from CUDA graphs while sampling on a GPU (see the module docstring).
    `lora_dir`: the folder where txt2img, img2img and inpaint find the LoRA files that A1111's
    `<lora:name:m>` tags in a prompt name (merged for that call only; `_lora_tags_applied`).
    `memory_limit`: the bytes a request may need (`arguments.estimate_memory`) before the tasks
    refuse it with a ValueError; None (default) is what the device has available at each call,
    math.inf never refuses.
    """

    def __init__(self, config=ModelConfig()):
        super().__init__()
        self.config = config
        self._build_text_encoders(config)
        self.unet = UNet(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.scale_factor = config.scale_factor
        # Kept in float64 on the CPU (not a buffer) so that .half() cannot round it, and built
        # there even when the networks are built on the meta device for loading.
        with torch.device("cpu"):
            self.alphas_cumprod = noise_schedule.alphas_cumprod()
        self.cuda_graphs = False
        self._unet_graphs = CUDAGraphed(self.unet)
        self.memory_limit = None
        self.vae_tile_size = "auto"  # decode_latents' and encode_image's default tile_size
        self.lora_dir = None  # where the tasks find the LoRAs of a prompt's <lora:name:m> tags
        self.embeddings = {}  # trigger word -> {text encoder attribute: (n, D) vectors}
        self._offload = None  # enable_offload's hooks, while on

    def _build_text_encoders(self, config):
        if config.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder {config.text_encoder!r} is SDXL's: build "
                             "ldm.StableDiffusionXL, or let ldm.load choose")
        text_model, tokenizer = TEXT_ENCODERS[config.text_encoder]
        self.tokenizer = tokenizer()
        self.text_encoder = text_model(config.text)
        self.conditioning_keys = PROMPT_OPTIONS

    def networks(self):
        """{"unet": …, "vae": …, "text_encoder": …}: the modules whose weights a checkpoint holds."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def device(self):
        """Where sampling runs: where the U-Net's weights are, or the execution device of
        `enable_offload` while the weights wait on the CPU."""
        if self._offload is not None:
            return self._offload.device
        return next(self.unet.parameters()).device

    # ---------------------------------------------------------------- memory
    def enable_offload(self, mode="model", *, device=None):
        """Keep the weights in CPU memory and bring them to `device` only to run (ldm/offload.py).

        mode "model": one network at a time (text encoder(s), U-Net, VAE), moved whole when it
        is first called and sent back when another is (the U-Net stays for the whole sampling
        loop); "sequential": each layer's weights only during its own forward, the least
        memory and the most transfers. device: the execution device (default: where the model
        is now if not the CPU, else CUDA). Outputs are those of the model run on `device`.
        """
        if device is None:
            device = self.device if self.device.type != "cpu" else offload.default_device()
        self.disable_offload(device="cpu")  # switching modes: nothing needs the device meanwhile
        self._offload = offload.enable(self.networks(), mode, device)

    def disable_offload(self, device=None):
        """Remove the offload hooks; every network then lives on `device` (default: the
        execution device)."""
        if self._offload is not None:
            self._offload, hooks = None, self._offload
            hooks.remove(device)

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    # ---------------------------------------------------------------- prompt -> conditioning
    def encode_text(self, prompts):
        """B prompts -> (B, 77, D) text embeddings: the U-Net's cross-attention context."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device))

    def encode_prompt(self, prompt, negative_prompt="", *, num_images=1, clip_skip=None,
                      prompt_syntax="a1111", emphasis="original", pad_conds=True):
        """(cond, uncond): the conditioning dicts of guidance's two halves, each
        {"context": (B · num_images, 77 · n, D)}, images of one prompt next to each other.

        prompt / negative_prompt: a string or a list (one negative per prompt); the negative
        prompt takes the place of the empty prompt of classifier-free guidance.
        prompt_syntax: "a1111" reads AUTOMATIC1111's `(word:1.2)`, `[word]`, `BREAK`; "plain"
        takes the text literally (`ldm.prompts`). Prompts longer than 75 tokens are encoded in
        chunks of 77 (n of them). pad_conds: prompt and negative padded to the same n with
        empty chunks (A1111's "Pad conds", so guidance runs as one batch); False leaves each
        its own n (A1111's default; guidance then runs the two halves separately).
        A plain prompt of at most 75 tokens gives CompVis's conditioning bit for bit.
        emphasis: how weights apply, "original" (A1111's), "no_norm" or "comfy" (ComfyUI's).
        clip_skip: A1111's "CLIP skip" N ≥ 1 (SD 1.x): the hidden state N − 1 blocks before
        the last, then the final layer norm; None or 1 is the last layer. Trigger words of
        loaded embeddings (`load_embedding`) are replaced by their vectors.
        """
        num_images = arguments.check_int("num_images", num_images, minimum=1)
        prompts = arguments.check_prompts("prompt", prompt)
        negatives = _per_prompt(negative_prompt, len(prompts))
        layers = self.clip_skip_layers(clip_skip)
        vectors = self._embedding_vectors("text_encoder")
        cond = self._tokenize(self.tokenizer, prompts, prompt_syntax, vectors)
        uncond = self._tokenize(self.tokenizer, negatives, prompt_syntax, vectors)
        if _check_bool("pad_conds", pad_conds):
            cond, uncond = prompt_lib.pad_chunks(cond, uncond)
        encode = self._chunk_encoder(self.text_encoder, lambda ids: self.text_encoder(
            ids, layers=layers), vectors, emphasis)
        return ({"context": encode(cond).repeat_interleave(num_images, dim=0)},
                {"context": encode(uncond).repeat_interleave(num_images, dim=0)})

    def clip_skip_layers(self, clip_skip):
        """The text blocks to run for A1111's clip skip (None: the family's own); ValueError
        where this model takes no such clip skip."""
        if clip_skip is None:
            return None
        clip_skip = arguments.check_int("clip_skip", clip_skip, minimum=1)
        if self.config.text_encoder != "clip":
            raise ValueError("clip_skip applies to SD 1.x's CLIP; SD 2.x already takes the "
                             "penultimate layer and SDXL its own (A1111 ignores it for both)")
        blocks = self.text_encoder.cfg.layers
        if clip_skip > blocks:
            raise ValueError(f"clip_skip must be in [1, {blocks}] for a text encoder of "
                             f"{blocks} blocks, got {clip_skip}")
        return blocks - (clip_skip - 1)

    def _tokenize(self, tokenizer, texts, syntax, vectors):
        if syntax not in prompt_lib.SYNTAXES:
            raise ValueError(f"prompt_syntax must be one of {prompt_lib.SYNTAXES}, got "
                             f"{syntax!r}")
        if syntax == "a1111" and any(lora.LORA_TAG.search(text) for text in texts):
            # A tag would otherwise be encoded as words, silently
            raise ValueError("encode_prompt: <lora:…> tags merge LoRAs, which encoding alone "
                             "cannot do: generate with txt2img / img2img / inpaint (they read "
                             "the tags), or load the LoRA (pipe.load_lora) and drop the tag")
        return prompt_lib.tokenize(tokenizer, texts, syntax=syntax, embeddings=vectors)

    def _chunk_encoder(self, text_encoder, encode_chunk, vectors, emphasis):
        """Tokens -> context (and pooled text, if encode_chunk gives it), chunk by chunk."""
        token_embedding = prompt_lib.find_token_embedding(text_encoder)

        def encode(tokens):
            return prompt_lib.encode(tokens, lambda ids: encode_chunk(ids.to(self.device)),
                                        emphasis=emphasis, embeddings=vectors,
                                        token_embedding=token_embedding)
        return encode

    def load_embedding(self, path, token=None):
        """Load a textual-inversion embedding (A1111 .pt, kohya/A1111 .safetensors, diffusers
        .bin, SDXL clip_l + clip_g): its trigger word (the file's stem unless `token`, as in
        A1111) then stands for its vectors in every prompt. Returns the
        `embeddings.TextualInversion`; CheckpointError for a file not for this model."""
        embedding = embeddings.read_embedding(path, token)
        keys = embeddings.ENCODERS[self.config.text_encoder]  # {attribute: encoder key}
        widths = {key: getattr(self, attribute).cfg.width for attribute, key in keys.items()}
        vectors = embeddings.vectors_for(embedding, widths)
        self.embeddings[embedding.token] = {attribute: vectors[key]
                                            for attribute, key in keys.items()}
        return embedding

    # ---------------------------------------------------------------- LoRA
    def load_lora(self, path, multiplier=1.0, *, text_multiplier=None, strict=True):
        """Merge a LoRA file (kohya/A1111, diffusers/PEFT, LyCORIS) into the weights with
        `multiplier` (A1111's `<lora:name:m>`; `text_multiplier`: the text encoders', default
        the same). Undone exactly by `unload_lora`; see `ldm.lora`. Returns the `lora.Loaded`."""
        return lora.load_lora(self, path, multiplier, text_multiplier=text_multiplier,
                              strict=strict)

    def unload_lora(self, loaded):
        """Take one loaded LoRA out: the weights become those of the others alone."""
        lora.unload_lora(self, loaded)

    def unload_loras(self):
        """Take every LoRA out: the weights are bit for bit those loaded from the file."""
        lora.unload_loras(self)

    @property
    def loras(self):
        """The LoRAs merged now, in the order they were loaded."""
        return lora.loaded_loras(self)

    def _embedding_vectors(self, attribute):
        """{trigger: (n, D) vectors} for the text encoder `attribute`, in its dtype."""
        encoder = getattr(self, attribute)
        weight = prompt_lib.find_token_embedding(encoder).weight
        return {token: vectors[attribute].to(weight.device, weight.dtype)
                for token, vectors in self.embeddings.items()}

    # ---------------------------------------------------------------- images in and out
    def encode_image(self, images, generator=None, *, tile_size=PIPE_SETTING):
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) scaled latents, drawn from the posterior
        as the original `get_first_stage_encoding` does. `generator`: one CPU generator for the
        batch, or a list of B, one per image (samplers.randn). tile_size: as decode_latents."""
        images = images.to(self.device, self.dtype)
        tiling = self._tiling(tile_size, images.shape, encode=True)
        posterior = vae_tiling.encode_tiled(self.vae, images, **tiling)
        noise = self._noise(posterior.mean.shape, generator)  # CPU-drawn, like all our noise
        return posterior.sample(noise=noise) * self.scale_factor

    def decode_latents(self, latents, *, tile_size=PIPE_SETTING):
        """(B, 4, h, w) scaled latents -> (B, 3, 8h, 8w) images in about [-1, 1].

        tile_size: decode in tiles of this many image pixels a side (`ldm.vae_tiling`: tiles
        share their GroupNorm statistics and overlap by the receptive field, so they agree
        with the whole decode to float precision); None decodes whole; "auto" (default) whole
        when the estimated memory fits what the device has free (or `memory_limit`), else the
        largest tiles that fit. Not given: `pipe.vae_tile_size` ("auto" unless set), which
        is what the tasks (txt2img, …) use.
        float16 can overflow in the VAE's last up-blocks (SD's known black images, SDXL's VAE
        always); such a batch is decoded again in float32 by a temporary copy of the VAE, and
        returned in float32. The pipeline's own VAE is never cast, so a model shared between
        threads or recorded in a CUDA graph stays as it is.
        """
        h, w = latents.shape[-2:]
        factor = self.vae.config.downsampling_factor
        tiling = self._tiling(tile_size, (len(latents), 3, h * factor, w * factor))
        images = vae_tiling.decode_tiled(self.vae, latents / self.scale_factor, **tiling)
        if images.dtype == torch.float16 and not torch.isfinite(images).all():
            vae = copy.deepcopy(self.vae).float()
            images = vae_tiling.decode_tiled(vae, latents.float() / self.scale_factor, **tiling)
        return images

    def _tiling(self, tile_size, image_shape, encode=False):
        """decode_tiled's / encode_tiled's keyword arguments for images of `image_shape`."""
        if tile_size is PIPE_SETTING:
            tile_size = self.vae_tile_size
        if tile_size != "auto":
            if tile_size is not None:
                tile_size = arguments.check_int("tile_size", tile_size, minimum=1)
            return {"tile_size": tile_size}
        limit = self.memory_limit
        if limit is None:
            limit = arguments.available_memory(self.device)
        if limit is None or limit == math.inf:
            return {"tile_size": None}
        batch, _, height, width = image_shape
        return vae_tiling.auto_tiling(self.vae.config, height, width, self.dtype, limit,
                                      batch=batch, encode=encode)

    def _conditioning_inputs(self, task, options, height, width):
        """encode_prompt's keyword inputs beyond the prompts, from a task's **options: the
        PROMPT_OPTIONS (StableDiffusionXL adds its size and aesthetic numbers)."""
        unknown = set(options) - self.conditioning_keys
        if unknown:
            raise TypeError(f"{task}() got unexpected keyword argument(s) "
                            f"{', '.join(sorted(unknown))}; this model's prompt options are "
                            f"{', '.join(sorted(self.conditioning_keys))}")
        return dict(options)

    # ---------------------------------------------------------------- the sampling loop
    def denoise(self, x, cond, uncond, timesteps, *, sampler="ddim", cfg_scale=7.5,
                cfg_interval=None, eta=0.0, generator=None, callback=None, progress=None,
                refiner=None):
        """Run `sampler` from x at timesteps[0] through every timestep; returns the final latent.

        x: (B, 4, h, w) noisy latents; cond, uncond: conditioning dicts (`encode_prompt`);
        timesteps: descending (`samplers.timesteps`); sampler: a name or a `samplers.Sampler`;
        cfg_interval: (low, high), guidance only at the steps with low ≤ t ≤ high, the
        conditional prediction alone at the others (`samplers.cfg`); None: at every step.
        eta: DDIM's η. generator: for the samplers that draw noise at every step, one
        generator for the batch or a list of B, one per image (the tasks pass one per image).
        Noise is drawn where its generator is and then moved (`rng.draw`): the tasks' CPU
        generators make the same images on a GPU as on the CPU, as A1111's "CPU" source does.
        callback(i, t, x, x0) runs after every step and may return a
        replacement x; progress: a step counter on stderr (default: when stderr is a terminal).
        refiner: a `Handoff` (SDXL's ensemble of experts): its model predicts the noise at the
        steps below its boundary, this one above, within the one sampling loop.
        """
        # The tasks have checked these already; denoise is also called on its own.
        cfg_scale, eta = arguments.check_cfg_scale(cfg_scale), arguments.check_eta(eta)
        cfg_interval = arguments.check_cfg_interval(cfg_interval)
        arguments.check_hooks(callback, progress)
        entry = _sampler_entry(sampler)
        eps_fn = self._guided(cond, uncond, cfg_scale, cfg_interval)
        if refiner is not None:
            eps_fn = refiner.experts(eps_fn, cfg_scale, cfg_interval)
        options = {"eta": eta} if entry.takes_eta else {}
        if entry.noisy:
            options["generator"] = generator
        if progress is None:
            progress = sys.stderr.isatty()  # no \r-redrawn lines in logs and notebooks
        callback = _chain(callback, _progress_bar(len(timesteps)) if progress else None)
        return entry.sample(eps_fn, x, timesteps, self.alphas_cumprod, callback=callback,
                            **options)

    def _guided(self, cond, uncond, cfg_scale, cfg_interval=None):
        """eps_fn(x, t): this model's guided noise prediction (v converted to ε)."""
        model = self._network()
        if self.config.prediction == "v":
            model = samplers.eps_from_v(model, self.alphas_cumprod)
        return samplers.cfg(model, cond, uncond, cfg_scale, cfg_interval)

    def _network(self):
        """The U-Net as the samplers' model, (x, t, cond) -> ε (or v); replayed from CUDA graphs
        when `cuda_graphs` is on."""
        unet = self.unet
        # Offloading moves the weights, which a recorded graph would still read where they were
        if self.cuda_graphs and self.device.type == "cuda" and self._offload is None:
            if self._unet_graphs.module is not self.unet:  # the U-Net was swapped for another
                self._unet_graphs = CUDAGraphed(self.unet)
            unet = self._unet_graphs
        return lambda x, t, cond: unet(x, t, **cond)

    # ---------------------------------------------------------------- the three tasks
    @_lora_tags_applied
    @torch.inference_mode()
    def txt2img(self, prompt, *, negative_prompt="", steps=None, sampler=None, schedule=None,
                cfg_scale=None, cfg_interval=None, height=None, width=None, num_images=1,
                seed=None, generator=None, rng="cpu", latents=None, eta=0.0, output_type="pil",
                callback=None, progress=None, refiner=None, refiner_start=0.8, hires_scale=None,
                hires_strength=hires.DEFAULT_STRENGTH, hires_steps=None, hires_upscale="latent",
                **conditioning):
        """Generate images from text. Returns a list of PIL images ("pil"), the final latents
        (B, 4, h, w) before the VAE ("latent"), or images (B, 3, H, W) in [-1, 1] ("tensor").

        prompt / negative_prompt: a string or a list (one per prompt), num_images per prompt.
        sampler: a name in `samplers.SAMPLERS` ("ddim", "euler_a", "dpmpp_2m", …; "…_karras"
        names the schedule too); schedule: one of `samplers.SCHEDULES` ("karras", …; default:
        the sampler's). cfg_interval: (low, high), classifier-free guidance only at the steps
        whose timestep t has low ≤ t ≤ high (0 ≤ low < high ≤ 1000), the conditional prediction
        alone (one U-Net batch, not two) at the others: "guidance in a limited interval"
        (`samplers.cfg`); (0, 1000) is every step. steps, sampler, cfg_scale and cfg_interval
        default to the model's `config.sampling` (SD: 50, DDIM, 7.5, every step; the shipped
        model: 25, DDPM, 5, (200, 1000)), height/width to its native size. `seed` fixes the
        noise: image i of the batch (prompt-major) is exactly the image of seed + i alone, its
        noise drawn from a generator of its own (`_generators`: also what a CPU `generator`, or
        a list of one per image, means). The starting noise is drawn on the CPU in float32, then
        moved, so a seed means the same start on any device; `latents` (B, 4, h, w) gives it
        explicitly. rng: the numbers a seed gives, "cpu" (torch's CPU generator, A1111's "CPU")
        or "nv" (CUDA's torch.randn, computed on the CPU: A1111's "NV", and its default "GPU" on
        an NVIDIA card; `ldm.rng`).
        eta, callback, progress: see `denoise`.
        refiner: an SDXL refiner (`ldm.load("sd_xl_refiner_1.0.safetensors")`) that takes over
        the steps after the share `refiner_start` of the noise schedule (0.8: the last 20 %,
        timesteps below 200), the "ensemble of experts" of the SDXL paper: one sampling loop
        whose noise prediction switches model (`Handoff`), so every sampler works unchanged.
        **conditioning: SDXL's micro-conditioning (`StableDiffusionXL.encode_prompt`):
        original_size, crops_coords_top_left, target_size; aesthetic_score and
        negative_aesthetic_score for a refiner. Each model takes the numbers it knows.
        hires_scale: AUTOMATIC1111's "Hires. fix" (`ldm.hires`), off when None: the images
        drawn at height × width are upscaled by this factor (> 1; the size rounded down to a
        multiple of 8) with `hires_upscale` (`hires.UPSCALERS`: "latent" interpolates the
        latents, as A1111's default; "pixel" resizes the decoded image with Lanczos), then
        denoised again there as img2img with `hires_strength` in (0, 1], running
        `hires_steps` steps (default: `steps`) of a schedule of hires_steps / hires_strength,
        as A1111 counts them. The second pass has the first's prompts, sampler, guidance and
        per-image seeds (noise drawn as img2img with the same seed draws it); SDXL's sizes
        are the target's. callback runs in both passes, its step index starting at 0 in each.

        Every argument is checked before any work (`ldm.arguments`): TypeError or ValueError
        naming it. A NumPy scalar counts as the Python number; seed is any integer, taken
        mod 2**64; latents may be a NumPy array. A request needing more memory than the device
        has is refused (ValueError; see `memory_limit`).
        """
        self._require_plain_unet("txt2img")
        seed, latents = arguments.check_seed(seed), arguments.check_latents(latents)
        check_rng(rng)
        arguments.check_hooks(callback, progress)
        plan = self._plan(steps, sampler, schedule, cfg_scale, cfg_interval, eta, output_type)
        h, w = self._latent_size(height, width)
        size = self._image_size(h, w)
        own, refiner_options = _split_conditioning(self, refiner, conditioning)
        inputs = self._conditioning_inputs("txt2img", own, *size)
        upscaling = hires.Hires.check(hires_scale, hires_strength, hires_steps, hires_upscale)
        if upscaling is not None:
            if refiner is not None:
                raise ValueError("hires_scale with a refiner is not supported yet: run the "
                                 "refiner on the result (refiner.img2img)")
            second = self._hires_plan(upscaling, size, steps, sampler, schedule, cfg_scale,
                                      cfg_interval, eta, output_type)
            second_inputs = self._conditioning_inputs("txt2img", own, *second.size)
            self._check_memory(prompt, num_images, self._latent_size(*second.size))
        handoff = None
        if refiner is not None:
            handoff = Handoff.check(self, refiner, refiner_start)
            refiner_inputs = refiner._conditioning_inputs("txt2img", refiner_options, *size)
        self._check_memory(prompt, num_images, (h, w))
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images=num_images,
                                          **inputs)
        if handoff is not None:
            handoff = handoff.conditioned(*refiner.encode_prompt(
                prompt, negative_prompt, num_images=num_images, **refiner_inputs))
        batch = len(cond["context"])
        generators = _generators(seed, generator, batch, rng)
        fresh = upscaling and [_copy(g) for g in generators]  # the seeds again, for pass 2
        x = self._initial_noise(latents, (batch, self.unet.config.out_channels, h, w), generators)
        z = self.denoise(x, cond, uncond, plan.timesteps, refiner=handoff,
                         **plan.options(generators, callback, progress))
        if upscaling is not None:
            if second_inputs != inputs:  # SDXL: the target size is in the conditioning
                cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images=num_images,
                                                  **second_inputs)
            z0 = hires.upscale(self, z, self._latent_size(*second.size), upscaling.upscaler,
                               fresh)
            z = self._refine(z0, cond, uncond, second.plan, second.timesteps, fresh, callback,
                             progress)
        return self._output(z, output_type)

    def _hires_plan(self, upscaling, size, steps, sampler, schedule, cfg_scale, cfg_interval,
                    eta, output_type):
        """The second pass of a hires fix: its pixel size, its plan (the first's settings on
        A1111's longer schedule) and the tail of timesteps it runs."""
        target = upscaling.target_size(*size, self.vae.config.downsampling_factor)
        run = upscaling.steps or (self.config.sampling.steps if steps is None else steps)
        total, run = hires.second_pass_steps(run, upscaling.strength)
        try:
            plan = self._plan(total, sampler, schedule, cfg_scale, cfg_interval, eta,
                              output_type)
        except ValueError as e:
            raise ValueError(f"hires_steps / hires_strength: the second pass runs {run} steps of "
                             f"a schedule of {total} (steps / strength, as A1111): {e}") from e
        return _HiresPass(target, plan, plan.timesteps[max(0, len(plan.timesteps) - run):])

    @_lora_tags_applied
    @torch.inference_mode()
    def img2img(self, image, prompt, *, strength=0.75, negative_prompt="", steps=None,
                sampler=None, schedule=None, cfg_scale=None, cfg_interval=None, num_images=1,
                seed=None, generator=None, rng="cpu", eta=0.0, output_type="pil", callback=None,
                progress=None, **conditioning):
        """Re-imagine `image` (PIL, list, or (B, 3, H, W) in [-1, 1]) following `prompt`.

        strength in (0, 1]: the share of the `steps` schedule that is re-run; the image is
        noised to the first of those steps, then denoised to the end (an SDXL refiner
        refining a finished image: a low strength, sgm's demo uses 0.15). The other
        arguments as in txt2img. Any PIL mode is read (16-bit and float grey on their own
        scale; alpha composited on white): see `ldm.images`.
        """
        strength, seed = arguments.check_strength(strength), arguments.check_seed(seed)
        check_rng(rng)
        arguments.check_hooks(callback, progress)
        self._require_plain_unet("img2img")
        plan = self._plan(steps, sampler, schedule, cfg_scale, cfg_interval, eta, output_type)
        size = self._latent_size(*image_shape(image)[1:])
        inputs = self._conditioning_inputs("img2img", conditioning, *self._image_size(*size))
        self._check_memory(prompt, num_images, size)
        pixels = to_tensor(image)
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images=num_images,
                                          **inputs)
        batch = len(cond["context"])
        generators = _generators(seed, generator, batch, rng)
        z0 = self.encode_image(_batch(pixels, batch, "image"), generators)
        # The original script runs int(strength * steps) steps; at least one, or nothing happens.
        steps = len(plan.timesteps)
        timesteps = plan.timesteps[steps - max(1, int(strength * steps)):]
        z = self._refine(z0, cond, uncond, plan, timesteps, generators, callback, progress)
        return self._output(z, output_type)

    def _refine(self, z0, cond, uncond, plan, timesteps, generators, callback, progress):
        """img2img's sampling: clean latents z0 noised to timesteps[0], then denoised."""
        x = samplers.add_noise(z0, self._noise(z0.shape, generators), timesteps[0],
                               self.alphas_cumprod)
        return self.denoise(x, cond, uncond, timesteps, **plan.options(generators, callback,
                                                                        progress))

    @_lora_tags_applied
    @torch.inference_mode()
    def inpaint(self, image, mask, prompt, *, negative_prompt="", steps=None, sampler=None,
                schedule=None, cfg_scale=None, cfg_interval=None, num_images=1, seed=None,
                generator=None, rng="cpu", eta=0.0, output_type="pil", callback=None,
                progress=None, **conditioning):
        """Repaint the white part of `mask` in `image` following `prompt`.

        With an inpainting checkpoint (9 input channels) the U-Net sees the mask and the
        masked image as its "concat" conditioning, as trained. With an ordinary one, the
        original latent blending is used: after every step the known region is replaced by the
        source latents noised to that step. The other arguments as in txt2img; image and mask
        in any PIL mode (a mask's alpha composited on black, "keep"): see `ldm.images`.
        """
        seed = arguments.check_seed(seed)
        check_rng(rng)
        arguments.check_hooks(callback, progress)
        plan = self._plan(steps, sampler, schedule, cfg_scale, cfg_interval, eta, output_type)
        image_size, mask_size = image_shape(image)[1:], image_shape(mask, name="mask")[1:]
        if mask_size != image_size:
            raise ValueError(f"mask size {tuple(mask_size)} differs from image size "
                             f"{tuple(image_size)}")
        size = self._latent_size(*image_size)
        inputs = self._conditioning_inputs("inpaint", conditioning, *self._image_size(*size))
        self._check_memory(prompt, num_images, size)
        pixels, repaint = to_tensor(image), mask_to_tensor(mask)
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images=num_images,
                                          **inputs)
        batch = len(cond["context"])
        generators = _generators(seed, generator, batch, rng)
        pixels, repaint = _batch(pixels, batch, "image"), _batch(repaint, batch, "mask")
        latent_mask = F.interpolate(repaint, size=size, mode="nearest").to(self.device, self.dtype)
        x = self._noise((batch, self.unet.config.out_channels, *size), generators)
        options = plan.options(generators, callback, progress)
        if self.unet.config.in_channels == 9:
            # The original `LatentInpaintDiffusion` order: [mask (1), masked-image latents (4)],
            # stacked after the 4 noisy latent channels; the same for both guidance halves.
            masked = self.encode_image(pixels * (1 - repaint), generators)
            concat = torch.cat([latent_mask, masked], dim=1)  # (B, 5, h, w)
            cond, uncond = {**cond, "concat": concat}, {**uncond, "concat": concat}
        else:
            z0 = self.encode_image(pixels, generators)
            blend = self._latent_blending(z0, latent_mask, plan.timesteps, generators)
            options["callback"] = _chain(blend, options["callback"])
        z = self.denoise(x, cond, uncond, plan.timesteps, **options)
        return self._output(z, output_type)

    # ---------------------------------------------------------------- helpers
    def _plan(self, steps, sampler, schedule, cfg_scale, cfg_interval, eta, output_type):
        """The sampling settings, the model's defaults filled in, checked before any work."""
        defaults = self.config.sampling
        arguments.check_optional("schedule", schedule, str, f"one of {', '.join(samplers.SCHEDULES)}")
        if isinstance(sampler, samplers.Sampler):
            sampler = sampler.name
        arguments.check_optional("sampler", sampler, str, "a sampler name or a samplers.Sampler")
        entry, schedule = samplers.resolve(defaults.sampler if sampler is None else sampler,
                                           schedule)
        steps = arguments.check_int("steps", defaults.steps if steps is None else steps)
        _check_choice("output_type", output_type, OUTPUT_TYPES)
        cfg_scale = arguments.check_cfg_scale(defaults.cfg_scale if cfg_scale is None
                                              else cfg_scale)
        cfg_interval = arguments.check_cfg_interval(defaults.cfg_interval if cfg_interval is None
                                                    else cfg_interval)
        eta = arguments.check_eta(eta)
        return _Plan(entry, samplers.timesteps(entry, schedule, steps, self.alphas_cumprod),
                     cfg_scale, cfg_interval, eta)

    def _output(self, latents, output_type):
        if output_type == "latent":
            return latents
        images = self.decode_latents(latents)
        return images if output_type == "tensor" else to_pil(images)

    def _require_plain_unet(self, task):
        if self.unet.config.in_channels != self.unet.config.out_channels:
            raise ValueError(f"this is an inpainting checkpoint ({self.unet.config.in_channels} "
                             f"input channels): use pipe.inpaint, not {task}")

    def _latent_size(self, height, width):
        factor = self.vae.config.downsampling_factor
        height = self.config.image_size if height is None else height
        width = self.config.image_size if width is None else width
        height, width = arguments.check_int("height", height), arguments.check_int("width", width)
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise ValueError(f"{name} must be a positive multiple of {factor}, got {value!r}")
        return height // factor, width // factor

    def _image_size(self, h, w):
        """Pixel (height, width) of a latent of size h × w."""
        factor = self.vae.config.downsampling_factor
        return h * factor, w * factor

    def _check_memory(self, prompt, num_images, size):
        """Refuse (ValueError), before anything is allocated, a request for len(prompt) ·
        num_images images of latent `size` (h, w) needing more memory than `memory_limit`
        (None: what the device has now); see `arguments.estimate_memory`."""
        prompts = arguments.check_prompts("prompt", prompt)
        num_images = arguments.check_int("num_images", num_images, minimum=1)
        factor = self.vae.config.downsampling_factor
        height, width = size[0] * factor, size[1] * factor
        needed = arguments.estimate_memory(self.config, len(prompts) * num_images, height,
                                           width, self.dtype)
        request = (f"{len(prompts)} prompt(s) × num_images={num_images} at height={height}, "
                   f"width={width}")
        arguments.check_memory(request, needed, self.device, self.memory_limit)

    def _noise(self, shape, generator):
        """Standard normal noise of `shape` (B, …), drawn on the CPU in float32 (the same numbers
        on any device), then moved: from one CPU generator, or image i's from generator i of a
        list (samplers.randn)."""
        return samplers.randn(shape, generator).to(self.device, self.dtype)

    def _initial_noise(self, latents, shape, generator):
        if latents is None:
            return self._noise(shape, generator)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(self.device, self.dtype)

    def _latent_blending(self, z0, mask, timesteps, generator):
        """A step callback for ordinary checkpoints: outside the mask, put back the source
        latents noised afresh to the step just reached (clean after the last step), as the
        original DDIM sampler's `mask`/`x0` arguments do."""
        def blend(i, t, x, x0_pred):
            if i + 1 == len(timesteps):
                return mask * x + (1 - mask) * z0
            known = samplers.add_noise(z0, self._noise(z0.shape, generator), timesteps[i + 1],
                                       self.alphas_cumprod)
            return mask * x + (1 - mask) * known
        return blend


@dataclass(frozen=True)
class Handoff:
    """SDXL's "ensemble of experts": `pipe` (the refiner) predicts the noise at every step whose
    timestep lies below `boundary`, with its own conditioning; the base model all before.

    As diffusers' denoising_end / denoising_start = f: the refiner takes t < (1 − f) · T.
    """
    pipe: "StableDiffusion"
    boundary: float
    cond: dict | None = None
    uncond: dict | None = None

    @classmethod
    def check(cls, base, refiner, start):
        """A Handoff to `refiner` at the share `start` in (0, 1) of the schedule, once the two
        models are known to share a latent space."""
        if not isinstance(refiner, StableDiffusion):
            raise TypeError(f"refiner must be a loaded model (ldm.load(...)), got "
                            f"{type(refiner).__name__}")
        start = arguments.check_float("refiner_start", start, 0, 1, low_open=True,
                                      why="the share of the schedule the base model runs")
        if (refiner.config.scale_factor != base.config.scale_factor
                or refiner.config.vae != base.config.vae
                or refiner.unet.config.out_channels != base.unet.config.out_channels):
            raise ValueError("refiner must share the base model's latent space (the same VAE "
                             "and scale factor), as SDXL's base and refiner do")
        return cls(refiner, (1 - start) * len(base.alphas_cumprod))

    def conditioned(self, cond, uncond):
        return Handoff(self.pipe, self.boundary, cond, uncond)

    def experts(self, base_eps, cfg_scale, cfg_interval=None):
        """eps_fn(x, t): the base's `base_eps` at t ≥ boundary, the refiner's below."""
        refiner_eps = self.pipe._guided(self.cond, self.uncond, cfg_scale, cfg_interval)

        def eps_fn(x, t):
            return (base_eps if float(t[0]) >= self.boundary else refiner_eps)(x, t)
        return eps_fn


def _split_conditioning(base, refiner, options):
    """A task's **conditioning split between the base and a refiner: each takes the keys its
    encode_prompt knows (SDXL base: sizes; refiner: sizes and aesthetic scores); without a
    refiner, all go to the base."""
    if refiner is None:
        return options, {}
    base_keys = getattr(base, "conditioning_keys", frozenset())
    refiner_keys = getattr(refiner, "conditioning_keys", frozenset())
    unknown = set(options) - base_keys - refiner_keys
    if unknown:
        raise TypeError("txt2img() got unexpected keyword argument(s) "
                        f"{', '.join(sorted(unknown))}")
    return ({k: v for k, v in options.items() if k in base_keys},
            {k: v for k, v in options.items() if k in refiner_keys})


@dataclass(frozen=True)
class _Plan:
    """A task's sampling settings: the sampler, the timesteps of the whole schedule (img2img
    runs a tail of them), guidance scale and interval, and DDIM's η."""
    sampler: samplers.Sampler
    timesteps: torch.Tensor
    cfg_scale: float
    cfg_interval: tuple | None
    eta: float

    def options(self, generator, callback, progress):
        """denoise's keyword arguments."""
        return dict(sampler=self.sampler, cfg_scale=self.cfg_scale,
                    cfg_interval=self.cfg_interval, eta=self.eta,
                    generator=generator, callback=callback, progress=progress)


@dataclass(frozen=True)
class _HiresPass:
    """A hires fix's second pass: pixel size (H, W), its plan, the timesteps it runs."""
    size: tuple
    plan: _Plan
    timesteps: torch.Tensor


def _copy(generator):
    """A new generator in `generator`'s present state (a CPU torch.Generator or a
    PhiloxGenerator)."""
    if isinstance(generator, PhiloxGenerator):
        twin = PhiloxGenerator(generator.initial_seed())
        twin.offset = generator.offset
        return twin
    return torch.Generator().set_state(generator.get_state())


def _generators(seed, generator, batch, rng="cpu"):
    """`batch` generators of kind `rng` (ldm.rng: CPU torch.Generators, or PhiloxGenerators
    for "nv"), image i's seeded s + i, so that image i of a batch is exactly
    the image of seed s + i alone (AUTOMATIC1111's rule): every noise an image gets (starting
    noise, posterior sample, img2img's and inpainting's noising, each step's noise) is drawn
    from its own generator, whatever else is in the batch.

    s is `seed`. A CPU `generator` (which wins over a seed) stands for the s drawn from it:
    one generator state gives one batch, and a generator used again gives new images. With
    neither, s is random. A list of `batch` CPU torch.Generators or PhiloxGenerators is used as
    given, one per image.
    Seeds are taken modulo 2**64, as torch.Generator.manual_seed takes negative ones.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"generator is a list of {len(generator)} for {batch} images; "
                             "give one generator, or one per image")
        return [g if isinstance(g, PhiloxGenerator) else _cpu(g) for g in generator]
    if generator is not None:
        seed = int(torch.randint(2**63 - 1, (), generator=_cpu(generator)))
    elif seed is None:
        seed = torch.Generator().seed()  # random, without touching torch's global generator
    return seeded_generators(seed, batch, rng)


def _cpu(generator):
    """Noise is drawn on the CPU, so that a seed gives the same image on any device."""
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (or a list of them, one per "
                         "image): ldm draws noise on the CPU so that a seed gives the same "
                         f"image on any device; got {generator!r}")
    return generator


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _sampler_entry(sampler):
    """The registry entry of a sampler name (str) or a `samplers.Sampler` itself."""
    if isinstance(sampler, samplers.Sampler):
        return sampler
    if not isinstance(sampler, str):
        raise TypeError(f"sampler must be a name (one of {', '.join(samplers.SAMPLERS)}, …) or "
                        f"a samplers.Sampler, got {sampler!r} ({type(sampler).__name__})")
    return samplers.resolve(sampler)[0]


def _per_prompt(texts, count):
    """One negative prompt per prompt: a string serves them all, a list gives each its own."""
    texts = [texts] * count if isinstance(texts, str) else arguments.check_prompts(
        "negative_prompt", texts)
    if len(texts) != count:
        raise ValueError(f"negative_prompt has {len(texts)} entries for {count} prompts")
    return texts


def _batch(tensor, batch, name):
    """Repeat a single image (or mask) over the batch; a batch must already have B entries."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"{name} has a batch of {tensor.shape[0]}, expected 1 or {batch}")


def _chain(*callbacks):
    """One step callback running several; a callback may return a replacement x."""
    active = [c for c in callbacks if c is not None]
    if not active:
        return None

    def run(i, t, x, x0_pred):
        for callback in active:
            replaced = callback(i, t, x, x0_pred)
            x = x if replaced is None else replaced
        return x
    return run


def _progress_bar(total):
    def show(i, t, x, x0_pred):
        end = "\n" if i + 1 == total else ""
        print(f"\rsampling {i + 1}/{total}", end=end, file=sys.stderr, flush=True)
    return show
