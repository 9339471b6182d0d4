"""Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) as a wrapper that turns the
U-Net into the eps_fn(x, t) every sampler takes:
    ε = ε(x, t, ∅) + s (ε(x, t, c) - ε(x, t, ∅))
The conditional and unconditional halves run as one batched call, [uncond; cond] in that
order, as the original's samplers do.

Shapes: x (B, C, h, w); t (B,) int64; cond (B, 77, D); uncond (B, 77, D) or (1, 77, D).
"""
import torch


def cfg(eps_model, cond, uncond, scale):
    """eps_fn(x, t) -> (B, C, h, w) guided noise, from eps_model(x, t, context) (the U-Net).

    scale == 1 is the conditional model alone: the unconditional half is skipped and each
    call has batch B, not 2B (as the original skips it).
    """
    if scale == 1:
        return lambda x, t: eps_model(x, t, cond)
    uncond = uncond.expand_as(cond)  # one empty-prompt embedding may serve every prompt
    context = torch.cat([uncond, cond])  # (2B, 77, D), built once, not per step

    def eps_fn(x, t):
        eps_uncond, eps_cond = eps_model(torch.cat([x, x]), torch.cat([t, t]), context).chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)

    return eps_fn
