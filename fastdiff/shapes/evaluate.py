"""Read a shapes-world picture back into a :class:`Scene`, by rule (no learned model), and score it.

Each pixel is named by its nearest palette colour; the background is the commonest name; an
object is a 4-connected region of pixels named otherwise (specks under 40 px are dropped). Its
colour is the commonest name inside it (edges left out: JPEG and a VAE smear them). Each pixel's
coverage (how far it lies from the background colour towards the object's) gives the region's
area and centre of mass. Its shape and turn are those of the circle, square or triangle — each
tried at every turn, 5° apart — of that area and centre whose redrawing differs least from it, so
the reading is the same at any rotation; its size class comes from the nominal diameter that area
gives, its position from the 3×3 cell of its centre. Everything is vectorised over a batch, so
thousands of pictures take seconds.

Scores count only what a prompt states: a caption that leaves out a size, a position or the
background is judged on the rest.
"""

from __future__ import annotations

from functools import cache
from itertools import permutations

import numpy as np
import torch
from PIL import Image

from .render import (
    CELL_BOUNDS, COLOURS, FILL, POSITIONS, RESOLUTION, SHAPES, SIZE_CUT, SYMMETRY, Obj, Scene, parse_caption,
    signed_distance,
)

__all__ = ["read_scene", "read_scenes", "attribute_accuracy", "ATTRIBUTES"]

ATTRIBUTES = ("background", "colour", "shape", "size", "position")

_NAMES = list(COLOURS)
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_MIN_AREA = 40  # px; smaller regions are compression specks (a small triangle covers ~160)
_CELL_CUTS = CELL_BOUNDS[1:3]
_TURN_STEP = 5.0  # degrees between the turns each shape is tried at
# Every (shape, turn) a region is compared with: the circle once, the others over their symmetry.
_CANDIDATES = [(shape, float(a)) for shape in SHAPES
               for a in np.arange(0.0, SYMMETRY[shape] if shape != "circle" else _TURN_STEP, _TURN_STEP)]
_CHUNK = 256  # pictures per vectorised pass: bounds memory


# --- input -------------------------------------------------------------------------------------

def _as_uint8(image, value_range) -> np.ndarray:
    """One picture as uint8 [64, 64, 3]."""
    if isinstance(image, Image.Image):
        a = np.asarray(image.convert("RGB"))
    else:
        if isinstance(image, torch.Tensor):  # channels first
            image = image.detach().cpu().permute(1, 2, 0)
            image = image.float().numpy() if image.is_floating_point() else image.numpy()
        a = np.asarray(image)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"expected a [H, W, 3] array or [3, H, W] tensor, got shape {a.shape}")
        if a.dtype.kind in "iub":  # integers are 0..255
            a = np.clip(a, 0, 255).astype(np.uint8)
        else:
            if not np.isfinite(a).all():   # NaN would read as black: a broken sampler must not score
                raise ValueError("a picture holds NaN or infinite values: the evaluator reads finite pixels")
            # Floats are [0, 1] unless some value is negative: every palette colour but white has
            # a channel below the middle, so a [-1, 1] shapes picture always has one.
            low, high = value_range or ((-1.0, 1.0) if a.min() < 0 else (0.0, 1.0))
            slack = 0.05 * (high - low)   # a decoder's overshoot; 0–255 values in a [0, 1] range are not
            if a.min() < low - slack or a.max() > high + slack:
                raise ValueError(f"a picture holds values from {a.min():g} to {a.max():g}, outside its range "
                                 f"({low:g}, {high:g})")
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

@cache
def _name_table() -> np.ndarray:
    """Nearest palette colour for every RGB colour at 6 bits a channel (a 256 KiB table).

    Looking names up is ~50× faster than measuring ten distances per pixel, and a 4-level bin
    moves a decision boundary by at most 2 levels, far less than the palette's spacing.
    """
    levels = np.arange(64, dtype=np.float32) * 4 + 1.5  # bin centres
    rgb = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    return np.argmin(((rgb[:, None, :] - _PALETTE[None]) ** 2).sum(-1), axis=1).astype(np.uint8)


def _components(fg: np.ndarray) -> np.ndarray:
    """Label 4-connected regions of a boolean batch [n, H, W]: each pixel gets its region's smallest flat index.

    Whole batch at once, union-find style: every region root is hooked under the smallest label
    next to it, then labels jump to their roots; a few rounds do even for JPEG's ragged edges,
    where plain min-label spreading crawls along them. Background pixels get ``fg.size``.
    """
    none = fg.size
    flat = np.where(fg.reshape(-1), np.arange(none), none)
    inside = np.flatnonzero(fg)
    while True:
        lab = flat.reshape(fg.shape)
        m = lab.copy()  # the smallest label among each pixel and its four neighbours
        np.minimum(m[:, 1:], lab[:, :-1], out=m[:, 1:])
        np.minimum(m[:, :-1], lab[:, 1:], out=m[:, :-1])
        np.minimum(m[:, :, 1:], lab[:, :, :-1], out=m[:, :, 1:])
        np.minimum(m[:, :, :-1], lab[:, :, 1:], out=m[:, :, :-1])
        smallest, own = m.reshape(-1)[inside], flat[inside]
        if np.array_equal(smallest, own):
            return lab
        np.minimum.at(flat, own, smallest)  # hook each root under its smallest neighbouring label
        flat[inside] = np.minimum(flat[inside], smallest)
        while True:  # labels always point to smaller indices, so jumping ends at the roots
            jumped = flat[flat[inside]]
            if np.array_equal(jumped, flat[inside]):
                break
            flat[inside] = jumped


def _mean_colour(rgb, group, keep, groups, fallback):
    """Mean RGB of the kept pixels of each group; `fallback` for groups with none kept."""
    total = np.stack([np.bincount(group[keep], weights=rgb[keep, c], minlength=groups) for c in range(3)], 1)
    count = np.bincount(group[keep], minlength=groups)[:, None]
    return np.where(count > 0, total / np.maximum(count, 1), fallback)


def _read_chunk(pixels: np.ndarray) -> list[Scene]:
    """Read uint8 [n, 64, 64, 3] pictures."""
    n, h, w, _ = pixels.shape
    k = len(_NAMES)
    q = pixels >> 2  # 6 bits a channel index the table of nearest names
    names = _name_table()[(q[..., 0].astype(np.int32) << 12) | (q[..., 1].astype(np.int32) << 6) | q[..., 2]]
    counts = np.bincount((np.arange(n)[:, None] * k + names.reshape(n, -1)).ravel(), minlength=n * k)
    background = counts.reshape(n, k).argmax(1)
    fg = names != background[:, None, None]

    # Regions: 4-connected pixels not named as the background.
    lab = _components(fg)
    where = np.flatnonzero(fg)
    comp_root, comp = np.unique(lab.reshape(-1)[where], return_inverse=True)
    image = comp_root // (h * w)
    ys, xs = (where // w) % h, where % w

    # Colour: commonest name, counting pixels whose four neighbours are in the region far more
    # than edge pixels (a region with no inside falls back to its edge).
    inner = fg.copy()
    inner[:, 1:] &= fg[:, :-1]
    inner[:, :-1] &= fg[:, 1:]
    inner[:, :, 1:] &= fg[:, :, :-1]
    inner[:, :, :-1] &= fg[:, :, 1:]
    votes = np.bincount(comp * k + names.reshape(-1)[where], weights=1 + 1000.0 * inner.reshape(-1)[where],
                        minlength=len(comp_root) * k)
    colour = votes.reshape(-1, k).argmax(1)

    # Coverage: how far each pixel lies from the background colour towards the region's colour.
    # Edge pixels blend the two (anti-aliasing, JPEG, a VAE) and often take a third name (purple
    # on green edges read gray); weighting them by coverage puts the outline where it really is.
    # Both colours are the ones measured in the picture, so a global colour drift cancels out.
    rgb = pixels.reshape(-1, 3).astype(np.float32)
    bg = _mean_colour(rgb, np.arange(n).repeat(h * w), ~fg.reshape(-1), n, _PALETTE[background])
    region_rgb = rgb[where]
    ink = _mean_colour(region_rgb, comp, inner.reshape(-1)[where], len(comp_root), _PALETTE[colour])
    span = ink - bg[image]
    cover = ((region_rgb - bg[image][comp]) * span[comp]).sum(1) / np.maximum((span**2).sum(1), 1)[comp]
    cover = np.clip(cover, 0, 1)
    area = np.bincount(comp, weights=cover, minlength=len(comp_root)) + 1e-9  # never 0: divided by

    # Shape and turn: redraw the region as each shape at each turn, of the same area and centre of
    # mass, and keep the one that differs least from it (summed |coverage difference|). Blur, JPEG
    # or a VAE smear every candidate alike, so the comparison survives them where box-based tests
    # do not. (Every shape's centre of mass is its centre.)
    x, y = xs + 0.5, ys + 0.5
    mx = np.bincount(comp, weights=cover * x, minlength=len(area)) / area
    my = np.bincount(comp, weights=cover * y, minlength=len(area)) / area
    fill = np.array([FILL[shape] for shape, _ in _CANDIDATES])
    radius = np.sqrt(area[:, None] / fill) / 2  # [regions, candidate]: half the nominal diameter
    px, py = (x - mx[comp]).astype(np.float32), (y - my[comp]).astype(np.float32)
    # Pixels outside the region (coverage 0 there) would add the redrawn shape's coverage m;
    # its total is the area, so they add area - Σ m over the region, and need no visiting.
    error = np.stack([
        area + np.bincount(comp, weights=np.abs(cover - m) - m, minlength=len(area))
        for m in (
            np.clip(0.5 - signed_distance(shape, px, py, radius[comp, i].astype(np.float32), angle), 0, 1)
            for i, (shape, angle) in enumerate(_CANDIDATES)
        )
    ], 1)
    best = error.argmin(1)
    pick = np.arange(len(area))

    # Size class from the nominal diameter of the chosen shape; position from the centre's cell.
    diameter = 2 * radius[pick, best]
    cell = np.digitize(my, _CELL_CUTS) * 3 + np.digitize(mx, _CELL_CUTS)

    objects: list[list[tuple[float, Obj]]] = [[] for _ in range(n)]
    for c in np.flatnonzero(area >= _MIN_AREA):
        shape, angle = _CANDIDATES[best[c]]
        obj = Obj(shape, _NAMES[colour[c]], "large" if diameter[c] > SIZE_CUT else "small",
                  POSITIONS[cell[c]], centre=(float(mx[c]), float(my[c])), diameter=float(diameter[c]),
                  angle=angle)
        objects[image[c]].append((-area[c], obj))
    return [Scene(_NAMES[b], [o for _, o in sorted(objs, key=lambda t: t[0])])
            for b, objs in zip(background, objects)]


def read_scenes(images, value_range=None) -> list[Scene]:
    """:func:`read_scene` for many pictures at once (a list, or a batch tensor/array)."""
    pixels = _as_batch(images, value_range)
    return [scene for i in range(0, len(pixels), _CHUNK) for scene in _read_chunk(pixels[i:i + _CHUNK])]


def read_scene(image, value_range=None) -> Scene:
    """The scene a 64×64 picture shows: a PIL image, a [H, W, 3] array or a [3, H, W] tensor.

    Integers are 0..255; floats are [0, 1], or [-1, 1] when any value is negative, unless
    `value_range` = (low, high) says otherwise. Objects come largest first.
    """
    return read_scenes([image], value_range)[0]


# --- scoring -----------------------------------------------------------------------------------

_OBJECT_ATTRIBUTES = ATTRIBUTES[1:]


def _matches(want: Obj, got: Obj) -> list[bool | None]:
    """Per object attribute, whether `got` has the one `want` states (None where it states none)."""
    return [None if getattr(want, a) is None else getattr(want, a) == getattr(got, a) for a in _OBJECT_ATTRIBUTES]


def _best_assignment(wanted: list[Obj], read: list[Obj]) -> list[list[bool | None]]:
    """Per wanted object, which of its stated colour/shape/size/position the best-matching read
    object has (None where not stated)."""
    read = read[:6]  # largest first; more would be noise, and permutations grow fast
    missed = [[None if getattr(w, a) is None else False for a in _OBJECT_ATTRIBUTES] for w in wanted]
    best, best_hits = missed, -1
    for chosen in permutations(range(len(read)), min(len(wanted), len(read))):
        rows = [_matches(w, read[j]) for w, j in zip(wanted, chosen)] + missed[len(chosen):]
        hits = sum(bool(h) for row in rows for h in row)
        if hits > best_hits:
            best, best_hits = rows, hits
    return best


def attribute_accuracy(images, scenes_or_prompts, value_range=None) -> dict[str, float]:
    """How many asked-for attributes the pictures show, as shares in [0, 1].

    `scenes_or_prompts` holds a :class:`Scene` or a caption per picture. Attributes are the
    background colour and, per asked object, its colour, shape, size and position — only those
    the scene or prompt states; the read objects are matched to the asked ones by the assignment
    that gets most attributes right.
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
        all_right = True
        if want.background is not None:
            right["background"] += want.background == got.background
            asked["background"] += 1
            all_right = want.background == got.background
        for attribute, column in zip(_OBJECT_ATTRIBUTES, zip(*hits)):
            stated = [h for h in column if h is not None]
            right[attribute] += sum(stated)
            asked[attribute] += len(stated)
            all_right = all_right and all(stated)
        same_count = len(want.objects) == len(got.objects)
        count += same_count
        exact += same_count and all_right
    n = max(len(wanted), 1)
    result = {"overall": sum(right.values()) / max(sum(asked.values()), 1)}
    result.update({a: right[a] / asked[a] if asked[a] else float("nan") for a in ATTRIBUTES})  # nan: never asked
    result.update(count=count / n, exact=exact / n)
    return result
