import math

import pytest
import torch

from fastdiff.stream.similarity import SimilarityFilter


def unit_at(angle: float) -> torch.Tensor:
    """A 2-pixel frame at `angle` radians: the cosine between two of them is cos(angle difference)."""
    return torch.tensor([math.cos(angle), math.sin(angle)])


def expected_p(cos: float, threshold: float) -> float:
    return max(0.0, 1.0 - (1.0 - cos) / (1.0 - threshold))


def test_identical_frames_skip_until_the_run_limit():
    sim = SimilarityFilter(threshold=0.9, max_skip_frames=3)
    frame = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    decisions = []
    for _ in range(10):
        decisions.append(sim.should_skip(frame.clone()))
        assert sim.probability(frame) == pytest.approx(1.0)
    assert decisions == [False, True, True, True, False, True, True, True, False, True]
    assert (sim.processed, sim.skipped, sim.skip_run) == (3, 7, 1)


def test_max_skip_frames_zero_never_skips():
    sim = SimilarityFilter(max_skip_frames=0)
    frame = torch.ones(4)
    assert [sim.should_skip(frame) for _ in range(5)] == [False] * 5


@pytest.mark.parametrize("other", [lambda f: -f, lambda f: torch.flip(f, [0]) * torch.tensor([1.0, -1.0])])
def test_opposite_or_orthogonal_frames_are_never_skipped(other):
    sim = SimilarityFilter(threshold=0.5)
    a = torch.tensor([3.0, 1.0])
    b = other(a)  # -a (cos -1) or a rotated by 90 degrees (cos 0)
    assert sim.should_skip(a) is False
    assert sim.probability(b) == 0.0
    frames = [b, a] * 20
    assert not any(sim.should_skip(f) for f in frames)
    assert (sim.processed, sim.skipped) == (41, 0)


def test_first_frame_is_never_skipped():
    sim = SimilarityFilter()
    assert sim.probability(torch.ones(5)) == 0.0
    assert sim.should_skip(torch.ones(5)) is False


@pytest.mark.parametrize("threshold", [0.5, 0.9, 0.98])
def test_probability_matches_formula(threshold):
    sim = SimilarityFilter(threshold=threshold)
    sim.should_skip(unit_at(0.0))
    for angle in [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, math.pi]:
        cos = math.cos(angle)
        assert sim.probability(unit_at(angle)) == pytest.approx(expected_p(cos, threshold), abs=1e-6)


def test_probability_on_random_frames_matches_torch_cosine():
    gen = torch.Generator().manual_seed(1)
    reference = torch.rand(3, 16, 16, generator=gen)
    sim = SimilarityFilter(threshold=0.9)
    sim.should_skip(reference)
    for noise in [0.0, 0.1, 0.3, 1.0]:
        frame = reference + noise * torch.randn(3, 16, 16, generator=gen)
        cos = torch.nn.functional.cosine_similarity(frame.reshape(1, -1), reference.reshape(1, -1)).item()
        assert sim.probability(frame) == pytest.approx(expected_p(cos, 0.9), abs=1e-5)


def test_any_dtype_compares_and_probability_changes_nothing():
    sim = SimilarityFilter(threshold=0.9)
    frame = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)).half()
    sim.should_skip(frame)
    # float32 rounding in cos (~1e-7) is magnified by 1 / (1 - threshold).
    assert sim.probability(frame.to(torch.float64)) == pytest.approx(1.0, abs=1e-5)
    assert sim.probability(-frame) == 0.0
    assert (sim.processed, sim.skipped, sim.skip_run) == (1, 0, 0)


def test_reference_is_a_copy_of_the_processed_frame():
    sim = SimilarityFilter(threshold=0.9)
    frame = torch.tensor([1.0, 0.0])
    sim.should_skip(frame)
    frame[:] = torch.tensor([0.0, 1.0])  # the caller reuses its buffer
    assert sim.probability(torch.tensor([1.0, 0.0])) == pytest.approx(1.0)


def test_reference_is_the_last_processed_frame_not_the_last_seen():
    sim = SimilarityFilter(threshold=0.9, max_skip_frames=1)
    a = unit_at(0.0)
    step = math.acos(0.995)  # p = 0.95 against the previous frame
    assert sim.should_skip(a) is False
    b = unit_at(step)
    skipped_b = sim.should_skip(b)
    # Against a processed b the next frame is one step away, against a it is two (p = 0.8).
    c = unit_at(2 * step)
    reference_angle = step if not skipped_b else 0.0
    assert sim.probability(c) == pytest.approx(expected_p(math.cos(2 * step - reference_angle), 0.9), abs=1e-6)


def test_shape_change_is_processed_and_becomes_reference():
    sim = SimilarityFilter(threshold=0.9)
    small, large = torch.ones(2, 2), torch.ones(3, 3)
    assert sim.should_skip(small) is False
    assert sim.probability(large) == 0.0
    assert sim.should_skip(large) is False
    assert sim.should_skip(large) is True  # identical to the new reference
    assert sim.probability(small) == 0.0


def test_zero_frames():
    sim = SimilarityFilter(threshold=0.9)
    zero = torch.zeros(4)
    sim.should_skip(zero)
    assert sim.probability(zero) == 1.0
    assert sim.probability(torch.ones(4)) == 0.0


def half_chance_decisions(seed: int, n: int = 60) -> list[bool]:
    """Frames rotating by a fixed step with max_skip_frames=1: every free decision has p = 0.5.

    After a processed frame the next one is one step away (p = 0.5); after a skip the run limit
    forces the next frame through, so the reference is always exactly one step behind a free frame.
    """
    threshold = 0.9
    step = math.acos(0.95)  # cos = 0.95 -> p = 1 - 0.05 / 0.1 = 0.5
    sim = SimilarityFilter(threshold=threshold, max_skip_frames=1, seed=seed)
    return [sim.should_skip(unit_at(k * step)) for k in range(n)]


def test_decisions_are_deterministic_per_seed():
    first = half_chance_decisions(seed=0)
    assert first == half_chance_decisions(seed=0)
    assert first != half_chance_decisions(seed=1)
    assert any(first) and not all(first[1:])  # p = 0.5 gives both outcomes


def test_reset_clears_reference_counters_and_reseeds():
    sim = SimilarityFilter(threshold=0.9, max_skip_frames=1, seed=3)
    step = math.acos(0.95)
    frames = [unit_at(k * step) for k in range(30)]
    first = [sim.should_skip(f) for f in frames]
    assert sim.processed + sim.skipped == 30
    sim.reset()
    assert (sim.processed, sim.skipped, sim.skip_run) == (0, 0, 0)
    assert sim.probability(frames[0]) == 0.0  # no reference
    assert [sim.should_skip(f) for f in frames] == first


def test_counters():
    sim = SimilarityFilter(threshold=0.9, max_skip_frames=2)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    for frame in [a, a, a, a, b, b]:  # F S S F F S
        sim.should_skip(frame)
    assert (sim.processed, sim.skipped, sim.skip_run) == (3, 3, 1)


@pytest.mark.parametrize("threshold", [0, 0.0, 1, 1.0, -0.1, 1.5, float("nan")])
def test_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        SimilarityFilter(threshold=threshold)


@pytest.mark.parametrize("max_skip_frames", [-1, 1.5, "3", True])
def test_bad_max_skip_frames(max_skip_frames):
    with pytest.raises(ValueError, match="max_skip_frames"):
        SimilarityFilter(max_skip_frames=max_skip_frames)
