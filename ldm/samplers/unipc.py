"""UniPC (Zhao et al. 2023, arXiv:2302.04867, "UniPC: A Unified Predictor-Corrector Framework
for Fast Sampling of Diffusion Models"), the variant diffusers' UniPCMultistepScheduler and
ComfyUI run by default: B(h) of type bh2, data prediction (x0), order 2.

SD's latent is x_t = α_t x0 + σ_t ε with α_t = √ᾱ_t, σ_t = √(1−ᾱ_t); λ_t = log(α_t/σ_t) is
the half log-SNR. Over the visited steps t_0 > … > t_{N−1}, and t_N the clean end (α = 1,
σ = 0, λ = ∞), write x_i, α_i, σ_i, λ_i, and m_i for x0 predicted at (x_i, t_i) (predict_x0).
A step i → i+1 of order p uses m_i and the p−1 estimates before it. With h = λ_{i+1} − λ_i and
ĥ = −h (the data-prediction form evaluates the φ functions at −h, as DPM-Solver++ does):
    r_k = (λ_{i−k} − λ_i) / h,   D_k = (m_{i−k} − m_i) / r_k,                 k = 1 … p−1
    φ_1(ĥ) = (e^ĥ − 1) / ĥ,   φ_{k+1}(ĥ) = (φ_k(ĥ) − 1/k!) / ĥ,   g_k = k! ĥ φ_{k+1}(ĥ)
    B = e^ĥ − 1                                                               (bh2; bh1: B = ĥ)
    x_base  = (σ_{i+1}/σ_i) x_i − α_{i+1} (e^ĥ − 1) m_i                       the DDIM step
    UniP-p:  x̃_{i+1} = x_base − α_{i+1} B Σ_{k<p} a_k D_k
    UniC-p:  x_{i+1} = x_base − α_{i+1} B (Σ_{k<p} c_k D_k + c_p D_p),   D_p = m̃_{i+1} − m_i
where m̃_{i+1} is x0 predicted at the predictor's x̃_{i+1}, and the weights solve
    Σ_k a_k r_k^{j−1} = g_j / B  (j = 1 … p−1),   Σ_k c_k r_k^{j−1} = g_j / B  (j = 1 … p; r_p = 1)
The corrector costs no network call: m̃_{i+1} is the evaluation the next step needs anyway, and
it is kept as m_{i+1} (the network is not called again at the corrected x_{i+1}).

Quirks of the authors' code, which diffusers keeps: a = (½) for p = 2 and c = (½) for p = 1,
the h → 0 limit of g_1/B, instead of the solved weights. The order ramps up as estimates
accumulate (p ≤ i + 1) and, as diffusers' lower_order_final does, down over the last steps
(p ≤ N − i): the last step, to σ = 0 where e^ĥ = 0, is first order and lands on m_{N−1}. It has
no corrector, which would need one more network call.

Shapes: x, m (B, C, h, w); timesteps descending, fractional allowed (ᾱ interpolated as
alpha_bar does), so every schedule in schedules.py can be stepped through; alphas_cumprod (T,).
"""
import math

import torch

from ldm.samplers.common import alpha_bar, alpha_bar_list, check_timesteps, full_t, predict_x0


def sample_unipc(eps_fn, x, timesteps, alphas_cumprod, *, order=2, callback=None):
    """UniPC-`order` from x (SD's x_t at timesteps[0]) through every timestep to the clean
    latent (σ = 0), which it returns. One eps_fn call per step.

    eps_fn(x_t, t) -> ε: x_t (B, C, h, w), t (B,), int64 at a trained step, else float.
    order: 1, 2 (diffusers' default, for guided sampling) or 3 (for unguided); any positive int.
    callback(i, t, x, x0) after step i, with t = timesteps[i], x the corrected x_{i+1} (the
    next step starts from it) and x0 = m_i; a returned tensor replaces x. The network has then
    already seen the predictor's x̃_{i+1}, so a replacement acts from the next predictor on.
    """
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be a positive integer, got {order!r}")
    ts = check_timesteps(timesteps, alphas_cumprod, fractional=True)
    a = _alpha_bars(ts, alphas_cumprod)
    n = len(ts)
    x0s = [_denoise(eps_fn, x, ts[0], a[0])]  # m_{i−order+1} … m_i
    for i, t in enumerate(ts):
        x0 = x0s[-1]
        if i == n - 1:
            x = x0  # σ_N = 0: the first-order step lands on m_{N−1}
        else:
            p = min(order, i + 1, n - i)  # warm-up, then lower_order_final
            window = a[i + 1 - p:i + 2]   # ᾱ_{i−p+1} … ᾱ_i, ᾱ_{i+1}
            x_pred = unipc_update(x, x0s[-p:], window)                        # UniP-p
            x0_next = _denoise(eps_fn, x_pred, ts[i + 1], a[i + 1])            # m̃_{i+1}
            x = unipc_update(x, x0s[-p:], window, x0_next)                     # UniC-p
            x0s = (x0s + [x0_next])[-order:]
        if callback is not None:
            replaced = callback(i, t, x, x0)
            x = x if replaced is None else replaced
    return x


def unipc_update(x, x0s, alpha_bars, x0_next=None):
    """One UniP-p step from x_i (x0_next None) or UniC-p step (x0_next = m̃_{i+1}) to x_{i+1}.

    x0s: m_{i−p+1} … m_i, p tensors (B, C, h, w); alpha_bars: ᾱ_{i−p+1} … ᾱ_i, ᾱ_{i+1}, p + 1
    floats below 1. Returns x_{i+1} (B, C, h, w).
    """
    lambdas = [0.5 * math.log(a / (1 - a)) for a in alpha_bars]
    a_i, a_next = alpha_bars[-2], alpha_bars[-1]
    lambda_i, h = lambdas[-2], lambdas[-1] - lambdas[-2]
    m = x0s[-1]
    h_hat = -h
    h_phi_1 = math.expm1(h_hat)  # ĥ φ_1(ĥ) = e^ĥ − 1
    b_h = h_phi_1                # B of type bh2 is the same number
    x_base = ((1 - a_next) / (1 - a_i)) ** 0.5 * x - a_next ** 0.5 * h_phi_1 * m
    rs = [(lam - lambda_i) / h for lam in lambdas[-3::-1]]  # r_1 … r_{p−1}
    ds = [(older - m) / r for older, r in zip(x0s[-2::-1], rs)]  # D_1 … D_{p−1}
    if x0_next is not None:
        rs, ds = rs + [1.0], ds + [x0_next - m]  # r_p = 1, D_p
    if not ds:
        return x_base  # UniP-1 is DDIM
    # The authors' code takes ½ for a single weight, g_1/B's limit as h → 0
    weights = [0.5] if len(ds) == 1 else _solve_weights(rs, h_hat, b_h)
    return x_base - a_next ** 0.5 * b_h * sum(w * d for w, d in zip(weights, ds))


def _solve_weights(rs, h_hat, b_h):
    """The weights w with Σ_k w_k r_k^{j−1} = g_j(ĥ) / B for j = 1 … len(rs), as Python floats."""
    n = len(rs)
    vandermonde = torch.tensor([[r ** j for r in rs] for j in range(n)], dtype=torch.float64)
    g = torch.tensor(_g(h_hat, n), dtype=torch.float64) / b_h
    return torch.linalg.solve(vandermonde, g).tolist()


def _g(h_hat, n):
    """g_k = k! ĥ φ_{k+1}(ĥ) for k = 1 … n, by the recursion φ_{k+1} = (φ_k − 1/k!) / ĥ."""
    phi = math.expm1(h_hat) / h_hat  # φ_1
    g = []
    for k in range(1, n + 1):
        phi = (phi - 1 / math.factorial(k)) / h_hat  # φ_{k+1}
        g.append(math.factorial(k) * h_hat * phi)
    return g


def _alpha_bars(ts, alphas_cumprod):
    """ᾱ at each timestep as Python floats: the table at integer steps, else interpolated."""
    if all(isinstance(t, int) for t in ts):
        return alpha_bar_list(ts, alphas_cumprod)
    return alpha_bar(torch.tensor(ts, dtype=torch.float64), alphas_cumprod).tolist()


def _denoise(eps_fn, x, t, a):
    """m = x0 predicted at (x, t); t goes to eps_fn as sigmas.denoiser gives it: int64 at a
    trained step, else float (at least float32: float16 would round 978.6 to 978.5)."""
    if float(t).is_integer():
        t_batch = full_t(int(t), x)
    else:
        t_batch = torch.full((x.shape[0],), t, device=x.device,
                             dtype=torch.promote_types(x.dtype, torch.float32))
    return predict_x0(x, eps_fn(x, t_batch), a)
