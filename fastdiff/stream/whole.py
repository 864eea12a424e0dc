"""The full stream's steady call — encode, denoiser, step, decode — as one compiled graph.

Two backends:

- ``"inductor"``: ``torch.compile`` of the whole call (on CUDA with CUDA graphs, mode
  ``"reduce-overhead"``, unless a mode is given);
- ``"onnxruntime"``: the call exported once to ONNX (the dynamo exporter, at the stream's fixed
  shapes) and run in one ONNX Runtime session, so that no Python and no separate kernels run
  between encode, denoiser, step and decode.

The prompt's conditioning is an input of the graph: a prompt change needs no rebuild. What the graph
bakes in — the schedule's and the guider's coefficients, the fixed noise, and for ONNX Runtime the
weights — makes it stale when those change, and the stream drops it then
(:meth:`fastdiff.Stream._drop_whole`).
"""

from __future__ import annotations

import logging
import tempfile
import warnings

import torch

from ..denoiser import Conditioning

WHOLE_BACKENDS = ("inductor", "onnxruntime")
_INPUTS = ("pixels", "buffer", "residual", "embeds")
_OUTPUTS = ("images", "finished", "buffer_next", "residual_next")


class WholeStep:
    """``(pixels, buffer, residual, cond) -> (images, finished, buffer', residual')`` for a full
    stream; ``pixels`` None for txt2img, ``buffer`` None with one slot, ``residual`` None without
    residual guidance. Build with :meth:`make`, which says None where the stream has no steady step
    it can express (fresh noise)."""

    def __init__(self, function, backend: str, compile_mode: str | None, device: torch.device,
                 threads: int | None):
        self.function, self.backend, self.device, self.threads = function, backend, device, threads
        self.compiled = None
        if backend == "inductor":
            mode = compile_mode or ("reduce-overhead" if device.type == "cuda" else None)
            self.compiled = torch.compile(function, mode=mode, dynamic=False)
        self._folder = None   # the ONNX file's temporary folder, deleted with the step
        self._present = None  # which inputs and outputs the exported graph has

    @classmethod
    def make(cls, latents, codec, backend: str, compile_mode: str | None = None, threads: int | None = None):
        step = latents.steady_step()
        if step is None:
            return None
        schedule = latents.schedule
        a0, b0 = float(schedule.alpha[0]), float(schedule.beta[0])
        eps0 = latents._fixed_noise()[0]
        noise_scale = schedule.noise_scale

        def whole(pixels, buffer, residual, embeds, *extras, extra_names=()):
            cond = Conditioning(embeds, dict(zip(extra_names, extras)))
            clean = None if pixels is None else codec.encode_unit(pixels)
            x_new = noise_scale * eps0 if clean is None else a0 * clean + b0 * eps0
            finished, buffer, residual = step(x_new.to(latents.dtype), eps0, buffer, residual, cond)
            return codec.decode_unit(finished), finished, buffer, residual

        return cls(whole, backend, compile_mode, latents.device, threads)

    def __call__(self, pixels, buffer, residual, cond: Conditioning):
        if cond.route is not None:
            raise ValueError("compile='whole' runs one network; a routed stream (router=...) runs per-module")
        names = tuple(sorted(cond.extras))
        extras = [cond.extras[k] for k in names]
        if self.backend == "inductor":
            return self.compiled(pixels, buffer, residual, cond.embeds, *extras, extra_names=names)
        inputs = dict(zip(_INPUTS, (pixels, buffer, residual, cond.embeds)), **dict(zip(names, extras)))
        feeds = {k: v for k, v in inputs.items() if v is not None}
        if self._folder is None:
            self._export(feeds, names)
        outputs = iter(self.engine(feeds))
        return tuple(next(outputs) if present else None for present in self._present)

    def _export(self, feeds: dict, extra_names: tuple):
        """The ONNX graph at these inputs' shapes, and its ONNX Runtime session."""
        from ..engines.ort import ARTEFACT, OrtEngine

        function, order = self.function, list(feeds)

        class Graph(torch.nn.Module):
            def forward(self, *tensors):
                given = dict(zip(order, tensors))
                args = [given.get(k) for k in _INPUTS] + [given[k] for k in extra_names]
                return tuple(out for out in function(*args, extra_names=extra_names) if out is not None)

        # the step keeps a buffer and a residual out exactly when they came in (a full stream's shape)
        self._present = (True, True, "buffer" in feeds, "residual" in feeds)
        logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the exporter's own chatter
            sample = tuple(v.clone() for v in feeds.values())   # ordinary tensors: export refuses inference ones
            program = torch.onnx.export(Graph(), sample, None, dynamo=True, opset_version=18, input_names=order,
                                        output_names=[n for n, p in zip(_OUTPUTS, self._present) if p],
                                        optimize=True, verbose=False)
        self._folder = tempfile.TemporaryDirectory(prefix="fastdiff-whole-")
        program.save(f"{self._folder.name}/{ARTEFACT}")
        # the graph is the whole frame, with next to no torch work between its runs: its threads may
        # spin between parallel ops instead of being woken for each (a quarter off a CPU frame, measured)
        self.engine = OrtEngine(self._folder.name, self.device, self.threads or torch.get_num_threads(), spin=True)
