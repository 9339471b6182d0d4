"""Where the noise comes from: torch's CPU generator, or CUDA's torch.randn reproduced on any
device (AUTOMATIC1111's "NV" source).

A seed fixes an image only together with the generator that turns it into numbers. Two are
offered, as A1111 names them in its "RNG" setting:

    "cpu"  torch.randn(shape, generator=torch.Generator().manual_seed(seed)): torch's CPU
           Mersenne twister, the same on every machine (A1111 "CPU"; ldm's default).
    "nv"   the numbers torch.randn(shape, generator=torch.Generator("cuda").manual_seed(seed))
           gives on an NVIDIA GPU, computed on the CPU (A1111 "NV", modules/rng_philox.py).
           A1111's default "GPU" draws with that CUDA generator, so "nv" is also how an image
           made with A1111's defaults on an NVIDIA card is reproduced anywhere.

How CUDA draws (torch's distribution kernels with cuRAND's Philox4x32-10): element i of a
tensor of n comes from counter block (offset, 0, i, 0) under the 64-bit key `seed`; Philox
turns that block into four 32-bit words, and the first two become one normal by Box–Muller,
    u = x·2⁻³² + 2⁻³³,  v = y·2⁻³²·2π + 2⁻³²·π,  z = √(−2 ln u) · sin v.
Each call moves the offset on by one block, so consecutive draws from one generator are CUDA's
consecutive torch.randn calls (the per-step noise of ancestral samplers included).

Caveats. (1) The arithmetic is A1111's: its float32-rounded constants, float64 logarithm and
sine, rounded to float32 at the end, bit for bit; CUDA computes in float32 with its own logf
and fast sine, so its numbers can differ from these in the last bits. (2) CUDA gives element
i the first Box–Muller value of thread i only while n is at most the threads torch's kernel
launches (SM count × threads per SM: 132 × 2048 = 270,336 on an H100, 28 × 1536 = 43,008 on an
RTX 3060); past that, thread i's other values fill elements i + threads, …, so CUDA's numbers
depend on the card, while A1111's NV (and this module) keep the rule above. An SD 1 latent
(4, 64, 64) = 16,384 values is within it on any recent card; an SDXL one (4, 128, 128) = 65,536
is on most, not on the smallest.
"""
import numbers

import numpy as np
import torch

RNGS = ("cpu", "nv")

# Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011)
PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments: golden ratio, √3 − 1, in 32 bits
ROUNDS = 10
MASK32 = 0xFFFFFFFF
SEED_MODULUS = 2**64  # torch.Generator.manual_seed's range, a negative seed read mod 2**64

# Box–Muller's scale factors as A1111 writes them: decimal approximations of 2⁻³² and 2⁻³²·2π,
# rounded to float32 (cuRAND's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI), then used in float64.
TWO_POW32_INV = float(np.float32(2.3283064e-10))
TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


class PhiloxGenerator:
    """CUDA's torch.randn stream for `seed`, drawn on the CPU: `randn(shape)` gives what the
    next torch.randn(shape, generator=g) would on an NVIDIA GPU with g seeded `seed`.

    `offset` counts the draws so far (one Philox block per call, as CUDA's generator moves on
    for tensors within its thread count). `initial_seed()` and `device` mirror
    torch.Generator, so code that asks a generator for its seed or device works with either.
    """

    device = torch.device("cpu")

    def __init__(self, seed):
        self.manual_seed(seed)

    def manual_seed(self, seed):
        """Restart the stream at `seed` (an integer, read mod 2**64 as torch does); returns
        self."""
        self._seed = check_seed(seed)
        self.offset = 0
        return self

    def initial_seed(self):
        return self._seed

    def randn(self, shape):
        """Standard-normal float32 CPU tensor of `shape`: CUDA's next torch.randn(shape)."""
        shape = check_shape(shape)
        n = int(np.prod(shape, dtype=np.int64))
        if n >= 2**32:
            raise ValueError(f"shape {shape}: at most 2**32 - 1 values per draw (the Philox "
                             f"counter's element index is 32 bits), got {n}")
        if n == 0:
            return torch.empty(shape)  # CUDA launches no kernel, and its offset stays
        key = (self._seed & MASK32, self._seed >> 32)  # the 64-bit seed, low word first
        x, y, _, _ = philox4x32(cuda_blocks(self.offset, n), key)
        self.offset += 1
        return torch.from_numpy(box_muller(x, y)).reshape(shape)

    def __repr__(self):
        return f"PhiloxGenerator(seed={self._seed}, offset={self.offset})"


def philox4x32(counter, key, rounds=ROUNDS):
    """Philox4x32 (`rounds` rounds) of counter blocks under one key.

    counter: four (N,) uint64 arrays holding 32-bit words, the blocks' words 0…3; key: two
    ints below 2**32. Returns the four output words, each (N,) uint64 holding 32-bit values.
    A round multiplies words 0 and 2 by the multipliers; a product of two 32-bit words is exact
    in uint64, and its high and low halves are Philox's "mulhi" and "mullo".
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    m0, m1 = np.uint64(PHILOX_M[0]), np.uint64(PHILOX_M[1])
    for r in range(rounds):
        if r:  # the key is bumped between rounds, not before the first
            k0, k1 = (k0 + PHILOX_W[0]) & MASK32, (k1 + PHILOX_W[1]) & MASK32
        p0, p1 = c0 * m0, c2 * m1
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ np.uint64(k0), p1 & MASK32,
                          (p0 >> 32) ^ c3 ^ np.uint64(k1), p0 & MASK32)
    return c0, c1, c2, c3


def cuda_blocks(offset, n):
    """The counter blocks CUDA's torch.randn uses for n elements at a generator's `offset`:
    element i's is (offset low, offset high, i, 0) (cuRAND's curand_init with subsequence i;
    the 64-bit offset in words 0-1, the subsequence in words 2-3)."""
    index = np.arange(n, dtype=np.uint64)
    return (np.full_like(index, offset & MASK32), np.full_like(index, offset >> 32),
            index, np.zeros_like(index))


def box_muller(x, y):
    """The first normal of Box–Muller on 32-bit words x, y ((N,) integer arrays), float32 (N,).

    u lies in (0, 1) (the half-step keeps it off 0, where ln u diverges) and v in (0, 2π)."""
    u = x * TWO_POW32_INV + TWO_POW32_INV / 2  # float64
    v = y * TWO_POW32_INV_2PI + TWO_POW32_INV_2PI / 2
    return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)


# ------------------------------------------------------------------------- the public draws
def generator(seed, rng="cpu"):
    """A fresh generator of kind `rng` seeded `seed`: a CPU torch.Generator ("cpu") or a
    PhiloxGenerator ("nv")."""
    check_rng(rng)
    if rng == "nv":
        return PhiloxGenerator(seed)
    return torch.Generator().manual_seed(check_seed(seed))


def generators(seed, batch, rng="cpu"):
    """`batch` generators of kind `rng`, image i's seeded seed + i (mod 2**64): A1111's rule,
    under which image i of a batch is the image of seed + i alone."""
    seed = check_seed(seed)
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return [generator((seed + i) % SEED_MODULUS, rng) for i in range(int(batch))]


def draw(shape, generator, *, device=None, dtype=None):
    """Standard-normal noise of `shape` from one generator (None: torch's global one), on
    `device` in `dtype` (torch's global generator: drawn on `device`). Drawn where the
    generator is, so that its numbers do not depend on where they are used: a PhiloxGenerator
    (CUDA's numbers, computed on the CPU) or a torch.Generator on another device than `device` draws float32 there, then the noise is
    moved and cast (A1111's "CPU" source on a GPU draws so); a torch.Generator on `device`
    draws there directly."""
    if isinstance(generator, PhiloxGenerator):
        return generator.randn(shape).to(device=device, dtype=dtype)
    if generator is not None and device is not None and torch.device(device) != generator.device:
        return torch.randn(shape, generator=generator, device=generator.device).to(
            device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def randn(shape, seed, rng="cpu"):
    """Standard-normal noise of `shape` from a fresh generator seeded `seed`, as a float32 CPU
    tensor: torch.randn with torch's CPU generator ("cpu", A1111's "CPU") or the numbers of
    CUDA's torch.randn ("nv", A1111's "NV", and its default "GPU" on an NVIDIA card).

    This is the noise A1111 starts image i of a batch from, with seed + i and shape
    (4, height/8, width/8).
    """
    check_rng(rng)
    shape = check_shape(shape)
    return draw(shape, generator(seed, rng), dtype=torch.float32)


# ---------------------------------------------------------------------------------- checks
def check_rng(rng):
    if rng not in RNGS:
        raise ValueError(f"rng must be one of {', '.join(map(repr, RNGS))} (torch's CPU "
                         f"generator, or CUDA's torch.randn reproduced), got {rng!r}")
    return rng


def check_seed(seed):
    """An integer seed (Python or NumPy, not bool), reduced mod 2**64 as torch reads seeds."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an integer (taken mod 2**64), got {seed!r} "
                        f"({type(seed).__name__})")
    return int(seed) % SEED_MODULUS


def check_shape(shape):
    """`shape` as a tuple of non-negative ints; an int n stands for (n,), as in torch.randn."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0
            for d in shape):
        raise ValueError(f"shape must be a tuple of non-negative integers, got {shape!r}")
    return tuple(int(d) for d in shape)
