"""The shapes world (world 2): 64×64 scenes of one to three flat objects on a plain background, and
captions that leave much of each scene free.

A scene is a background colour and one to three objects. Each object has four *attributes* — a
shape, a colour, a size class and a cell of a 3×3 grid — and *details* drawn freely inside them: its
centre anywhere in its cell (as far as the frame allows), its exact size inside the class, and a
turn of up to ±15° for squares and triangles. A caption states the shape and colour of every object and may
leave out its size, its position and the background: unstated attributes are drawn from the world's
distribution. So many pictures fit one caption, the one-step conditional mean is a smear, and only
real sampling draws one sharp scene.

Everything is seeded: the same seed gives the same scenes, pixels and captions. Captions come in a
canonical form, ``a {size} {colour} {shape} {position}, {colour} background`` with the unstated parts
left out, and in paraphrases; :func:`parse_caption` reads either back into the partial scene it
names (``None`` for what it leaves free), and :func:`realise` draws a full scene that fits one.

The numbers (colours far apart in RGB, size classes apart in area, centres kept off the cell lines,
objects apart by a gap) are chosen so that :mod:`fastdiff.shapes.evaluate` reads the pictures back
after JPEG or a VAE; see that module.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ..checks import check_int

__all__ = [
    "RESOLUTION", "COLOURS", "SHAPES", "SIZES", "SIZE_RANGES", "SIZE_CUT", "POSITIONS", "CELL_BOUNDS",
    "SYMMETRY", "TURN_RANGE", "FILL", "OBJECT_COUNTS", "HIDE_PROBABILITY", "HELDOUT_KINDS", "HELDOUT_SEEDS",
    "Obj", "Scene", "signed_turn", "signed_distance", "render", "render_batch", "sample_scene", "realise", "hide",
    "caption", "parse_caption", "reshape", "vocabulary", "scene_stream", "heldout_prompts", "batch_scenes", "scene_tensors", "batch_tensors",
]

RESOLUTION = 64  # pixels per side

# Named colours, at least ~90 apart in RGB (the closest pair is orange/yellow), so JPEG noise and
# a VAE's colour drift never move a flat area to another name. Gray is 120, not 128: every colour
# but white then has a channel below the middle, so a [-1, 1] picture always has a negative value
# (evaluate uses that to tell [-1, 1] from [0, 1]).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (245, 230, 40),
    "green": (30, 170, 50),
    "cyan": (30, 210, 220),
    "blue": (30, 60, 220),
    "purple": (140, 40, 190),
    "white": (250, 250, 250),
    "gray": (120, 120, 120),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

# An object's size is its *nominal diameter* s, uniform inside its class: a circle of diameter s,
# a square of side 0.85·s, an equilateral triangle of side 1.15·s — about equal areas, so size
# reads alike whatever the shape. The classes are 1.44× apart in area at their closest edges.
SIZE_RANGES = {"small": (14.0, 20.0), "large": (24.0, 32.0)}
SIZE_CUT = 22.0  # nominal diameters below are small, above are large
_SQUARE_SIDE, _TRIANGLE_SIDE = 0.85, 1.15
FILL = {  # area / s², per shape
    "circle": math.pi / 4,
    "square": _SQUARE_SIDE ** 2,
    "triangle": math.sqrt(3) / 4 * _TRIANGLE_SIDE ** 2,
}
SYMMETRY = {"circle": 360.0, "square": 90.0, "triangle": 120.0}  # degrees after which a shape repeats
# Squares and triangles are turned by up to this many degrees either way from upright. Turned over
# their whole symmetry, every shape's average over turns is a round blob: the model's estimate of
# x0 before the turn is settled is then the same blob for all three shapes, and an 8×8-latent
# model trained on the CPU drew blobs (shape 35–51%, BENCHMARKS). Within ±15° the average keeps the
# corners, so the shape word has something to steer.
TURN_RANGE = 15.0

# Cell lines along each axis: a centre left of 22 px is in the left column, right of 42 px in the
# right one. Centres stay 1.5 px off these lines (so a read-back centre is never borderline), objects
# 1.5 px inside the frame (a triangle's anti-aliased tip reaches 1 px past it) and 3 px apart (so no JPEG or VAE blur joins them).
CELL_BOUNDS = (0.0, 22.0, 42.0, float(RESOLUTION))
_CELL_MARGIN, _FRAME_MARGIN, _GAP = 1.5, 1.5, 3.0

OBJECT_COUNTS = {1: 0.4, 2: 0.35, 3: 0.25}  # how many objects a training scene holds
# In training captions each object's size and position and the scene's background are left out
# with this probability, each on its own.
HIDE_PROBABILITY = 0.3


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str | None = None        # None: left free by a caption
    position: str | None = None    # None: left free by a caption
    # Details, not attributes: drawn inside what the attributes allow; two objects that differ
    # only here are equal.
    centre: tuple[float, float] | None = field(default=None, compare=False)  # px (x, y)
    diameter: float | None = field(default=None, compare=False)              # nominal, px
    angle: float = field(default=0.0, compare=False)                         # degrees, clockwise

    @property
    def drawable(self) -> bool:
        return self.centre is not None and self.diameter is not None


@dataclass
class Scene:
    background: str | None          # None: left free by a caption
    objects: list[Obj] = field(default_factory=list)


# --- geometry ----------------------------------------------------------------------------------

def _unit_outline(shape: str) -> list[tuple[float, float]]:
    """Vertices of a nominal-diameter-1 shape at angle 0, about its centre (a 32-gon for the circle)."""
    if shape == "square":
        h = _SQUARE_SIDE / 2
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":  # apex up; its centroid is the centre
        r = _TRIANGLE_SIDE / math.sqrt(3)
        return [(r * math.sin(a), -r * math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
    return [(0.5 * math.cos(a), 0.5 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 32, endpoint=False)]


_OUTLINES = {s: _unit_outline(s) for s in SHAPES}


def _outline(obj: Obj) -> list[tuple[float, float]]:
    """The object's vertices in pixels."""
    c, s = math.cos(math.radians(obj.angle)), math.sin(math.radians(obj.angle))
    (x, y), d = obj.centre, obj.diameter
    return [(x + d * (c * u - s * v), y + d * (s * u + c * v)) for u, v in _OUTLINES[obj.shape]]


def signed_turn(shape: str, angle: float) -> float:
    """`angle` (degrees, as stored: in [0, the shape's symmetry)) as a turn either way from
    upright, in (-symmetry/2, symmetry/2]."""
    period = SYMMETRY[shape]
    turn = angle % period
    return turn - period if turn > period / 2 else turn


def _apart(a: list[tuple[float, float]], b: list[tuple[float, float]], gap: float) -> bool:
    """Whether two convex outlines are at least `gap` apart along one of their edge normals."""
    for poly in (a, b):
        for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
            nx, ny = y1 - y0, x0 - x1
            norm = math.hypot(nx, ny)
            pa = [(x * nx + y * ny) / norm for x, y in a]
            pb = [(x * nx + y * ny) / norm for x, y in b]
            if min(pb) - max(pa) >= gap or min(pa) - max(pb) >= gap:
                return True
    return False


def signed_distance(shape: str, dx, dy, r, angle=0.0):
    """Signed distance (px, negative inside) of points at offset (dx, dy) from the centre of a
    `shape` of nominal radius `r` (half its nominal diameter) turned by `angle` degrees. Arrays
    broadcast; the evaluator uses it too."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    theta = np.radians(angle)
    c, s = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
    u, v = c * dx + s * dy, c * dy - s * dx  # the point in the shape's own frame
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - r * np.float32(_SQUARE_SIDE)
    # equilateral triangle: the farthest of its three edge lines, each at the inradius
    inradius = r * np.float32(_TRIANGLE_SIDE / math.sqrt(3))  # = side / (2√3) for side 1.15·2r
    h = np.float32(math.sqrt(3) / 2)
    return np.maximum(np.maximum(v, h * u - v / 2), -h * u - v / 2) - inradius


# --- drawing -----------------------------------------------------------------------------------

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
_PALETTE_U8 = _PALETTE.astype(np.uint8)
_WINDOW = 36  # every object, turned and anti-aliased, fits a 36×36 window
_LOCAL = np.arange(_WINDOW)


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """Draw `scenes` (full ones, as :func:`sample_scene` or :func:`realise` make) as uint8
    [n, 64, 64, 3], all at once.

    Coverage of a pixel is ½ minus the signed distance of its centre, clipped to [0, 1]: cheap
    anti-aliasing that keeps edges a clean one-pixel blend. Each object is drawn in a window
    around it rather than over the whole picture.
    """
    for s in scenes:
        if s.background is None or not all(o.drawable for o in s.objects):
            raise ValueError("render needs full scenes (a background, and every object's centre and "
                             "diameter): draw one with realise(scene, rng)")
    n = len(scenes)
    backgrounds = _PALETTE_U8[[_COLOUR_INDEX[s.background] for s in scenes]]
    out = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    for c in range(3):  # channel by channel: numpy fills these strided rows ~6× faster
        out[..., c] = backgrounds[:, c, None, None]
    # Objects of one scene never overlap, so drawing the first objects of all scenes, then the
    # second ones, gives the same pixels as drawing scene by scene.
    for k in range(max((len(s.objects) for s in scenes), default=0)):
        rows = [(i, s.objects[k]) for i, s in enumerate(scenes) if len(s.objects) > k]
        for shape in SHAPES:
            picked = [(i, o) for i, o in rows if o.shape == shape]
            if not picked:
                continue
            idx = np.array([i for i, _ in picked])
            cx = np.array([o.centre[0] for _, o in picked], dtype=np.float32)
            cy = np.array([o.centre[1] for _, o in picked], dtype=np.float32)
            r = np.array([o.diameter / 2 for _, o in picked], dtype=np.float32)[:, None, None]
            angle = np.array([o.angle for _, o in picked], dtype=np.float32)[:, None, None]
            x0 = np.clip(np.rint(cx).astype(int) - _WINDOW // 2, 0, RESOLUTION - _WINDOW)
            y0 = np.clip(np.rint(cy).astype(int) - _WINDOW // 2, 0, RESOLUTION - _WINDOW)
            xs, ys = x0[:, None] + _LOCAL, y0[:, None] + _LOCAL  # [m, window] pixel indices
            dx = (xs + np.float32(0.5) - cx[:, None])[:, None, :]
            dy = (ys + np.float32(0.5) - cy[:, None])[:, :, None]
            cover = np.clip(0.5 - signed_distance(shape, dx, dy, r, angle), 0, 1)[..., None]
            where = (idx[:, None, None], ys[:, :, None], xs[:, None, :])
            base = out[where].astype(np.float32)
            colour = _PALETTE[[_COLOUR_INDEX[o.colour] for _, o in picked]][:, None, None, :]
            blend = np.subtract(colour, base)  # base + cover·(colour - base), in place
            blend *= cover
            blend += base
            out[where] = np.rint(blend, out=blend).astype(np.uint8)
    return out


def render(scene: Scene) -> Image.Image:
    """The scene as a 64×64 RGB picture; the same scene always gives the same pixels."""
    return Image.fromarray(render_batch([scene])[0], "RGB")


# --- sampling ----------------------------------------------------------------------------------

def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _centre_range(cell: int, half_extent: float) -> tuple[float, float]:
    """Where a centre may lie along one axis: inside grid column/row `cell`, off the cell lines,
    and far enough from the frame for an object reaching `half_extent` px from its centre."""
    lo, hi = CELL_BOUNDS[cell], CELL_BOUNDS[cell + 1]
    lo = max(lo + _CELL_MARGIN if cell > 0 else lo, half_extent + _FRAME_MARGIN)
    hi = min(hi - _CELL_MARGIN if cell < 2 else hi, RESOLUTION - half_extent - _FRAME_MARGIN)
    return lo, hi


def _place(obj: Obj, rng: np.random.Generator) -> Obj | None:
    """`obj` (all attributes set) with details drawn: a diameter in its class, a turn, a centre in
    its cell. None when the drawn size and turn leave no room in the cell."""
    diameter = round(float(rng.uniform(*SIZE_RANGES[obj.size])), 2)
    angle = round(float(rng.uniform(-TURN_RANGE, TURN_RANGE)), 1) % SYMMETRY[obj.shape]
    angle = angle if obj.shape != "circle" else 0.0  # a circle's turn shows nothing
    probe = replace(obj, centre=(0.0, 0.0), diameter=diameter, angle=angle)
    outline = _outline(probe)
    ex, ey = max(abs(x) for x, _ in outline), max(abs(y) for _, y in outline)
    cell = POSITIONS.index(obj.position)
    (x_lo, x_hi), (y_lo, y_hi) = _centre_range(cell % 3, ex), _centre_range(cell // 3, ey)
    if x_lo > x_hi or y_lo > y_hi:
        return None
    centre = (round(float(rng.uniform(x_lo, x_hi)), 2), round(float(rng.uniform(y_lo, y_hi)), 2))
    return replace(probe, centre=centre)


_LAYOUT_TRIES = 30    # detail draws per choice of free attributes
_ATTRIBUTE_TRIES = 200  # choices of free attributes before a scene is called impossible


def _fill(scene: Scene, rng: np.random.Generator) -> Scene:
    """One draw of the free attributes: a background unlike every object, a size class, and
    distinct cells (stated cells kept)."""
    objects = []
    taken = {o.position for o in scene.objects if o.position is not None}
    for o in scene.objects:
        size = o.size or SIZES[rng.integers(len(SIZES))]
        position = o.position
        if position is None:
            free = [p for p in POSITIONS if p not in taken]
            position = free[rng.integers(len(free))]
            taken.add(position)
        objects.append(Obj(o.shape, o.colour, size, position))
    background = scene.background
    if background is None:
        used = {o.colour for o in scene.objects}
        free = [c for c in COLOURS if c not in used]
        background = free[rng.integers(len(free))]
    return Scene(background, objects)


def _layout(full: Scene, rng: np.random.Generator) -> Scene | None:
    """Details for every object of `full` (all attributes set) with the objects apart, or None
    when :data:`_LAYOUT_TRIES` draws find no room."""
    for _ in range(_LAYOUT_TRIES):
        placed = [_place(o, rng) for o in full.objects]
        if any(p is None for p in placed):
            continue
        outlines = [_outline(p) for p in placed]
        if all(_apart(outlines[i], outlines[j], _GAP) for i in range(len(placed)) for j in range(i)):
            return Scene(full.background, placed)
    return None


def realise(scene: Scene, rng) -> Scene:
    """A full scene that fits `scene`: its unstated attributes drawn from the world's distribution,
    and every object's details (centre, diameter, turn) drawn inside its attributes, with the
    objects apart. ValueError if the stated attributes leave no room (e.g. three large triangles in
    one row), or if two objects are stated in one cell."""
    rng = _rng(rng)
    stated = [o.position for o in scene.objects if o.position is not None]
    if len(set(stated)) < len(stated):
        raise ValueError(f"two objects stated in one cell: {stated}")
    if not 1 <= len(scene.objects) <= 3:
        raise ValueError(f"a scene holds 1 to 3 objects, got {len(scene.objects)}")
    for _ in range(_ATTRIBUTE_TRIES):  # fully stated scenes, too: a tight layout needs many draws
        placed = _layout(_fill(scene, rng), rng)
        if placed is not None:
            return placed
    raise ValueError(f"no layout fits {scene}")


def sample_scene(rng, objects: int | None = None) -> Scene:
    """A random full scene from `rng` (a numpy Generator or a seed) with `objects` objects (1–3;
    None draws the count from :data:`OBJECT_COUNTS`).

    Attributes are drawn independently (object colours unlike the background, cells distinct);
    a draw whose objects find no room is drawn again whole, so a scene is the world's distribution
    conditioned on its objects fitting — the same that :func:`realise` draws from.
    """
    rng = _rng(rng)
    if objects is None:
        counts = list(OBJECT_COUNTS)
        objects = counts[rng.choice(len(counts), p=list(OBJECT_COUNTS.values()))]
    objects = check_int(objects, "objects", 1, 3)
    names = list(COLOURS)
    while True:  # ends: most draws fit (a scene of three large triangles in one row does not)
        background = names[rng.integers(len(names))]
        others = [c for c in names if c != background]
        cells = rng.permutation(len(POSITIONS))[:objects]
        full = Scene(background, [
            Obj(SHAPES[rng.integers(len(SHAPES))], others[rng.integers(len(others))],
                SIZES[rng.integers(len(SIZES))], POSITIONS[c])
            for c in cells
        ])
        placed = _layout(full, rng)
        if placed is not None:
            return placed


def hide(scene: Scene, rng, probability: float = HIDE_PROBABILITY) -> Scene:
    """What a caption of `scene` states: each object's size and position and the background left
    out with `probability` each (details dropped)."""
    rng = _rng(rng)
    objects = [Obj(o.shape, o.colour,
                   None if rng.random() < probability else o.size,
                   None if rng.random() < probability else o.position)
               for o in scene.objects]
    background = None if rng.random() < probability else scene.background
    return Scene(background, objects)


def _attributes(scene: Scene) -> Scene:
    """The scene's attributes alone (details dropped)."""
    return Scene(scene.background, [Obj(o.shape, o.colour, o.size, o.position) for o in scene.objects])


# --- captions ----------------------------------------------------------------------------------

_CANONICAL_POSITION = {
    "center": "in the center", "left": "on the left", "right": "on the right",
    "top": "at the top", "bottom": "at the bottom",
    **{p: f"at the {p}" for p in POSITIONS if " " in p},
}
# Paraphrases may use any of these; the canonical word or phrase comes first.
_POSITION_WORDS = {
    p: [_CANONICAL_POSITION[p]] + (
        ["in the middle"] if p == "center"
        else [f"on the {p} side"] if p in ("left", "right")
        else [f"in the {p} corner"] if " " in p
        else []
    )
    for p in POSITIONS
}
_SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}
_TEMPLATES = [  # with a background; the first is canonical
    "{objects}, {background} background",
    "{background} background with {objects}",
    "a {background} background with {objects}",
    "{objects} on a {background} background",
    "{objects} against a {background} background",
]


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(scene: Scene, style: str = "canonical", rng=None) -> str:
    """Describe what `scene` states (its ``None`` attributes left out): the canonical form, or with
    ``style="paraphrase"`` a wording drawn from `rng`.

    Canonical: ``a small red circle on the left and a blue square, white background``.
    """
    if style not in ("canonical", "paraphrase"):
        raise ValueError(f"style must be 'canonical' or 'paraphrase', got {style!r}")
    if style == "canonical":
        def pick(options):
            return options[0]
        template = _TEMPLATES[0]
    else:
        rng = _rng(rng)

        def pick(options):
            return options[rng.integers(len(options))] if len(options) > 1 else options[0]
        template = pick(_TEMPLATES)
    phrases = []
    for o in scene.objects:
        words = [pick(_SIZE_WORDS[o.size])] if o.size is not None else []
        words += [o.colour, o.shape]
        if o.position is not None:
            words.append(pick(_POSITION_WORDS[o.position]))
        phrases.append(_with_article(" ".join(words)))
    objects = " and ".join(phrases)
    if scene.background is None:
        if not phrases:
            raise ValueError("a scene with no objects and no background has no caption")
        return objects
    if not phrases:
        return f"{scene.background} background"
    text = template.format(objects=objects, background=scene.background)
    # Only a background can follow a bare "a" (object phrases carry their own article).
    return text.replace("a orange background", "an orange background")


def _alternatives(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_WORD_OF = {w: s for s, ws in _SIZE_WORDS.items() for w in ws}
_PHRASE_OF = {w: p for p, ws in _POSITION_WORDS.items() for w in ws}
_OBJECT_RE = re.compile(
    rf"\ban? (?:({_alternatives(_WORD_OF)}) )?({_alternatives(COLOURS)}) ({_alternatives(SHAPES)})"
    rf"(?: ({_alternatives(_PHRASE_OF)}))?\b"
)
_BACKGROUND_RE = re.compile(rf"\b({_alternatives(COLOURS)}) background\b")


def parse_caption(text: str) -> Scene:
    """The partial scene a canonical or paraphrased caption names: what it leaves out is ``None``.
    ValueError if it names neither an object nor a background."""
    text = " ".join(text.lower().split())
    background = _BACKGROUND_RE.search(text)
    objects = [
        Obj(shape, colour, _WORD_OF.get(size), _PHRASE_OF.get(where))
        for size, colour, shape, where in _OBJECT_RE.findall(text)
    ]
    if background is None and not objects:
        raise ValueError(f"caption {text!r} names no '<colour> <shape>' and no '<colour> background'")
    return Scene(background.group(1) if background else None, objects)


def reshape(scene: Scene, text: str, index: int, shape: str) -> tuple[Scene, str]:
    """`scene` and its caption `text` with object `index` turned into `shape`: drawn so (its place,
    size and turn kept) and named so (the rest of the wording kept)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    named = list(_OBJECT_RE.finditer(text))
    if len(named) != len(scene.objects):
        raise ValueError(f"caption {text!r} names {len(named)} objects, the scene holds {len(scene.objects)}")
    if not 0 <= index < len(named):
        raise ValueError(f"index must be in [0, {len(named)}), got {index}")
    word = named[index].span(3)
    objects = list(scene.objects)
    objects[index] = replace(objects[index], shape=shape)
    return replace(scene, objects=objects), text[:word[0]] + shape + text[word[1]:]


def vocabulary() -> list[str]:
    """Every word a caption can hold, sorted (commas aside): for a word-level CLIP tokenizer."""
    texts = [*COLOURS, *SHAPES, *_WORD_OF, *_PHRASE_OF, "a", "an", "and", *_TEMPLATES]
    words = set()
    for text in texts:
        words.update(re.sub(r"\{\w+\}|,", " ", text).split())
    return sorted(words)


# --- streams -----------------------------------------------------------------------------------

def _sample_item(rng: np.random.Generator, paraphrase_prob: float, hide_prob: float):
    scene = sample_scene(rng)
    style = "paraphrase" if rng.random() < paraphrase_prob else "canonical"
    return scene, caption(hide(scene, rng, hide_prob), style, rng)


def scene_stream(seed: int, paraphrase_prob: float = 0.5, hide_prob: float = HIDE_PROBABILITY,
                 chunk: int = 64) -> Iterator[tuple[Image.Image, str, Scene]]:
    """Endless seeded (image, caption, scene) triples, the same as :func:`batch_tensors` draws from
    ``numpy.random.default_rng(seed)``. The caption states part of the scene (:func:`hide`).
    Pictures are drawn `chunk` at a time, which is faster."""
    rng = np.random.default_rng(seed)
    while True:
        items = [_sample_item(rng, paraphrase_prob, hide_prob) for _ in range(chunk)]
        pixels = render_batch([scene for scene, _ in items])
        for (scene, text), image in zip(items, pixels):
            yield Image.fromarray(image, "RGB"), text, scene


def batch_scenes(n: int, rng, paraphrase_prob: float = 0.5,
                 hide_prob: float = HIDE_PROBABILITY) -> tuple[list[Scene], list[str]]:
    """`n` random drawable scenes and their captions (the draws :func:`batch_tensors` makes)."""
    rng = _rng(rng)
    items = [_sample_item(rng, paraphrase_prob, hide_prob) for _ in range(n)]
    return [scene for scene, _ in items], [text for _, text in items]


def scene_tensors(scenes: list[Scene]) -> torch.Tensor:
    """Drawable scenes as a float tensor [n, 3, 64, 64] in [-1, 1]."""
    return torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)


def batch_tensors(n: int, rng, paraphrase_prob: float = 0.5,
                  hide_prob: float = HIDE_PROBABILITY) -> tuple[torch.Tensor, list[str]]:
    """`n` random scenes as a float tensor [n, 3, 64, 64] in [-1, 1] and their captions."""
    scenes, captions = batch_scenes(n, rng, paraphrase_prob, hide_prob)
    return scene_tensors(scenes), captions


# Fixed evaluation sets: "one", "two", "three" objects with every attribute stated, and "unstated":
# one object whose caption leaves out a non-empty set of {size, position, background}.
HELDOUT_KINDS = ("one", "two", "three", "unstated")
HELDOUT_SEEDS = {"one": 20_260_001, "two": 20_260_002, "three": 20_260_003, "unstated": 20_260_004}


def _heldout_scene(kind: str, rng: np.random.Generator) -> Scene:
    if kind != "unstated":
        return _attributes(sample_scene(rng, objects=HELDOUT_KINDS.index(kind) + 1))
    scene = _attributes(sample_scene(rng, objects=1))
    hidden = [False, False, False]
    while not any(hidden):
        hidden = [bool(rng.random() < 0.5) for _ in hidden]
    (o,) = scene.objects
    return Scene(None if hidden[2] else scene.background,
                 [Obj(o.shape, o.colour, None if hidden[0] else o.size, None if hidden[1] else o.position)])


def heldout_prompts(kind: str = "one", count: int = 256, seed: int | None = None) -> list[tuple[str, Scene]]:
    """A fixed evaluation set: `count` distinct canonical captions with the (partial) scenes they
    state (attributes only; :func:`realise` draws pictures of them).

    The default seeds (:data:`HELDOUT_SEEDS`) are not ones training uses by convention (0, 1, ...),
    so the set is fixed and documented; it is not checked to be disjoint from any training stream.
    """
    if kind not in HELDOUT_SEEDS:
        raise ValueError(f"kind must be one of {HELDOUT_KINDS}, got {kind!r}")
    check_int(count, "count", 1, 10_000)   # the world has a few thousand distinct one-object captions
    check_int(seed, "seed", 0, optional=True)
    rng = np.random.default_rng(HELDOUT_SEEDS[kind] if seed is None else seed)
    prompts: dict[str, Scene] = {}
    for _ in range(100 * count):  # far more draws than a possible `count` needs
        if len(prompts) == count:
            break
        scene = _heldout_scene(kind, rng)
        prompts.setdefault(caption(scene), scene)
    else:
        raise ValueError(f"could not draw {count} distinct {kind!r} prompts")
    return list(prompts.items())


TUNING_SEEDS = {"one": 7_001, "two": 7_002, "three": 7_003, "unstated": 7_004}


def tuning_prompts(role: str = "search", count: int = 48, repeats: int = 1, kinds=HELDOUT_KINDS) -> list[str]:
    """Prompts for the offline tuning tools: ``role="search"`` draws `count` from the tuning seeds
    (none of them in the held-out sets), ``"eval"`` takes them from the held-out sets; an equal
    share of each of `kinds` (by default one, two, three objects, unstated attributes). Each
    unstated prompt comes `repeats` times in a row (each row gets noise of its own), so that a judge
    can measure the coverage of what those prompts leave free (it needs ≥ 2 pictures of a prompt)."""
    check_int(count, "count", 1)
    check_int(repeats, "repeats", 1)
    if role not in ("search", "eval"):
        raise ValueError(f"role must be 'search' or 'eval', got {role!r}")
    if isinstance(kinds, str) or not kinds or any(kind not in HELDOUT_KINDS for kind in kinds):
        raise ValueError(f"kinds must be some of {HELDOUT_KINDS}, got {kinds!r}")
    shares = [count // len(kinds) + (i < count % len(kinds)) for i in range(len(kinds))]
    prompts = []
    for kind, share in zip(kinds, shares):
        if not share:
            continue
        if role == "eval":
            drawn = [p for p, _ in heldout_prompts(kind, share)]
        else:
            held = {p for p, _ in heldout_prompts(kind, 256)}
            drawn = [p for p, _ in heldout_prompts(kind, share + 64, seed=TUNING_SEEDS[kind]) if p not in held][:share]
        prompts += [p for p in drawn for _ in range(repeats if kind == "unstated" else 1)]
    return prompts
