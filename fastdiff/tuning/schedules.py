"""Step schedules: the few timesteps a search found, as an artefact the front doors load.

A :class:`Schedule` is a JSON file: the timesteps (noisiest first), the solver they were searched
for, whether they are a whole sampling trajectory (``mode="pipeline"``: txt2img from pure noise) or
a stream's (``mode="stream"``: its first timestep is img2img's strength), how they were found and
what they scored, and a manifest of what they fit — the denoiser's weights hash, the scheduler's
class and config, the prediction type. A schedule made for another model or scheduler is refused
with the fields that differ.

How each scheduler takes a schedule: fastdiff never calls a diffusers scheduler's ``step``; its
own step math (:mod:`fastdiff.sampling`) reads the coefficients of any timesteps off the scheduler's
noise tables, so every scheduler — DDIM too, whose ``set_timesteps`` takes no ``timesteps=`` —
runs any schedule inside ``fastdiff.accelerate`` and ``fastdiff.Stream``. For plain diffusers,
:meth:`Schedule.pipeline_kwargs` gives ``timesteps=`` (or ``sigmas=``) where the scheduler accepts
them, and says so where it does not.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
import weakref
from dataclasses import asdict, dataclass, field

import torch

from ..artefacts import (StaleArtefactError, check_fields, check_seal, library_versions, read_json, sealed, weights_hash,
                         write_json)
from ..checks import check_choice, check_int
from ..denoiser import denoiser_for
from ..sampling.schedule import SOLVERS, is_flow_scheduler, validate_timesteps

__all__ = ["Schedule", "load_schedule", "schedule_fields", "prompts_hash", "model_hash", "FORMAT", "MODES"]

FORMAT = 1
KIND = "fastdiff-schedule"
MODES = ("pipeline", "stream")
REMEDY = "search a schedule for this model (fastdiff tune steps) or use its default steps"


_HASHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_hash(module: torch.nn.Module) -> str:
    """The hash of `module`'s base weights (attached LoRA adapters left out), computed again only when
    a parameter changed in place or an adapter came or went."""
    params = list(module.parameters())
    if any(p.is_inference() for p in params):
        # made under torch.inference_mode (e.g. LoRA layers attached there): no version counter to
        # tell an in-place change by, so no caching
        return weights_hash(module, base_only=True)
    version = (sum(p._version for p in params), len(module.state_dict()))
    known = _HASHES.get(module)
    if known is None or known[0] != version:
        known = (version, weights_hash(module, base_only=True))
        _HASHES[module] = known
    return known[1]


def _config_hash(scheduler) -> str:
    """A hash of the scheduler's noise-schedule configuration (what its tables depend on)."""
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
            "rescale_betas_zero_snr", "prediction_type", "shift", "timestep_spacing", "steps_offset")
    config = {k: scheduler.config.get(k) for k in keys if k in scheduler.config}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def schedule_fields(pipe) -> dict:
    """What a schedule must fit: the denoiser's weights and the scheduler's kind and tables."""
    scheduler = pipe.scheduler
    return {
        "model": model_hash(denoiser_for(pipe).original),
        "scheduler": type(scheduler).__name__,
        "scheduler_config": _config_hash(scheduler),
        "prediction_type": "flow" if is_flow_scheduler(scheduler) else scheduler.config.get("prediction_type",
                                                                                            "epsilon"),
    }


def prompts_hash(prompts) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


@dataclass
class Schedule:
    """The timesteps of `steps` steps, noisiest first, for `solver`, with what the search recorded."""

    timesteps: list[float]
    solver: str
    mode: str = "pipeline"
    method: str = "uniform"
    fields: dict = field(default_factory=dict)     # schedule_fields of the pipeline it was made for
    fitness: dict = field(default_factory=dict)    # {"search": ..., "eval": ..., "weights": ...}
    details: dict = field(default_factory=dict)    # the search's settings, prompts' hashes, timings

    def __post_init__(self):
        check_choice(self.solver, "solver", SOLVERS)
        check_choice(self.mode, "mode", MODES)
        self.timesteps = [float(t) for t in self.timesteps]
        if not self.timesteps:
            raise ValueError("timesteps must name at least one timestep")

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    # -- the pipeline it fits ------------------------------------------------------------------
    def check(self, pipe) -> "Schedule":
        """`self` if it was made for `pipe`'s denoiser weights and scheduler; StaleArtefactError
        naming each field that differs otherwise."""
        check_fields("this step schedule", schedule_fields(pipe), self.fields, REMEDY)
        validate_timesteps(self.timesteps, pipe.scheduler.config.num_train_timesteps, is_flow_scheduler(pipe.scheduler))
        return self

    def pipeline_kwargs(self, pipe) -> dict:
        """What to pass a plain diffusers pipeline call for these timesteps: ``timesteps=`` where the
        scheduler's ``set_timesteps`` takes it; ValueError where it takes neither (DDIM: run the
        schedule through ``fastdiff.accelerate``, which takes any timesteps)."""
        accepted = inspect.signature(pipe.scheduler.set_timesteps).parameters
        if "timesteps" in accepted:
            return {"timesteps": [int(round(t)) for t in self.timesteps]}
        raise ValueError(f"{type(pipe.scheduler).__name__}.set_timesteps takes no timesteps=; run this schedule "
                         "through fastdiff.accelerate(pipe, schedule=...), whose step math takes any timesteps")

    # -- the file ------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        body = asdict(self)
        fields = body.pop("fields")
        manifest = {"kind": KIND, "format": FORMAT, "fields": fields, "versions": library_versions(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        return sealed({"manifest": manifest, **body})

    def save(self, path: str) -> str:
        """Write the schedule (atomically) to `path`, a ``.json`` file; returns the path."""
        if not str(path).endswith(".json"):
            raise ValueError(f"path must be a .json file, got {path!r}")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        write_json(str(path), self.to_dict())
        return str(path)

    @classmethod
    def load(cls, path: str, pipe=None) -> "Schedule":
        """The schedule in `path`; checked against `pipe` when given (see :meth:`check`)."""
        if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
            raise ValueError(f"schedule: no schedule file at {path!r}")
        try:
            data = read_json(path)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"schedule: {path} is not a schedule file ({error})") from error
        manifest = data.get("manifest") if isinstance(data, dict) else None
        if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
            raise ValueError(f"schedule: {path} is not a fastdiff step schedule")
        if manifest.get("format") != FORMAT:
            raise StaleArtefactError(f"schedule: {path} has format {manifest.get('format')!r}; this fastdiff reads "
                                     f"{FORMAT}; {REMEDY}")
        check_seal(data, f"schedule: {path}", REMEDY)
        body = {k: data[k] for k in ("timesteps", "solver", "mode", "method", "fitness", "details") if k in data}
        schedule = cls(fields=manifest.get("fields", {}), **body)
        return schedule.check(pipe) if pipe is not None else schedule


def load_schedule(schedule, pipe, mode: str | None = None, steps: int | None = None) -> Schedule:
    """A :class:`Schedule` from a path (or one already loaded), checked against `pipe`, and of
    `mode` / `steps` when given."""
    schedule = schedule if isinstance(schedule, Schedule) else Schedule.load(schedule)
    schedule.check(pipe)
    if mode is not None and schedule.mode != mode:
        raise ValueError(f"schedule: this is a {schedule.mode} schedule; a {mode} schedule is needed here")
    if steps is not None and schedule.steps != check_int(steps, "steps", 1):
        raise ValueError(f"schedule: it has {schedule.steps} steps, not {steps}")
    return schedule
