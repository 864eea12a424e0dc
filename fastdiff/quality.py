"""The quality of a sampling configuration on a shapes-world model: one table row per (steps, CFG mode).

Each row generates the held-out prompts of the shapes world from fixed seeds through
:func:`fastdiff.accelerate` (the stream's own step and guidance code, so a stream with the same
timesteps, solver and CFG mode gives the same pictures — the stream tests check that equality) and
measures, from :mod:`fastdiff.shapes.metrics`:

- prompt accuracy on one-, two- and three-object prompts and on prompts that leave attributes
  unstated (only what a prompt states is scored);
- coverage of what the unstated prompts leave free, over several seeds per prompt;
- PSNR against a many-step ``full``-CFG teacher on the same seeds and initial noise;
- the Fréchet shape distance to rendered scenes of the same prompts;
- seconds per image.

It sits above the front doors (it drives ``accelerate``), not in :mod:`fastdiff.shapes`, which is the
yardstick and imports nothing above the sampling layer.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .checks import MAX_SEED, check_choice, check_int
from .sampling.guidance import CFG_MODES
from .shapes.metrics import coverage, frechet_distance, paired_psnr, prompt_accuracy
from .shapes.render import heldout_prompts, realise, render_batch

__all__ = ["QualityRow", "Prompts", "held_out", "generate", "teacher_pictures", "quality_row", "quality_table",
           "format_table", "rows_as_dicts", "SOLVERS"]

# DDIM's deterministic step; LCM's x̂0 re-noised to the next step (the stream's); DPM-Solver++ 2M
SOLVERS = ("ddim", "lcm", "dpmpp2m")
KINDS = ("one", "two", "three")


@dataclass
class QualityRow:
    steps: int
    cfg: str
    solver: str
    accuracy_one: float
    accuracy_two: float
    accuracy_three: float
    accuracy_unstated: float
    coverage: float      # of what the unstated prompts leave free; ~1 for rendered scenes
    psnr: float          # dB against the teacher; inf for the teacher itself
    distance: float      # Fréchet shape distance to rendered scenes of the same prompts
    seconds_per_image: float
    label: str = ""      # what else the row ran with (a schedule, an adapter, a router)
    draws: int = 1       # initial noises the measures are the mean over (a distance moves ±0.2 between draws)
    distance_spread: float = 0.0   # the distance's standard deviation over those draws
    accuracy_by_draw: list = field(default_factory=list)   # each draw's mean accuracy over 1, 2, 3 objects


@dataclass
class Prompts:
    """The held-out prompts a table runs, in one list: `count` per kind, then the unstated prompts
    `repeats` times each (coverage needs several seeds per prompt), and their rendered scenes."""

    texts: list[str]
    kinds: list[str]
    rendered: np.ndarray

    def of(self, kind: str) -> slice:
        first = self.kinds.index(kind)
        return slice(first, first + self.kinds.count(kind))


def held_out(count: int = 128, unstated: int = 32, repeats: int = 8, seed: int = 0) -> Prompts:
    """The held-out set of the quality table (see :class:`Prompts`)."""
    check_int(count, "count", 1)
    check_int(unstated, "unstated", 1)
    check_int(repeats, "repeats", 2)
    check_int(seed, "seed", 0)
    texts, kinds, scenes = [], [], []
    for kind in KINDS:
        for text, scene in heldout_prompts(kind, count):
            texts.append(text), kinds.append(kind), scenes.append(scene)
    for text, scene in heldout_prompts("unstated", unstated):
        for _ in range(repeats):
            texts.append(text), kinds.append("unstated"), scenes.append(scene)
    rng = np.random.default_rng(seed)
    return Prompts(texts, kinds, render_batch([realise(s, rng) for s in scenes]))


def _noise(count: int, shape: tuple, seed: int) -> torch.Tensor:
    """The initial latents every configuration starts from: the i-th prompt always gets the same."""
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def generate(pipe, prompts: list[str], steps: int, cfg: str, solver: str | None = "ddim", guidance_scale: float = 5.0,
             seed: int = 0, batch: int = 64, guidance_rescale: float = 0.0, options: dict | None = None,
             call_options: dict | None = None) -> tuple[torch.Tensor, float]:
    """Pictures [N, 3, 64, 64] in [0, 1] for `prompts`, and the seconds it took per picture.

    `options` go to ``fastdiff.accelerate`` (a ``schedule``, an ``adapter``, a ``router``...);
    `call_options` to each call. ``solver=None`` leaves the solver to a schedule or an adapter."""
    from .accelerate import accelerate

    check_choice(cfg, "cfg", CFG_MODES)
    if solver is not None:
        check_choice(solver, "solver", SOLVERS)
    check_int(steps, "steps", 1)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts: a non-empty list of prompts")
    check_int(seed, "seed", 0, MAX_SEED - len(prompts))   # each batch draws from seed + its first row
    check_int(batch, "batch", 1)
    fast = accelerate(pipe, cfg=cfg, solver=solver, **(options or {}))
    height, width = fast.parts.size(None, None)   # the model's native size
    noise = _noise(len(prompts), fast.parts.latent_shape(height, width), seed)
    rescale = {"guidance_rescale": guidance_rescale} if guidance_rescale and cfg == "full" else {}
    images, start = [], time.perf_counter()
    try:
        for i in range(0, len(prompts), batch):
            out = fast(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                       latents=noise[i:i + batch], generator=torch.Generator().manual_seed(seed + i),
                       output_type="pt", height=height, width=width, **rescale, **(call_options or {}))
            images.append(out.images.float().cpu())
    finally:   # an adapter loads into the pipeline's own denoiser: the next row must see the base model
        if fast.adapter is not None:
            fast.set_adapter(None)
    seconds = (time.perf_counter() - start) / max(len(prompts), 1)
    return torch.cat(images), seconds


def measure(images: torch.Tensor, held: Prompts, teacher: torch.Tensor | None) -> dict:
    """The row's measures of `images` (one per held-out prompt) against `teacher`'s pictures."""
    values = {f"accuracy_{kind}": prompt_accuracy(images[held.of(kind)], held.texts[held.of(kind)], (0.0, 1.0))
              for kind in (*KINDS, "unstated")}
    values["coverage"] = coverage(images[held.of("unstated")], held.texts[held.of("unstated")], (0.0, 1.0))
    values["psnr"] = paired_psnr(images, teacher, (0.0, 1.0)) if teacher is not None else float("nan")
    values["distance"] = frechet_distance(images, held.rendered, (0.0, 1.0))
    return values


def teacher_pictures(pipe, held: Prompts, draws: int = 1, teacher_steps: int = 50, guidance_scale: float = 5.0,
                     seed: int = 0, batch: int = 64, guidance_rescale: float = 0.0) -> list[torch.Tensor]:
    """The teacher's pictures of `held` — `teacher_steps` DDIM steps with ``full`` CFG — one per draw of
    the initial noise (seeds `seed`, `seed` + 1, ...): what :func:`quality_row` pairs each draw with."""
    check_int(draws, "draws", 1)
    check_int(teacher_steps, "teacher_steps", 1)
    return [generate(pipe, held.texts, teacher_steps, "full", "ddim", guidance_scale, seed + draw, batch,
                     guidance_rescale)[0] for draw in range(draws)]


def quality_row(pipe, held: Prompts, teachers: list, steps: int, cfg: str, solver: str | None = "ddim",
                guidance_scale: float = 5.0, seed: int = 0, batch: int = 64, guidance_rescale: float = 0.0,
                options: dict | None = None, call_options: dict | None = None, label: str = "") -> QualityRow:
    """One :class:`QualityRow` of `held`: the mean of its measures over ``len(teachers)`` draws of the
    initial noise (seeds `seed`, `seed` + 1, ...), each against the teacher's pictures of the same draw
    (``teachers[i]``, or None for no PSNR); `distance_spread` is the distances' standard deviation."""
    if isinstance(teachers, torch.Tensor) or not isinstance(teachers, (list, tuple)) or not teachers:
        raise ValueError("teachers: a list of one teacher's pictures per draw (None for no PSNR), at least one")
    values, seconds = [], []
    for draw, teacher in enumerate(teachers):
        images, took = generate(pipe, held.texts, steps, cfg, solver, guidance_scale, seed + draw, batch,
                                guidance_rescale, options, call_options)
        values.append(measure(images, held, teacher))
        seconds.append(took)
    mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    spread = float(np.std([v["distance"] for v in values], ddof=1)) if len(values) > 1 else 0.0
    by_draw = [float(np.mean([v[f"accuracy_{kind}"] for kind in KINDS])) for v in values]
    return QualityRow(steps=steps, cfg=cfg, solver=solver or "", seconds_per_image=float(np.mean(seconds)),
                      label=label, draws=len(values), distance_spread=spread, accuracy_by_draw=by_draw, **mean)


def quality_table(pipe, steps_list=(50, 25, 8, 4, 2, 1), cfgs=CFG_MODES[:3], solver: str | None = "ddim",
                  guidance_scale: float = 5.0, count: int = 128, teacher_steps: int = 50, seed: int = 0,
                  batch: int = 64, progress=None, guidance_rescale: float = 0.0, unstated: int = 32,
                  repeats: int = 8, options: dict | None = None, label: str = "", draws: int = 1) -> list[QualityRow]:
    """One :class:`QualityRow` per (steps, cfg) over the held-out set (:func:`held_out`), each the mean
    over `draws` initial noises (:func:`quality_row`); the teacher is `teacher_steps` DDIM steps with
    ``full`` CFG (and the same rescale). `options` go to ``fastdiff.accelerate`` for every row but the
    teacher's (e.g. a schedule), named by `label`."""
    if isinstance(cfgs, str) or not cfgs or not len(steps_list):
        raise ValueError(f"cfgs and steps_list: non-empty lists, got {cfgs!r} and {steps_list!r}")
    for cfg in cfgs:
        check_choice(cfg, "cfgs", CFG_MODES)
    for steps in steps_list:
        check_int(steps, "steps_list", 1)
    held = held_out(count, unstated, repeats, seed)
    teachers = teacher_pictures(pipe, held, draws, teacher_steps, guidance_scale, seed, batch, guidance_rescale)
    rows = []
    for steps in steps_list:
        for cfg in cfgs:
            rows.append(quality_row(pipe, held, teachers, steps, cfg, solver, guidance_scale, seed, batch,
                                    guidance_rescale, options, label=label))
            if progress is not None:
                progress(rows[-1])
    return rows


def format_table(rows: list[QualityRow]) -> str:
    """The rows as a Markdown table."""
    lines = ["| steps | CFG | solver | accuracy 1 / 2 / 3 objects | accuracy, unstated | coverage "
             "| PSNR vs teacher (dB) | Fréchet shape distance | s / image |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        psnr = "∞" if np.isinf(r.psnr) else f"{r.psnr:.2f}"
        label = f" {r.label}" if r.label else ""
        distance = f"{r.distance:.3f}" + (f" ± {r.distance_spread:.3f} ({r.draws} draws)" if r.draws > 1 else "")
        lines.append(f"| {r.steps} | {r.cfg}{label} | {r.solver} | {100 * r.accuracy_one:.1f}% / "
                     f"{100 * r.accuracy_two:.1f}% / {100 * r.accuracy_three:.1f}% | "
                     f"{100 * r.accuracy_unstated:.1f}% | {r.coverage:.3f} | {psnr} | {distance} | "
                     f"{r.seconds_per_image:.4f} |")
    return "\n".join(lines)


def rows_as_dicts(rows: list[QualityRow]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(r).items()}
            for r in rows]
