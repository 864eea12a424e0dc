import numpy as np
import pytest

from fastdiff.shapes import moving_shapes_clip


def arrays(frames):
    return [np.asarray(f) for f in frames]


def test_same_seed_same_frames_other_seed_other_frames():
    a, b = arrays(moving_shapes_clip(8, seed=3)), arrays(moving_shapes_clip(8, seed=3))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], arrays(moving_shapes_clip(8, seed=4))[0])


@pytest.mark.parametrize("num_frames,size", [(1, 16), (5, 64), (32, 48)])
def test_frame_count_size_and_mode(num_frames, size):
    frames = moving_shapes_clip(num_frames, size)
    assert len(frames) == num_frames
    assert all(f.size == (size, size) and f.mode == "RGB" for f in frames)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_shape_moves_across_the_frame(seed):
    frames = arrays(moving_shapes_clip(32, 64, seed))
    assert all(not np.array_equal(x, y) for x, y in zip(frames, frames[1:]))
    # The object's pixels (those unlike the background corner) move from one side to the other.
    def centre_x(a):
        return np.nonzero((a != a[0, 0]).any(axis=2))[1].mean()

    assert abs(centre_x(frames[-1]) - centre_x(frames[0])) > 20


@pytest.mark.parametrize("kwargs,name", [
    ({"num_frames": 0}, "num_frames"), ({"num_frames": 2.0}, "num_frames"), ({"num_frames": True}, "num_frames"),
    ({"size": 8}, "size"), ({"size": "64"}, "size"), ({"size": 10**5}, "size"), ({"seed": 1.5}, "seed"), ({"seed": None}, "seed"),
])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        moving_shapes_clip(**kwargs)
