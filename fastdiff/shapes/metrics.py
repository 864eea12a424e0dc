"""Quality measures for pictures of the shapes world: prompt accuracy, paired PSNR against a
teacher, coverage of what prompts leave free, and a distribution distance to rendered scenes.

*Coverage* catches collapse. A prompt that leaves an object's size or position, or the background,
unstated asks for all of them, and every square or triangle may be turned either way. Over several
pictures of one prompt, the entropy of what the evaluator reads for each free attribute (size class,
position cell, background, turn in six bins over the renderer's turns) is compared with the entropy
the renderer's own pictures of that prompt give at the same count. Rendered pictures score about 1;
a model that draws one picture whatever the seed scores 0.

The distance is the Fréchet distance between Gaussians fitted to *shape features*, 28 numbers per
picture that this module defines (no learned network, so it is exact and fast on the CPU):

- colour mass (10): the share of pixels nearest each palette colour — which colours appear, and
  how much of each;
- layout (16): per cell of a 4×4 grid, the share of pixels not of the picture's commonest colour —
  where objects are, and how large;
- sharpness (1): the height of the steps between neighbouring pixels, each step weighted by its
  height (Σd² / Σ|d|) — blur spreads an edge over more, lower steps and lowers it, whatever the
  number of edges (the mean absolute difference does not fall: an edge's steps keep their sum);
- off-palette share (1): the share of pixels farther than 0.15 (RGB in [0, 1]) from every palette
  colour — smears, halos and noise raise it.

Each feature is divided by its spread over 1,000 rendered scenes (a fixed, seeded set), so a
feature counts by how many typical deviations it moves, whatever its units. The off-palette share
is the exception: it hardly varies between rendered scenes (they are flat palette colours with
anti-aliased edges), so by that spread one picture drawn in an off shade would count as a hundred
deviations, and a few such pictures would outweigh every layout and colour error (pictures of one
flat colour scored closer to rendered scenes than 25 guided steps did). It takes the unit of the
other shares of pixels instead, their spreads' root mean square: a pixel off the palette counts as
much as a pixel moved in layout or colour. Blurry, noisy, off-colour or wrongly laid-out pictures
move the features' mean and spread. Like FID it needs a few hundred pictures per side to be stable,
and it is biased upwards at small counts: compare distances only at equal counts.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import torch

from .evaluate import _as_batch, attribute_accuracy, read_scenes
from .render import COLOURS, TURN_RANGE, Obj, Scene, parse_caption, realise, render_batch, sample_scene, signed_turn

__all__ = ["prompt_accuracy", "paired_psnr", "coverage", "coverage_by_attribute", "read_object", "shape_features",
           "frechet_distance", "frechet_by_feature", "FEATURE_NAMES", "FREE_ATTRIBUTES"]

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32) / 255
_GRID = 4
_OFF_PALETTE = 0.15
FEATURE_NAMES = ([f"mass_{c}" for c in COLOURS] + [f"layout_{r}{c}" for r in range(_GRID) for c in range(_GRID)]
                 + ["sharpness", "off_palette"])


def prompt_accuracy(images, prompts, value_range=None) -> float:
    """Share of the attributes the prompts ask for (background; per object colour, shape, size,
    position) that the evaluator reads back from the pictures. See
    :func:`~fastdiff.shapes.evaluate.attribute_accuracy` for the per-attribute split."""
    _check_pair_lengths(images, prompts, "prompts")
    return attribute_accuracy(images, prompts, value_range)["overall"]


FREE_ATTRIBUTES = ("background", "size", "position", "turn")
_TURN_BINS = 6
_REFERENCE_DRAWS = 4  # rendered sets per prompt whose entropies are averaged: a steadier yardstick


def _entropy(values: list) -> float:
    """Plug-in entropy (nats) of a list of discrete readings."""
    if not values:
        return 0.0
    _, counts = np.unique(np.array(values, dtype=object).astype(str), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def _turn_bin(obj) -> int:
    """Which of :data:`_TURN_BINS` equal bins over the renderer's turns (±TURN_RANGE) `obj`'s turn
    falls in; turns read beyond the range count in the end bins."""
    width = 2 * TURN_RANGE / _TURN_BINS
    return int(np.clip((signed_turn(obj.shape, obj.angle) + TURN_RANGE) // width, 0, _TURN_BINS - 1))


def _free_readings(wanted: Scene, read: list[Scene]) -> dict[tuple[str, int], list]:
    """For each attribute `wanted` leaves free, and each object, what the pictures show: keys
    (attribute, object index), values one reading per picture where the object was found (the
    read object of its colour and shape, else of its colour). A turn is read only from an object
    of the wanted shape: a square drawn as a circle has no turn to read (a circle's reads 0°), and
    the wrong shape is prompt accuracy's business, as a missing object is."""
    readings: dict[tuple[str, int], list] = {}
    if wanted.background is None:
        readings[("background", -1)] = [scene.background for scene in read]
    for i, want in enumerate(wanted.objects):
        free = [a for a in ("size", "position") if getattr(want, a) is None]
        if want.shape != "circle":
            free.append("turn")
        for attribute in free:
            readings[(attribute, i)] = []
        for scene in read:
            o = read_object(want, scene)
            if o is None:  # a missing object is prompt accuracy's business, not diversity's
                continue
            for attribute in free:
                if attribute == "turn" and o.shape != want.shape:
                    continue   # so is a wrong shape: its turn says nothing of the wanted one's
                readings[(attribute, i)].append(_turn_bin(o) if attribute == "turn" else getattr(o, attribute))
    return readings


def read_object(want: Obj, scene: Scene) -> Obj | None:
    """The object of `scene` that stands for `want`: the first read of its colour and shape, else
    of its colour; None when no object has its colour."""
    same_colour = [o for o in scene.objects if o.colour == want.colour]
    return next((o for o in same_colour if o.shape == want.shape), same_colour[0] if same_colour else None)


def coverage_by_attribute(images, prompts, value_range=None, seed: int = 0) -> dict[str, float]:
    """:func:`coverage` per free attribute (``background``, ``size``, ``position``, ``turn``; those
    no prompt leaves free are left out) and ``overall``."""
    _check_pair_lengths(images, prompts, "prompts")
    read = read_scenes(images, value_range)
    groups: dict[str, list[Scene]] = {}
    for prompt, scene in zip(prompts, read):
        groups.setdefault(prompt, []).append(scene)
    if all(len(g) < 2 for g in groups.values()):
        raise ValueError("coverage needs several pictures of one prompt: repeat each prompt over seeds")
    rng = np.random.default_rng(seed)
    got = dict.fromkeys(FREE_ATTRIBUTES, 0.0)
    expected = dict.fromkeys(FREE_ATTRIBUTES, 0.0)
    for prompt, scenes in groups.items():
        if len(scenes) < 2:
            continue
        wanted = parse_caption(prompt)
        mine = _free_readings(wanted, scenes)
        rendered = [[realise(wanted, rng) for _ in scenes] for _ in range(_REFERENCE_DRAWS)]
        theirs = [_free_readings(wanted, read_scenes(render_batch(draw))) for draw in rendered]
        for key, values in mine.items():
            got[key[0]] += _entropy(values)
            expected[key[0]] += np.mean([_entropy(t[key][:len(values)]) for t in theirs])
    result = {a: float(got[a] / expected[a]) for a in FREE_ATTRIBUTES if expected[a] > 0}
    total = sum(expected.values())
    result["overall"] = float(sum(got.values()) / total) if total > 0 else float("nan")
    return result


def coverage(images, prompts, value_range=None, seed: int = 0) -> float:
    """How much of the spread the prompts leave free the pictures show: the entropy of the evaluator's
    readings of every free attribute over the pictures of each prompt, summed, over the same sum for
    the renderer's pictures of those prompts at the same counts. About 1 for rendered scenes, 0 for
    one picture repeated. `prompts` holds one caption per picture; each prompt needs ≥ 2 pictures
    (different seeds) to count. `seed` seeds the rendered yardstick."""
    return coverage_by_attribute(images, prompts, value_range, seed)["overall"]


def _pixels(images, value_range) -> np.ndarray:
    """Pictures as float [N, 64, 64, 3] in [0, 1], through the evaluator's input rules."""
    return _as_batch(images, value_range).astype(np.float32) / 255


def _length(images) -> int:
    return images.shape[0] if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4 else (
        len(images) if isinstance(images, (list, tuple)) else 1)


def _check_pair_lengths(images, others, name: str) -> None:
    if _length(images) != _length(others):
        raise ValueError(f"{name} must hold one entry per picture: {_length(images)} pictures, "
                         f"{_length(others)} {name}")


def paired_psnr(images, reference_images, value_range=None) -> float:
    """PSNR (dB, pixels in [0, 1]) of `images` against `reference_images` picture by picture, from
    the squared error pooled over all pairs; ``inf`` when they are identical."""
    _check_pair_lengths(images, reference_images, "reference_images")
    a, b = _pixels(images, value_range), _pixels(reference_images, value_range)
    if len(a) == 0:
        raise ValueError("images is empty")
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return math.inf if mse == 0 else -10 * math.log10(mse)


def shape_features(images, value_range=None) -> np.ndarray:
    """The 28 shape features (:data:`FEATURE_NAMES`) of each picture, as float64 [N, 28], in units
    of their spread over rendered scenes."""
    x = _pixels(images, value_range)
    raw = np.concatenate([_raw_features(x[i:i + _CHUNK]) for i in range(0, len(x), _CHUNK)] or [np.zeros((0, 28))])
    return raw / _reference_spread()


_CHUNK = 128  # pictures per pass: the palette distances take 0.5 MB a picture
_REFERENCE_SCENES, _REFERENCE_SEED = 1000, 31_415


@cache
def _reference_spread() -> np.ndarray:
    rng = np.random.default_rng(_REFERENCE_SEED)
    pixels = render_batch([sample_scene(rng) for _ in range(_REFERENCE_SCENES)]).astype(np.float32) / 255
    spread = np.concatenate([_raw_features(pixels[i:i + _CHUNK]) for i in range(0, len(pixels), _CHUNK)]).std(0)
    shares = spread[:-2]   # colour mass and layout (see the module's note on the off-palette share)
    spread[-1] = np.sqrt((shares ** 2).mean())
    return spread


def _raw_features(x: np.ndarray) -> np.ndarray:
    n, size = len(x), x.shape[1]
    dist = np.linalg.norm(x[..., None, :] - _PALETTE, axis=-1)          # [N, H, W, colours]
    nearest = dist.argmin(-1)
    mass = np.stack([(nearest == k).mean(axis=(1, 2)) for k in range(len(_PALETTE))], 1)
    commonest = mass.argmax(1)
    foreground = (nearest != commonest[:, None, None]).astype(np.float64)
    cell = size // _GRID
    layout = foreground.reshape(n, _GRID, cell, _GRID, cell).mean(axis=(2, 4)).reshape(n, -1)
    steps = np.abs(np.concatenate([np.diff(x, axis=1).reshape(n, -1), np.diff(x, axis=2).reshape(n, -1)], 1))
    sharpness = (steps ** 2).sum(1) / np.maximum(steps.sum(1), 1e-6)
    off_palette = (dist.min(-1) > _OFF_PALETTE).mean(axis=(1, 2))
    return np.concatenate([mass, layout, sharpness[:, None], off_palette[:, None]], 1).astype(np.float64)


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(images, reference_images, value_range=None) -> float:
    """Fréchet distance between Gaussians fitted to the shape features of two sets of pictures
    (any sizes ≥ 2 each): |μ₁ − μ₂|² + tr(Σ₁ + Σ₂ − 2(Σ₁^½ Σ₂ Σ₁^½)^½). 0 for identical sets."""
    f1, f2 = _feature_pair(images, reference_images, value_range)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root1 = _psd_sqrt(s1)
    cross = np.linalg.eigvalsh(root1 @ s2 @ root1)  # eigenvalues of Σ₁^½ Σ₂ Σ₁^½ (symmetric PSD)
    trace_sqrt = float(np.sqrt(np.clip(cross, 0, None)).sum())
    distance = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)
    return max(distance, 0.0)  # rounding can leave −1e-16 for identical sets


def frechet_by_feature(images, reference_images, value_range=None) -> dict[str, float]:
    """Which features make :func:`frechet_distance`: each feature's own one-dimensional Fréchet
    distance, (μ₁ − μ₂)² + (σ₁ − σ₂)², in the same units. They add up to the distance of Gaussians
    with the features uncorrelated; the full distance also counts their correlations."""
    f1, f2 = _feature_pair(images, reference_images, value_range)
    terms = (f1.mean(0) - f2.mean(0)) ** 2 + (f1.std(0, ddof=1) - f2.std(0, ddof=1)) ** 2
    return dict(zip(FEATURE_NAMES, map(float, terms)))


def _feature_pair(images, reference_images, value_range) -> tuple[np.ndarray, np.ndarray]:
    f1, f2 = shape_features(images, value_range), shape_features(reference_images, value_range)
    for name, f in (("images", f1), ("reference_images", f2)):
        if len(f) < 2:
            raise ValueError(f"{name} must hold at least 2 pictures to fit a covariance, got {len(f)}")
    return f1, f2
