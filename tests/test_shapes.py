"""Shapes world and its judge: captions, splits, renders, and the judge against ground truth."""
import math

import pytest
import torch
import torch.nn.functional as F

from ldm.data import shapes
from ldm.judge import ATTRIBUTES, accepts, judge, read_image


pytestmark = pytest.mark.usefixtures("one_thread")


def test_caption_families_round_trip():
    prompts = [p for f in shapes.FAMILIES for p in shapes.all_prompts(f)]
    assert len(prompts) == 18 + 90 + 90
    assert {shapes.parse_caption(p.caption) for p in prompts} == set(prompts)
    assert shapes.Prompt("red", "circle", background="blue").caption == \
        "a red circle on a blue background"
    assert shapes.parse_caption("a white triangle in the top left") == \
        shapes.Prompt("white", "triangle", position="top left")
    with pytest.raises(ValueError, match="not a shapes-world caption"):
        shapes.parse_caption("a red cat")


def test_held_out_split_keeps_every_word_in_training():
    for family in shapes.FAMILIES:
        held, train = shapes.held_out_prompts(family), shapes.training_prompts(family)
        assert held and not set(held) & set(train)
        assert len(held) + len(train) == len(shapes.all_prompts(family))
        # every colour, shape, background and position of a held-out prompt has training captions
        for field in ("colour", "shape", "background", "position"):
            assert {getattr(p, field) for p in held} <= {getattr(p, field) for p in train}
    assert [p.caption for p in shapes.held_out_prompts("object")] == \
        ["a red circle", "a white triangle", "a black square"]


def test_training_batches_are_deterministic_and_never_held_out():
    a = shapes.training_batch(64, torch.Generator().manual_seed(3))
    b = shapes.training_batch(64, torch.Generator().manual_seed(3))
    c = shapes.training_batch(64, torch.Generator().manual_seed(4))
    assert a.images.shape == (64, 3, 64, 64) and a.images.dtype == torch.float32
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert a.captions != c.captions
    assert a.images.min() == -1 and a.images.max() == 1
    assert not any(shapes.is_held_out(shapes.parse_caption(t)) for t in a.captions)
    assert {shapes.parse_caption(t).family for t in a.captions} == set(shapes.FAMILIES)


def test_scenes_satisfy_their_prompts_and_stay_in_the_picture():
    generator = torch.Generator().manual_seed(0)
    prompts = [p for f in shapes.FAMILIES for p in shapes.all_prompts(f)]
    for prompt, scene in zip(prompts, shapes.batch_for(prompts, generator).scenes):
        assert scene.colour == prompt.colour and scene.shape == prompt.shape
        assert scene.background != scene.colour
        assert prompt.background in (None, scene.background)
        # "a red circle" is drawn near the middle, so it reads as the center too
        assert scene.position == (prompt.position or "center")
        assert 16 <= scene.size <= 32
        half = scene.size / 2
        assert half <= scene.x <= 64 - half and half <= scene.y <= 64 - half


def test_render_areas_match_geometry():
    """Pixel counts of a 32-px shape are its area: s², π s²/4, s²/2 (to the pixel grid)."""
    scenes = [shapes.Scene("red", s, "blue", 32.0, 32.0, 32.0) for s in shapes.SHAPES]
    areas = shapes.shape_masks(scenes).sum(dim=(1, 2)).tolist()
    assert areas[1] == 32 * 32
    assert areas[0] == pytest.approx(math.pi * 16 ** 2, rel=0.02)
    assert areas[2] == pytest.approx(32 * 32 / 2, rel=0.05)
    triangle = shapes.shape_masks(scenes[2:])[0]
    widths = triangle.sum(dim=1)[16:48]
    assert widths[0] <= 2 and widths[-1] == 32  # apex up, base down


def _judge_accuracy(images, prompts, scenes):
    """Fraction of images whose every attribute (all four, against the ground truth) is read right."""
    right = 0
    for image, scene in zip(images, scenes):
        reading = read_image(image)
        right += all(getattr(reading, a) == getattr(scene, a) for a in ATTRIBUTES)
    return right / len(scenes)


def _all_prompts_twice():
    return [p for f in shapes.FAMILIES for p in shapes.all_prompts(f)] * 2


def test_judge_reads_ground_truth_renders():
    prompts = _all_prompts_twice()
    batch = shapes.batch_for(prompts, torch.Generator().manual_seed(1))
    assert _judge_accuracy(batch.images, prompts, batch.scenes) == 1


def test_judge_survives_noise_and_blur():
    """A decoder's output is softer than a render: blurred edges, small colour errors."""
    generator = torch.Generator().manual_seed(2)
    prompts = _all_prompts_twice()
    batch = shapes.batch_for(prompts, generator)
    noisy = batch.images + 0.15 * torch.randn(batch.images.shape, generator=generator)
    blurred = F.avg_pool2d(noisy, 3, stride=1, padding=1, count_include_pad=False)
    assert _judge_accuracy(blurred, prompts, batch.scenes) == 1


def test_judge_scores_captions():
    scene = shapes.Scene("red", "triangle", "blue", 16.0, 16.0, 24.0)
    image = shapes.render([scene])[0]
    assert judge(image, "a red triangle in the top left") == {
        "colour": True, "shape": True, "position": True}
    assert judge(image, "a red circle on a green background") == {
        "colour": True, "shape": False, "background": False}
    assert accepts(image, "a red triangle") and accepts(image, "a red triangle on a blue background")
    assert not accepts(image, "a blue triangle in the top left")


def test_judge_rejects_a_blank_image():
    blank = torch.full((3, 64, 64), -1.0)  # all black: no object
    reading = read_image(blank)
    assert reading.background == "black" and reading.shape is None and reading.colour is None
    assert not accepts(blank, "a black square")


def test_evaluate_draws_a_block_of_seeds_per_seed():
    """judge.evaluate(seed=s) gives image i the seed s·n + i (n images in the call): two seeds
    share no noise, seed 0 is seeds 0 … n − 1 as before; each image is judged against its own
    prompt (txt2img's prompt-major order)."""
    from ldm.judge import evaluate

    prompts = [shapes.all_prompts("object")[k] for k in (0, 5)]
    scene = shapes.DEFAULT.training_batch(1, torch.Generator().manual_seed(3))
    asked = []

    class Recorder:
        def txt2img(self, captions, *, num_images, seed, **options):
            asked.append((list(captions), num_images, seed, options.get("cfg_interval")))
            return scene.images.expand(len(captions) * num_images, -1, -1, -1)

    for seed in (0, 1, 4):
        results = evaluate(Recorder(), prompts, samples=3, seed=seed, cfg_interval=(200, 1000))
        assert [p for p, _ in results] == [prompts[0]] * 3 + [prompts[1]] * 3
    captions = [p.caption for p in prompts]
    assert asked == [(captions, 3, 0, (200, 1000)), (captions, 3, 6, (200, 1000)),
                     (captions, 3, 24, (200, 1000))]
