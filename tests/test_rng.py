"""ldm.rng: torch's CPU generator, and CUDA's torch.randn reproduced by Philox4x32-10 (A1111's
"NV" source).

References nobody here wrote: Random123's known-answer vectors for the Philox core; the values
printed in A1111's modules/rng_philox.py docstring; values computed by running that module
(commit ef1698fd) on this machine; torch's own CPU generator; and, when a GPU is present,
CUDA's torch.randn itself.
"""
import numpy as np
import pytest
import torch

from ldm import rng

from helpers import fresh_seed

# Random123 tests/kat_vectors, "philox4x32 10" lines: counter words, key words, output words.
PHILOX_KAT = [
    ("00000000 00000000 00000000 00000000", "00000000 00000000",
     "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff",
     "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0",
     "d16cfe09 94fdcceb 5001e420 24126ea1"),
]

# A1111 rng_philox.py's docstring: Generator(seed=0).randn(shape=(3, 4)), "the same as
# torch.randn(..., device='cuda')", printed to 8 decimals.
A1111_DOCSTRING = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                   [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                   [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]

# Generator(seed).randn(shape) of A1111's rng_philox.py (commit ef1698fd), run here: exact
# float32 values. (seed, draws made before, shape, index into the draw, values)
A1111_RUNS = [
    (0, [(3, 4)], (2, 3), (), [0.18082589, -0.5522627, 0.9238134,
                               -0.73497033, 1.3799946, 0.8676307]),
    (2**32 + 7, [], (2, 3), (), [-0.28273523, -1.0128043, 0.009528826,
                                 0.44708487, 1.5803586, 0.95369816]),
    (3948572193, [(4, 8, 8)] * 2, (4, 8, 8), (0, 0, slice(0, 4)),
     [1.1832114, 0.7286689, 0.11236093, -0.019549731]),
    (3948572193, [(4, 8, 8)] * 2, (4, 8, 8), (3, 7, slice(4, 8)),
     [0.03859479, 0.36136335, 0.5716778, -1.33952]),
    (2**64 - 1, [], (5,), (), [0.6323023, 0.03350097, 0.83908767, -2.0634682, 1.2808009]),
]


def words(text):
    return [int(w, 16) for w in text.split()]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_core_matches_random123_known_answers(counter, key, expected):
    blocks = [np.array([w], dtype=np.uint64) for w in words(counter)]
    out = rng.philox4x32(blocks, words(key))
    assert [int(w[0]) for w in out] == words(expected)


def test_philox_rounds_matter():
    """Fewer rounds give other words: the loop really runs ten."""
    blocks = [np.zeros(1, dtype=np.uint64)] * 4
    assert [int(w[0]) for w in rng.philox4x32(blocks, (0, 0), rounds=9)] != words(
        PHILOX_KAT[0][2])


def test_nv_matches_the_a1111_docstring():
    """The docstring's numbers were printed from a float64 computation with exact 2⁻³² and 2π;
    A1111's code (and ours) use its float32-rounded constants, which moves them by up to
    2.7e-7 (two float32 steps at 1)."""
    got = rng.randn((3, 4), 0, rng="nv")
    want = torch.tensor(A1111_DOCSTRING, dtype=torch.float64)
    assert (got.double() - want).abs().max() < 3e-7
    assert got.dtype == torch.float32 and got.device.type == "cpu"


@pytest.mark.parametrize("seed, before, shape, index, values", A1111_RUNS)
def test_nv_is_a1111s_generator_bit_for_bit(seed, before, shape, index, values):
    g = rng.PhiloxGenerator(seed)
    for earlier in before:
        g.randn(earlier)
    got = g.randn(shape)[index].flatten()
    assert torch.equal(got, torch.tensor(values, dtype=torch.float32))


def test_consecutive_draws_advance_one_block_each():
    """Draw k of a generator is the first draw of one whose offset is k, and element i of a
    draw does not depend on the shape (CUDA's thread i fills element i)."""
    g = rng.PhiloxGenerator(1234)
    draws = [g.randn((4, 5)) for _ in range(3)]
    assert g.offset == 3
    for k, d in enumerate(draws):
        fresh = rng.PhiloxGenerator(1234)
        fresh.offset = k
        assert torch.equal(fresh.randn(20), d.flatten())
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(rng.PhiloxGenerator(1234).randn(7), draws[0].flatten()[:7])


def test_a_draw_of_nothing_leaves_the_offset():
    g = rng.PhiloxGenerator(5)
    assert g.randn((0, 4)).shape == (0, 4)
    assert g.offset == 0
    assert torch.equal(g.randn(3), rng.randn(3, 5, rng="nv"))


def test_manual_seed_restarts_and_initial_seed_reports():
    g = rng.PhiloxGenerator(77)
    first = g.randn(6)
    g.randn(6)
    assert g.manual_seed(77) is g and g.offset == 0
    assert torch.equal(g.randn(6), first)
    assert g.initial_seed() == 77


@pytest.mark.parametrize("seed", [0, 31337, 2**40 + 3])
def test_cpu_is_torchs_cpu_generator(seed):
    want = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    assert torch.equal(rng.randn((2, 4, 8, 8), seed, rng="cpu"), want)
    assert torch.equal(rng.randn((2, 4, 8, 8), seed), want)  # the default


@pytest.mark.parametrize("kind", rng.RNGS)
def test_shapes_dtype_determinism(kind):
    a = rng.randn((4, 16, 24), 9, rng=kind)
    assert a.shape == (4, 16, 24) and a.dtype == torch.float32 and a.device.type == "cpu"
    assert torch.equal(a, rng.randn([4, 16, 24], np.int64(9), rng=kind))
    assert not torch.equal(a, rng.randn((4, 16, 24), 10, rng=kind))
    assert rng.randn(5, 9, rng=kind).shape == (5,)
    assert rng.randn((), 9, rng=kind).shape == ()
    assert rng.randn(torch.Size([2, 3]), 9, rng=kind).shape == (2, 3)


def test_negative_seeds_read_mod_2_64_as_torch_does():
    assert torch.equal(rng.randn(8, -1, rng="nv"), rng.randn(8, 2**64 - 1, rng="nv"))
    assert torch.equal(rng.randn(8, -1, rng="cpu"),
                       torch.randn(8, generator=torch.Generator().manual_seed(-1)))


def test_nv_looks_standard_normal():
    """65,536 values (an SDXL latent): mean 0 and variance 1 within 5 standard errors, and the
    tails where a normal puts them (a Box–Muller with a wrong constant fails these)."""
    x = rng.randn((4, 128, 128), 2024, rng="nv").double()
    n = x.numel()
    assert abs(x.mean()) < 5 / n**0.5
    assert abs(x.var() - 1) < 5 * (2 / n)**0.5
    beyond_2 = (x.abs() > 2).double().mean()  # P(|z| > 2) = 0.0455
    assert abs(beyond_2 - 0.0455) < 5 * (0.0455 * 0.9545 / n)**0.5


def test_generators_seed_image_i_with_seed_plus_i():
    for kind in rng.RNGS:
        gens = rng.generators(100, 3, rng=kind)
        assert len(gens) == 3
        for i, g in enumerate(gens):
            assert torch.equal(rng.draw((4, 8, 8), g), rng.randn((4, 8, 8), 100 + i, rng=kind))
    assert all(isinstance(g, rng.PhiloxGenerator) for g in rng.generators(0, 2, "nv"))
    assert all(isinstance(g, torch.Generator) for g in rng.generators(0, 2, "cpu"))
    wrapped = rng.generators(2**64 - 1, 2, "nv")
    assert [g.initial_seed() for g in wrapped] == [2**64 - 1, 0]


def test_draw_casts_philox_noise_and_leaves_torch_draws_to_torch():
    """draw() is what the samplers call: float32 Philox numbers cast to the asked dtype, and
    consecutive calls on one generator are consecutive draws; a torch.Generator draws itself."""
    g = rng.PhiloxGenerator(3)
    x = rng.draw((2, 3), g, dtype=torch.float64)
    assert x.dtype == torch.float64
    assert torch.equal(x, rng.randn((2, 3), 3, rng="nv").double())
    reference = rng.PhiloxGenerator(3)
    reference.randn(1)
    assert torch.equal(rng.draw((2, 3), g, device="cpu"), reference.randn((2, 3)))
    t = torch.Generator().manual_seed(4)
    want = torch.randn((2, 3), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert torch.equal(rng.draw((2, 3), t, dtype=torch.float64), want)



def test_a_cpu_generator_draws_on_the_cpu_for_another_device():
    """A1111's "CPU" source on a GPU: the numbers are the CPU generator's, drawn there and
    moved (the meta device stands in for a GPU), and the generator advances as on the CPU."""
    seed = fresh_seed()
    g, twin = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    x = rng.draw((2, 4, 8, 8), g, device="meta", dtype=torch.float16)
    assert x.device.type == "meta" and x.dtype == torch.float16 and x.shape == (2, 4, 8, 8)
    torch.randn((2, 4, 8, 8), generator=twin)
    assert torch.equal(g.get_state(), twin.get_state())
    assert torch.equal(rng.draw((3,), g, device="cpu"), torch.randn((3,), generator=twin))

@pytest.mark.parametrize("call, error, words_", [
    (lambda: rng.randn((2,), 0, rng="gpu"), ValueError, ["'cpu'", "'nv'", "'gpu'"]),
    (lambda: rng.randn((2,), 0, rng=None), ValueError, ["rng"]),
    (lambda: rng.randn((2,), 1.5), TypeError, ["seed", "1.5"]),
    (lambda: rng.randn((2,), True), TypeError, ["seed"]),
    (lambda: rng.randn((2,), None), TypeError, ["seed"]),
    (lambda: rng.randn((2, -1), 0), ValueError, ["shape", "-1"]),
    (lambda: rng.randn("4x4", 0), ValueError, ["shape"]),
    (lambda: rng.randn((2.0, 2), 0, rng="nv"), ValueError, ["shape"]),
    (lambda: rng.PhiloxGenerator(0).randn((2**16, 2**16)), ValueError, ["2**32"]),
    (lambda: rng.generators(0, 0), ValueError, ["batch"]),
    (lambda: rng.generator(0, "NV"), ValueError, ["rng"]),
])
def test_bad_arguments_are_named(call, error, words_):
    with pytest.raises(error) as info:
        call()
    for word in words_:
        assert word in str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("seed", [0, 1, 123456789, 2**32 + 5])
def test_nv_matches_cuda_torch_randn(seed):
    """CUDA's own numbers, three consecutive draws of an SD latent: equal up to CUDA's float32
    arithmetic (its logf and fast sine against A1111's float64)."""
    cuda = torch.Generator("cuda").manual_seed(seed)
    ours = rng.PhiloxGenerator(seed)
    for _ in range(3):
        want = torch.randn((4, 64, 64), generator=cuda, device="cuda").cpu()
        got = ours.randn((4, 64, 64))
        assert (got - want).abs().max() < 1e-5


# ----------------------------------------------------------- the pipeline's use (once wired)
def _pipeline_takes_rng():
    import inspect

    from ldm.pipeline import StableDiffusion
    return "rng" in inspect.signature(StableDiffusion.txt2img).parameters


@pytest.mark.skipif(not _pipeline_takes_rng(), reason="txt2img(rng=...) not wired in yet")
def test_pipeline_draws_every_noise_as_a1111_does_with_nv(monkeypatch):
    """txt2img(rng="nv"): image i's generator is PhiloxGenerator(seed + i); its first draw is
    the starting noise and each later one an ancestral step's noise, in A1111's order
    (modules/rng.py ImageRNG: first(), then next() per step), on the tiny model."""
    import ldm
    from ldm.config import PRESETS

    pipe = ldm.StableDiffusion(PRESETS["tiny"])
    draws = []
    real_draw = rng.draw

    def recording(shape, generator, **kwargs):
        draws.append((generator.initial_seed(), generator.offset, tuple(shape)))
        return real_draw(shape, generator, **kwargs)
    monkeypatch.setattr(rng, "draw", recording)
    z = pipe.txt2img("a red circle", steps=3, sampler="euler_a", seed=100, num_images=2,
                     rng="nv", height=32, width=32, output_type="latent", progress=False)
    h, w = z.shape[-2:]
    # the starting noise, then one draw per step but the last (k-diffusion's Euler a)
    assert draws == [(seed, offset, (4, h, w)) for offset in range(3) for seed in (100, 101)]
    with pytest.raises(ValueError, match="rng"):
        pipe.txt2img("a", steps=2, seed=1, rng="gpu", height=32, width=32)


@pytest.mark.skipif(not _pipeline_takes_rng(), reason="txt2img(rng=...) not wired in yet")
def test_brownian_trees_of_philox_generators_take_the_image_seeds():
    from ldm.samplers import brownian
    assert brownian._draw_seed(rng.PhiloxGenerator(7)) == 7
