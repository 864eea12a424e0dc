"""The shapes world: 64×64 scenes of one or two flat objects on a plain background, and their captions.

A scene is a background colour and one or two objects, each a shape, a colour, a size and a cell
of a 3×3 grid. Everything is seeded: the same seed gives the same scenes, pixels and captions.
Captions come in one canonical form, ``a {size} {colour} {shape} {position}, {colour} background``,
and in paraphrases; :func:`parse_caption` reads either back into the scene it names.

The choices (colours far apart in RGB, small objects 18 px across, large 28 px, two objects never
in neighbouring cells) are made so that :mod:`fastdiff.shapes.evaluate` reads the pictures back
after JPEG or a VAE; see that module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from PIL import Image

__all__ = [
    "RESOLUTION", "COLOURS", "SHAPES", "SIZES", "POSITIONS", "CELL_CENTRES", "SIDES", "JITTER",
    "Obj", "Scene", "signed_distance", "render", "render_batch", "sample_scene", "caption", "parse_caption",
    "vocabulary", "scene_stream", "heldout_prompts", "HELDOUT_SEEDS", "batch_tensors",
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
SIDES = {"small": 18, "large": 28}  # pixels across: small covers ≥ 2×2 latent pixels of 8×8
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
# Cell centres are pulled in from the thirds (10.7, 32, 53.3) so a large object stays inside the
# frame; two objects only share a picture from non-neighbouring cells, 34 px apart, so even two
# large ones keep a gap of ≥ 6 - 2·JITTER px.
CELL_CENTRES = (15.0, 32.0, 49.0)
JITTER = 1.0  # ± pixels of seeded offset per axis

# Ordered pairs of cells at least two rows or columns apart.
_PAIRS = [
    (a, b) for a in range(9) for b in range(9)
    if max(abs(a % 3 - b % 3), abs(a // 3 - b // 3)) >= 2
]


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str
    # A rendering detail, not an attribute: two objects that differ only here are equal.
    offset: tuple[float, float] = field(default=(0.0, 0.0), compare=False)


@dataclass
class Scene:
    background: str
    objects: list[Obj] = field(default_factory=list)


# --- drawing -----------------------------------------------------------------------------------

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
_PALETTE_U8 = _PALETTE.astype(np.uint8)
_WINDOW = 32  # every object, jittered and anti-aliased, fits a 32×32 window
_LOCAL = np.arange(_WINDOW)


def signed_distance(shape: str, dx, dy, r):
    """Signed distance (px, negative inside) of points at offset (dx, dy) from the centre of a
    `shape` of half-size `r` (half its box's side). Arrays broadcast; the evaluator uses it too."""
    dx = np.abs(dx)
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(dx, np.abs(dy)) - r
    # upright triangle in the same box: apex at the top middle, base along the bottom
    return np.maximum(dy - r, (2 * dx - dy - r) * np.float32(1 / np.sqrt(5)))


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """Draw `scenes` as uint8 [n, 64, 64, 3], all at once (numpy, no Python loop over pixels).

    Coverage of a pixel is ½ minus the signed distance of its centre, clipped to [0, 1]: cheap
    anti-aliasing that keeps edges a clean one-pixel blend. Each object is drawn in a 32×32
    window around it rather than over the whole picture, 4× less work.
    """
    n = len(scenes)
    backgrounds = _PALETTE_U8[[_COLOUR_INDEX[s.background] for s in scenes]]
    out = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    for c in range(3):  # channel by channel: numpy fills these strided rows ~6× faster
        out[..., c] = backgrounds[:, c, None, None]
    centres = np.array(CELL_CENTRES, dtype=np.float32)
    # Objects of one scene never overlap, so drawing the first objects of all scenes, then the
    # second ones, gives the same pixels as drawing scene by scene (and no pixel twice per pass).
    for k in range(max((len(s.objects) for s in scenes), default=0)):
        rows = [(i, s.objects[k]) for i, s in enumerate(scenes) if len(s.objects) > k]
        for shape in SHAPES:
            picked = [(i, o) for i, o in rows if o.shape == shape]
            if not picked:
                continue
            idx = np.array([i for i, _ in picked])
            cell = np.array([POSITIONS.index(o.position) for _, o in picked])
            off = np.array([o.offset for _, o in picked], dtype=np.float32).reshape(-1, 2)
            cx, cy = centres[cell % 3] + off[:, 0], centres[cell // 3] + off[:, 1]
            r = np.array([SIDES[o.size] / 2 for _, o in picked], dtype=np.float32)
            x0 = np.clip(np.rint(cx).astype(int) - _WINDOW // 2, 0, RESOLUTION - _WINDOW)
            y0 = np.clip(np.rint(cy).astype(int) - _WINDOW // 2, 0, RESOLUTION - _WINDOW)
            xs, ys = x0[:, None] + _LOCAL, y0[:, None] + _LOCAL  # [m, 32] pixel indices
            dx = (xs + np.float32(0.5) - cx[:, None])[:, None, :]
            dy = (ys + np.float32(0.5) - cy[:, None])[:, :, None]
            sd = signed_distance(shape, dx, dy, r[:, None, None])
            cover = np.clip(0.5 - sd, 0, 1)[..., None]
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


def sample_scene(rng, two_objects_prob: float = 0.5, jitter: bool = True) -> Scene:
    """A random scene from `rng` (a numpy Generator or a seed): one object, or two with `two_objects_prob`.

    Object colours differ from the background; two objects sit in non-neighbouring cells.
    """
    rng = _rng(rng)
    names = list(COLOURS)
    background = names[rng.integers(len(names))]
    if rng.random() < two_objects_prob:
        cells = _PAIRS[rng.integers(len(_PAIRS))]
    else:
        cells = (int(rng.integers(9)),)
    objects = []
    for cell in cells:
        colour = names[rng.integers(len(names) - 1)]
        if colour == background:  # draw from the other nine colours, evenly
            colour = names[-1]
        offset = tuple(round(float(v), 2) for v in rng.uniform(-JITTER, JITTER, 2)) if jitter else (0.0, 0.0)
        objects.append(Obj(SHAPES[rng.integers(3)], colour, SIZES[rng.integers(2)], POSITIONS[cell], offset))
    return Scene(background, objects)


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
_TEMPLATES = [
    "{objects}, {background} background",
    "{background} background with {objects}",
    "a {background} background with {objects}",
    "{objects} on a {background} background",
    "{objects} against a {background} background",
]


def caption(scene: Scene, style: str = "canonical", rng=None) -> str:
    """Describe `scene`: the canonical form, or with ``style="paraphrase"`` a wording drawn from `rng`.

    Canonical: ``a small red circle on the left and a large blue square at the top right, white background``.
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
    phrases = [
        f"a {pick(_SIZE_WORDS[o.size])} {o.colour} {o.shape} {pick(_POSITION_WORDS[o.position])}"
        for o in scene.objects
    ]
    if not phrases:
        return f"{scene.background} background"
    text = template.format(objects=" and ".join(phrases), background=scene.background)
    # Only a background can follow a bare "a" (object phrases start "a small"/"a large"...).
    return text.replace("a orange background", "an orange background")


def _alternatives(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_WORD_OF = {w: s for s, ws in _SIZE_WORDS.items() for w in ws}
_PHRASE_OF = {w: p for p, ws in _POSITION_WORDS.items() for w in ws}
_OBJECT_RE = re.compile(
    rf"\b({_alternatives(_WORD_OF)}) ({_alternatives(COLOURS)}) ({_alternatives(SHAPES)}) "
    rf"({_alternatives(_PHRASE_OF)})\b"
)
_BACKGROUND_RE = re.compile(rf"\b({_alternatives(COLOURS)}) background\b")


def parse_caption(text: str) -> Scene:
    """The scene a canonical or paraphrased caption names (offsets zero); ValueError if it names none."""
    text = " ".join(text.lower().split())
    background = _BACKGROUND_RE.search(text)
    if background is None:
        raise ValueError(f"no '<colour> background' in caption {text!r}")
    objects = [
        Obj(shape, colour, _WORD_OF[size], _PHRASE_OF[where])
        for size, colour, shape, where in _OBJECT_RE.findall(text)
    ]
    return Scene(background.group(1), objects)


def vocabulary() -> list[str]:
    """Every word a caption can hold, sorted (commas aside): for a word-level CLIP tokenizer."""
    texts = [*COLOURS, *SHAPES, *_WORD_OF, *_PHRASE_OF, "and", "an", *_TEMPLATES]
    words = set()
    for text in texts:
        words.update(re.sub(r"\{\w+\}|,", " ", text).split())
    return sorted(words)


# --- streams -----------------------------------------------------------------------------------

def _sample_item(rng: np.random.Generator, two_objects_prob: float, paraphrase_prob: float):
    scene = sample_scene(rng, two_objects_prob)
    style = "paraphrase" if rng.random() < paraphrase_prob else "canonical"
    return scene, caption(scene, style, rng)


def scene_stream(seed: int, two_objects_prob: float = 0.5, paraphrase_prob: float = 0.5,
                 chunk: int = 64) -> Iterator[tuple[Image.Image, str, Scene]]:
    """Endless seeded (image, caption, scene) triples; the same as :func:`batch_tensors` draws from
    ``numpy.random.default_rng(seed)``. Pictures are drawn `chunk` at a time, which is faster."""
    rng = np.random.default_rng(seed)
    while True:
        items = [_sample_item(rng, two_objects_prob, paraphrase_prob) for _ in range(chunk)]
        pixels = render_batch([scene for scene, _ in items])
        for (scene, text), image in zip(items, pixels):
            yield Image.fromarray(image, "RGB"), text, scene


def batch_tensors(n: int, rng, two_objects_prob: float = 0.5,
                  paraphrase_prob: float = 0.5) -> tuple[torch.Tensor, list[str]]:
    """`n` random scenes as a float tensor [n, 3, 64, 64] in [-1, 1] and their captions."""
    rng = _rng(rng)
    items = [_sample_item(rng, two_objects_prob, paraphrase_prob) for _ in range(n)]
    pixels = torch.from_numpy(render_batch([scene for scene, _ in items]))
    images = pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
    return images, [text for _, text in items]


HELDOUT_SEEDS = {"one": 20_250_001, "two": 20_250_002}


def heldout_prompts(kind: str = "one", count: int = 256, seed: int | None = None) -> list[tuple[str, Scene]]:
    """A fixed evaluation set: `count` distinct canonical captions with their scenes (no offsets).

    ``kind="one"`` holds one-object scenes, ``"two"`` two-object scenes. The default seeds
    (:data:`HELDOUT_SEEDS`) are not ones training uses by convention (0, 1, ...), so the set is
    fixed and documented; it is not checked to be disjoint from any training stream.
    """
    if kind not in HELDOUT_SEEDS:
        raise ValueError(f"kind must be 'one' or 'two', got {kind!r}")
    rng = np.random.default_rng(HELDOUT_SEEDS[kind] if seed is None else seed)
    prompts: dict[str, Scene] = {}
    for _ in range(100 * count):  # far more draws than a possible `count` needs
        if len(prompts) == count:
            break
        scene = sample_scene(rng, two_objects_prob=float(kind == "two"), jitter=False)
        prompts.setdefault(caption(scene), scene)
    else:
        raise ValueError(f"could not draw {count} distinct {kind}-object prompts")
    return list(prompts.items())
