"""Shape profiles: the batch sizes and image sizes an engine is built for.

A profile is (min, opt, max) for the batch, the image height and the image width, in rows and
image pixels. TensorRT builds one optimisation profile from it; ONNX Runtime and AOTInductor use
it to choose static or dynamic axes and the sizes to trace at. A stream calls its denoiser on a
fixed number of rows once full (fewer while it fills), so its profile is (1, rows, rows).

The profiles of the supported model families (native resolutions, usual batch ranges) are data
files, ``fastdiff/engines/family_profiles/<family>.json`` (package data, so a wheel carries them;
``engines/profiles`` in the repository links there): see :func:`load_family_profile`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from ..checks import check_int

# shipped inside the package (engines/profiles in the repository points here), so installs find them
PROFILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "family_profiles")


def _check_range(name: str, value) -> tuple[int, int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
            or not value[0] <= value[1] <= value[2]):
        raise ValueError(f"{name} must be (min, opt, max) positive integers with min ≤ opt ≤ max, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class ShapeProfile:
    batch: tuple[int, int, int]
    height: tuple[int, int, int]
    width: tuple[int, int, int]

    def __post_init__(self):
        for name in ("batch", "height", "width"):
            object.__setattr__(self, name, _check_range(name, getattr(self, name)))

    @property
    def static_batch(self) -> bool:
        return self.batch[0] == self.batch[2]

    @property
    def static_size(self) -> bool:
        return self.height[0] == self.height[2] and self.width[0] == self.width[2]

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> "ShapeProfile":
        return cls(tuple(data["batch"]), tuple(data["height"]), tuple(data["width"]))

    def check_multiple(self, multiple: int):
        """Every size a multiple of `multiple` (what the component's VAE and patch size take)."""
        for name in ("height", "width"):
            for value in getattr(self, name):
                if value % multiple:
                    raise ValueError(f"{name} {value} in the shape profile is not a multiple of {multiple}")

    def __str__(self) -> str:
        def span(v):
            return str(v[0]) if v[0] == v[2] else f"{v[0]}..{v[2]} (opt {v[1]})"
        return f"batch {span(self.batch)}, {span(self.height)}×{span(self.width)} px"


def stream_profile(rows: int, resolutions) -> ShapeProfile:
    """The profile of a stream with `rows` denoiser rows per call at the given (height, width)
    resolutions, the first being the one to optimise for."""
    check_int(rows, "rows", 1)
    resolutions = check_resolutions(resolutions)
    heights, widths = [h for h, _ in resolutions], [w for _, w in resolutions]
    return ShapeProfile((1, rows, rows), (min(heights), heights[0], max(heights)),
                        (min(widths), widths[0], max(widths)))


def check_resolutions(resolutions) -> list[tuple[int, int]]:
    """A non-empty list of (height, width) pairs of positive integers."""
    ok = isinstance(resolutions, (list, tuple)) and len(resolutions) > 0
    pairs = []
    for r in resolutions if ok else []:
        if (not isinstance(r, (list, tuple)) or len(r) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in r)):
            ok = False
            break
        pairs.append((int(r[0]), int(r[1])))
    if not ok:
        raise ValueError(f"resolutions must be a non-empty list of (height, width) positive integers, got {resolutions!r}")
    return pairs


def family_profile_names(folder: str = PROFILES_DIR) -> list[str]:
    if not os.path.isdir(folder):
        return []
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))


def load_family_profile(family: str, folder: str = PROFILES_DIR) -> dict:
    """A family's profile data: ``resolutions`` [[h, w], ...] (the first native), ``batch`` [min, opt, max],
    ``components`` and a ``description``."""
    path = os.path.join(folder, f"{family}.json")
    if not os.path.isfile(path):
        raise ValueError(f"profile must be one of {family_profile_names(folder)} (files in {folder}), got {family!r}")
    with open(path) as f:
        data = json.load(f)
    check_resolutions(data["resolutions"])
    _check_range("batch", tuple(data["batch"]))
    return data
