"""The ONNX Runtime backend: an ONNX file and an InferenceSession over it.

On the CPU inputs go in as numpy views of the torch tensors (no copy). With onnxruntime-gpu and
CUDA tensors, inputs and outputs stay on the device through an IO binding, and the session tries
the TensorRT, then the CUDA execution provider.
"""

from __future__ import annotations

import os

import torch

from .components import Component
from .onnx_export import export_onnx, optimise_onnx
from .profiles import ShapeProfile

ARTEFACT = "model.onnx"


def build(component: Component, folder: str, profile: ShapeProfile, dtype: torch.dtype, opset: int,
          exporter: str = "auto", progress=None) -> dict:
    path = os.path.join(folder, ARTEFACT)
    details = export_onnx(component, path, profile, opset=opset, exporter=exporter, dtype=dtype)
    progress and progress("export")
    details["optimised"] = optimise_onnx(path, details["external_data"])
    progress and progress("optimise")
    return details


def providers_for(device: torch.device) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.type == "cuda":
        wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        chosen = [p for p in wanted if p in available]
        if not chosen:
            raise RuntimeError("onnxruntime has no CUDA execution provider here; install onnxruntime-gpu "
                               "to run ONNX engines on a CUDA device")
        return chosen
    return ["CPUExecutionProvider"]


class OrtEngine:
    """Named torch tensors in, a list of torch tensors out, on the device of the inputs."""

    def __init__(self, folder: str, device: torch.device, threads: int | None = None, spin: bool = False):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # Between per-module engine calls torch runs the stream's own ops on the same cores: ONNX
        # Runtime's threads must sleep when idle, not spin, or the two thread pools slow each other
        # down. `spin` is for a session that leaves torch next to nothing to run between its calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.device = device
        self.session = ort.InferenceSession(os.path.join(folder, ARTEFACT), options, providers=providers_for(device))
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if self.device.type == "cuda":
            return self._run_bound(feeds)
        arrays = {name: value.detach().contiguous().cpu().numpy() for name, value in feeds.items()}
        return [torch.from_numpy(out) for out in self.session.run(self.output_names, arrays)]

    def _run_bound(self, feeds):
        binding = self.session.io_binding()
        for name, value in feeds.items():
            value = value.contiguous()
            binding.bind_input(name, value.device.type, value.device.index or 0, _numpy_type(value.dtype),
                               tuple(value.shape), value.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, self.device.type, self.device.index or 0)
        self.session.run_with_iobinding(binding)
        # outputs come back as OrtValues on the device; DLPack hands them to torch without a copy
        return [torch.from_dlpack(v) for v in binding.get_outputs()]


def _numpy_type(dtype: torch.dtype):
    import numpy as np

    types = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}
    if dtype not in types:
        raise ValueError(f"precision: ONNX Runtime engines take float32 or float16 tensors here, got {dtype}")
    return types[dtype]
