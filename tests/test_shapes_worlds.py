"""Larger shapes worlds (purple, the star) and the judge on them; the default world, which the
shipped model learnt, pinned bit for bit."""
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

from ldm import judge
from ldm.data import shapes
from ldm.data.shapes import DEFAULT, EXTENDED, FAMILIES, NEW_CONCEPTS


pytestmark = pytest.mark.usefixtures("one_thread")


def _sha(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
    return h.hexdigest()[:16]


def _batch_sha(batch):
    return _sha(batch.images.numpy().tobytes(), "\n".join(batch.captions), repr(batch.scenes))


# Computed from ldm/data/shapes.py and ldm/judge.py as they were before larger worlds existed
# (commit 7a1e854): the shipped model's data, its held-out split and every seeded render.
DEFAULT_WORLD_PINS = {
    "all_object": "36f5737d909caff2", "held_object": "b3b484a63bc1ab1b",
    "train_object": "123b8467fa73af20", "all_background": "cb0f79d0784d7c2d",
    "held_background": "f43b30badfb8ff9c", "train_background": "430da18171aa30c9",
    "all_position": "7b40af0da41392f5", "held_position": "904ed748772f6101",
    "train_position": "3608f8224947bc65",
    "batch0": "8a6ab587fa0a9a8b", "batch1": "cfc18e4ad34eaff2", "batch7": "8856ed74198bcd70",
    "batch_for_all": "42640a9b2c7c735b", "readings": "aebf2e217db81d52",
}


def test_default_world_is_unchanged_bit_for_bit():
    found = {}
    for f in FAMILIES:
        for split, pick in (("all", shapes.all_prompts), ("held", shapes.held_out_prompts),
                            ("train", shapes.training_prompts)):
            found[f"{split}_{f}"] = _sha("\n".join(p.caption for p in pick(f)))
    for seed in (0, 1, 7):
        found[f"batch{seed}"] = _batch_sha(
            shapes.training_batch(32, torch.Generator().manual_seed(seed)))
    prompts = [p for f in FAMILIES for p in shapes.all_prompts(f)]
    batch = shapes.batch_for(prompts, torch.Generator().manual_seed(1))
    found["batch_for_all"] = _sha(batch.images.numpy().tobytes(), repr(batch.scenes))
    # the judge's readings (colours, shapes, positions, boxes) of the default world's renders
    found["readings"] = _sha(repr([judge.read_image(image) for image in batch.images]))
    assert found == DEFAULT_WORLD_PINS
    # the module's functions are the default world's
    assert shapes.World() == DEFAULT == shapes.world("shapes")
    assert _batch_sha(DEFAULT.training_batch(32, torch.Generator().manual_seed(7))) == \
        DEFAULT_WORLD_PINS["batch7"]


def test_world_names_and_bad_worlds():
    assert EXTENDED == shapes.world("shapes+star+purple")  # the words' order is the lists'
    assert EXTENDED.name == "shapes+purple+star" and DEFAULT.name == "shapes"
    assert EXTENDED.colours == (*shapes.COLOURS, "purple")
    assert EXTENDED.shapes == (*shapes.SHAPES, "star")
    assert shapes.world("shapes+star").colours == shapes.COLOURS
    assert NEW_CONCEPTS == EXTENDED.naming("purple", "star") and NEW_CONCEPTS.only == (
        "purple", "star")
    assert shapes.World(colours=["red", "purple"], shapes=["star"], only="star").only == ("star",)
    for name in ("shapes+pink", "circles", "shapes+star+star", "purple+star"):
        with pytest.raises(ValueError, match="unknown world"):
            shapes.world(name)
    with pytest.raises(ValueError, match="colours"):
        shapes.World(colours=("red",))                 # no colour left for a background
    with pytest.raises(ValueError, match="shapes"):
        shapes.World(shapes=("hexagon",))
    with pytest.raises(ValueError, match="only"):
        DEFAULT.naming("purple")                       # not a word of the default world


def test_captions_of_the_extended_world():
    counts = [len(EXTENDED.all_prompts(f)) for f in FAMILIES]
    assert counts == [7 * 4, 7 * 4 * 6, 7 * 4 * 5]
    prompts = [p for f in FAMILIES for p in EXTENDED.all_prompts(f)]
    assert {EXTENDED.parse_caption(p.caption) for p in prompts} == set(prompts)
    assert EXTENDED.parse_caption("a purple star on a white background") == \
        shapes.Prompt("purple", "star", background="white")
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        shapes.parse_caption("a purple star")         # the default world has no such words
    # the judge reads every world's captions
    assert judge.parse_caption("a red star in the top left").position == "top left"


def test_extended_world_keeps_the_default_split_and_holds_out_purple_stars():
    for family in FAMILIES:
        old = set(shapes.all_prompts(family))
        held = set(EXTENDED.held_out_prompts(family))
        assert held & old == set(shapes.held_out_prompts(family))
        assert set(EXTENDED.training_prompts(family)) & old == set(
            shapes.training_prompts(family))
        # "a purple star …" never appears in a training caption: the words are taught apart
        stars = [p for p in EXTENDED.all_prompts(family) if (p.colour, p.shape) == (
            "purple", "star")]
        assert stars and set(stars) <= held
    assert [p.caption for p in NEW_CONCEPTS.held_out_prompts("object")] == \
        ["a yellow star", "a purple circle", "a purple star"]


def _words(prompts):
    return {(field, getattr(p, field)) for p in prompts
            for field in ("colour", "shape", "background", "position")}


def test_held_out_words_all_have_training_captions():
    """As in the default world, in each family of the extended world; in the LoRA's captions
    (NEW_CONCEPTS) across the families: "a yellow star" is held out, and no other object
    caption of it names yellow, but "a yellow star in the top right" is a training caption."""
    for family in FAMILIES:
        held, train = EXTENDED.held_out_prompts(family), EXTENDED.training_prompts(family)
        assert held and not set(held) & set(train)
        assert _words(held) <= _words(train)
    held, train = ([p for f in FAMILIES for p in pick(f)] for pick in (
        NEW_CONCEPTS.held_out_prompts, NEW_CONCEPTS.training_prompts))
    assert held and not set(held) & set(train)
    assert _words(held) <= _words(train)
    assert {("colour", "purple"), ("background", "purple"), ("shape", "star")} <= _words(train)


def test_new_concept_batches_name_purple_or_star():
    a = NEW_CONCEPTS.training_batch(48, torch.Generator().manual_seed(5))
    b = NEW_CONCEPTS.training_batch(48, torch.Generator().manual_seed(5))
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    prompts = [EXTENDED.parse_caption(t) for t in a.captions]
    assert all({"purple", "star"} & {p.colour, p.shape, p.background} for p in prompts)
    assert not any(shapes.is_held_out(p) for p in prompts)
    assert {p.family for p in prompts} == set(FAMILIES)
    assert all(s.colour != s.background and s.background in EXTENDED.colours for s in a.scenes)
    # the extended world's own distribution mixes the new words with the old ones
    mixed = [EXTENDED.parse_caption(t) for t in
             EXTENDED.training_batch(64, torch.Generator().manual_seed(5)).captions]
    named = [{"purple", "star"} & {p.colour, p.shape, p.background} for p in mixed]
    assert any(named) and not all(named)


def test_purple_renders_and_stands_apart_from_the_palette():
    image = shapes.render([shapes.Scene("purple", "square", "purple", 32.0, 32.0, 20.0)])[0]
    assert torch.equal(image, torch.tensor([0.0, -1.0, 0.0])[:, None, None].expand(3, 64, 64))
    purple = torch.tensor(shapes.RGB["purple"])
    gaps = {c: (purple - torch.tensor(rgb)).norm().item() for c, rgb in shapes.PALETTE.items()}
    assert min(gaps.values()) > 2 * judge.FAR_FROM_BACKGROUND * 0.7  # 0.71 from red/blue/black
    assert min(gaps, key=gaps.get) in ("red", "blue", "black")


def _star_polygon(x, y, size):
    """The ten corners of an upright regular star whose box is `size` wide, centred at (x, y)."""
    outer = size / 2 / math.sin(math.radians(72))
    inner = outer * math.sin(math.radians(18)) / math.sin(math.radians(54))  # pentagram ratio
    height = outer * (1 + math.cos(math.radians(36)))
    top = y - height / 2
    corners = []
    for k in range(10):
        radius, angle = (outer, inner)[k % 2], math.radians(90 - 36 * k)
        corners.append((x + radius * math.cos(angle), top + outer - radius * math.sin(angle)))
    return corners


def test_star_matches_an_independent_polygon_test():
    """Pixel centres inside matplotlib's Path of the star, for sizes and sub-pixel offsets."""
    path_module = pytest.importorskip("matplotlib.path")
    centres = torch.stack(torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5,
                                         indexing="xy"), dim=-1).reshape(-1, 2).numpy()
    generator = torch.Generator().manual_seed(11)
    for _ in range(12):
        size = 16 + 16 * torch.rand((), generator=generator).item()
        x, y = (size / 2 + (64 - size) * torch.rand(2, generator=generator)).tolist()
        ours = shapes.shape_masks([shapes.Scene("red", "star", "blue", x, y, size)])[0]
        ref = path_module.Path(_star_polygon(x, y, size)).contains_points(centres)
        ref = torch.from_numpy(ref).reshape(64, 64)
        assert (ours != ref).sum() <= 1, (size, x, y)  # at most a centre on the outline


def test_star_area_box_and_orientation():
    """A star fills 5 R r sin 36° of its box: 0.326 of size × 0.951 size; its top is a point."""
    for size in (16.0, 24.0, 32.0):
        scene = shapes.Scene("red", "star", "blue", 32.0, 32.0, size)
        mask = shapes.shape_masks([scene])[0]
        outer = size / 2 / math.sin(math.radians(72))
        area = 5 * outer * outer * shapes.STAR_INNER * math.sin(math.radians(36))
        assert mask.sum().item() == pytest.approx(area, rel=0.06)
        x0, y0, x1, y1 = judge._box(mask)
        # (tips thinner than a pixel hold no pixel centre: a 16-px star is 13 rows, not 15.2)
        assert x1 - x0 == pytest.approx(size, abs=1) and y1 - y0 == pytest.approx(
            0.951 * size, abs=2.5)
        assert (x0 + x1) / 2 == pytest.approx(32, abs=0.5)
        assert (y0 + y1) / 2 == pytest.approx(32, abs=0.5)
        widths = mask[y0:y1].sum(dim=1)
        arms = (widths.argmax().item() + 0.5) / (y1 - y0)   # the widest row's depth in the box
        assert widths[0] <= 2 and arms == pytest.approx(0.38, abs=0.06)
        assert judge.solidity(mask) == pytest.approx(0.5, abs=0.06)


def test_solidity_of_known_masks():
    square = torch.zeros(10, 10, dtype=torch.bool)
    square[2:7, 3:8] = True
    assert judge.solidity(square) == 1
    ell = square.clone()
    ell[2:5, 5:8] = False                # an L of 16 pixels, its hull 16 + a 3 × 3 half-square
    assert judge.solidity(ell) == pytest.approx(16 / (16 + 4.5))


def test_hull_area_matches_scipy():
    spatial = pytest.importorskip("scipy.spatial")
    generator = torch.Generator().manual_seed(4)
    for n in (3, 10, 100):
        points = torch.randint(0, 40, (n, 2), generator=generator).tolist()
        points = [tuple(p) for p in points] + [(0, 0), (39, 1), (2, 38)]  # never collinear
        assert judge._hull_area(points) == pytest.approx(spatial.ConvexHull(points).volume,
                                                         rel=1e-12)


def _attribute_accuracy(images, scenes):
    """{attribute: fraction read as the ground truth}, and the fraction read fully right."""
    readings = [judge.read_image(image) for image in images]
    right = {a: sum(getattr(r, a) == getattr(s, a) for r, s in zip(readings, scenes)) / len(scenes)
             for a in judge.ATTRIBUTES}
    right["all"] = sum(all(getattr(r, a) == getattr(s, a) for a in judge.ATTRIBUTES)
                       for r, s in zip(readings, scenes)) / len(scenes)
    return right


def test_judge_reads_the_extended_world_clean_and_noisy():
    """Every caption of the extended world (336 images), as rendered, then with the noise and
    blur of test_shapes.py: every attribute read right (measured: 100 % both, on 3 × 672)."""
    prompts = [p for f in FAMILIES for p in EXTENDED.all_prompts(f)]
    generator = torch.Generator().manual_seed(2)
    batch = EXTENDED.batch_for(prompts, generator)
    assert _attribute_accuracy(batch.images, batch.scenes)["all"] == 1
    noisy = batch.images + 0.15 * torch.randn(batch.images.shape, generator=generator)
    blurred = F.avg_pool2d(noisy, 3, stride=1, padding=1, count_include_pad=False)
    scores = _attribute_accuracy(blurred, batch.scenes)
    assert min(scores.values()) >= 0.99, scores


def _pinched_triangle(size=26.0, pinch=0.3):
    """A triangle whose sides bow inwards, as the shipped model often draws one at guidance 3:
    notched like a star, but widest at its base."""
    path_module = pytest.importorskip("matplotlib.path")
    apex, left, right = (32, 32 - size / 2), (32 - size / 2, 32 + size / 2), (32 + size / 2,
                                                                              32 + size / 2)
    centroid = [sum(c) / 3 for c in zip(apex, left, right)]
    corners = []
    for a, b in ((apex, right), (right, left), (left, apex)):
        middle = [(p + q) / 2 for p, q in zip(a, b)]
        corners += [a, [m + pinch * (c - m) for m, c in zip(middle, centroid)]]
    centres = torch.stack(torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5,
                                         indexing="xy"), dim=-1).reshape(-1, 2).numpy()
    inside = torch.from_numpy(path_module.Path(corners).contains_points(centres))
    return inside.reshape(64, 64)


def test_judge_tells_a_star_from_a_pinched_triangle():
    mask = _pinched_triangle()
    assert judge.solidity(mask) < judge.STAR_SOLIDITY  # as notched as a blurred star
    image = torch.where(mask, 1.0, -1.0).expand(3, 64, 64)  # white on black
    assert judge.read_image(image).shape == "triangle"
    star = shapes.render([shapes.Scene("white", "star", "black", 32.0, 32.0, 26.0)])[0]
    assert judge.read_image(star).shape == "star"


def test_judge_scores_new_captions():
    scene = shapes.Scene("purple", "star", "white", 16.0, 48.0, 22.0)
    image = shapes.render([scene])[0]
    assert judge.judge(image, "a purple star in the bottom left") == {
        "colour": True, "shape": True, "position": True}
    assert judge.accepts(image, "a purple star on a white background")
    assert judge.judge(image, "a blue triangle on a white background") == {
        "colour": False, "shape": False, "background": True}
    on_purple = shapes.render([shapes.Scene("red", "circle", "purple", 32.0, 32.0, 24.0)])[0]
    assert judge.accepts(on_purple, "a red circle on a purple background")


def test_judge_command_line_rejects_unknown_worlds(capsys):
    with pytest.raises(SystemExit):
        judge.main(["--world", "shapes+pink"])
    assert "unknown world" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        judge.main(["--only", "purple"])               # the default world has no purple
