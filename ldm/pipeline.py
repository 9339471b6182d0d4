"""A whole Stable Diffusion model: its four parts, its constants, and generation with them.

    pipe = ldm.load("v1-5-pruned-emaonly.safetensors", device="cuda", dtype=torch.float16)
    ids = pipe.tokenizer(["a photo of an astronaut riding a horse"])   # (B, 77) int64
    ctx = pipe.text_encoder(ids)                                      # (B, 77, 768)
    eps = pipe.unet(x, t, ctx)                                        # x (B, 4, h, w), t (B,)
    z = pipe.vae.encode(images).mean * pipe.scale_factor              # images (B, 3, 8h, 8w)
    images = pipe.vae.decode(z / pipe.scale_factor)

Device and dtype are decided here, once; the model code never names a device.

On a GPU, `pipe.cuda_graphs = True` replays the U-Net's forward from a CUDA graph at every
step (ldm/cuda_graph.py), and `pipe.unet.to(memory_format=torch.channels_last)` spares cuDNN
its layout conversions; both are off by default until a GPU run has measured them.
"""
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm import samplers, schedule
from ldm.config import ModelConfig
from ldm.cuda_graph import CUDAGraphed
from ldm.images import mask_to_tensor, to_pil, to_tensor
from ldm.models.clip_text import CLIPTextModel
from ldm.models.open_clip_text import OpenCLIPTextModel
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from ldm.tokenizer import CLIPTokenizer


class StableDiffusion(nn.Module):
    """Tokenizer, text encoder, U-Net and VAE of one latent diffusion model, plus its constants.

    `scale_factor` maps VAE latents to the U-Net's unit-variance latents; `alphas_cumprod`
    (float64, (1000,)) is the training noise schedule the samplers use. `cuda_graphs`: replay
    the U-Net from CUDA graphs while sampling on a GPU (see the module docstring).
    """

    def __init__(self, config=ModelConfig()):
        super().__init__()
        self.config = config
        text_model, tokenizer = TEXT_ENCODERS[config.text_encoder]
        self.tokenizer = tokenizer()
        self.text_encoder = text_model(config.text)
        self.unet = UNet(config.unet)
        self.vae = AutoencoderKL(config.vae)
        self.scale_factor = config.scale_factor
        # Kept in float64 on the CPU (not a buffer) so that .half() cannot round it, and built
        # there even when the networks are built on the meta device for loading.
        with torch.device("cpu"):
            self.alphas_cumprod = schedule.alphas_cumprod()
        self.cuda_graphs = False
        self._unet_graphs = CUDAGraphed(self.unet)

    def networks(self):
        """{"unet": …, "vae": …, "text_encoder": …}: the modules whose weights a checkpoint holds."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    # ---------------------------------------------------------------- generation
    @property
    def device(self):
        return self.unet.out[2].weight.device

    @property
    def dtype(self):
        return self.unet.out[2].weight.dtype

    def encode_text(self, prompts):
        """B prompts -> (B, 77, D) text embeddings: the U-Net's cross-attention context."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device))

    def encode_image(self, images, generator=None):
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) scaled latents, drawn from the posterior
        as the original `get_first_stage_encoding` does. `generator` is a CPU generator."""
        posterior = self.vae.encode(images.to(self.device, self.dtype))
        noise = self._noise(posterior.mean.shape, generator)  # CPU-drawn, like all our noise
        return posterior.sample(noise=noise) * self.scale_factor

    def decode_latents(self, latents):
        """(B, 4, h, w) scaled latents -> (B, 3, 8h, 8w) images in about [-1, 1]."""
        images = self.vae.decode(latents / self.scale_factor)
        # fp16 can overflow in the VAE's last up-blocks (SD's known black images): redo in fp32.
        if images.dtype == torch.float16 and not torch.isfinite(images).all():
            images = self.vae.float().decode(latents.float() / self.scale_factor)
            self.vae.half()
        return images

    @torch.inference_mode()
    def txt2img(self, prompt, negative_prompt="", steps=None, sampler=None, cfg_scale=None,
                height=None, width=None, seed=None, latents=None, output_type="pil", *,
                num_images=1, eta=0.0, generator=None, callback=None, progress=None):
        """Generate images from text. Returns a list of PIL images ("pil"), the final latents
        (B, 4, h, w) before the VAE ("latent"), or images (B, 3, H, W) in [-1, 1] ("tensor").

        prompt / negative_prompt: a string or a list (one per image); the negative prompt
        replaces the empty prompt of classifier-free guidance. steps, sampler (one of SAMPLERS:
        "ddim", "plms", "ddpm", then k-diffusion's "euler", "euler_a", "heun", "dpmpp_2m",
        "dpmpp_2m_sde", each of those also with "_karras" σ steps) and cfg_scale default to
        the model's `config.sampling` (SD: 50, DDIM, 7.5), height/width to its native size.
        eta: DDIM's η (Euler a and DPM++ 2M SDE always add their full noise). `seed` or a CPU `generator` fixes the noise (drawn on
        the CPU in float32, then moved, so a seed means the same start on any device);
        `latents` (B, 4, h, w) gives the starting noise explicitly. `progress`: show a step
        counter on stderr (default: when stderr is a terminal); `callback(i, t, x, x0)` runs
        after every step and may return a replacement x.
        """
        self._require_plain_unet("txt2img")
        job = self._prepare(prompt, negative_prompt, num_images, steps, sampler, cfg_scale,
                            output_type, eta)
        h, w = self._latent_size(height, width)
        generator = _generator(seed, generator)
        x = self._initial_noise(latents, (job.batch, self.unet.config.out_channels, h, w),
                                generator)
        return self._run(job, x, job.timesteps, generator, callback, progress)

    @torch.inference_mode()
    def img2img(self, image, prompt, strength=0.75, negative_prompt="", steps=None, sampler=None,
                cfg_scale=None, seed=None, output_type="pil", *, num_images=1, eta=0.0,
                generator=None, callback=None, progress=None):
        """Re-imagine `image` (PIL, list, or (B, 3, H, W) in [-1, 1]) following `prompt`.

        strength in (0, 1]: the share of the `steps` schedule that is re-run; the image is
        noised to the first of those steps, then denoised to the end.
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        self._require_plain_unet("img2img")
        job = self._prepare(prompt, negative_prompt, num_images, steps, sampler, cfg_scale,
                            output_type, eta)
        generator = _generator(seed, generator)
        z0 = self._encode_init_image(image, job.batch, generator)
        # The original script runs int(strength * steps) steps; at least one, or nothing happens.
        timesteps = job.timesteps[len(job.timesteps) - max(1, int(strength * len(job.timesteps))):]
        x = samplers.add_noise(z0, self._noise(z0.shape, generator), timesteps[0],
                               self.alphas_cumprod)
        return self._run(job, x, timesteps, generator, callback, progress)

    @torch.inference_mode()
    def inpaint(self, image, mask, prompt, negative_prompt="", steps=None, sampler=None,
                cfg_scale=None, seed=None, output_type="pil", *, num_images=1, eta=0.0,
                generator=None, callback=None, progress=None):
        """Repaint the white part of `mask` in `image` following `prompt`.

        With an inpainting checkpoint (9 input channels) the U-Net sees the mask and the
        masked image, as trained. With an ordinary one, the original latent blending is used:
        after every step the known region is replaced by the source latents noised to that step.
        """
        job = self._prepare(prompt, negative_prompt, num_images, steps, sampler, cfg_scale,
                            output_type, eta)
        generator = _generator(seed, generator)
        pixels = to_tensor(image)
        repaint = mask_to_tensor(mask)
        if repaint.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(f"mask size {tuple(repaint.shape[-2:])} differs from image size "
                             f"{tuple(pixels.shape[-2:])}")
        size = self._latent_size(*pixels.shape[-2:])
        pixels, repaint = _batch(pixels, job.batch, "image"), _batch(repaint, job.batch, "mask")
        latent_mask = F.interpolate(repaint, size=size, mode="nearest")
        latent_mask = latent_mask.to(self.device, self.dtype)
        x = self._noise((job.batch, self.unet.config.out_channels, *latent_mask.shape[-2:]),
                        generator)
        if self.unet.config.in_channels == 9:
            masked = self.encode_image(pixels * (1 - repaint), generator)
            job.eps_model = _with_inpainting_inputs(job.eps_model, latent_mask, masked)
            return self._run(job, x, job.timesteps, generator, callback, progress)
        z0 = self.encode_image(pixels, generator)
        blend = self._latent_blending(z0, latent_mask, job.timesteps, generator)
        return self._run(job, x, job.timesteps, generator, _chain(blend, callback), progress)

    # ---------------------------------------------------------------- helpers
    def _prepare(self, prompt, negative_prompt, num_images, steps, sampler, cfg_scale,
                 output_type, eta):
        defaults = self.config.sampling
        steps = defaults.steps if steps is None else steps
        sampler = defaults.sampler if sampler is None else sampler
        cfg_scale = defaults.cfg_scale if cfg_scale is None else cfg_scale
        sampler, schedule = samplers.resolve(sampler)
        _check_choice("output_type", output_type, OUTPUT_TYPES)
        timesteps = samplers.timesteps(sampler, schedule, steps, self.alphas_cumprod)
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = _per_prompt(negative_prompt, len(prompts))
        cond = self.encode_text(prompts).repeat_interleave(num_images, dim=0)
        uncond = self.encode_text(negatives).repeat_interleave(num_images, dim=0)
        return _Job(batch=cond.shape[0], cond=cond, uncond=uncond, cfg_scale=cfg_scale,
                    sampler=sampler, eta=eta, output_type=output_type,
                    eps_model=self._unet_step(),
                    timesteps=timesteps)

    def _unet_step(self):
        """The U-Net as the samplers call it: (x, t, context) -> ε, from CUDA graphs if asked."""
        if not (self.cuda_graphs and self.device.type == "cuda"):
            return self.unet
        if self._unet_graphs.module is not self.unet:  # the U-Net was swapped for another
            self._unet_graphs = CUDAGraphed(self.unet)
        return self._unet_graphs

    def _require_plain_unet(self, task):
        if self.unet.config.in_channels != self.unet.config.out_channels:
            raise ValueError(f"this is an inpainting checkpoint ({self.unet.config.in_channels} "
                             f"input channels): use pipe.inpaint, not {task}")

    def _latent_size(self, height, width):
        factor = self.vae.config.downsampling_factor
        height = self.config.image_size if height is None else height
        width = self.config.image_size if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % factor:
                raise ValueError(f"{name} must be a positive multiple of {factor}, got {value!r}")
        return height // factor, width // factor

    def _noise(self, shape, generator):
        """Standard normal noise, drawn on the CPU (same numbers on any device), then moved."""
        return torch.randn(shape, generator=generator).to(self.device, self.dtype)

    def _initial_noise(self, latents, shape, generator):
        if latents is None:
            return self._noise(shape, generator)
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(self.device, self.dtype)

    def _encode_init_image(self, image, batch, generator):
        pixels = to_tensor(image)
        self._latent_size(*pixels.shape[-2:])
        return self.encode_image(_batch(pixels, batch, "image"), generator)

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

    def _run(self, job, x, timesteps, generator, callback, progress):
        eps_model = job.eps_model
        if self.config.prediction == "v":  # outside the inpainting inputs: x is the 4-ch latent
            eps_model = samplers.eps_from_v(eps_model, self.alphas_cumprod)
        eps_fn = samplers.cfg(eps_model, job.cond, job.uncond, job.cfg_scale)
        # The samplers draw their per-step noise (NOISY_SAMPLERS) on the latents' device; seed
        # a generator there from ours.
        if self.device.type != "cpu":
            seed = int(torch.randint(2**62, (), generator=generator))
            generator = torch.Generator(self.device).manual_seed(seed)
        if progress is None:
            progress = sys.stderr.isatty()  # no \r-redrawn lines in logs and notebooks
        callback = _chain(callback, _progress_bar(len(timesteps)) if progress else None)
        options = {"eta": job.eta} if job.sampler.takes_eta else {}
        if job.sampler.noisy:
            options["generator"] = generator
        x0 = job.sampler.sample(eps_fn, x, timesteps, self.alphas_cumprod, callback=callback,
                                **options)
        if job.output_type == "latent":
            return x0
        images = self.decode_latents(x0)
        return images if job.output_type == "tensor" else to_pil(images)


# Text encoder and tokenizer of each family (ModelConfig.text_encoder): SD 1.x, SD 2.x.
TEXT_ENCODERS = {"clip": (CLIPTextModel, CLIPTokenizer),
                 "open_clip": (OpenCLIPTextModel, CLIPTokenizer.open_clip)}
OUTPUT_TYPES = ("pil", "latent", "tensor")


@dataclass
class _Job:
    """What every generation shares: the batch's text embeddings and the sampler settings."""
    batch: int
    cond: torch.Tensor      # (B, 77, D)
    uncond: torch.Tensor    # (B, 77, D)
    cfg_scale: float
    sampler: samplers.Sampler
    eta: float
    output_type: str
    eps_model: object       # (x, t, context) -> the U-Net's ε (or v), with inpainting inputs
    timesteps: torch.Tensor


def _generator(seed, generator):
    """Noise is drawn on the CPU from this generator, so a seed gives the same image anywhere."""
    if generator is not None:
        if generator.device.type != "cpu":
            raise ValueError("generator must be a CPU torch.Generator: ldm draws noise on the "
                             "CPU so that a seed gives the same image on any device")
        return generator
    fresh = torch.Generator()
    if seed is None:
        fresh.seed()  # a non-deterministic seed, without touching torch's global generator
    else:
        fresh.manual_seed(int(seed))
    return fresh


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _per_prompt(texts, count):
    texts = [texts] * count if isinstance(texts, str) else list(texts)
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


def _with_inpainting_inputs(unet, mask, masked_latents):
    """The 9-channel U-Net's input: [latents (4), mask (1), masked-image latents (4)], the
    order the original `LatentInpaintDiffusion` concatenates them in."""
    extra = torch.cat([mask, masked_latents], dim=1)  # (B, 5, h, w)

    def eps_model(x, t, context):
        copies = x.shape[0] // extra.shape[0]  # guidance runs [uncond, cond] in one batch
        return unet(torch.cat([x, extra.repeat(copies, 1, 1, 1)], dim=1), t, context)
    return eps_model


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
