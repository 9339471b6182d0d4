"""Training latents for pictures the autoencoder's encoder cannot encode: latents fitted to the
frozen decoder, and data functions that mix them with the model's own data. (Also a fixed set
of the encoder's own latents, `encode_targets`, for training without encoding at every step.)

Why. A LoRA teaches the U-Net to produce latents z₀ and leaves the autoencoder as it is. The
usual targets are the encoder's, z₀ = E(x). But an encoder only encodes what it was trained on:
the shipped tiny-shapes autoencoder never saw purple, and it maps a purple picture to a blue
one (0 of 54 purple backgrounds survive encode → decode; a star comes back as a star 28 times in
84). A LoRA trained on E(x) would learn to draw blue. The decoder can still draw purple, if it
is given the right latent. So the targets are found by optimisation against the decoder D:

    z* = argmin_z  |D(z) − x|₁ + |D(z) − x|²  +  prior_weight · |z − E(x)|² / Var(E(x))

(means over elements), by Adam from z = E(x) (the encoder's mean): the image term draws x, the
prior term keeps z near where the encoder puts pictures, so that z* stays a latent like those
the U-Net learnt. Fitted targets are points: they are stored as posterior moments with the
log-variance at DiagonalGaussian's floor (−30, σ = 3e-7), so `ldm.train`'s posterior sampling
returns z* itself.

    targets = fit_targets(pipe.vae, world.training_batch(256, generator), keep=judge.accepts)
    data = mixed(targets.batch, encoded(shapes.training_batch, pipe.vae), share=0.25)
    finetune(pipe, config, data, lora=LoRAConfig(8, text_encoder=True))

`keep` drops a picture whose fitted latent still does not decode right (the decoder has
limits too: a blue object on purple, 0.71 apart, blurs into its background), so that the U-Net
learns only what the decoder can draw. `mixed` adds a share of the model's own data to every
batch (replay), so that what the model knew is not unlearnt.
"""
import logging
from dataclasses import dataclass

import torch

from ldm.data.folder import Batch

log = logging.getLogger(__name__)

POINT_LOGVAR = -30.0  # DiagonalGaussian's lower clamp: a posterior of std 3e-7, a point


def fit_latents(vae, images, *, steps=100, lr=0.2, prior_weight=0.01, batch_size=64):
    """Latents z (B, z_channels, h, w) whose decoding is `images` (B, 3, H, W) in [-1, 1]: the
    minimiser of the module docstring's objective, `steps` Adam steps from the encoder's mean,
    `batch_size` images at a time. The autoencoder's weights are not changed (gradients are
    taken with respect to z only)."""
    if steps < 0 or lr <= 0 or prior_weight < 0 or batch_size < 1:
        raise ValueError(f"fit_latents needs steps >= 0, lr > 0, prior_weight >= 0 and "
                         f"batch_size >= 1, got {steps}, {lr}, {prior_weight}, {batch_size}")
    param = next(vae.parameters())
    return torch.cat([_fit(vae, chunk.to(param.device, param.dtype), steps, lr, prior_weight)
                      for chunk in images.split(batch_size)])


def _fit(vae, images, steps, lr, prior_weight):
    with torch.no_grad():
        start = vae.encode(images).mean                          # (B, z, h, w)
    z = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([z], lr=lr)
    scale = start.var().clamp_min(1e-12)
    with torch.enable_grad():
        for _ in range(steps):
            error = vae.decode(z) - images
            loss = error.abs().mean() + error.pow(2).mean()
            loss = loss + prior_weight * (z - start).pow(2).mean() / scale
            z.grad, = torch.autograd.grad(loss, z)  # not into the autoencoder's .grad
            optimizer.step()
    return z.detach()


@dataclass
class LatentTargets:
    """Fixed training pairs: posterior moments (N, 2·z_channels, h, w) (mean, then log-variance,
    as `ldm.data.folder.LatentCache` stores them) and their N captions."""
    moments: torch.Tensor
    captions: list

    def __len__(self):
        return len(self.captions)

    def batch(self, batch_size, generator):
        """A data function of `ldm.finetune.finetune`: `batch_size` pairs drawn uniformly (with
        replacement) by `generator`."""
        picks = torch.randint(len(self), (batch_size,), generator=generator)
        return Batch([self.captions[i] for i in picks.tolist()], [None] * batch_size,
                     latents=self.moments[picks])


def point_moments(z):
    """Moments (B, 2·z_channels, h, w) of a posterior that is the point z (B, z_channels, h, w)."""
    return torch.cat([z, torch.full_like(z, POINT_LOGVAR)], dim=1)


@torch.no_grad()
def fit_targets(vae, batch, *, keep=None, **fit):
    """LatentTargets for a batch (`.images` (B, 3, H, W), `.captions`): `fit_latents(**fit)`
    of its images; with `keep(decoded image (3, H, W), caption) -> bool`, only the pairs whose
    fitted latent decodes to an image it accepts. Logs how many were kept."""
    z = fit_latents(vae, batch.images, **fit)
    captions = list(batch.captions)
    if keep is not None:
        decoded = torch.cat([vae.decode(chunk) for chunk in z.split(64)]).float().cpu()
        kept = [i for i, (image, caption) in enumerate(zip(decoded, captions))
                if keep(image, caption)]
        log.info("latent targets: %d of %d fitted latents decode as their caption says",
                 len(kept), len(captions))
        if not kept:
            raise ValueError("fit_targets: no fitted latent decodes to an image `keep` accepts")
        z, captions = z[kept], [captions[i] for i in kept]
    return LatentTargets(point_moments(z.float().cpu()), captions)


def encoded(data, vae):
    """The data function `data` (batches of images) with the images replaced by `vae`'s
    posterior moments, computed on the fly: the model's usual targets, as latents, so that
    they mix with LatentTargets."""
    param = next(vae.parameters())

    @torch.no_grad()
    def latent_data(batch_size, generator):
        batch = data(batch_size, generator)
        return Batch(list(batch.captions), [None] * batch_size,
                     latents=_moments(vae, batch.images.to(param.device, param.dtype)))
    return latent_data


@torch.no_grad()
def encode_targets(vae, batch, *, batch_size=64):
    """LatentTargets of a batch's pictures (`.images` (B, 3, H, W), `.captions`) as `vae`
    encodes them, `batch_size` at a time: a fixed set whose encoder cost is paid once, where
    `encoded` pays it at every training step (a quarter of a LoRA step of the shipped model)."""
    param = next(vae.parameters())
    moments = torch.cat([_moments(vae, chunk.to(param.device, param.dtype))
                         for chunk in batch.images.split(batch_size)])
    return LatentTargets(moments, list(batch.captions))


def _moments(vae, images):
    """`vae`'s posterior moments (B, 2·z_channels, h, w) of images (B, 3, H, W), float32 on the
    CPU (mean, then log-variance)."""
    posterior = vae.encode(images)
    return torch.cat([posterior.mean, posterior.logvar], dim=1).float().cpu()


def mixed(data, replay, share):
    """A data function whose batches are round(share · size) pairs of `replay` after the rest
    from `data`; both must give latents of the same shape (LatentTargets.batch, `encoded`)."""
    if not 0 <= share <= 1:
        raise ValueError(f"the replay share must be in [0, 1], got {share}")

    def mixed_data(batch_size, generator):
        n_replay = round(share * batch_size)
        parts = [d(n, generator) for d, n in ((data, batch_size - n_replay), (replay, n_replay))
                 if n > 0]
        return Batch([c for p in parts for c in p.captions], [None] * batch_size,
                     latents=torch.cat([p.latents for p in parts]))
    return mixed_data
