"""How good a set of timesteps is: paired error against a many-step teacher from the same noise.

A :class:`Trajectories` holds what every candidate of a search is run against: the prompts'
conditioning, fixed initial noise, and the teacher's pictures from that noise (`teacher_steps`
uniform DDIM steps, the same guidance). :meth:`Trajectories.score` runs a candidate through the
stream core — the very step code ``fastdiff.accelerate`` and ``fastdiff.Stream`` run — and measures:

- ``latent``: mean squared error of the final latents against the teacher's, relative to the
  teacher latents' mean square (weight-free: works on any model);
- ``psnr``: pixel PSNR against the teacher's pictures, through the VAE;
- with a `judge` (the shapes world's: :func:`shapes_judge`), ``accuracy`` (share of prompted
  attributes read back), ``distance`` (Fréchet shape distance to rendered scenes) and, where a
  prompt comes several times, ``coverage`` of what those prompts leave free.

The fitness to minimise is Σ weight·term over ``latent``, ``1 − accuracy``, the distance over the
teacher's, and coverage's shortfall from the teacher's (:data:`DEFAULT_WEIGHTS`). Two modes:
``"pipeline"`` samples from pure noise through all the steps (txt2img); ``"stream"`` is the
stream's img2img: frames of a clip enter at the first timestep (the strength) and take the
stream's LCM step at each.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..checks import check_choice
from ..sampling.guiders import make_guider
from ..sampling.schedule import step_schedule
from ..stream.batch import LatentStream
from ..stream.prepare import Prepared

__all__ = ["Trajectories", "DEFAULT_WEIGHTS", "shapes_judge", "fitness_of"]

# latent: relative latent MSE (0 = the teacher); accuracy: 1 − prompt accuracy; distance: the Fréchet
# shape distance over the teacher's own; coverage: the share of the teacher's coverage a schedule
# loses (0 at or above it: more spread than the teacher's is noise, not a merit). The last three need
# a judge. Coverage weighs half: a few seeds per prompt make it the noisiest term.
DEFAULT_WEIGHTS = {"latent": 1.0, "accuracy": 1.0, "distance": 0.1, "coverage": 0.5}


def fitness_of(metrics: dict, weights: dict, teacher: dict) -> float:
    """The weighted sum a search minimises (see :data:`DEFAULT_WEIGHTS`)."""
    total = weights.get("latent", 0.0) * metrics["latent"]
    if "accuracy" in metrics:
        total += weights.get("accuracy", 0.0) * (1.0 - metrics["accuracy"])
    if "distance" in metrics and teacher.get("distance"):
        total += weights.get("distance", 0.0) * metrics["distance"] / max(teacher["distance"], 1e-6)
    if "coverage" in metrics and teacher.get("coverage"):
        total += weights.get("coverage", 0.0) * max(0.0, 1.0 - metrics["coverage"] / teacher["coverage"])
    return float(total)


def shapes_judge(prompts: list[str], seed: int = 0):
    """The shapes world's judge of pictures of `prompts`: (images [N, 3, H, W] in [0, 1]) →
    {"accuracy", "distance"} (the distance to rendered scenes of the same prompts), and "coverage"
    over the prompts that come more than once (see :func:`~fastdiff.shapes.render.tuning_prompts`'
    `repeats`)."""
    from ..shapes.metrics import coverage, frechet_distance, prompt_accuracy
    from ..shapes.render import parse_caption, realise, render_batch

    rng = np.random.default_rng(seed)
    rendered = render_batch([realise(parse_caption(p), rng) for p in prompts])
    counts = collections.Counter(prompts)
    repeated = [i for i, p in enumerate(prompts) if counts[p] > 1]

    def judge(images: torch.Tensor) -> dict:
        metrics = {"accuracy": prompt_accuracy(images, prompts, (0.0, 1.0)),
                   "distance": frechet_distance(images, rendered, (0.0, 1.0))}
        if repeated:
            spread = coverage(images[repeated], [prompts[i] for i in repeated], (0.0, 1.0), seed)
            if math.isfinite(spread):   # nan when the repeated prompts leave nothing free
                metrics["coverage"] = spread
        return metrics
    return judge


@dataclass
class _Setting:
    cfg: str
    guidance_scale: float
    guidance_rescale: float
    solver: str
    teacher_steps: int


class Trajectories:
    """The fixed run every candidate is measured on: `prompts` from fixed noise (``mode="pipeline"``),
    or `frames` of a clip entering at `strength_timestep` (``mode="stream"``, one prompt)."""

    def __init__(self, pipe, prompts: list[str], *, mode: str = "pipeline", cfg: str | None = None,
                 guidance_scale: float = 1.0, guidance_rescale: float = 0.0, solver: str | None = None,
                 teacher_steps: int = 50, seed: int = 0, frames=None, strength_timestep: float | None = None,
                 judge=None, batch: int = 64):
        self.mode = check_choice(mode, "mode", ("pipeline", "stream"))
        if not prompts:
            raise ValueError("prompts must hold at least one prompt")
        self.pipe, self.parts = pipe, Prepared(pipe)
        cfg = cfg or ("full" if guidance_scale > 1 else "none")
        solver = solver or ("lcm" if mode == "stream" else "ddim")
        self.setting = _Setting(cfg, guidance_scale, guidance_rescale, solver, teacher_steps)
        self.guider = make_guider(cfg, guidance_scale, 1.0, guidance_rescale if cfg == "full" else 0.0)
        # the teacher: full CFG at the same scale (residual CFG is a few-step approximation of it)
        self.teacher_guider = make_guider("full" if guidance_scale > 1 else "none", guidance_scale, 1.0,
                                          guidance_rescale if guidance_scale > 1 else 0.0)
        self.judge = judge
        self.batch = batch
        self.height, self.width = self.parts.size(None, None)
        self.latent_shape = self.parts.latent_shape(self.height, self.width)
        gen = torch.Generator().manual_seed(seed)
        denoiser = self.parts.denoiser
        if mode == "pipeline":
            self.prompts = list(prompts)
            self.clean = None
            self.noise = torch.randn((len(prompts), *self.latent_shape), generator=gen)
        else:
            if frames is None or strength_timestep is None:
                raise ValueError("mode='stream' needs frames (a clip) and strength_timestep (its first timestep)")
            from ..images import to_model_tensor

            self.prompts = [prompts[0]] * len(frames)
            pixels = torch.cat([to_model_tensor(f, self.height, self.width, denoiser.device, self.parts.codec.dtype)
                                for f in frames])
            with torch.inference_mode():
                self.clean = self.parts.codec.encode_unit(pixels).float()
            self.noise = torch.randn((len(frames), *self.latent_shape), generator=gen)
        self.strength_timestep = strength_timestep
        self.cond = self.parts.encode(self.prompts, None, self.height, self.width)
        self.teacher_latents, self.teacher_images = self._teacher()
        self.teacher_metrics = self.judge(self.teacher_images) if judge is not None else {}
        self.evaluations = 0

    # -- running a schedule ------------------------------------------------------------------------
    def _run(self, schedule, guider) -> torch.Tensor:
        """Final latents of every prompt (or frame) through `schedule`: one group of rows per batch."""
        denoiser = self.parts.denoiser
        cond, uncond = self.cond
        out = []
        with torch.inference_mode():
            for i in range(0, len(self.prompts), self.batch):
                rows = slice(i, i + self.batch)
                stream = LatentStream(denoiser, schedule, cond.rows(rows), uncond.rows(rows), self.latent_shape,
                                      guider=guider, noise="fresh", generator=torch.Generator().manual_seed(i))
                clean = None if self.clean is None else self.clean[rows]
                first = stream.push(clean, noise=self.noise[rows])
                out.append((first if first is not None else stream.drain()[0]).latents.float())
        return torch.cat(out)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([self.parts.codec.decode_unit(c).float().clamp(0, 1)
                              for c in latents.split(self.batch)])

    def _teacher(self):
        scheduler = self.pipe.scheduler
        steps = self.setting.teacher_steps
        if self.mode == "pipeline":   # the pipeline's own schedule (Flux's shifted for the image's size)
            schedule = self.parts.step_schedule(list(range(steps)), None, steps, "ddim", self.height, self.width)
        else:   # uniform DDIM steps from the stream's first timestep down
            start = float(self.strength_timestep)
            times = np.linspace(start, 0, steps, endpoint=False)
            schedule = step_schedule(scheduler, timesteps=[float(round(t)) for t in times], solver="ddim")
        latents = self._run(schedule, self.teacher_guider)
        return latents, self._decode(latents)

    def schedule_of(self, timesteps) -> "StepSchedule":  # noqa: F821 - fastdiff.sampling.schedule
        return step_schedule(self.pipe.scheduler, timesteps=[float(t) for t in timesteps], solver=self.setting.solver)

    def score(self, timesteps, weights: dict = DEFAULT_WEIGHTS) -> tuple[float, dict]:
        """(fitness, metrics) of running `timesteps` (noisiest first) against the teacher."""
        latents = self._run(self.schedule_of(timesteps), self.guider)
        images = self._decode(latents)
        self.evaluations += 1
        mse = float(((latents - self.teacher_latents) ** 2).mean() / (self.teacher_latents ** 2).mean())
        pixel_mse = float(((images - self.teacher_images) ** 2).mean())
        metrics = {"latent": mse, "psnr": math.inf if pixel_mse == 0 else -10 * math.log10(pixel_mse)}
        if self.judge is not None:
            metrics.update(self.judge(images))
        return fitness_of(metrics, weights, self.teacher_metrics), metrics
