"""The quality of a sampling configuration on the shapes model: one table row per (steps, CFG mode).

Each row generates the held-out one- and two-object prompts from fixed seeds through
:func:`fastdiff.accelerate` (the stream's own step and guidance code, so a stream with the same
timesteps, solver and CFG mode gives the same pictures — the stream tests check that equality) and
measures prompt accuracy, PSNR against a many-step ``full``-CFG teacher on the same seeds and
initial noise, the Fréchet shape distance to the rendered scenes, and seconds per image.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ..denoiser import check_size
from ..sampling.guidance import CFG_MODES
from ..vae import LatentCodec
from .metrics import frechet_distance, paired_psnr, prompt_accuracy
from .render import heldout_prompts, render_batch

__all__ = ["QualityRow", "generate", "quality_table", "format_table", "rows_as_dicts", "SOLVERS"]

SOLVERS = ("ddim", "lcm")  # DDIM's deterministic step; LCM's x̂0 re-noised to the next step (the stream's)


@dataclass
class QualityRow:
    steps: int
    cfg: str
    solver: str
    accuracy_one: float
    accuracy_two: float
    psnr: float          # dB against the teacher; inf for the teacher itself
    distance: float      # Fréchet shape distance to the rendered scenes
    seconds_per_image: float


def _noise(count: int, shape: tuple, seed: int) -> torch.Tensor:
    """The initial latents every configuration starts from: the i-th prompt always gets the same."""
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def generate(pipe, prompts: list[str], steps: int, cfg: str, solver: str = "ddim", guidance_scale: float = 5.0,
             seed: int = 0, batch: int = 64) -> tuple[torch.Tensor, float]:
    """Pictures [N, 3, 64, 64] in [0, 1] for `prompts`, and the seconds it took per picture."""
    from ..accelerate import accelerate

    if cfg not in CFG_MODES:
        raise ValueError(f"cfg must be one of {CFG_MODES}, got {cfg!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer ≥ 1, got {steps!r}")
    fast = accelerate(pipe, cfg=cfg, solver=solver)
    codec = LatentCodec(pipe.vae)
    height, width = check_size(fast.denoiser, codec, None, None)   # the model's native size
    f = codec.scale_factor
    noise = _noise(len(prompts), (fast.denoiser.in_channels, height // f, width // f), seed)
    images, start = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        out = fast(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance_scale,
                   latents=noise[i:i + batch], generator=torch.Generator().manual_seed(seed + i),
                   output_type="pt", height=height, width=width)
        images.append(out.images.float().cpu())
    seconds = (time.perf_counter() - start) / max(len(prompts), 1)
    return torch.cat(images), seconds


def quality_table(pipe, steps_list=(50, 25, 8, 4, 2, 1), cfgs=CFG_MODES[:3], solver: str = "ddim",
                  guidance_scale: float = 5.0, count: int = 128, teacher_steps: int = 50, seed: int = 0,
                  batch: int = 64, progress=None) -> list[QualityRow]:
    """One :class:`QualityRow` per (steps, cfg) over `count` one-object and `count` two-object
    held-out prompts; the teacher is `teacher_steps` DDIM steps with ``full`` CFG."""
    held = heldout_prompts("one", count) + heldout_prompts("two", count)
    prompts = [p for p, _ in held]
    rendered = render_batch([scene for _, scene in held])
    teacher, _ = generate(pipe, prompts, teacher_steps, "full", "ddim", guidance_scale, seed, batch)
    rows = []
    for steps in steps_list:
        for cfg in cfgs:
            images, seconds = generate(pipe, prompts, steps, cfg, solver, guidance_scale, seed, batch)
            one, two = images[:count], images[count:]
            rows.append(QualityRow(
                steps=steps, cfg=cfg, solver=solver,
                accuracy_one=prompt_accuracy(one, prompts[:count], (0.0, 1.0)),
                accuracy_two=prompt_accuracy(two, prompts[count:], (0.0, 1.0)),
                psnr=paired_psnr(images, teacher, (0.0, 1.0)),
                distance=frechet_distance(images, rendered, (0.0, 1.0)),
                seconds_per_image=seconds))
            if progress is not None:
                progress(rows[-1])
    return rows


def format_table(rows: list[QualityRow]) -> str:
    """The rows as a Markdown table."""
    lines = ["| steps | CFG | solver | accuracy, 1 object | accuracy, 2 objects | PSNR vs teacher (dB) "
             "| Fréchet shape distance | s / image |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        psnr = "∞" if np.isinf(r.psnr) else f"{r.psnr:.2f}"
        lines.append(f"| {r.steps} | {r.cfg} | {r.solver} | {100 * r.accuracy_one:.1f}% | "
                     f"{100 * r.accuracy_two:.1f}% | {psnr} | {r.distance:.4f} | {r.seconds_per_image:.4f} |")
    return "\n".join(lines)


def rows_as_dicts(rows: list[QualityRow]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and np.isinf(v) else v) for k, v in asdict(r).items()} for r in rows]
