"""Low-rank adapters on the denoiser: ours (one-step, with a manifest) and the few-step ones users
already have (LCM-LoRA, TCD, Hyper-SD, SDXL-Lightning, DMD2), loaded the way diffusers loads them.

An adapter folder of ours holds ``pytorch_lora_weights.safetensors`` in diffusers' LoRA format —
``pipe.load_lora_weights(folder)`` works with no fastdiff installed — and ``manifest.json``: the base
weights hash, target modules, rank, and the sampling the adapter was trained for (scheduler,
timesteps, guidance). A file of someone else's (a folder or a ``.safetensors``, diffusers/PEFT or
kohya keys) gets its sampling from the known families of its pipeline's kind (:func:`known_families`:
:data:`KNOWN_FAMILIES` for the UNets, :data:`FLOW_FAMILIES` for SD3 and Flux), by name, or from
``adapter_scheduler=``.

:func:`attach_adapter` loads one into the pipeline's denoiser as the PEFT adapter named
:data:`ADAPTER_NAME`, with its scale held in 0-d tensors rather than Python floats: changing the
scale then changes no code path, so a ``torch.compile``'d denoiser does not recompile, and an
engine is rebuilt (ONNX Runtime) or refitted (TensorRT) from the cache key, which holds the scale.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

import torch

from ..artefacts import StaleArtefactError, check_fields, check_manifest, read_manifest
from ..checks import check_number
from ..denoiser import denoiser_for
from .schedules import model_hash

__all__ = ["ADAPTER_NAME", "WEIGHTS_FILE", "KNOWN_FAMILIES", "FLOW_FAMILIES", "known_families", "AdapterSampling",
           "Adapter", "HoldsAdapter", "load_adapter", "attach_adapter", "detach_adapter", "set_adapter_scale",
           "adapter_scheduler"]

ADAPTER_NAME = "fastdiff"
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
FORMAT = 1
KIND = "fastdiff-adapter"
REMEDY = "train one for this model (fastdiff tune onestep)"


@dataclass(frozen=True)
class AdapterSampling:
    """How an adapter samples: its scheduler class (None: the pipeline's own), extra scheduler
    config, its timesteps (None: the scheduler's own for `steps`), its step count and guidance, and
    the LoRA weight its card gives (the scale when the caller names none). `at_steps`: (steps,
    {field: value}) pairs for a family whose files of that step count sample otherwise;
    `cfg_guidance`: the guidance of the family's CFG-preserving files (their names say "CFG")."""

    scheduler: str | None
    steps: int
    timesteps: tuple | None = None
    guidance_scale: float = 1.0
    config: dict = field(default_factory=dict)
    eta: float = 0.0
    scale: float = 1.0
    at_steps: tuple = ()
    cfg_guidance: float | None = None


# Few-step adapters users already have, by a word of their name (their cards' settings).
KNOWN_FAMILIES = {
    "lcm": AdapterSampling("LCMScheduler", 4, guidance_scale=1.0),
    "tcd": AdapterSampling("TCDScheduler", 4, guidance_scale=1.0, eta=0.3),
    "dmd2": AdapterSampling("LCMScheduler", 4, timesteps=(999, 749, 499, 249), guidance_scale=1.0),
    "hyper": AdapterSampling("DDIMScheduler", 8, guidance_scale=1.0, config={"timestep_spacing": "trailing"},
                             cfg_guidance=5.0,   # the one-step file is the unified LoRA, sampled by TCD
                             at_steps=((1, {"scheduler": "TCDScheduler", "config": {}, "eta": 1.0}),)),
    "lightning": AdapterSampling("EulerDiscreteScheduler", 8, guidance_scale=1.0,
                                 config={"timestep_spacing": "trailing"}),
}


# The flow-matching families' few-step adapters (their cards' settings): they keep the pipeline's
# flow-matching Euler, and Hyper-SD's want a small LoRA weight; Flux-dev's guidance is its model input.
FLOW_FAMILIES = {
    "sd3": {"hyper": AdapterSampling(None, 8, guidance_scale=5.0, scale=0.125, at_steps=(
        (4, {"guidance_scale": 3.0}), (8, {"guidance_scale": 5.0}), (16, {"guidance_scale": 7.0})))},
    "flux": {"hyper": AdapterSampling(None, 8, guidance_scale=3.5, scale=0.125),
             "turbo": AdapterSampling(None, 8, guidance_scale=3.5)},
}


def known_families(family: str | None = None) -> dict:
    """The known few-step families for a denoiser of `family` (its ``Denoiser.family``)."""
    return FLOW_FAMILIES.get(family, KNOWN_FAMILIES)


def _family_of(name: str, families: dict) -> tuple[str, AdapterSampling] | None:
    """The known family a file name names, with its step count read off '…-2step…' names."""
    lowered = os.path.basename(str(name)).lower()
    for family, sampling in families.items():
        if family in lowered:
            steps = re.search(r"(\d+)[-_]?steps?", lowered)
            if steps and sampling.timesteps is None:
                count = int(steps.group(1))
                sampling = replace(sampling, steps=count, **dict(sampling.at_steps).get(count, {}))
            if sampling.cfg_guidance is not None and "cfg" in lowered:
                sampling = replace(sampling, guidance_scale=sampling.cfg_guidance)
            return family, sampling
    return None


@dataclass
class Adapter:
    """A LoRA file (or folder) and how it samples; `manifest` is set for adapters of ours."""

    path: str
    sampling: AdapterSampling
    family: str
    manifest: dict | None = None

    @property
    def weights(self) -> str:
        return os.path.join(self.path, WEIGHTS_FILE) if os.path.isdir(self.path) else self.path

    def check(self, pipe) -> "Adapter":
        """Refuse an adapter of ours trained on other base weights (StaleArtefactError, naming them)."""
        if self.manifest is not None:
            found = self.manifest.get("fields", {})
            wanted = {"base": model_hash(denoiser_for(pipe).original), "family": denoiser_for(pipe).family}
            check_fields(f"the adapter in {self.path}", wanted, {k: found.get(k) for k in wanted},
                         REMEDY)
        return self


def load_adapter(adapter, pipe=None, adapter_scheduler: str | None = None) -> Adapter:
    """An :class:`Adapter` from a folder or ``.safetensors`` path (or one already loaded), checked
    against `pipe` when given. `adapter_scheduler` (a key of :func:`known_families` for `pipe`'s
    denoiser; the UNets' without a pipe) overrides the sampling of a file that is not ours."""
    if isinstance(adapter, Adapter):
        return adapter.check(pipe) if pipe is not None else adapter
    if not isinstance(adapter, (str, os.PathLike)) or not os.path.exists(adapter):
        raise ValueError(f"adapter: no LoRA folder or .safetensors file at {adapter!r}")
    path = str(adapter)
    families = known_families(denoiser_for(pipe).family if pipe is not None else None)
    if adapter_scheduler is not None and adapter_scheduler not in families:
        raise ValueError(f"adapter_scheduler must be one of {tuple(families)}, got {adapter_scheduler!r}")
    manifest_path = os.path.join(path, "manifest.json") if os.path.isdir(path) else None
    if manifest_path and os.path.isfile(manifest_path):
        if adapter_scheduler is not None:
            raise ValueError("adapter_scheduler: this adapter is fastdiff's own, and its manifest says how it "
                             "samples; the override is for adapters made elsewhere")
        try:
            manifest = read_manifest(path)
            if manifest.get("kind") != KIND:
                raise ValueError(f"adapter: {path} holds a manifest that is not a fastdiff adapter's")
            fields = manifest.get("fields")   # checked against the pipeline by Adapter.check
            check_manifest(path, fields if isinstance(fields, dict) else {}, "adapter", FORMAT, REMEDY)   # files whole
        except StaleArtefactError as error:
            raise StaleArtefactError(f"adapter: {error}") from None
        s = manifest["sampling"]   # under the manifest's seal, checked above
        timesteps = tuple(s["timesteps"]) if s.get("timesteps") else None
        sampling = AdapterSampling(s.get("scheduler"), s["steps"], timesteps, s.get("guidance_scale", 1.0),
                                   s.get("config", {}), s.get("eta", 0.0))
        loaded = Adapter(path, sampling, "fastdiff", manifest)
    else:
        weights = os.path.join(path, WEIGHTS_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(weights) or not weights.endswith(".safetensors"):
            raise ValueError(f"adapter: {path} is neither a .safetensors file nor a folder holding {WEIGHTS_FILE}")
        if adapter_scheduler is not None:
            found = (adapter_scheduler, families[adapter_scheduler])
        else:
            found = _family_of(path, families)
        if found is None:
            raise ValueError(f"adapter: {os.path.basename(path)} is not ours and names no known family "
                             f"({', '.join(families)}); say how it samples with adapter_scheduler=")
        loaded = Adapter(path, found[1], found[0])
    return loaded.check(pipe) if pipe is not None else loaded


def _lora_layers(module: torch.nn.Module):
    for sub in module.modules():
        scaling = getattr(sub, "scaling", None)
        if isinstance(scaling, dict) and ADAPTER_NAME in scaling:
            yield sub


def set_adapter_scale(module: torch.nn.Module, scale: float) -> None:
    """Set the attached adapter's scale in place (no recompilation: the scales are 0-d tensors)."""
    scale = check_number(scale, "scale", 0.0)
    for sub in _lora_layers(module):
        value = sub.scaling[ADAPTER_NAME]
        if not isinstance(value, torch.Tensor):   # first time: PEFT's float at weight 1, a tensor from now on
            sub._fastdiff_unit_scaling = float(value)
            sub.scaling[ADAPTER_NAME] = value = torch.tensor(0.0, device=next(sub.parameters()).device)
        value.fill_(sub._fastdiff_unit_scaling * scale)


def attach_adapter(pipe, adapter: Adapter, scale: float = 1.0) -> Adapter:
    """Load `adapter` into `pipe`'s denoiser as the PEFT adapter :data:`ADAPTER_NAME` (replacing one
    attached before) at `scale`. The pipeline's text encoders are left as they are."""
    module = denoiser_for(pipe).original
    detach_adapter(pipe)
    kwargs = {}
    if not os.path.isdir(adapter.path):
        kwargs["weight_name"] = os.path.basename(adapter.path)
    source = os.path.dirname(adapter.path) if "weight_name" in kwargs else adapter.path
    try:
        pipe.load_lora_weights(source, adapter_name=ADAPTER_NAME, **kwargs)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ValueError(f"adapter: {adapter.path} does not fit this {type(module).__name__} ({error})") from error
    if not any(True for _ in _lora_layers(module)):
        raise ValueError(f"adapter: {adapter.path} holds no LoRA weights for the denoiser")
    set_adapter_scale(module, scale)
    return adapter


def detach_adapter(pipe) -> None:
    """Remove the adapter :func:`attach_adapter` loaded, if any (other adapters stay)."""
    module = denoiser_for(pipe).original
    if any(True for _ in _lora_layers(module)):
        module.delete_adapters(ADAPTER_NAME)


def adapter_scheduler(pipe, adapter: "Adapter | None"):
    """The scheduler `adapter` samples with: a new one of its class from `pipe`'s config (the
    pipeline's own scheduler is never replaced), or None when it is the pipeline's own."""
    if adapter is None or adapter.sampling.scheduler in (None, type(pipe.scheduler).__name__):
        if adapter is not None and adapter.sampling.config:
            return type(pipe.scheduler).from_config(pipe.scheduler.config, **adapter.sampling.config)
        return None
    import diffusers

    cls = getattr(diffusers, adapter.sampling.scheduler)
    return cls.from_config(pipe.scheduler.config, **adapter.sampling.config)


class HoldsAdapter:
    """The adapter part of a front door holding ``self.pipe`` and ``self.parts``: which adapter is
    attached, at which scale, and the scheduler it samples with."""

    adapter: Adapter | None = None
    adapter_scale: float = 1.0
    own_scheduler = None   # the adapter's own scheduler, when not the pipeline's

    def _set_adapter(self, adapter, scale: float | None = None, family: str | None = None) -> None:
        # scale None: the adapter's own (its card's LoRA weight; 1 for ours)
        if scale is not None:
            scale = check_number(scale, "scale", 0.0)
        if adapter is None:
            detach_adapter(self.pipe)
            self.adapter, self.own_scheduler = None, None
        else:
            if getattr(self, "router", None) is not None:
                raise ValueError("adapter: a router is set, and its pruned sub-networks would run without the "
                                 "adapter; use one or the other")
            loaded = load_adapter(adapter, self.pipe, family)
            scale = loaded.sampling.scale if scale is None else scale
            if self.adapter is None or os.path.abspath(loaded.path) != os.path.abspath(self.adapter.path):
                attach_adapter(self.pipe, loaded, scale)
            else:
                set_adapter_scale(self.parts.denoiser.original, scale)
            self.adapter, self.own_scheduler = loaded, adapter_scheduler(self.pipe, loaded)
        self.adapter_scale = 1.0 if scale is None else scale

    @property
    def scheduler(self):
        """The scheduler this front door samples with: the adapter's, else the pipeline's."""
        return self.own_scheduler if self.own_scheduler is not None else self.pipe.scheduler
