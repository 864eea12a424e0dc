"""Small deterministic video clips of a moving shape, for stream tests and demos."""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from ..checks import check_int

__all__ = ["SHAPES", "moving_shapes_clip"]

SHAPES = ("circle", "square", "triangle")


def _mix(a, b, t: float) -> tuple[int, int, int]:
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def _draw(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, colour) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
    else:  # an upright triangle inscribed in the same box
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=colour)


def moving_shapes_clip(num_frames: int = 32, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """`num_frames` RGB frames of size×size: one shape crossing a plain background, changing colour.

    The seed picks the shape (``SHAPES[seed % 3]``), the colours, the size and the path; the same
    seed always gives the same frames.
    """
    check_int(num_frames, "num_frames", 1)
    check_int(size, "size", 16, 2048)  # smaller frames leave the shape no room to move; larger ones no memory
    check_int(seed, "seed")

    rng = random.Random(seed)
    shape = SHAPES[seed % len(SHAPES)]
    # A dark background and bright object colours keep the shape visible whatever the draw.
    background = tuple(rng.randrange(0, 110) for _ in range(3))
    start, end = (tuple(rng.randrange(150, 256) for _ in range(3)) for _ in range(2))
    r = size * rng.uniform(0.12, 0.2)
    y0, y1 = (rng.uniform(r, size - r) for _ in range(2))
    x0, x1 = r, size - r
    if rng.random() < 0.5:  # right to left half of the time
        x0, x1 = x1, x0

    frames = []
    for i in range(num_frames):
        t = i / (num_frames - 1) if num_frames > 1 else 0.0
        frame = Image.new("RGB", (size, size), background)
        _draw(ImageDraw.Draw(frame), shape, x0 + (x1 - x0) * t, y0 + (y1 - y0) * t, r, _mix(start, end, t))
        frames.append(frame)
    return frames
