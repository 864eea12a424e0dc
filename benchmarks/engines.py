"""Engines against eager PyTorch: denoiser latency and end-to-end stream frames/s.

    python benchmarks/engines.py [--pipelines tiny,shapes] [--backends onnxruntime,aoti,inductor,whole,whole-onnxruntime]
                                 [--batches 1,2,4] [--frames 30] [--rounds 3] [--threads N] [--workers N]
                                 [--out results.json]
    python benchmarks/engines.py --gpu [--archs sd-turbo,sd15,sdxl,sd3] [--size 512]

CPU (default). For each pipeline (``tiny``: the tiny random-weight SD-1.x pipeline of
:mod:`fastdiff.architectures`, LCM, 64×64; ``shapes``: the embedded shapes model, 64×64), in one run:

- denoiser latency: one call on B rows (the stream's batch sizes: B = n·F rows for n steps and F
  frames per call) with the stream's conditioning, eager PyTorch against each backend's engine;
- stream frames/s: ``fastdiff.Stream`` img2img, n = 2 steps ([32, 45] of 50), cfg "self", F = 1,
  with the denoiser and both VAE halves as engines (for ``whole`` / ``whole-onnxruntime`` among the
  backends: the whole steady step as one graph, ``Stream(compile="whole")`` through torch.compile /
  ONNX Runtime), against the eager stream and against diffusers'
  StableDiffusionImg2ImgPipeline called once per frame on the same two timesteps (guidance 1, no
  CFG batch, precomputed prompt embeddings; the per-frame baseline of the stream benchmark).
  With ``--workers N`` the ONNX Runtime stream also runs with ``engine_options={"workers": N}``
  (its denoiser call as N calls side by side on one-thread sessions).

Configurations take turns call by call (a shuffled order per sweep) so that load from other
processes hits them alike; speed-ups are medians over sweeps of same-sweep time ratios. Engines
are built (or loaded from a private cache folder) before timing; build times are reported apart.

GPU (``--gpu``; needs CUDA): the real architectures with random weights (SD-Turbo, SD 1.5, SDXL,
SD3's DiT) at ``--size`` px, float16: one denoiser call eager against ``torch.compile`` with CUDA
graphs (mode "reduce-overhead"), and TensorRT when it imports; the FLOPs of one call (counted by
``torch.utils.flop_counter``) against the measured peak of a large float16 matmul on the same GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from machine import environment  # noqa: E402
from fastdiff import Stream  # noqa: E402
from fastdiff.engines import ShapeProfile, component, engine  # noqa: E402

# the whole steady step as one graph: torch.compile ("whole") or ONNX Runtime ("whole-onnxruntime")
WHOLE = ("whole", "whole-onnxruntime")

PROMPT = "a large red circle on the left, blue background"
STEPS = [32, 45]
WARMUP = 5
SPIN_PAUSE_S = 0.1   # longer than ONNX Runtime's threads spin after a run (see interleave)


# -- timing ------------------------------------------------------------------------------------------
def interleave(calls: dict, sweeps: int, rounds: int, seed: int = 0, block: int = 1) -> dict[str, list[float]]:
    """{name: [seconds per call]}: every sweep runs each configuration in a shuffled order, `block`
    timed calls in a row. With block > 1 each configuration's turn starts after a pause and one
    untimed call: the whole step's ONNX Runtime threads spin for about 40 ms after a run (measured),
    which would otherwise slow whatever is timed next."""
    rng = random.Random(seed)
    times = {name: [] for name in calls}
    with torch.inference_mode():
        for fn in calls.values():
            for _ in range(WARMUP):
                fn()
        for _ in range(rounds):
            for _ in range(max(1, sweeps // block)):
                order = list(calls)
                rng.shuffle(order)
                for name in order:
                    if block > 1:
                        time.sleep(SPIN_PAUSE_S)
                        calls[name]()
                    for _ in range(block):
                        t0 = time.perf_counter()
                        calls[name]()
                        times[name].append(time.perf_counter() - t0)
    return times


def paired(times: dict, name: str, base: str) -> float:
    """Median over sweeps of base's time / name's time: how many times faster `name` is."""
    return statistics.median(b / a for a, b in zip(times[name], times[base]))


# -- CPU ---------------------------------------------------------------------------------------------
def load(name: str):
    if name == "tiny":
        from fastdiff.architectures import tiny_sd_pipeline
        pipe = tiny_sd_pipeline(scheduler="lcm")
    elif name == "shapes":
        from fastdiff.shapes.model import load_pipeline
        pipe = load_pipeline()
    else:
        raise SystemExit(f"--pipelines takes tiny and shapes, got {name!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoiser_rows(pipe, batch: int):
    """The stream's conditioning and latents for `batch` rows of its denoiser call."""
    stream = Stream(pipe, STEPS, cfg="none")
    stream.prepare(PROMPT)
    part = component(pipe, "denoiser")
    cond = stream.latents.cond
    embeds = cond.embeds[:1].expand(batch, -1, -1).contiguous()
    g = torch.Generator().manual_seed(0)
    x = torch.randn((batch,) + stream.latent_shape, generator=g)
    t = torch.linspace(900, 100, batch)
    return part, {"sample": x, "timestep": t, "encoder_hidden_states": embeds}


def cpu_denoiser(pipe_name, pipe, backends, batches, cache_dir, threads, sweeps, rounds, build_log):
    rows = []
    profile = ShapeProfile((1, max(batches) // 2 or 1, max(batches)), (64, 64, 64), (64, 64, 64))
    runners = {}
    for backend in backends:
        part, _ = denoiser_rows(pipe, 1)
        t0 = time.perf_counter()
        runners[backend] = engine(part, backend, profile=profile, cache_dir=cache_dir, threads=threads)
        build_log.append({"pipeline": pipe_name, "component": "denoiser", "backend": backend,
                          "seconds": round(time.perf_counter() - t0, 1)})
    for batch in batches:
        part, feeds = denoiser_rows(pipe, batch)
        unet = pipe.unet
        calls = {"eager": lambda: unet(feeds["sample"], feeds["timestep"],
                                       encoder_hidden_states=feeds["encoder_hidden_states"], return_dict=False)}
        for backend, runner in runners.items():
            calls[backend] = (lambda r=runner: r(feeds))
        times = interleave(calls, sweeps, rounds)
        for name in calls:
            rows.append({"pipeline": pipe_name, "batch": batch, "method": name,
                         "ms": statistics.median(times[name]) * 1e3,
                         "speedup_vs_eager": paired(times, name, "eager") if name != "eager" else 1.0})
        print(f"  denoiser {pipe_name} B={batch} done", file=sys.stderr, flush=True)
    return rows


def cpu_stream(pipe_name, pipe, backends, cache_dir, threads, sweeps, rounds, build_log, backends_extra=(),
               block: int = 1, workers: int = 1):
    from diffusers import StableDiffusionImg2ImgPipeline

    g = torch.Generator().manual_seed(1)
    frames = [torch.rand(1, 3, 64, 64, generator=g) for _ in range(4)]
    state = {"i": 0}

    def next_frame():
        state["i"] = (state["i"] + 1) % len(frames)
        return frames[state["i"]]

    streams = {"eager": Stream(pipe, STEPS, cfg="self", output_type="pt")}
    side_by_side = [("onnxruntime", workers)] if "onnxruntime" in backends and workers > 1 else []
    for backend, n in [(b, 1) for b in backends] + side_by_side:
        t0 = time.perf_counter()
        options = {"cache_dir": cache_dir} | ({"threads": threads} if threads else {}) | \
            ({"workers": n} if n > 1 else {})
        s = Stream(pipe, STEPS, cfg="self", output_type="pt", backend=backend, engine_options=options)
        s.prepare(PROMPT)
        name = backend if n == 1 else f"{backend}, {n} workers"
        build_log.append({"pipeline": pipe_name, "component": "stream (denoiser + VAE)", "backend": name,
                          "seconds": round(time.perf_counter() - t0, 1)})
        streams[name] = s
    streams["eager"].prepare(PROMPT)
    for extra in backends_extra:   # the whole steady step (encode + UNet + step + decode) as one graph
        compile_backend = "onnxruntime" if extra == "whole-onnxruntime" else "inductor"
        t0 = time.perf_counter()
        s = Stream(pipe, STEPS, cfg="self", output_type="pt", compile="whole", compile_backend=compile_backend)
        s.prepare(PROMPT)
        with torch.inference_mode():
            for _ in range(len(STEPS) + 1):   # fills the stream, then compiles
                s(next_frame())
        build_log.append({"pipeline": pipe_name, "component": "stream (whole step)",
                          "backend": {"inductor": "torch.compile", "onnxruntime": "ONNX Runtime"}[compile_backend],
                          "seconds": round(time.perf_counter() - t0, 1)})
        streams[f"whole step ({compile_backend})"] = s
    calls = {f"fastdiff {name}": (lambda s=s: s(next_frame())) for name, s in streams.items()}

    # diffusers' img2img takes custom timesteps only from schedulers that accept them (LCM does, the
    # shapes model's DDIM does not): the baseline runs LCM's step on the same two timesteps, which
    # costs what DDIM's would (two denoiser calls on one row, one encode, one decode)
    from diffusers import LCMScheduler

    components = dict(pipe.components, scheduler=LCMScheduler.from_config(pipe.scheduler.config))
    img2img = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    timesteps = [int(t) for t in streams["eager"].schedule.timesteps.round()]
    with torch.inference_mode():
        embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    calls["diffusers per frame"] = lambda: img2img(prompt_embeds=embeds, image=next_frame(), strength=1.0,
                                                   timesteps=timesteps, guidance_scale=1.0, output_type="pt").images
    times = interleave(calls, sweeps, rounds, block=block)
    rows = []
    for name in calls:
        ms = statistics.median(times[name]) * 1e3
        rows.append({"pipeline": pipe_name, "method": name, "ms": ms, "fps": 1e3 / ms,
                     "speedup_vs_diffusers": paired(times, name, "diffusers per frame"),
                     "speedup_vs_eager_stream": paired(times, name, "fastdiff eager")})
    print(f"  stream {pipe_name} done", file=sys.stderr, flush=True)
    return rows


def cpu_tables(result) -> str:
    lines = ["| pipeline | rows B | method | ms/call | × eager |", "|---|---:|---|---:|---:|"]
    for r in result["denoiser"]:
        lines.append(f"| {r['pipeline']} | {r['batch']} | {r['method']} | {r['ms']:.2f} | {r['speedup_vs_eager']:.2f}× |")
    lines += ["", "| pipeline | method | ms/frame | frames/s | × diffusers per frame | × eager stream |",
              "|---|---|---:|---:|---:|---:|"]
    for r in result["stream"]:
        lines.append(f"| {r['pipeline']} | {r['method']} | {r['ms']:.2f} | {r['fps']:.1f} | "
                     f"{r['speedup_vs_diffusers']:.2f}× | {r['speedup_vs_eager_stream']:.2f}× |")
    lines += ["", "| pipeline | engine | backend | build or load, s |", "|---|---|---|---:|"]
    for r in result["builds"]:
        lines.append(f"| {r['pipeline']} | {r['component']} | {r['backend']} | {r['seconds']} |")
    return "\n".join(lines)


# -- GPU ---------------------------------------------------------------------------------------------
def matmul_peak_tflops(dtype=torch.float16, n: int = 8192, repeats: int = 20) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def cuda_ms(fn, repeats: int = 30) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu(args) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from fastdiff.architectures import ARCHITECTURES

    peak = matmul_peak_tflops()
    rows = []
    for arch in args.archs.split(","):
        pipe = ARCHITECTURES[arch].pipeline(torch_dtype=torch.float16, device="cuda")
        for batch in [int(b) for b in args.batches.split(",")]:
            part = component(pipe, "denoiser")
            inputs = part.sample_inputs(batch, args.size, args.size, device="cuda")
            graph = part.graph.eval()
            compiled = torch.compile(graph, mode="reduce-overhead", dynamic=False)
            methods = {"eager": lambda: graph(*inputs), "inductor + CUDA graphs": lambda: compiled(*inputs)}
            try:   # built outside inference mode: export traces the module
                static = ShapeProfile((batch,) * 3, (args.size,) * 3, (args.size,) * 3)
                runner = engine(part, "tensorrt", profile=static, options={"cuda_graph": True})
                feeds = dict(zip([s.name for s in part.inputs], inputs))
                methods["tensorrt + CUDA graphs"] = lambda: runner(feeds)
            except Exception as error:  # noqa: BLE001 - no TensorRT here, or its build failed: say so, go on
                print(f"  {arch} B={batch}: no TensorRT run ({type(error).__name__}: {error})", file=sys.stderr)
            with torch.inference_mode():
                with FlopCounterMode(display=False) as counter:
                    graph(*inputs)
                flops = counter.get_total_flops()
                eager_ms = None
                for name, fn in methods.items():
                    ms = cuda_ms(fn)
                    eager_ms = eager_ms or ms
                    rows.append({"arch": arch, "batch": batch, "method": name, "ms": ms, "speedup": eager_ms / ms,
                                 "tflops": flops / (ms / 1e3) / 1e12, "of_peak": flops / (ms / 1e3) / 1e12 / peak,
                                 "gflop_per_call": flops / 1e9})
            print(f"  {arch} B={batch} done", file=sys.stderr, flush=True)
        del pipe
        torch.cuda.empty_cache()
    return {"matmul_peak_tflops": peak, "rows": rows}


def gpu_table(result) -> str:
    lines = [f"float16 matmul peak measured: {result['matmul_peak_tflops']:.0f} TFLOP/s", "",
             "| arch | B | method | ms/call | × eager | GFLOP/call | TFLOP/s | % of matmul peak |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['arch']} | {r['batch']} | {r['method']} | {r['ms']:.2f} | {r['speedup']:.2f}× | "
                     f"{r['gflop_per_call']:.0f} | {r['tflops']:.0f} | {100 * r['of_peak']:.0f}% |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipelines", default="tiny,shapes")
    parser.add_argument("--backends", default="onnxruntime,aoti,inductor")
    parser.add_argument("--batches", default="1,2,4", help="denoiser rows per call")
    parser.add_argument("--frames", type=int, default=30, help="sweeps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block", type=int, default=5,
                        help="stream frames timed in a row per configuration, after one untimed (1: frame by frame)")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads")
    parser.add_argument("--workers", type=int, default=1,
                        help="the ONNX Runtime stream also with engine_options['workers'] at this")
    parser.add_argument("--cache-dir", default=None, help="engine cache (default: a fresh temporary folder)")
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmark instead (needs CUDA)")
    parser.add_argument("--archs", default="sd-turbo,sd15,sdxl,sd3")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()   # custom timestep schedules warn on every call
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"environment": environment(
        [os.path.relpath(__file__)] + argv, ("torch", "diffusers", "onnx", "onnxruntime", "onnxscript", "tensorrt"))}
    print(json.dumps(result["environment"], indent=1), file=sys.stderr)
    if args.gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--gpu needs a CUDA device")
        result["gpu"] = gpu(args)
        table = gpu_table(result["gpu"])
    else:
        cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="fastdiff-bench-engines-")
        asked = [b for b in args.backends.split(",") if b]
        whole = [b for b in asked if b in WHOLE]   # Stream(compile="whole"), not engines
        backends = [b for b in asked if b not in WHOLE]
        batches = [int(b) for b in args.batches.split(",")]
        result.update(denoiser=[], stream=[], builds=[])
        for name in args.pipelines.split(","):
            pipe = load(name)
            result["denoiser"] += cpu_denoiser(name, pipe, backends, batches, cache_dir, args.threads,
                                               args.frames, args.rounds, result["builds"])
            result["stream"] += cpu_stream(name, pipe, backends, cache_dir, args.threads, args.frames,
                                           args.rounds, result["builds"], whole, args.block, args.workers)
        table = cpu_tables(result)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
