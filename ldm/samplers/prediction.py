"""What the network predicts: ε (SD 1.x, SD 2 512-base) or v (SD 2 768-v).

Every sampler here is written in terms of ε. A v-prediction model (Salimans & Ho 2022,
arXiv:2202.00512, "progressive distillation") outputs v = √ᾱ_t ε − √(1−ᾱ_t) x0 instead; with
x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε that gives
    ε  = √ᾱ_t v + √(1−ᾱ_t) x_t          (the original's predict_eps_from_z_and_v)
    x0 = √ᾱ_t x_t − √(1−ᾱ_t) v          (predict_start_from_z_and_v; the samplers' x0 from
                                          this ε is the same, up to rounding)
so wrapping the model is all it takes.

Shapes: x (B, C, h, w), t (B,) int64, v and ε like x.
"""
import torch

PREDICTIONS = ("eps", "v")


def eps_from_v(v_model, alphas_cumprod):
    """eps_model(x, t, context) -> ε, from v_model(x, t, context) -> v.

    √ᾱ and √(1−ᾱ) are computed once in float64, moved to x's device and dtype on the first call
    (not at every step), and gathered there from t: no host sync in the sampling loop.
    """
    alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    sqrt_a, sqrt_1ma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()  # (T,) each
    tables = {}  # (device, dtype) -> the two tables there

    def eps_model(x, t, context):
        v = v_model(x, t, context)
        key = (x.device, x.dtype)
        if key not in tables:
            tables[key] = (sqrt_a.to(*key), sqrt_1ma.to(*key))
        a, b = (table[t].reshape(-1, *[1] * (x.ndim - 1)) for table in tables[key])  # (B,1,1,1)
        return a * v + b * x
    return eps_model
