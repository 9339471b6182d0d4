"""Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) as a wrapper that turns the
network into the eps_fn(x, t) every sampler takes:
    ε = ε(x, t, ∅) + s (ε(x, t, c) − ε(x, t, ∅))
The conditional and unconditional halves run as one batched call, [uncond; cond] in that
order, as the original's samplers do; when their entries differ beyond the batch axis (a
negative prompt of another number of 77-token chunks, not padded: A1111 without "Pad conds"),
as two calls.

Conditioning is a dict of tensors whose first axis is the batch, the keywords the U-Net takes:
{"context": (B, 77, D)} for text, plus {"concat": (B, 5, h, w)} for an inpainting model. Every
entry is batched the same way, so a new kind of conditioning needs no change here.

Guidance in a limited interval (Kynkäänniemi et al. 2024, arXiv:2404.07724): with
interval=(low, high), guidance applies only at the steps whose timestep t lies in
[low, high]; elsewhere eps_fn is the conditional model alone, one call of batch B. Guidance
composes a picture at high noise and, late in sampling, pushes details past where the
conditional model puts them (the shipped model rounds squares into circles at t < 200).

Shapes: x (B, C, h, w); t (B,) int64 or float; each cond entry (B, …), each uncond entry
(B, …) or (1, …).
"""
import torch


def cfg(model, cond, uncond, scale, interval=None):
    """eps_fn(x, t) -> (B, C, h, w) guided noise, from model(x, t, cond) (the U-Net's ε).

    scale == 1 is the conditional model alone: the unconditional half is skipped and each
    call has batch B, not 2B (as the original skips it). interval: (low, high), guidance only
    where low ≤ t ≤ high (the batch shares its t), the conditional model alone elsewhere;
    None: at every step.
    """
    def conditional(x, t):
        return model(x, t, cond)

    if scale == 1:
        return conditional
    guided = _guided(model, cond, uncond, scale)
    if interval is None:
        return guided
    low, high = interval

    def eps_fn(x, t):
        return guided(x, t) if low <= float(t[0]) <= high else conditional(x, t)
    return eps_fn


def _guided(model, cond, uncond, scale):
    """cfg's eps_fn at every step."""
    if any(uncond[key].shape[1:] != cond[key].shape[1:] for key in cond.keys() & uncond.keys()):
        return _separately(model, cond, uncond, scale)
    batched = batch_conditioning(uncond, cond)  # built once, not per step

    def eps_fn(x, t):
        eps_uncond, eps_cond = model(torch.cat([x, x]), torch.cat([t, t]), batched).chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return eps_fn


def _separately(model, cond, uncond, scale):
    """cfg's eps_fn with the two halves in calls of their own (A1111's CFGDenoiser does so
    when their context lengths differ)."""
    if uncond.keys() != cond.keys():
        raise ValueError(f"cond and uncond must have the same entries, got {sorted(cond)} "
                         f"and {sorted(uncond)}")
    batch = len(next(iter(cond.values())))
    uncond = {key: value.expand(batch, *value.shape[1:]) for key, value in uncond.items()}

    def eps_fn(x, t):
        eps_uncond, eps_cond = model(x, t, uncond), model(x, t, cond)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return eps_fn


def batch_conditioning(uncond, cond):
    """{key: cat([uncond[key], cond[key]])}: one (2B, …) batch per entry. An unconditional entry
    of batch 1 (one empty-prompt embedding) serves every prompt."""
    if uncond.keys() != cond.keys():
        raise ValueError(f"cond and uncond must have the same entries, got {sorted(cond)} "
                         f"and {sorted(uncond)}")
    return {key: torch.cat([uncond[key].expand_as(cond[key]), cond[key]]) for key in cond}
