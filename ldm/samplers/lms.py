"""Linear multistep (LMS) in σ space: the Adams–Bashforth method on Karras et al.'s ODE
(Karras et al. 2022, arXiv:2206.00364, eq. 4 in σ), as k-diffusion's sample_lms writes it.

The ODE is dx/dσ = d(x, σ) = (x − D(x, σ)) / σ. LMS keeps the last `order` slopes
d_i, d_{i−1}, …, fits the polynomial through them in σ (the Lagrange interpolant) and integrates
it exactly over the step:
    x_{i+1} = x_i + Σ_j c_j d_{i−j},     c_j = ∫_{σ_i}^{σ_{i+1}} ℓ_j(σ) dσ,
    ℓ_j(σ)  = Π_{k ≠ j} (σ − σ_{i−k}) / (σ_{i−j} − σ_{i−k})
One network call per step. The first steps have fewer slopes and take order i + 1 (the first is
Euler); the last step, to σ = 0, is an LMS step like the others. CompVis' PLMS (plms.py) is the
same idea on ε at equal steps, with fixed coefficients; here the steps are uneven, so the
coefficients are worked out at each step. (k-diffusion integrates ℓ_j numerically with
scipy.integrate.quad; ℓ_j is a polynomial of degree order − 1, integrated here in closed form.)

Shapes: x, d (B, C, h, w); timesteps descending, fractional allowed; alphas_cumprod (T,).
"""
from ldm.samplers.sigmas import apply_callback, enter_sigma_space


def sample_lms(eps_fn, x, timesteps, alphas_cumprod, *, order=4, callback=None):
    """LMS from x (SD's x_t at timesteps[0]) through every timestep to σ = 0; returns x0.

    eps_fn(x_t, t) -> ε; callback(i, t, x, x0) as in sample_euler. order: how many slopes
    (network calls) each step combines, at most; 4 is k-diffusion's and A1111's."""
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    ts, sigmas, denoise, x = enter_sigma_space(eps_fn, x, timesteps, alphas_cumprod)
    slopes = []  # d_i, d_{i−1}, …: the newest first
    for i, t in enumerate(ts):
        x0 = denoise(x, sigmas[i], t)
        slopes = [(x - x0) / sigmas[i], *slopes[:order - 1]]
        # σ_{i+1}, σ_i, σ_{i−1}, … as far back as there are slopes
        coeffs = lms_coefficients(sigmas[i + 1::-1][:len(slopes) + 1])
        x = x + sum(c * d for c, d in zip(coeffs, slopes))
        x = apply_callback(callback, i, t, x, sigmas[i + 1], x0)
    return x


def lms_coefficients(sigmas):
    """[c_0, …, c_{n−1}] for the step from sigmas[1] = σ_i to sigmas[0] = σ_{i+1}, given the
    n + 1 floats σ_{i+1}, σ_i, σ_{i−1}, …, σ_{i−n+1}: c_j = ∫ ℓ_j over [σ_i, σ_{i+1}].

    Each numerator Π_{k≠j} (σ − σ_{i−k}) is expanded in u = σ − σ_i. Its roots σ_{i−k} − σ_i are
    ≥ 0 and u runs over [σ_{i+1} − σ_i, 0] ≤ 0, so every term of the integral has one sign:
    no cancellation, even when the σ crowd together at the end of a Karras schedule."""
    sigma_next, nodes = sigmas[0], sigmas[1:]
    h = sigma_next - nodes[0]
    coeffs = []
    for j, node in enumerate(nodes):
        poly, denominator = [1.0], 1.0  # poly[m]: the coefficient of u^m
        for k, other in enumerate(nodes):
            if k != j:
                poly = _times_linear(poly, other - nodes[0])
                denominator *= node - other
        integral = sum(a * h ** (m + 1) / (m + 1) for m, a in enumerate(poly))  # ∫_0^h poly(u) du
        coeffs.append(integral / denominator)
    return coeffs


def _times_linear(poly, root):
    """The coefficients (ascending powers) of poly(u) · (u − root)."""
    return [a - root * b for a, b in zip([0.0, *poly], [*poly, 0.0])]
