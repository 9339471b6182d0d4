"""What the network predicts: ε (SD 1.x, SD 2 512-base) or v (SD 2 768-v).

Every sampler here is written in terms of ε. A v-prediction model (Salimans & Ho 2022,
arXiv:2202.00512, "progressive distillation") outputs v = √ᾱ_t ε − √(1−ᾱ_t) x0 instead; with
x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε that gives
    ε  = √ᾱ_t v + √(1−ᾱ_t) x_t          (the original's predict_eps_from_z_and_v)
    x0 = √ᾱ_t x_t − √(1−ᾱ_t) v          (predict_start_from_z_and_v; the samplers' x0 from
                                          this ε is the same, up to rounding)
so wrapping the model is all it takes.

Shapes: x (B, C, h, w), t (B,) int64 (or float: fractional steps), v and ε like x.
"""
import torch

from ldm.samplers.common import alpha_bar

PREDICTIONS = ("eps", "v")


def eps_from_v(v_model, alphas_cumprod):
    """eps_model(x, t, cond) -> ε, from v_model(x, t, cond) -> v (cond: the conditioning dict).

    t: (B,) int64, or float for the fractional steps of the Euler / DPM++ samplers (ᾱ then
    interpolated as common.alpha_bar does). The schedule is copied to x's device once, not at
    every step, and ᾱ_t gathered there: no host sync in the sampling loop.
    """
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    on_device = {}  # device -> alphas_cumprod there

    def eps_model(x, t, cond):
        v = v_model(x, t, cond)
        if x.device not in on_device:
            on_device[x.device] = alphas_cumprod.to(x.device)
        a = alpha_bar(t, on_device[x.device]).reshape(-1, *[1] * (x.ndim - 1))  # (B, 1, 1, 1)
        return a.sqrt().to(x.dtype) * v + (1 - a).sqrt().to(x.dtype) * x
    return eps_model
