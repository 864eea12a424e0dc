"""TorchInductor backends: AOTInductor packages (persisted) and torch.compile (in memory).

``aoti``: the component's graph is captured with ``torch.export`` (dynamic batch unless the
profile's is static, dynamic size when it spans several) and compiled ahead of time into a ``.pt2``
package that later loads without compiling again.

``inductor``: ``torch.compile`` of the graph in this process. Shapes are static (``dynamic=False``):
a stream calls its denoiser with one row count once full, so after the first calls nothing
recompiles. On CUDA the default mode is "reduce-overhead", which replays CUDA graphs.
"""

from __future__ import annotations

import os
import warnings

import torch

from .components import Component
from .onnx_export import _dims, dynamic_shapes, trace_size
from .profiles import ShapeProfile

ARTEFACT = "model.pt2"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def build_aoti(component: Component, folder: str, profile: ShapeProfile, dtype: torch.dtype, progress=None) -> dict:
    graph = component.graph.eval()
    device = next(component.module.parameters()).device
    batch = profile.batch[1] if profile.static_batch else max(profile.batch[1], 2)
    sample = component.sample_inputs(batch, *trace_size(component, profile), dtype=dtype, device=device)
    dims, _ = _dims(component, profile)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(graph, sample, dynamic_shapes=dynamic_shapes(component, dims), strict=False)
        progress and progress("export")
        torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(folder, ARTEFACT))
        progress and progress("build")
    return {"exporter": "torch.export", "device": str(device)}


class AotiEngine:
    def __init__(self, folder: str, device: torch.device, names: list[str]):
        self.names = names
        self.device = device
        self.runner = torch._inductor.aoti_load_package(os.path.join(folder, ARTEFACT))

    def __call__(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out = self.runner(*(feeds[n].contiguous() for n in self.names))
        return list(out) if isinstance(out, (tuple, list)) else [out]


def default_mode(device: torch.device) -> str:
    return "reduce-overhead" if device.type == "cuda" else "default"


class CompiledEngine:
    """torch.compile of the component's graph; compiles on first call for each new input shape."""

    def __init__(self, component: Component, mode: str | None = None):
        device = next(component.module.parameters()).device
        mode = mode or default_mode(device)
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES}, got {mode!r}")
        self.mode = mode
        self.names = [spec.name for spec in component.inputs]
        # Dynamo counts compilations per function, over every instance of a graph class: with several
        # streams (sessions, pipelines), each at a few row counts, torch's default of 8 would quietly
        # send the later ones back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.compiled = torch.compile(component.graph.eval(), mode=mode, dynamic=False, fullgraph=False)

    def __call__(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out = self.compiled(*(feeds[n] for n in self.names))
        if self.mode == "reduce-overhead":   # CUDA-graph outputs are overwritten by the next replay
            out = out.clone() if torch.is_tensor(out) else tuple(o.clone() for o in out)
        return list(out) if isinstance(out, (tuple, list)) else [out]
