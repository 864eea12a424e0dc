"""The refit weight map: which module parameter each ONNX initializer holds.

TensorRT's ONNX parser names an engine's weights after the ONNX initializers, so refitting an
engine with new weights (a LoRA fused at another scale) means computing every initializer from
the module's current state dict. The map is found once, when the ONNX file is written: by name
(exporters keep parameter names, under the graph wrapper's prefix), else by value, as stored or
transposed (exporters fold ``W.T`` of linear layers into new initializers). Initializers that
match no parameter are constants of the graph (shapes, frequency tables) and stay as built.
Nothing here needs TensorRT: applying the map to an ONNX file (:func:`apply_to_onnx`) is how it is
checked, with ONNX Runtime, wherever TensorRT is not installed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

# initializers this small that match no parameter are graph constants, not weights
MIN_WEIGHT_ELEMENTS = 64


def _digest(array: np.ndarray) -> str:
    # values only: exporters also fold a parameter into a reshaped constant (e.g. [1, L, D] of [L, D])
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest() + array.dtype.str


def _state_arrays(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, np.ndarray]:
    # bfloat16 has no numpy type: compare its bits as int16
    as_numpy = (lambda t: t.view(torch.int16).numpy()) if dtype == torch.bfloat16 else (lambda t: t.numpy())
    return {name: as_numpy(t.detach().to("cpu", dtype).contiguous()) for name, t in module.state_dict().items()}


def _initializer_arrays(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    arrays = {}
    for init in model.graph.initializer:
        array = numpy_helper.to_array(init)
        if str(array.dtype) == "bfloat16":   # compared as raw bits, like the parameters
            array = array.view(np.int16)
        arrays[init.name] = array
    return arrays


def weight_map(onnx_path: str, module: torch.nn.Module, dtype: torch.dtype) -> dict:
    """{"map": {initializer: {"param": name, "transpose": bool, "shape": [...]}}, "unmapped": [initializers that
    look like weights but match no parameter], "unplaced": {parameter: digest}} for the ONNX file
    exported from `module` in `dtype`. "unplaced" holds the parameters no initializer maps to (equal
    constants the exporter shared, say): a refit can't reach them, so it refuses to run once any of
    them has changed (:func:`changed_unplaced`) rather than leave them stale."""
    import onnx

    model = onnx.load(onnx_path, load_external_data=True)
    params = _state_arrays(module, dtype)
    by_value, by_transposed = {}, {}   # digest → parameter names with those values
    for name, array in params.items():
        by_value.setdefault(_digest(array), []).append(name)
        if array.ndim == 2:
            by_transposed.setdefault(_digest(array.T), []).append(name)
    mapping, unmapped = {}, []
    for init_name, array in _initializer_arrays(model).items():
        # the graph wrapper's attribute ("unet.", "vae.") prefixes the module's own parameter names
        named = init_name if init_name in params else init_name.split(".", 1)[-1]
        if named in params and params[named].shape == array.shape and np.array_equal(params[named], array):
            mapping[init_name] = {"param": named, "transpose": False, "shape": list(array.shape)}
            continue
        digest = _digest(array)
        same, transposed = by_value.get(digest, []), by_transposed.get(digest, [])
        # several parameters with equal values (fresh biases, say) would make the map a guess: unmapped
        if len(same) == 1:
            mapping[init_name] = {"param": same[0], "transpose": False, "shape": list(array.shape)}
        elif not same and len(transposed) == 1:
            mapping[init_name] = {"param": transposed[0], "transpose": True, "shape": list(array.shape)}
        elif array.size >= MIN_WEIGHT_ELEMENTS and array.dtype.kind == "f" or same or transposed:
            unmapped.append(init_name)
    placed = {entry["param"] for entry in mapping.values()}
    unplaced = {name: _digest(array) for name, array in params.items() if name not in placed}
    return {"map": mapping, "unmapped": sorted(unmapped), "unplaced": dict(sorted(unplaced.items()))}


def changed_unplaced(module: torch.nn.Module, mapping: dict, dtype: torch.dtype) -> list[str]:
    """The parameters no initializer holds whose values changed since the map was made."""
    unplaced = mapping.get("unplaced", {})
    if not unplaced:
        return []
    params = _state_arrays(module, dtype)
    return sorted(name for name, digest in unplaced.items() if name not in params or _digest(params[name]) != digest)


def weights_from(module: torch.nn.Module, mapping: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every mapped initializer's value computed from `module`'s current weights, in `dtype`, contiguous."""
    state = module.state_dict()
    values = {}
    for init_name, entry in mapping["map"].items():
        tensor = state[entry["param"]].detach().to("cpu", dtype)
        values[init_name] = (tensor.t() if entry["transpose"] else tensor).contiguous().reshape(entry["shape"])
    return values


def constants_from(onnx_path: str, name: str) -> torch.Tensor:
    """The value an initializer was built with (a graph constant a refit hands back unchanged)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_path, load_external_data=True)
    for init in model.graph.initializer:
        if init.name == name:
            return torch.from_numpy(numpy_helper.to_array(init).copy())
    raise KeyError(f"refit: no initializer {name!r} in {onnx_path}")


def apply_to_onnx(onnx_path: str, out_path: str, module: torch.nn.Module, mapping: dict, dtype: torch.dtype):
    """Write a copy of the ONNX file with its weights refitted from `module` (the map's check)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_path, load_external_data=True)
    values = weights_from(module, mapping, dtype)
    for init in model.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name].numpy(), init.name))
    onnx.save_model(model, out_path)
