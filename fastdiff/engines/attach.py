"""Swap a denoiser adapter's module and a latent codec's VAE for engines.

This is what ``fastdiff.Stream(..., backend=...)`` and ``fastdiff.accelerate(pipe, backend=...)``
call. Nothing of the user's pipeline is modified: the adapter's ``.module`` and the codec's
``.vae`` are the fastdiff objects' own references.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..checks import check_int
from ..denoiser import Denoiser, GroupedDenoiser
from ..vae import LatentCodec
from .backends import PRECISIONS, engine, resolve_backend
from .components import denoiser_component, side_component, vae_component
from .modules import EngineModule, EngineVAE
from .profiles import ShapeProfile, stream_profile

HOT_COMPONENTS = ("denoiser", "vae_encoder", "vae_decoder")
OPTIONS = ("components", "precision", "cache_dir", "rebuild", "compile_mode", "threads", "workers", "tensorrt")


@dataclass
class AttachedEngines:
    backend: str
    profiles: dict = field(default_factory=dict)   # component → ShapeProfile
    folders: dict = field(default_factory=dict)    # component → artefact folder (None for 'inductor')


def check_options(options: dict | None) -> dict:
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"engine_options must be a dict, got {type(options).__name__}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"engine_options has unknown keys {unknown}; accepted are {OPTIONS}")
    components = options.get("components", HOT_COMPONENTS)
    if isinstance(components, str) or not set(components) <= set(HOT_COMPONENTS) or not components:
        raise ValueError(f"engine_options['components'] must be a non-empty list of {HOT_COMPONENTS}, got {components!r}")
    options["components"] = tuple(components)
    if not isinstance(options.get("rebuild", False), bool):
        raise ValueError(f"engine_options['rebuild'] must be True or False, got {options['rebuild']!r}")
    precision = options.get("precision")
    if isinstance(precision, dict) and not set(precision) <= set(HOT_COMPONENTS):
        raise ValueError(f"engine_options['precision'] per component takes keys of {HOT_COMPONENTS}, "
                         f"got {sorted(precision)}")
    return options


def precision_of(options: dict, name: str, vae=None, backend: str | None = None) -> str | None:
    """A component's engine precision: engine_options['precision'] (one for all, or per component),
    else fp32 for the halves of a VAE that asks diffusers to upcast it (the SDXL VAE; not for
    'inductor', which compiles the module as it is), else the module's."""
    precision = options.get("precision")
    if isinstance(precision, dict):
        precision = precision.get(name)
    if precision is None and vae is not None and name.startswith("vae") and backend != "inductor" \
            and vae.config.get("force_upcast", False) and next(vae.parameters()).dtype == torch.float16:
        return "fp32"
    return precision


def _profile(most: int, best: int | None, resolutions) -> ShapeProfile:
    profile = stream_profile(most, resolutions)
    if best is None:
        return profile
    return ShapeProfile((1, min(best, most), most), profile.height, profile.width)


def attach_engines(denoiser: Denoiser, codec: LatentCodec, backend: str, *, rows: int, frames: int,
                   resolutions, options: dict | None = None, best_rows: int | None = None,
                   best_frames: int | None = None) -> AttachedEngines:
    """Run `denoiser` and `codec` on `backend` engines for up to `rows` denoiser rows and `frames`
    images per call (optimised for `best_rows` / `best_frames`, default the most) at the given
    (height, width) resolutions in pixels, the first being the one to optimise for."""
    options = check_options(options)
    backend = resolve_backend(backend, denoiser.device)
    attached = AttachedEngines(backend)
    build = {k: options[k] for k in ("cache_dir", "rebuild", "compile_mode", "threads") if k in options}
    if backend == "tensorrt":   # the stream's shapes are static once it is full: replay CUDA graphs
        build["options"] = {"cuda_graph": True, **options.get("tensorrt", {})}
    elif "tensorrt" in options:
        raise ValueError(f"engine_options['tensorrt'] applies to backend='tensorrt', not {backend!r}")
    # denoiser calls side by side, each session on its share of the threads (see Denoiser.set_workers);
    # the VAE's calls stay one at a time, on all of them
    workers = check_int(options.get("workers", 1), "engine_options['workers']", 1, 64)
    side_by_side = {}
    if workers > 1:
        if backend != "onnxruntime":
            raise ValueError(f"engine_options['workers'] runs ONNX Runtime sessions side by side; "
                             f"backend={backend!r} takes 1")
        if "threads" not in build:
            side_by_side = {"threads": max(1, torch.get_num_threads() // workers)}

    def make(component, profile: ShapeProfile, key: str | None = None, vae=None, like: str | None = None,
             **own) -> EngineModule:
        precision = precision_of(options, like or component.name, vae, backend)
        runner = engine(component, backend, profile=profile, precision=precision, **build, **own)
        attached.profiles[key or component.name] = profile
        attached.folders[key or component.name] = getattr(runner, "folder", None)
        checked = None if backend == "inductor" else profile   # torch.compile takes any shape
        return EngineModule(component, runner, PRECISIONS[precision] if precision else component.dtype, checked)

    if "denoiser" in options["components"]:
        # the networks the denoiser calls beside its own (ControlNets), described before any export:
        # one that can't be an engine stops the build before the denoiser's is made
        sides = {name: side_component(denoiser, name) for name in denoiser.side_networks()}
        profile = _profile(rows, best_rows, resolutions)
        if isinstance(denoiser, GroupedDenoiser):   # one engine per sub-network, each under its own key
            for route, module in denoiser.originals.items():
                denoiser.modules[route] = make(denoiser_component(denoiser, module), profile, f"denoiser/{route}",
                                               **side_by_side)
        else:
            denoiser.module = make(denoiser_component(denoiser), profile, **side_by_side)
        for name, side in sides.items():   # at the denoiser's precision
            denoiser.side_runners[name] = make(side, profile, name, like="denoiser", **side_by_side)
        denoiser.set_workers(workers)
    vae = codec.vae.vae if isinstance(codec.vae, EngineVAE) else codec.vae
    halves = {}
    for name in ("vae_encoder", "vae_decoder"):
        halves[name] = make(vae_component(vae, name), _profile(frames, best_frames, resolutions), vae=vae) \
            if name in options["components"] else None
    if any(halves.values()):
        codec.vae = EngineVAE(vae, halves["vae_encoder"], halves["vae_decoder"])
    return attached


def refit_engines(denoiser: Denoiser):
    """Load the denoiser module's current weights (e.g. a LoRA fused at a new scale) into its running
    TensorRT engine, built with ``engine_options={"tensorrt": {"refit": True}}``, without a rebuild."""
    runner = getattr(denoiser.module, "runner", None)
    if not hasattr(runner, "refit"):
        raise ValueError("refit: the denoiser does not run on a TensorRT engine; only TensorRT engines refit "
                         "(other backends rebuild: the changed weights make a new cache key)")
    runner.refit(denoiser.original)
