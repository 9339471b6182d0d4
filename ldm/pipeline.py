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
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ldm import arguments, samplers
from ldm import schedule as noise_schedule
from ldm.config import ModelConfig
from ldm.cuda_graph import CUDAGraphed
from ldm.images import image_shape, mask_to_tensor, to_pil, to_tensor
from ldm.models.clip_text import CLIPTextModel
from ldm.models.open_clip_text import OpenCLIPTextModel
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from ldm.tokenizer import CLIPTokenizer

# Text encoder and tokenizer of each family (ModelConfig.text_encoder): SD 1.x, SD 2.x.
TEXT_ENCODERS = {"clip": (CLIPTextModel, CLIPTokenizer),
                 "open_clip": (OpenCLIPTextModel, CLIPTokenizer.open_clip)}
OUTPUT_TYPES = ("pil", "latent", "tensor")


class StableDiffusion(nn.Module):
    """Tokenizer, text encoder, U-Net and VAE of one latent diffusion model, plus its constants.

    `scale_factor` maps VAE latents to the U-Net's unit-variance latents; `alphas_cumprod`
    (float64, (1000,)) is the training noise schedule the samplers use. `cuda_graphs`: replay
    the U-Net from CUDA graphs while sampling on a GPU (see the module docstring).
    `memory_limit`: the bytes a request may need (`arguments.estimate_memory`) before the tasks
    refuse it with a ValueError; None (default) is what the device has available at each call,
    math.inf never refuses.
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
            self.alphas_cumprod = noise_schedule.alphas_cumprod()
        self.cuda_graphs = False
        self._unet_graphs = CUDAGraphed(self.unet)
        self.memory_limit = None

    def networks(self):
        """{"unet": …, "vae": …, "text_encoder": …}: the modules whose weights a checkpoint holds."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    @property
    def device(self):
        """Where the U-Net's weights are, hence where sampling runs."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    # ---------------------------------------------------------------- prompt -> conditioning
    def encode_text(self, prompts):
        """B prompts -> (B, 77, D) text embeddings: the U-Net's cross-attention context."""
        return self.text_encoder(self.tokenizer(prompts).to(self.device))

    def encode_prompt(self, prompt, negative_prompt="", *, num_images=1):
        """(cond, uncond): the conditioning dicts of guidance's two halves, each
        {"context": (B · num_images, 77, D)}, images of one prompt next to each other.

        prompt / negative_prompt: a string or a list (one negative per prompt); the negative
        prompt takes the place of the empty prompt of classifier-free guidance.
        """
        num_images = arguments.check_int("num_images", num_images, minimum=1)
        prompts = arguments.check_prompts("prompt", prompt)
        negatives = _per_prompt(negative_prompt, len(prompts))
        cond = {"context": self.encode_text(prompts).repeat_interleave(num_images, dim=0)}
        uncond = {"context": self.encode_text(negatives).repeat_interleave(num_images, dim=0)}
        return cond, uncond

    # ---------------------------------------------------------------- images in and out
    def encode_image(self, images, generator=None):
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) scaled latents, drawn from the posterior
        as the original `get_first_stage_encoding` does. `generator`: one CPU generator for the
        batch, or a list of B, one per image (samplers.randn)."""
        posterior = self.vae.encode(images.to(self.device, self.dtype))
        noise = self._noise(posterior.mean.shape, generator)  # CPU-drawn, like all our noise
        return posterior.sample(noise=noise) * self.scale_factor

    def decode_latents(self, latents):
        """(B, 4, h, w) scaled latents -> (B, 3, 8h, 8w) images in about [-1, 1].

        float16 can overflow in the VAE's last up-blocks (SD's known black images); such a batch
        is decoded again in float32 by a temporary copy of the VAE, and returned in float32. The
        pipeline's own VAE is never cast, so a model shared between threads or recorded in a
        CUDA graph stays as it is.
        """
        images = self.vae.decode(latents / self.scale_factor)
        if images.dtype == torch.float16 and not torch.isfinite(images).all():
            vae = copy.deepcopy(self.vae).float()
            images = vae.decode(latents.float() / self.scale_factor)
        return images

    # ---------------------------------------------------------------- the sampling loop
    def denoise(self, x, cond, uncond, timesteps, *, sampler="ddim", cfg_scale=7.5, eta=0.0,
                generator=None, callback=None, progress=None):
        """Run `sampler` from x at timesteps[0] through every timestep; returns the final latent.

        x: (B, 4, h, w) noisy latents; cond, uncond: conditioning dicts (`encode_prompt`);
        timesteps: descending (`samplers.timesteps`); sampler: a name or a `samplers.Sampler`;
        eta: DDIM's η. generator: for the samplers that draw noise at every step, one CPU
        generator for the batch or a list of B, one per image (the tasks pass one per image);
        on a GPU the noise is drawn there, from device generators seeded from these
        (`_on_device`). callback(i, t, x, x0) runs after every step and may return a
        replacement x; progress: a step counter on stderr (default: when stderr is a terminal).
        """
        # The tasks have checked these already; denoise is also called on its own.
        cfg_scale, eta = arguments.check_cfg_scale(cfg_scale), arguments.check_eta(eta)
        arguments.check_hooks(callback, progress)
        entry = _sampler_entry(sampler)
        model = self._network()
        if self.config.prediction == "v":
            model = samplers.eps_from_v(model, self.alphas_cumprod)
        eps_fn = samplers.cfg(model, cond, uncond, cfg_scale)
        options = {"eta": eta} if entry.takes_eta else {}
        if entry.noisy:
            options["generator"] = _on_device(generator, self.device)
        if progress is None:
            progress = sys.stderr.isatty()  # no \r-redrawn lines in logs and notebooks
        callback = _chain(callback, _progress_bar(len(timesteps)) if progress else None)
        return entry.sample(eps_fn, x, timesteps, self.alphas_cumprod, callback=callback,
                            **options)

    def _network(self):
        """The U-Net as the samplers' model, (x, t, cond) -> ε (or v); replayed from CUDA graphs
        when `cuda_graphs` is on."""
        unet = self.unet
        if self.cuda_graphs and self.device.type == "cuda":
            if self._unet_graphs.module is not self.unet:  # the U-Net was swapped for another
                self._unet_graphs = CUDAGraphed(self.unet)
            unet = self._unet_graphs
        return lambda x, t, cond: unet(x, t, **cond)

    # ---------------------------------------------------------------- the three tasks
    @torch.inference_mode()
    def txt2img(self, prompt, *, negative_prompt="", steps=None, sampler=None, schedule=None,
                cfg_scale=None, height=None, width=None, num_images=1, seed=None,
                generator=None, latents=None, eta=0.0, output_type="pil", callback=None,
                progress=None):
        """Generate images from text. Returns a list of PIL images ("pil"), the final latents
        (B, 4, h, w) before the VAE ("latent"), or images (B, 3, H, W) in [-1, 1] ("tensor").

        prompt / negative_prompt: a string or a list (one per prompt), num_images per prompt.
        sampler: a name in `samplers.SAMPLERS` ("ddim", "euler_a", "dpmpp_2m", …; "…_karras"
        names the schedule too); schedule: one of `samplers.SCHEDULES` ("karras", …; default:
        the sampler's). steps, sampler and cfg_scale default to the model's `config.sampling`
        (SD: 50, DDIM, 7.5), height/width to its native size. `seed` fixes the noise: image i
        of the batch (prompt-major) is exactly the image of seed + i alone, its noise drawn
        from a generator of its own (`_generators`: also what a CPU `generator`, or a list of
        one per image, means). The starting noise is drawn on the CPU in float32, then moved,
        so a seed means the same start on any device; `latents` (B, 4, h, w) gives it
        explicitly.
        eta, callback, progress: see `denoise`.

        Every argument is checked before any work (`ldm.arguments`): TypeError or ValueError
        naming it. A NumPy scalar counts as the Python number; seed is any integer, taken
        mod 2**64; latents may be a NumPy array. A request needing more memory than the device
        has is refused (ValueError; see `memory_limit`).
        """
        self._require_plain_unet("txt2img")
        seed, latents = arguments.check_seed(seed), arguments.check_latents(latents)
        arguments.check_hooks(callback, progress)
        plan = self._plan(steps, sampler, schedule, cfg_scale, eta, output_type)
        h, w = self._latent_size(height, width)
        self._check_memory(prompt, num_images, (h, w))
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images=num_images)
        batch = len(cond["context"])
        generators = _generators(seed, generator, batch)
        x = self._initial_noise(latents, (batch, self.unet.config.out_channels, h, w), generators)
        z = self.denoise(x, cond, uncond, plan.timesteps, **plan.options(generators, callback,
                                                                         progress))
        return self._output(z, output_type)

    @torch.inference_mode()
    def img2img(self, image, prompt, *, strength=0.75, negative_prompt="", steps=None,
                sampler=None, schedule=None, cfg_scale=None, num_images=1, seed=None,
                generator=None, eta=0.0, output_type="pil", callback=None, progress=None):
        """Re-imagine `image` (PIL, list, or (B, 3, H, W) in [-1, 1]) following `prompt`.

        strength in (0, 1]: the share of the `steps` schedule that is re-run; the image is
        noised to the first of those steps, then denoised to the end. The other arguments as
        in txt2img. Any PIL mode is read (16-bit and float grey on their own scale; alpha
        composited on white): see `ldm.images`.
        """
        strength, seed = arguments.check_strength(strength), arguments.check_seed(seed)
        arguments.check_hooks(callback, progress)
        self._require_plain_unet("img2img")
        plan = self._plan(steps, sampler, schedule, cfg_scale, eta, output_type)
        self._check_memory(prompt, num_images, self._latent_size(*image_shape(image)[1:]))
        pixels = to_tensor(image)
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images=num_images)
        batch = len(cond["context"])
        generators = _generators(seed, generator, batch)
        z0 = self.encode_image(_batch(pixels, batch, "image"), generators)
        # The original script runs int(strength * steps) steps; at least one, or nothing happens.
        steps = len(plan.timesteps)
        timesteps = plan.timesteps[steps - max(1, int(strength * steps)):]
        x = samplers.add_noise(z0, self._noise(z0.shape, generators), timesteps[0],
                               self.alphas_cumprod)
        z = self.denoise(x, cond, uncond, timesteps, **plan.options(generators, callback,
                                                                    progress))
        return self._output(z, output_type)

    @torch.inference_mode()
    def inpaint(self, image, mask, prompt, *, negative_prompt="", steps=None, sampler=None,
                schedule=None, cfg_scale=None, num_images=1, seed=None, generator=None, eta=0.0,
                output_type="pil", callback=None, progress=None):
        """Repaint the white part of `mask` in `image` following `prompt`.

        With an inpainting checkpoint (9 input channels) the U-Net sees the mask and the
        masked image as its "concat" conditioning, as trained. With an ordinary one, the
        original latent blending is used: after every step the known region is replaced by the
        source latents noised to that step. The other arguments as in txt2img; image and mask
        in any PIL mode (a mask's alpha composited on black, "keep"): see `ldm.images`.
        """
        seed = arguments.check_seed(seed)
        arguments.check_hooks(callback, progress)
        plan = self._plan(steps, sampler, schedule, cfg_scale, eta, output_type)
        image_size, mask_size = image_shape(image)[1:], image_shape(mask, name="mask")[1:]
        if mask_size != image_size:
            raise ValueError(f"mask size {tuple(mask_size)} differs from image size "
                             f"{tuple(image_size)}")
        size = self._latent_size(*image_size)
        self._check_memory(prompt, num_images, size)
        pixels, repaint = to_tensor(image), mask_to_tensor(mask)
        cond, uncond = self.encode_prompt(prompt, negative_prompt, num_images=num_images)
        batch = len(cond["context"])
        generators = _generators(seed, generator, batch)
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
    def _plan(self, steps, sampler, schedule, cfg_scale, eta, output_type):
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
        eta = arguments.check_eta(eta)
        return _Plan(entry, samplers.timesteps(entry, schedule, steps, self.alphas_cumprod),
                     cfg_scale, eta)

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
class _Plan:
    """A task's sampling settings: the sampler, the timesteps of the whole schedule (img2img
    runs a tail of them), guidance scale and DDIM's η."""
    sampler: samplers.Sampler
    timesteps: torch.Tensor
    cfg_scale: float
    eta: float

    def options(self, generator, callback, progress):
        """denoise's keyword arguments."""
        return dict(sampler=self.sampler, cfg_scale=self.cfg_scale, eta=self.eta,
                    generator=generator, callback=callback, progress=progress)


def _generators(seed, generator, batch):
    """`batch` CPU generators, image i's seeded s + i, so that image i of a batch is exactly
    the image of seed s + i alone (AUTOMATIC1111's rule): every noise an image gets (starting
    noise, posterior sample, img2img's and inpainting's noising, each step's noise) is drawn
    from its own generator, whatever else is in the batch.

    s is `seed`. A CPU `generator` (which wins over a seed) stands for the s drawn from it:
    one generator state gives one batch, and a generator used again gives new images. With
    neither, s is random. A list of `batch` CPU generators is used as given, one per image.
    Seeds are taken modulo 2**64, as torch.Generator.manual_seed takes negative ones.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"generator is a list of {len(generator)} for {batch} images; "
                             "give one generator, or one per image")
        return [_cpu(g) for g in generator]
    if generator is not None:
        seed = int(torch.randint(2**63 - 1, (), generator=_cpu(generator)))
    elif seed is None:
        seed = torch.Generator().seed()  # random, without touching torch's global generator
    return [torch.Generator().manual_seed((int(seed) + i) % 2**64) for i in range(batch)]


def _cpu(generator):
    """Noise is drawn on the CPU, so that a seed gives the same image on any device."""
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("generator must be a CPU torch.Generator (or a list of them, one per "
                         "image): ldm draws noise on the CPU so that a seed gives the same "
                         f"image on any device; got {generator!r}")
    return generator


def _on_device(generators, device):
    """The samplers draw their per-step noise on the latents' device: on a GPU, one generator
    there per CPU generator, seeded from it (the draw of a seed itself on the CPU)."""
    if device.type == "cpu" or generators is None:
        return generators
    if isinstance(generators, torch.Generator):
        return _on_device([generators], device)[0]
    return [torch.Generator(device).manual_seed(int(torch.randint(2**62, (), generator=g)))
            for g in generators]


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
