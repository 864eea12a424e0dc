"""Export a component to ONNX: the dynamo exporter where it works, the TorchScript one otherwise.

The graph gets a dynamic batch axis unless the profile's batch is static, and dynamic height and
width when the profile spans several sizes. The dynamo exporter constant-folds and cleans the graph
with onnxscript's optimizer; onnxslim, when installed, slims it further. Models over 2 GB (the
protobuf limit) keep their weights in an external data file beside the graph.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings

import torch

from ..checks import check_int
from .components import Component, size_axis
from .profiles import ShapeProfile

logger = logging.getLogger("fastdiff.engines")

EXPORTERS = ("auto", "dynamo", "torchscript")
MIN_OPSET = 18
PROTOBUF_LIMIT = 2 * 1024 ** 3


def _dims(component: Component, profile: ShapeProfile):
    """{input: {axis: Dim}} for the dynamo exporter and {input: {axis: name}} for TorchScript."""
    from torch.export import Dim

    # diffusers' UNet takes another path at 64 rows or more (upsampling in chunks): stay below it.
    batch = None if profile.static_batch else Dim("batch", min=profile.batch[0], max=max(profile.batch[2], 2))
    divisor = component.size_divisor
    base = {}
    if not profile.static_size and component.uses_size():
        # sizes in units of the component's spatial grid; 8 keeps every UNet level's division exact
        base = {"H": Dim("height", min=profile.height[0] // divisor // 8, max=profile.height[2] // divisor // 8),
                "W": Dim("width", min=profile.width[0] // divisor // 8, max=profile.width[2] // divisor // 8)}
    dynamo, names = {}, {}
    for spec in component.inputs:
        axes, axis_names = {}, {}
        for axis, symbol in enumerate(spec.shape):
            size = size_axis(symbol)
            if symbol == "B" and batch is not None:
                axes[axis], axis_names[axis] = batch, "batch"
            elif size is not None and base:
                name, times, over = size
                if (8 * times) % over:
                    raise ValueError(f"{spec.name}: a size of {symbol} can't follow the dynamic size (multiples of 8)")
                factor = 8 * times // over
                axes[axis] = base[name] if factor == 1 else base[name] * factor
                axis_names[axis] = {"H": "height", "W": "width"}[name] + (symbol[1:] if len(symbol) > 1 else "")
        dynamo[spec.name] = axes or None
        names[spec.name] = axis_names
    return dynamo, names


def trace_size(component: Component, profile: ShapeProfile) -> tuple[int, int]:
    """The (height, width) a graph is traced at: the profile's optimal one — unless its size is
    dynamic and that is one unit of the dynamic size (8 latents), which torch.export would
    specialise as it does a size of 1; then two, where the profile reaches them."""
    unit = component.size_divisor * 8

    def size(span):
        low, opt, high = span
        return 2 * unit if opt == unit and high >= 2 * unit else opt
    if profile.static_size or not component.uses_size():
        return profile.height[1], profile.width[1]
    return size(profile.height), size(profile.width)


def dynamic_shapes(component: Component, dims: dict):
    """torch.export's dynamic shapes of `component`'s graph from {input: axes}: keyed as the graph's
    forward binds its inputs, a ``*rest`` parameter taking those beyond its named ones as a tuple
    (the UNet's graph takes image embeddings and ControlNet residuals so); None when all are static."""
    if not any(dims.values()):
        return None
    names = [spec.name for spec in component.inputs]
    shapes, taken = {}, 0
    for parameter in inspect.signature(component.graph.forward).parameters.values():
        if parameter.kind == parameter.VAR_POSITIONAL:
            if taken < len(names):   # (torch.export binds no key for an empty *rest)
                shapes[parameter.name] = tuple(dims[name] for name in names[taken:])
            break
        if taken < len(names):
            shapes[parameter.name] = dims[names[taken]]
            taken += 1
    return shapes


def _weights_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """The weights' size once exported in `dtype` (floating tensors take its size, the rest theirs)."""
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() * (size if p.is_floating_point() else p.element_size()) for p in module.state_dict().values())


def export_onnx(component: Component, path: str, profile: ShapeProfile, *, opset: int = MIN_OPSET,
                exporter: str = "auto", dtype: torch.dtype | None = None) -> dict:
    """Write `component` as ONNX to `path`; returns what was done: exporter, opset, external data."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    import onnx

    check_int(opset, "opset", MIN_OPSET, onnx.defs.onnx_opset_version())   # the newest the installed onnx knows
    profile.check_multiple(component.size_divisor * (8 if component.size_divisor > 1 and not profile.static_size else 1))
    dtype = dtype or component.dtype
    graph = component.graph.eval()
    # trace at the optimal batch, but at least 2: a size-1 axis would be specialised away
    sample = component.sample_inputs(max(profile.batch[1], 2) if not profile.static_batch else profile.batch[1],
                                     *trace_size(component, profile), dtype=dtype,
                                     device=next(component.module.parameters()).device)
    names = [spec.name for spec in component.inputs]
    dynamo_dims, axis_names = _dims(component, profile)
    external = _weights_bytes(component.module, dtype) > PROTOBUF_LIMIT * 0.9
    folder = os.path.dirname(os.path.abspath(path))
    before = set(os.listdir(folder))
    errors = []
    # the exporter warns about every torchvision op it cannot register when torchvision is absent
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    for name in (["dynamo", "torchscript"] if exporter == "auto" else [exporter]):
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if name == "dynamo":
                    program = torch.onnx.export(
                        graph, sample, None, dynamo=True, opset_version=opset, input_names=names,
                        output_names=component.outputs, dynamic_shapes=dynamic_shapes(component, dynamo_dims),
                        optimize=True, verbose=False)
                    program.save(path, external_data=external)
                else:
                    torch.onnx.export(
                        graph, sample, path, dynamo=False, opset_version=opset, input_names=names,
                        output_names=component.outputs, dynamic_axes={k: v for k, v in axis_names.items() if v},
                        do_constant_folding=True)
                    if external:
                        _move_to_external_data(path)
                        _remove_strays(folder, before, path)
            break
        except Exception as error:  # noqa: BLE001 - any exporter failure means: try the next one
            cause = error.__cause__ or error   # the exporter's own error wraps the real one
            errors.append(f"{name}: {type(cause).__name__}: {str(cause).strip()[:300]}")
            logger.info("ONNX export of %s with the %s exporter failed: %s", component.name, name, errors[-1])
    else:
        raise RuntimeError(f"ONNX export of {component.name} failed:\n" + "\n".join(errors))
    written = sorted(set(os.listdir(folder)) - before)
    return {"exporter": name, "opset": opset, "external_data": external, "files": written,
            "fallback_reason": errors[0] if errors else None}


def _remove_strays(folder: str, before: set, path: str) -> list[str]:
    """Delete what the TorchScript exporter wrote per tensor beside `path` once it is merged into one
    ``.data`` file (an SDXL UNet would leave gigabytes of them otherwise)."""
    keep = {os.path.basename(path), os.path.basename(path) + ".data"}
    strays = [name for name in set(os.listdir(folder)) - before - keep]
    for name in strays:
        full = os.path.join(folder, name)
        if os.path.isfile(full):
            os.remove(full)
    return strays


def _move_to_external_data(path: str):
    import onnx

    model = onnx.load(path)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data")


def optimise_onnx(path: str, external: bool) -> str:
    """Constant folding and dead-node removal by onnxslim when it is installed; what was done."""
    try:
        import onnxslim
    except ImportError:
        return "onnxslim not installed: the exporter's own optimisation only"
    if external:   # onnxslim rewrites the graph in memory; models beyond protobuf's limit stay as they are
        return "skipped: external data"
    onnxslim.slim(path, path)
    return "onnxslim"
