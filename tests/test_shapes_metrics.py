"""Quality measures on known inputs: identical sets, a known error, wrong colours, blur."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdiff.shapes import metrics
from fastdiff.shapes.render import Obj, Scene, caption, heldout_prompts, render_batch


@pytest.fixture(scope="module")
def held():
    return heldout_prompts("one", 64)


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
        wrong.append(Scene(scene.background, (Obj(obj.shape, colour, obj.size, obj.position),)))
    accuracy = metrics.prompt_accuracy(render_batch(wrong), prompts)
    # Colour is one of five attributes asked (background, colour, shape, size, position).
    assert accuracy == pytest.approx(0.8, abs=1e-9)


def test_distance_grows_with_blur_and_stays_small_within_the_distribution():
    scenes_a = [s for _, s in heldout_prompts("one", 200, seed=1)]
    scenes_b = [s for _, s in heldout_prompts("one", 200, seed=2)]
    a, b = _tensor(render_batch(scenes_a)), _tensor(render_batch(scenes_b))
    blurred = F.avg_pool2d(b, 5, stride=1, padding=2, count_include_pad=False)
    same = metrics.frechet_distance(a, b)
    blurry = metrics.frechet_distance(a, blurred)
    noisy = metrics.frechet_distance(a, (b + 0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1))
    assert same < blurry / 5 and same < noisy / 5, (same, blurry, noisy)


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
