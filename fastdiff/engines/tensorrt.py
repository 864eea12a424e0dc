"""The TensorRT backend: ONNX → TensorRT network → serialized plan; a runner on torch's CUDA stream.

Written against TensorRT 10 / 11's Python API (``tensorrt``). Precision lives in the ONNX graph
(it is exported in the engine's dtype) and the network is strongly typed, as TensorRT 11 requires
and 10 allows; there are no FP16/BF16 builder flags to set. One optimisation profile spans the
shape profile's (min, opt, max) batch and image size. A timing cache, shared by every build on the
same TensorRT version and GPU, makes rebuilds quick. With ``options["refit"]`` the plan is built
refittable and the artefact keeps the ONNX initializer → parameter map (:mod:`.refit`), so a LoRA
fused at another scale is refitted in place instead of rebuilding.

At run time the I/O buffers are torch tensors allocated once per input shape; inputs are copied
into them and the engine runs on a CUDA stream of its own (``execute_async_v3``), ordered after
and before torch's current stream. Every call's return value is checked. With
``options["cuda_graph"]`` each shape's execution is captured once into a CUDA graph and replayed; a
capture that fails falls back to direct execution, with a warning, and never replays an empty
graph. The engines of one process share one activation buffer (they run one after another).

Everything that does not need TensorRT itself (the profile's shapes, the refit map) is a plain
function here or in :mod:`.refit`, tested on every machine.
"""

from __future__ import annotations

import json
import os

import torch

from .components import Component
from .onnx_export import export_onnx, optimise_onnx
from .profiles import ShapeProfile

ONNX_FILE, PLAN_FILE, REFIT_FILE = "model.onnx", "model.plan", "refit_map.json"
OPTIONS = ("refit", "cuda_graph", "timing_cache", "workspace_gb")


def check_options(options: dict) -> dict:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"options has unknown TensorRT options {unknown}; accepted are {OPTIONS}")
    return options


def profile_shapes(component: Component, profile: ShapeProfile) -> dict[str, tuple[tuple, tuple, tuple]]:
    """{input: (min shape, opt shape, max shape)}: the optimisation profile of each input."""
    shapes = {}
    for spec in component.inputs:
        shapes[spec.name] = tuple(
            component.input_shape(spec, profile.batch[i], profile.height[i], profile.width[i]) for i in range(3))
    return shapes


def default_timing_cache(folder: str) -> str:
    """A timing cache per TensorRT version and GPU, beside the artefacts (the cache folder's parent)."""
    import tensorrt as trt

    major, minor = torch.cuda.get_device_capability()
    return os.path.join(os.path.dirname(os.path.abspath(folder)), f"timing-trt{trt.__version__}-sm{major}{minor}.cache")


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build(component: Component, folder: str, profile: ShapeProfile, dtype: torch.dtype, opset: int,
          exporter: str = "auto", options: dict | None = None, progress=None) -> dict:
    import tensorrt as trt

    options = check_options(dict(options or {}))
    onnx_path = os.path.join(folder, ONNX_FILE)
    details = export_onnx(component, onnx_path, profile, opset=opset, exporter=exporter, dtype=dtype)
    progress and progress("export")
    details["optimised"] = optimise_onnx(onnx_path, details["external_data"])
    if options.get("refit"):
        from .refit import weight_map
        with open(os.path.join(folder, REFIT_FILE), "w") as f:
            json.dump(weight_map(onnx_path, component.module, dtype), f)
    progress and progress("optimise")

    logger = _logger()
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):   # reads external data beside the file too
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT could not parse the ONNX of {component.name}: " + "; ".join(errors))

    config = builder.create_builder_config()
    if options.get("workspace_gb"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options["workspace_gb"] * 1024 ** 3))
    if options.get("refit"):
        config.set_flag(trt.BuilderFlag.REFIT)
    trt_profile = builder.create_optimization_profile()
    for name, (low, best, high) in profile_shapes(component, profile).items():
        trt_profile.set_shape(name, low, best, high)
    if config.add_optimization_profile(trt_profile) < 0:
        raise RuntimeError(f"TensorRT refused the optimisation profile of {component.name}: {profile}")

    cache_path = options.get("timing_cache") or default_timing_cache(folder)
    cache_bytes = open(cache_path, "rb").read() if os.path.isfile(cache_path) else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(timing_cache, False):
        raise RuntimeError(f"TensorRT refused the timing cache {cache_path}; delete it to start a new one")

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT could not build an engine for {component.name} (see its log above)")
    with open(os.path.join(folder, PLAN_FILE), "wb") as f:
        f.write(plan)
    _write_atomically(cache_path, bytes(timing_cache.serialize()))
    progress and progress("build")
    details.update(tensorrt=trt.__version__, strongly_typed=bool(flags), refittable=bool(options.get("refit")),
                   timing_cache=cache_path)
    return details


def _write_atomically(path: str, data: bytes):
    """Atomic across processes and threads: a private temporary file (pid and thread), then a rename."""
    import threading
    import uuid

    tmp = f"{path}.{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:6]}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class _SharedActivations:
    """One device buffer for the activations of every engine on a device (they run in turn), grown
    to the largest engine's need; each context points into it."""

    def __init__(self):
        self.buffers, self.contexts = {}, {}

    def attach(self, context, size: int, device: torch.device):
        key = str(device)
        self.contexts.setdefault(key, []).append(context)
        if key not in self.buffers or self.buffers[key].numel() < size:
            self.buffers[key] = torch.empty(size, dtype=torch.uint8, device=device)
            for ctx in self.contexts[key]:   # the buffer moved: every context points at the new one
                ctx.device_memory = self.buffers[key].data_ptr()
        else:
            context.device_memory = self.buffers[key].data_ptr()


SHARED_ACTIVATIONS = _SharedActivations()


def _torch_dtype(trt_dtype) -> torch.dtype:
    import tensorrt as trt

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}[trt_dtype]


class TensorRTEngine:
    """Named CUDA tensors in, output tensors out (copies: the buffers are reused by the next call)."""

    def __init__(self, folder: str, device: torch.device, input_names: list[str], output_names: list[str],
                 weights_dtype: torch.dtype, options: dict | None = None):
        import tensorrt as trt

        options = check_options(dict(options or {}))
        self.folder, self.device = folder, device
        self.input_names, self.output_names = input_names, output_names
        self.use_cuda_graph = bool(options.get("cuda_graph"))
        self.weights_dtype = weights_dtype
        self.logger = _logger()
        with open(os.path.join(folder, PLAN_FILE), "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {folder}/{PLAN_FILE} (built by another TensorRT or GPU?)")
        self.context = self._context(trt)
        self.stream = torch.cuda.Stream(device)   # ours, not the legacy default stream
        self.dtypes = {name: _torch_dtype(self.engine.get_tensor_dtype(name)) for name in input_names + output_names}
        self.buffers: dict[tuple, dict[str, torch.Tensor]] = {}   # input shapes → I/O tensors
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.current = None

    def _context(self, trt):
        """An execution context whose activations live in the shared buffer (where TensorRT allows)."""
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is None or not hasattr(self.engine, "device_memory_size_v2"):
            return self.engine.create_execution_context()
        context = self.engine.create_execution_context(strategy.USER_MANAGED)
        SHARED_ACTIVATIONS.attach(context, int(self.engine.device_memory_size_v2), self.device)
        return context

    def _set_shape(self, name: str, shape: tuple):
        if not self.context.set_input_shape(name, shape):
            raise RuntimeError(f"TensorRT refused the shape {shape} for {name} of {self.folder} (outside its profile?)")

    def _buffers_for(self, shapes: tuple) -> dict[str, torch.Tensor]:
        """The I/O tensors of one input-shape combination, allocated the first time it is seen."""
        if shapes not in self.buffers:
            buffers = {}
            for name, shape in zip(self.input_names, shapes):
                self._set_shape(name, shape)
                buffers[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            for name in self.output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                buffers[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.buffers[shapes] = buffers
        return self.buffers[shapes]

    def _bind(self, shapes: tuple, buffers: dict):
        if self.current == shapes:
            return
        for name, shape in zip(self.input_names, shapes):
            self._set_shape(name, shape)
        for name, tensor in buffers.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.current = shapes

    def __call__(self, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        shapes = tuple(tuple(feeds[name].shape) for name in self.input_names)
        buffers = self._buffers_for(shapes)
        for name in self.input_names:
            buffers[name].copy_(feeds[name])
        self._bind(shapes, buffers)
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)   # the inputs were copied on the caller's stream
        with torch.cuda.stream(self.stream):
            graph = self.graphs.get(shapes) if self.use_cuda_graph else None
            if self.use_cuda_graph and graph is None:
                graph = self._capture(shapes)
            if graph is not None:
                graph.replay()
            else:
                self._execute()
            outputs = [buffers[name].clone() for name in self.output_names]
        caller.wait_stream(self.stream)
        return outputs

    def _execute(self):
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution failed for {self.folder}")

    def _capture(self, shapes: tuple):
        """A CUDA graph of one execution at `shapes`; None (direct execution from then on, with a
        warning) when the capture fails — never an empty graph replayed for ever."""
        import warnings

        self._execute()   # a plain run first: TensorRT initialises lazily
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                if not self.context.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("execute_async_v3 returned False during capture")
        except Exception as error:  # noqa: BLE001 - any capture failure means: run directly
            warnings.warn(f"CUDA graph capture failed for {self.folder} ({error}); running without graphs",
                          RuntimeWarning, stacklevel=3)
            self.use_cuda_graph = False
            return None
        self.graphs[shapes] = graph
        return graph

    def refit(self, module: torch.nn.Module):
        """Load `module`'s current weights into the engine (built with options["refit"]): every weight
        the engine lists, each in the dtype of its prototype; parameters the map can't place must be
        unchanged, or the refit refuses to run (they would stay stale)."""
        import tensorrt as trt

        from .refit import changed_unplaced, constants_from, weights_from

        path = os.path.join(self.folder, REFIT_FILE)
        if not os.path.isfile(path):
            raise ValueError("refit: this engine was not built refittable; build it with options={'refit': True}")
        with open(path) as f:
            mapping = json.load(f)
        stale = changed_unplaced(module, mapping, self.weights_dtype)
        if stale:
            raise RuntimeError(f"refit: {len(stale)} changed parameters have no place in the engine's weights "
                               f"({stale[:5]}...); rebuild the engine instead")
        refitter = trt.Refitter(self.engine, self.logger)
        values = weights_from(module, mapping, self.weights_dtype)
        kept = []   # every array handed over stays alive until the refit is done
        for name in refitter.get_all_weights():
            prototype = refitter.get_weights_prototype(name)
            dtype = _torch_dtype(prototype.dtype)
            if name in values:
                tensor = values[name].to(dtype).contiguous()
            else:   # a graph constant no parameter feeds: its built value, unchanged
                tensor = constants_from(os.path.join(self.folder, ONNX_FILE), name).to(dtype).contiguous()
            kept.append(tensor)
            if not refitter.set_named_weights(name, trt.Weights(prototype.dtype, tensor.data_ptr(), tensor.numel())):
                raise RuntimeError(f"refit: TensorRT refused new weights for {name}")
        missing = refitter.get_missing_weights()
        if missing:
            raise RuntimeError(f"refit: weights not supplied for {missing[:5]}... ({len(missing)} in all)")
        torch.cuda.current_stream(self.device).synchronize()   # no execution may still read the old weights
        self.stream.synchronize()
        if not refitter.refit_cuda_engine():
            raise RuntimeError("refit: TensorRT could not refit the engine")
        self.graphs.clear()   # captured graphs hold the old weights' kernels' arguments
