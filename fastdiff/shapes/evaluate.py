"""Read a shapes-world picture back into a :class:`Scene`, by rule (no learned model), and score it.

Each pixel is named by its nearest palette colour; the background is the commonest name; an
object is a 4-connected region of pixels named otherwise. Its colour is the commonest name inside
it (edges left out: JPEG and a VAE smear them), its shape the share of its bounding box it fills
(square 1, circle π/4, triangle ½), its size the side that area implies, its position the grid
cell of its bounding-box centre. Everything is vectorised over a batch of pictures, so scoring
thousands of them takes a second or two.
"""

from __future__ import annotations

from itertools import permutations

import numpy as np
import torch
from PIL import Image

from .render import CELL_CENTRES, COLOURS, POSITIONS, RESOLUTION, SHAPES, SIDES, Scene, Obj, parse_caption

__all__ = ["read_scene", "read_scenes", "attribute_accuracy", "ATTRIBUTES"]

ATTRIBUTES = ("background", "colour", "shape", "size", "position")

_NAMES = list(COLOURS)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_MIN_AREA = 40  # px; smaller regions are compression specks (a small triangle covers ~160)
_FILL = np.array([np.pi / 4, 1.0, 0.5])  # share of the bounding box each shape fills, SHAPES order
_FILL_CUTS = (0.64, 0.89)  # triangle < 0.64 ≤ circle < 0.89 ≤ square
_SIDE_CUT = (SIDES["small"] + SIDES["large"]) / 2  # px across: small below, large above
_CELL_CUTS = ((CELL_CENTRES[0] + CELL_CENTRES[1]) / 2, (CELL_CENTRES[1] + CELL_CENTRES[2]) / 2)
_CHUNK = 256  # pictures per vectorised pass: bounds memory


# --- input -------------------------------------------------------------------------------------

def _as_uint8(image, value_range) -> np.ndarray:
    """One picture as uint8 [64, 64, 3]."""
    if isinstance(image, Image.Image):
        a = np.asarray(image.convert("RGB"))
    else:
        if isinstance(image, torch.Tensor):  # channels first
            image = image.detach().float().cpu().permute(1, 2, 0).numpy()
        a = np.asarray(image)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"expected a [H, W, 3] array or [3, H, W] tensor, got shape {a.shape}")
        if a.dtype != np.uint8:
            # Floats are [0, 1] unless some value is negative: every palette colour but white has
            # a channel below the middle, so a [-1, 1] shapes picture always has one.
            low, high = value_range or ((-1.0, 1.0) if a.min() < 0 else (0.0, 1.0))
            a = np.clip(np.rint((a - low) * (255 / (high - low))), 0, 255).astype(np.uint8)
    if a.shape[:2] != (RESOLUTION, RESOLUTION):
        a = np.asarray(Image.fromarray(a).resize((RESOLUTION, RESOLUTION), Image.BOX))
    return a


def _as_batch(images, value_range) -> np.ndarray:
    """Pictures (a list, or a batch tensor [N, 3, H, W] / array [N, H, W, 3]) as uint8 [N, 64, 64, 3]."""
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        return np.zeros((0, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    return np.stack([_as_uint8(image, value_range) for image in images])


# --- reading -----------------------------------------------------------------------------------

def _components(fg: np.ndarray) -> np.ndarray:
    """Label 4-connected regions of a boolean batch [n, H, W]: each pixel gets its region's smallest flat index.

    Min-label propagation with pointer jumping, whole batch at once; converges in a handful of
    passes for convex blobs. Background pixels get ``fg.size``.
    """
    none = fg.size
    lab = np.where(fg, np.arange(none).reshape(fg.shape), none)
    inside = np.flatnonzero(fg)
    while True:
        m = lab.copy()
        np.minimum(m[:, 1:], lab[:, :-1], out=m[:, 1:])
        np.minimum(m[:, :-1], lab[:, 1:], out=m[:, :-1])
        np.minimum(m[:, :, 1:], lab[:, :, :-1], out=m[:, :, 1:])
        np.minimum(m[:, :, :-1], lab[:, :, 1:], out=m[:, :, :-1])
        flat = m.reshape(-1)
        flat[~fg.reshape(-1)] = none  # a background pixel never joins a region
        flat[inside] = flat[flat[inside]]  # jump to the label's label
        if np.array_equal(m, lab):
            return lab
        lab = m


def _read_chunk(pixels: np.ndarray) -> list[Scene]:
    n, h, w, _ = pixels.shape
    k = len(_NAMES)
    x = pixels.reshape(-1, 3).astype(np.float32)
    # nearest palette colour: argmin |x - p|² = argmin (|p|² - 2 x·p)
    names = np.argmin((_PALETTE**2).sum(1) - 2 * x @ _PALETTE.T, axis=1).reshape(n, h, w)
    counts = np.bincount((np.arange(n)[:, None] * k + names.reshape(n, -1)).ravel(), minlength=n * k)
    background = counts.reshape(n, k).argmax(1)
    fg = names != background[:, None, None]

    lab = _components(fg)
    where = np.flatnonzero(fg)
    comp_root, comp = np.unique(lab.reshape(-1)[where], return_inverse=True)
    area = np.bincount(comp)
    ys, xs = (where // w) % h, where % w
    top, left = np.full(len(area), h), np.full(len(area), w)
    bottom, right = np.zeros(len(area), int), np.zeros(len(area), int)
    np.minimum.at(top, comp, ys)
    np.minimum.at(left, comp, xs)
    np.maximum.at(bottom, comp, ys + 1)
    np.maximum.at(right, comp, xs + 1)
    # Colour: commonest name, counting pixels whose four neighbours are in the region far more
    # than edge pixels (a region with no inside falls back to its edge).
    inner = fg.copy()
    inner[:, 1:] &= fg[:, :-1]
    inner[:, :-1] &= fg[:, 1:]
    inner[:, :, 1:] &= fg[:, :, :-1]
    inner[:, :, :-1] &= fg[:, :, 1:]
    votes = np.bincount(comp * k + names.reshape(-1)[where], weights=1 + 1000.0 * inner.reshape(-1)[where],
                        minlength=len(area) * k)
    colour = votes.reshape(-1, k).argmax(1)

    fill = area / ((bottom - top) * (right - left))
    shape = np.where(fill < _FILL_CUTS[0], 2, np.where(fill < _FILL_CUTS[1], 0, 1))
    side = np.sqrt(area / _FILL[shape]) * (RESOLUTION / w)
    scale = np.array([w, h]) / RESOLUTION
    cx, cy = (left + right) / 2 / scale[0], (top + bottom) / 2 / scale[1]
    cell = np.digitize(cy, _CELL_CUTS) * 3 + np.digitize(cx, _CELL_CUTS)

    objects: list[list[tuple[int, Obj]]] = [[] for _ in range(n)]
    for c in np.flatnonzero(area * (RESOLUTION**2) >= _MIN_AREA * h * w):
        obj = Obj(SHAPES[shape[c]], _NAMES[colour[c]], "large" if side[c] > _SIDE_CUT else "small",
                  POSITIONS[cell[c]])
        objects[comp_root[c] // (h * w)].append((-int(area[c]), obj))
    return [Scene(_NAMES[b], [o for _, o in sorted(objs, key=lambda t: t[0])])
            for b, objs in zip(background, objects)]


def read_scenes(images, value_range=None) -> list[Scene]:
    """:func:`read_scene` for many pictures at once (a list, or a batch tensor/array)."""
    pixels = _as_batch(images, value_range)
    return [scene for i in range(0, len(pixels), _CHUNK) for scene in _read_chunk(pixels[i:i + _CHUNK])]


def read_scene(image, value_range=None) -> Scene:
    """The scene a 64×64 picture shows: a PIL image, a [H, W, 3] array or a [3, H, W] tensor.

    uint8 is 0..255; floats are [0, 1], or [-1, 1] when any value is negative, unless
    `value_range` = (low, high) says otherwise. Objects come largest first.
    """
    return read_scenes([image], value_range)[0]


# --- scoring -----------------------------------------------------------------------------------

def _matches(want: Obj, got: Obj) -> list[bool]:
    return [want.colour == got.colour, want.shape == got.shape, want.size == got.size,
            want.position == got.position]


def _best_assignment(wanted: list[Obj], read: list[Obj]) -> list[list[bool]]:
    """Per wanted object, which of colour/shape/size/position the best-matching read object has."""
    read = read[:6]  # largest first; more would be noise, and permutations grow fast
    best = [[False] * 4 for _ in wanted]
    for chosen in permutations(range(len(read)), min(len(wanted), len(read))):
        hits = [_matches(w, read[j]) for w, j in zip(wanted, chosen)]
        hits += [[False] * 4] * (len(wanted) - len(chosen))
        if sum(map(sum, hits)) > sum(map(sum, best)):
            best = hits
    return best


def attribute_accuracy(images, scenes_or_prompts, value_range=None) -> dict[str, float]:
    """How many asked-for attributes the pictures show, as shares in [0, 1].

    `scenes_or_prompts` holds a :class:`Scene` or a caption per picture. Attributes are the
    background colour and, per asked object, its colour, shape, size and position; the read
    objects are matched to the asked ones by the assignment that gets most attributes right.
    ``overall`` pools them; ``count`` (as many objects read as asked) and ``exact`` (count and
    every attribute right) are reported beside, not pooled.
    """
    wanted = [parse_caption(s) if isinstance(s, str) else s for s in scenes_or_prompts]
    read = read_scenes(images, value_range)
    if len(read) != len(wanted):
        raise ValueError(f"{len(read)} pictures but {len(wanted)} scenes or prompts")
    right = dict.fromkeys(ATTRIBUTES, 0)
    asked = dict.fromkeys(ATTRIBUTES, 0)
    count = exact = 0
    for want, got in zip(wanted, read):
        hits = _best_assignment(want.objects, got.objects)
        right["background"] += want.background == got.background
        asked["background"] += 1
        for attribute, column in zip(ATTRIBUTES[1:], zip(*hits)):
            right[attribute] += sum(column)
            asked[attribute] += len(column)
        same_count = len(want.objects) == len(got.objects)
        count += same_count
        exact += same_count and want.background == got.background and all(map(all, hits))
    n = max(len(wanted), 1)
    result = {"overall": sum(right.values()) / max(sum(asked.values()), 1)}
    result.update({a: right[a] / asked[a] if asked[a] else 1.0 for a in ATTRIBUTES})
    result.update(count=count / n, exact=exact / n)
    return result
