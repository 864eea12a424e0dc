"""Quality measures on known inputs: identical sets, a known error, wrong colours, blur, collapse."""

import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdiff.shapes import metrics
from fastdiff.shapes.render import Obj, Scene, caption, heldout_prompts, realise, render_batch


@pytest.fixture(scope="module")
def held():
    rng = np.random.default_rng(0)
    return [(p, realise(s, rng)) for p, s in heldout_prompts("one", 64)]


def drawn(prompts, seed):
    """Rendered pictures of `prompts` (held-out pairs), their free parts drawn from `seed`."""
    rng = np.random.default_rng(seed)
    return render_batch([realise(s, rng) for _, s in prompts])


def _as_circles(scene: Scene) -> Scene:
    """`scene` with every object drawn as a circle (a shape error, nothing else changed)."""
    return Scene(scene.background, [Obj("circle", o.colour, o.size, o.position, o.centre, o.diameter, 0.0)
                                     for o in scene.objects])


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def test_identical_images_give_infinite_psnr_and_zero_distance(held):
    images = _tensor(render_batch([s for _, s in held]))
    assert metrics.paired_psnr(images, images.clone()) == math.inf
    assert metrics.frechet_distance(images, images.clone()) == pytest.approx(0.0, abs=1e-9)


def test_psnr_of_a_known_error():
    a = torch.zeros(2, 3, 64, 64)
    b = torch.full((2, 3, 64, 64), 51 / 255)
    assert metrics.paired_psnr(a, b) == pytest.approx(20 * math.log10(255 / 51), abs=1e-6)


def test_rendered_scenes_are_read_back_and_a_wrong_colour_lowers_accuracy(held):
    prompts = [p for p, _ in held]
    right = render_batch([s for _, s in held])
    assert metrics.prompt_accuracy(right, prompts) == 1.0
    wrong = []
    for _, scene in held:  # every object redrawn in another colour (never the background's)
        obj = scene.objects[0]
        colour = next(c for c in ("red", "green", "blue") if c not in (obj.colour, scene.background))
        wrong.append(Scene(scene.background, [Obj(obj.shape, colour, obj.size, obj.position, obj.centre,
                                                  obj.diameter, obj.angle)]))
    accuracy = metrics.prompt_accuracy(render_batch(wrong), prompts)
    # Colour is one of five attributes asked (background, colour, shape, size, position).
    assert accuracy == pytest.approx(0.8, abs=1e-9)


def test_distance_grows_with_blur_and_stays_small_within_the_distribution():
    a = _tensor(drawn(heldout_prompts("one", 200, seed=1), 1))
    b = _tensor(drawn(heldout_prompts("one", 200, seed=2), 2))
    blurred = F.avg_pool2d(b, 5, stride=1, padding=2, count_include_pad=False)
    same = metrics.frechet_distance(a, b)
    blurry = metrics.frechet_distance(a, blurred)
    noisy = metrics.frechet_distance(a, (b + 0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1))
    assert same < blurry / 5 and same < noisy / 5, (same, blurry, noisy)


def test_distance_by_feature_names_what_moved():
    prompts = heldout_prompts("one", 120, seed=1)
    a = _tensor(drawn(prompts, 1))
    blurred = F.avg_pool2d(a, 5, stride=1, padding=2, count_include_pad=False)
    assert set(metrics.frechet_by_feature(a, a.clone()).values()) == {0.0}
    terms = metrics.frechet_by_feature(blurred, a)
    assert list(terms) == metrics.FEATURE_NAMES
    # a blur spreads each edge over more pixels: the step across edges (sharpness) carries the distance
    assert max(terms, key=terms.get) == "sharpness", terms
    assert terms["sharpness"] > 0.5 * sum(terms.values()), terms
    assert sum(terms.values()) == pytest.approx(metrics.frechet_distance(blurred, a), rel=0.2)
    red = a[[i for i, (text, _) in enumerate(prompts) if "red" in text]]   # a set with more red in it
    reddish = metrics.frechet_by_feature(red, a)
    assert max(reddish, key=reddish.get) == "mass_red", reddish


def test_flat_pictures_and_off_shades_are_far_from_rendered_scenes_in_proportion():
    # Pictures of one flat palette colour hold nothing of a scene: far the worst. A set with one picture
    # in twenty drawn in an off shade is wrong on those pictures only: farther than a second sample of
    # rendered scenes, nearer than a blur of every picture.
    prompts = heldout_prompts("unstated", 40) + heldout_prompts("two", 120)
    reference = _tensor(drawn(prompts, 1))
    sharp = _tensor(drawn(prompts, 2))
    palette = torch.from_numpy(metrics._PALETTE)   # the palette the features measure against, in [0, 1]
    flat = palette[torch.arange(len(sharp)) % len(palette)][:, :, None, None].expand_as(sharp).contiguous()
    off = sharp.clone()
    off[::20] = off[::20] * 0.7 + 0.15
    blurred = F.avg_pool2d(sharp, 3, stride=1, padding=1, count_include_pad=False)
    distance = {name: metrics.frechet_distance(x, reference)
                for name, x in (("sharp", sharp), ("off", off), ("blurred", blurred), ("flat", flat))}
    assert distance["sharp"] < distance["off"] < distance["blurred"] < distance["flat"] / 3, distance


def test_features_are_documented_and_colour_mass_sums_to_one(held):
    features = metrics.shape_features(render_batch([s for _, s in held[:8]]))
    assert features.shape == (8, len(metrics.FEATURE_NAMES)) == (8, 28)
    raw = features * metrics._reference_spread()  # back to shares of pixels
    np.testing.assert_allclose(raw[:, :10].sum(1), 1.0)
    assert (raw[:, -1] < 0.05).all()  # rendered scenes are palette colours but for anti-aliased edges


def test_mismatched_inputs_are_refused_naming_the_argument(held):
    images = render_batch([s for _, s in held[:4]])
    with pytest.raises(ValueError, match="reference_images"):
        metrics.paired_psnr(images, images[:3])
    with pytest.raises(ValueError, match="prompts"):
        metrics.prompt_accuracy(images, [caption(held[0][1])])
    with pytest.raises(ValueError, match="reference_images must hold at least 2"):
        metrics.frechet_distance(images, images[:1])


def test_distance_tells_a_one_step_smear_from_sharp_samples():
    # What one plain step gives is the mean of the pictures that fit a prompt: render many per prompt
    # and average them. Sharp samples of the same prompts sit far closer to rendered scenes.
    prompts = heldout_prompts("unstated", 64) + heldout_prompts("two", 64)
    reference = _tensor(drawn(prompts, 1))
    sharp = _tensor(drawn(prompts, 2))
    smear = torch.stack([_tensor(drawn(prompts, 10 + k)) for k in range(16)]).mean(0)
    assert metrics.frechet_distance(smear, reference) > 10 * metrics.frechet_distance(sharp, reference)


def test_coverage_is_about_one_for_rendered_samples_and_low_for_collapse():
    held = heldout_prompts("unstated", 24)
    repeats = 8
    prompts = [p for p, _ in held for _ in range(repeats)]
    rng = np.random.default_rng(3)
    pictures = render_batch([realise(s, rng) for _, s in held for _ in range(repeats)])
    by_attribute = metrics.coverage_by_attribute(pictures, prompts)
    assert set(by_attribute) == {"background", "size", "position", "turn", "overall"}
    assert 0.85 < by_attribute["overall"] < 1.15, by_attribute
    # one picture per prompt, whatever the seed: nothing free is covered
    collapsed = np.repeat(pictures[::repeats], repeats, axis=0)
    assert metrics.coverage(collapsed, prompts) == 0.0
    # half the seeds collapsed: in between
    half = pictures.copy().reshape(len(held), repeats, 64, 64, 3)
    half[:, repeats // 2:] = half[:, :1]
    assert 0.2 < metrics.coverage(half.reshape(pictures.shape), prompts) < 0.9


def test_a_wrong_shape_costs_accuracy_not_turn_coverage():
    # Squares drawn as circles: prompt accuracy charges the shape; the turns of the squares that
    # are drawn stay as spread as the renderer's (a circle's turn, read as 0°, is no reading).
    held = [(p, s) for p, s in heldout_prompts("unstated", 160) if [o.shape for o in s.objects] == ["square"]][:16]
    repeats = 8
    prompts = [p for p, _ in held for _ in range(repeats)]
    rng = np.random.default_rng(4)
    scenes = [realise(s, rng) for _, s in held for _ in range(repeats)]
    rounded = [_as_circles(sc) if i % 2 else sc for i, sc in enumerate(scenes)]
    turned = metrics.coverage_by_attribute(render_batch(scenes), prompts)["turn"]
    half_round = render_batch(rounded)
    assert metrics.coverage_by_attribute(half_round, prompts)["turn"] == pytest.approx(turned, abs=0.15)
    assert metrics.prompt_accuracy(half_round, prompts) < metrics.prompt_accuracy(render_batch(scenes), prompts) - 0.05


def test_coverage_refuses_single_pictures_and_mismatched_prompts():
    held = heldout_prompts("unstated", 4)
    pictures = drawn(held, 0)
    with pytest.raises(ValueError, match="several pictures"):
        metrics.coverage(pictures, [p for p, _ in held])
    with pytest.raises(ValueError, match="prompts"):
        metrics.coverage(pictures, [held[0][0]])


def test_shape_confusion_of_the_errors_benchmark_counts_asked_against_read():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    try:
        import shapes_errors
    finally:
        sys.path.pop(0)
    held = [(p, s) for p, s in heldout_prompts("one", 48)]
    rng = np.random.default_rng(5)
    scenes = [realise(s, rng) for _, s in held]
    as_circles = [_as_circles(sc) for sc in scenes]
    prompts = [p for p, _ in held]
    asked = {shape: sum(o.shape == shape for _, s in held for o in s.objects) for shape in shapes_errors.SHAPES}
    assert shapes_errors.confusion(render_batch(scenes), prompts) == {k: {k: n} for k, n in asked.items() if n} | {
        k: {} for k, n in asked.items() if not n}
    drawn_round = shapes_errors.confusion(render_batch(as_circles), prompts)
    assert drawn_round["square"] == {"circle": asked["square"]} and asked["square"] > 0
