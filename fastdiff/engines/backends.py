"""One interface over the backends: build → artefact (cached) → load → a runner of named tensors.

=============  ===========================================  ====================================
backend        artefact                                     needs
=============  ===========================================  ====================================
onnxruntime    ``model.onnx``                               ``pip install onnx onnxruntime``
                                                            (``onnxruntime-gpu`` for CUDA)
tensorrt       ``model.onnx`` + ``model.plan``              ``pip install tensorrt`` (NVIDIA's)
aoti           ``model.pt2`` (AOTInductor package)          a C++ compiler on the CPU
inductor       none: ``torch.compile`` in this process      a C++ compiler on the CPU
=============  ===========================================  ====================================

A runner takes ``{input name: tensor}`` and returns the outputs as a list of tensors.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Callable

import torch

from ..checks import check_int
from . import cache
from .components import Component
from .onnx_export import MIN_OPSET
from .profiles import ShapeProfile

logger = logging.getLogger("fastdiff.engines")

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Backend:
    """One engine backend, described as data: what it needs, what it does, what its artefact
    depends on. ``build(source, folder, profile, dtype, fields, options, exporter, progress)`` writes
    the artefact (None: nothing on disk); ``load(component, folder, fields, threads, options)`` gives a
    runner of named tensors."""

    name: str
    requirements: tuple            # (module to import, package to install)
    stages: tuple                  # what a build goes through, in order (progress is reported per stage)
    packages: tuple                # whose versions enter the cache key
    onnx: bool                     # the artefact is built from an ONNX export (opset in the key)
    devices: tuple                 # device types it runs on
    needs_compiler: bool           # a C++ compiler on the CPU (torch's inductor)
    build: Callable | None
    load: Callable | None


def _build_ort(source, folder, profile, dtype, fields, options, exporter, progress):
    from . import ort
    return ort.build(source, folder, profile, dtype, fields["opset"], exporter, progress)


def _load_ort(component, folder, fields, threads, options):
    from .ort import OrtEngine
    return OrtEngine(folder, next(component.module.parameters()).device, threads)


def _build_tensorrt(source, folder, profile, dtype, fields, options, exporter, progress):
    from . import tensorrt
    return tensorrt.build(source, folder, profile, dtype, fields["opset"], exporter,
                          {**fields["options"], **(options or {})}, progress)


def _load_tensorrt(component, folder, fields, threads, options):
    from .tensorrt import TensorRTEngine
    return TensorRTEngine(folder, next(component.module.parameters()).device, [s.name for s in component.inputs],
                          component.outputs, PRECISIONS[fields["precision"]], {**fields["options"], **(options or {})})


def _build_aoti(source, folder, profile, dtype, fields, options, exporter, progress):
    from . import inductor
    return inductor.build_aoti(source, folder, profile, dtype, progress)


def _load_aoti(component, folder, fields, threads, options):
    from .inductor import AotiEngine
    return AotiEngine(folder, next(component.module.parameters()).device, [s.name for s in component.inputs])


_ONNX = (("onnx", "onnx"), ("onnxscript", "onnxscript"))
REGISTRY = {b.name: b for b in (
    Backend("onnxruntime", _ONNX + (("onnxruntime", "onnxruntime (or onnxruntime-gpu)"),), ("export", "optimise"),
            ("onnx", "onnxruntime", "onnxruntime-gpu"), True, ("cpu", "cuda"), False, _build_ort, _load_ort),
    Backend("tensorrt", _ONNX + (("tensorrt", "tensorrt"),), ("export", "optimise", "build"),
            ("onnx", "tensorrt"), True, ("cuda",), False, _build_tensorrt, _load_tensorrt),
    Backend("aoti", (), ("export", "build"), (), False, ("cpu", "cuda"), True, _build_aoti, _load_aoti),
    Backend("inductor", (), (), (), False, ("cpu", "cuda"), True, None, None),
)}
BACKENDS = tuple(REGISTRY)
STAGES = {name: b.stages for name, b in REGISTRY.items() if b.stages}
INSTALL_HINT = 'pip install "fastdiff[onnx]"'   # the one form the README uses too


def missing_requirements(backend: str) -> list[str]:
    """The packages `backend` needs that are not installed (a C++ compiler for the CPU inductor ones)."""
    record = REGISTRY[backend]
    missing = [package for module, package in record.requirements if importlib.util.find_spec(module) is None]
    if record.needs_compiler and not torch.cuda.is_available() and shutil.which("g++") is None \
            and shutil.which("c++") is None:
        missing.append("a C++ compiler (g++)")
    return missing


def check_backend(backend: str, device: torch.device) -> str:
    """`backend` if it can run here; a clear error naming what to install otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    missing = missing_requirements(backend)
    if missing:
        raise ImportError(f"backend={backend!r} needs {', '.join(missing)}: install "
                          + ("it" if len(missing) == 1 else "them")
                          + (f" ({INSTALL_HINT})" if backend == "onnxruntime" else ""))
    if device.type not in REGISTRY[backend].devices:
        names = " and ".join(d.upper() if d == "cuda" else d for d in REGISTRY[backend].devices)
        raise ValueError(f"backend={backend!r} runs on {names} devices only; the model is on {device}")
    return backend


def pick_backend(device: torch.device) -> tuple[str, str]:
    """The best backend available for `device`, and why it was picked."""
    if device.type == "cuda":
        order = ["tensorrt", "inductor", "onnxruntime"]
        reasons = {"tensorrt": "TensorRT is installed", "inductor": "TensorRT is not installed; torch.compile "
                   "with CUDA graphs", "onnxruntime": "no TensorRT and no compiler"}
    else:
        order = ["onnxruntime", "inductor"]
        reasons = {"onnxruntime": "ONNX Runtime is installed (fastest on the CPU here)",
                   "inductor": "ONNX Runtime is not installed; torch.compile"}
    for name in order:
        if not missing_requirements(name):
            return name, reasons[name]
    raise ImportError("backend='auto' found no engine backend: install onnx, onnxscript and onnxruntime "
                      f"({INSTALL_HINT}) or a C++ compiler for torch.compile")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        name, why = pick_backend(device)
        logger.warning("backend='auto' picked %r: %s", name, why)
        return name
    return check_backend(backend, device)


def check_precision(precision: str | None, component: Component) -> str:
    if precision is None:
        return {v: k for k, v in PRECISIONS.items()}[component.dtype]
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
    return precision


def engine_fields(component: Component, backend: str, precision: str, profile: ShapeProfile,
                  opset: int = MIN_OPSET, options: dict | None = None) -> dict:
    """Everything an artefact depends on: the cache key's fields."""
    device = next(component.module.parameters()).device
    return {
        "component": component.name, "kind": component.kind,
        "module": type(component.module).__name__,
        "weights": cache.weights_hash(component.module), "lora": cache.lora_scales(component.module),
        "state": component.state,
        "backend": backend, "precision": precision, "profile": profile.to_dict(),
        "opset": opset if REGISTRY[backend].onnx else None,
        "inputs": [spec.name for spec in component.inputs], "outputs": component.outputs,
        "versions": cache.library_versions(REGISTRY[backend].packages), "device": cache.device_fields(device),
        "options": options or {},
    }


def _cast_copy(component: Component, dtype: torch.dtype) -> Component:
    """The component with its graph in `dtype` (a copy: the user's module keeps its dtype)."""
    if dtype == component.dtype:
        return component
    import copy
    from dataclasses import replace

    graph = copy.deepcopy(component.graph).to(dtype)
    return replace(component, graph=graph)


def build_artefact(component: Component, folder: str, fields: dict, *, rebuild: bool = False,
                   exporter: str = "auto", progress=None, options: dict | None = None) -> tuple[dict, bool]:
    """Build (or find up to date) the artefact of `fields` in `folder`; (manifest, built now).
    ``progress(stage)`` is called as each of the backend's stages ends."""
    record, dtype = REGISTRY[fields["backend"]], PRECISIONS[fields["precision"]]
    if record.build is None:
        raise ValueError(f"backend={record.name!r} (torch.compile) builds nothing on disk; use 'aoti' for a "
                         "persisted engine")
    profile = ShapeProfile.from_dict(fields["profile"])
    source = _cast_copy(component, dtype)
    return cache.build_or_load(
        folder, fields, lambda partial: record.build(source, partial, profile, dtype, fields, options, exporter,
                                                     progress),
        rebuild=rebuild)


def load_runner(component: Component, folder: str, fields: dict, *, threads: int | None = None,
                options: dict | None = None):
    """A runner over the checked artefact in `folder` (refused if it was built from anything else),
    loaded under the slot's lock so that a rebuild can't replace the folder meanwhile."""
    with cache.loading(folder):
        cache.check_artefact(folder, fields)
        return REGISTRY[fields["backend"]].load(component, folder, fields, threads, options)


def engine(component: Component, backend: str = "auto", *, profile: ShapeProfile, precision: str | None = None,
           cache_dir: str | None = None, rebuild: bool = False, opset: int = MIN_OPSET,
           options: dict | None = None, compile_mode: str | None = None, threads: int | None = None):
    """A runner for `component`: built or loaded from the cache (in memory for 'inductor')."""
    if not isinstance(component, Component):
        raise ValueError(f"component must be a fastdiff.engines.component(pipe, name), got {type(component).__name__}")
    if not isinstance(profile, ShapeProfile):
        raise ValueError(f"profile must be a ShapeProfile (batch, height, width ranges), got {profile!r}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise ValueError(f"cache_dir must be a folder path, got {cache_dir!r}")
    check_int(threads, "threads", 1, optional=True)
    if not isinstance(rebuild, bool):   # a string such as "no" would read as true
        raise ValueError(f"rebuild must be True or False, got {rebuild!r}")
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"options must be a dict of TensorRT's options, got {type(options).__name__}")
    device = next(component.module.parameters()).device
    backend = resolve_backend(backend, device)
    precision = check_precision(precision, component)
    if backend == "inductor":
        from .inductor import CompiledEngine
        if PRECISIONS[precision] != component.dtype:
            raise ValueError(f"precision={precision!r}: backend='inductor' compiles the module as it is "
                             f"({component.dtype}); cast the pipeline with .to(dtype) instead")
        return CompiledEngine(component, compile_mode)
    options = dict(options or {})
    if options and backend != "tensorrt":
        raise ValueError(f"options are TensorRT's ({sorted(options)}); backend={backend!r} takes none")
    if options:
        from .tensorrt import check_options
        check_options(options)
    # only what changes the plan goes into the key; CUDA graphs and the timing cache's path do not
    fields = engine_fields(component, backend, precision, profile, opset,
                           {k: options[k] for k in ("refit", "workspace_gb") if k in options})
    cache_dir = cache_dir or cache.default_cache_dir()
    folder = os.path.join(cache_dir, cache.slot_name(fields))
    covering = None if rebuild or os.path.exists(folder) else cache.find_covering(cache_dir, fields)
    if covering is not None:   # e.g. built by `fastdiff build` for a wider batch range
        folder = covering
        manifest, built = cache.read_manifest(folder), False
        fields = manifest["fields"]
    else:
        manifest, built = build_artefact(component, folder, fields, rebuild=rebuild, options=options)
    logger.info("%s %s engine for %s in %s", "built" if built else "loaded", backend, component.name, folder)
    runner = load_runner(component, folder, fields, threads=threads, options=options)
    runner.manifest, runner.folder, runner.backend, runner.built_now = manifest, folder, backend, built
    return runner
