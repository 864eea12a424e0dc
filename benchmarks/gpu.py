"""The GPU benchmark, in one short run: frames/s of real-time img2img and txt2img on a lent GPU, fastdiff
against diffusers, StreamDiffusion and the floor, with MFU against the matmul peak measured in the
same run. Written to fit a lent H100/H200's 15 minutes (≤ 8 minutes of work), prepared on the CPU.

    python benchmarks/gpu.py --out out/gpu                 # on the GPU
    python benchmarks/gpu.py --quick --out out/gpu-quick   # the same code on the CPU, tiny pipeline (CI)

Set-ups (random weights built from the published configs; nothing is downloaded):

- ``sd-turbo``: the SD-Turbo architecture (SD 2.1 UNet) at 512², fp16 (and bf16 with ``--bf16``), a
  TAESD-architecture VAE (``AutoencoderTiny()``), 1-step img2img (strength 0.5 of 2 steps) and 1-step
  txt2img, no CFG — StreamDiffusion's headline configuration;
- ``sd15-lcm``: the SD 1.5 architecture, LCM, the 4-step img2img stream (t_index_list [0, 16, 32, 45]).

Methods, each timed frame by frame with CUDA events after a synchronisation:

- ``diffusers default``: the img2img / txt2img pipeline as a user builds it (AutoencoderKL, the
  prompt encoded every call, fp32) — the "AutoPipeline defaults" StreamDiffusion compares with;
- ``diffusers tuned``: fp16, TAESD, precomputed prompt embeddings;
- ``StreamDiffusion``: if it imports (``pip install streamdiffusion --no-deps``);
- ``fastdiff eager``: ``fastdiff.Stream``, PyTorch as it is; and again with its attention held to
  xformers, SDPA's flash kernel and SDPA's cuDNN kernel (``Stream(attention=...)``; a kernel the
  machine lacks is a row with its error);
- ``fastdiff compiled``: ``fastdiff.Stream(compile="whole")`` — encode, UNet, step, decode as one
  ``torch.compile`` graph with CUDA graphs, run after every other method of every set-up and only
  while ``--budget-seconds`` allows (a compilation takes minutes), first checked against a fresh
  eager stream on the same frames (``max_abs_diff_vs_eager``);
- ``floor``: the same modules alone — one UNet call on the stream's rows, one encode, one decode.

FLOPs per frame are counted once with ``torch.utils.flop_counter`` (≈ 804 GFLOP for one SD-Turbo
UNet call at 512², ≈ 1068 GFLOP for a TAESD img2img frame); MFU = FLOPs × frames/s over the dense
matmul peak of the same GPU, measured first. Results: ``results.json`` and ``results.md`` in --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from machine import environment  # noqa: E402

PROMPT = "a photo of a red fox in a green forest"
ATTENTION = ("xformers", "sdpa-flash", "sdpa-cudnn")   # beside the default, PyTorch's SDPA choosing


# -- timing -----------------------------------------------------------------------------------------
class Timer:
    """Per-frame milliseconds: CUDA events after a synchronisation on a GPU, the host clock on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def measure(self, fn, frames: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(frames):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return times


def matmul_peak(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """Dense matmul TFLOP/s measured here (the MFU denominator)."""
    n = 512 if quick else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timer = Timer(device)
    ms = statistics.median(timer.measure(lambda: a @ b, frames=5 if quick else 20, warmup=2 if quick else 5))
    return 2 * n ** 3 / (ms / 1e3) / 1e12


def flops_of(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


# -- set-ups ----------------------------------------------------------------------------------------
def build_pipe(arch: str, quick: bool, device, dtype, scheduler: str):
    """(pipeline on `device` in `dtype` with a TAESD-architecture VAE, size, its KL VAE)."""
    from diffusers import AutoencoderTiny, LCMScheduler, EulerAncestralDiscreteScheduler

    from fastdiff.architectures import ARCHITECTURES, tiny_sd_pipeline, tiny_vae

    if quick:
        pipe = tiny_sd_pipeline(scheduler="lcm")
        taesd, size = tiny_vae("tiny"), 64
    else:
        pipe = ARCHITECTURES[arch].pipeline(torch_dtype=dtype, device=device)
        taesd, size = AutoencoderTiny(), 512
    kl = pipe.vae
    if scheduler == "lcm":
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    elif not quick:   # SD-Turbo's own: Euler ancestral, trailing
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                     timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype), taesd.to(device, dtype), kl, size


def methods(setup: str, quick: bool, device, dtype, timer: Timer, frames: int, warmup: int, results: Results,
            deferred: list):
    """Time every method of one set-up but the compiled one, whose closure goes to `deferred` (its
    compilation takes minutes on a GPU: the cheap figures of every set-up come first)."""
    arch, steps, scheduler = {"sd-turbo": ("sd-turbo", {"img2img": [25], "txt2img": [0]}, "euler"),
                              "sd15-lcm": ("sd15", {"img2img": [0, 16, 32, 45]}, "lcm")}[setup]
    pipe, taesd, kl, size = build_pipe(arch, quick, device, dtype, scheduler)
    frame = torch.rand(1, 3, size, size, device=device, dtype=dtype)
    with torch.inference_mode():
        embeds = pipe.encode_prompt(PROMPT, device, 1, False)[0]
    for mode, t_index in steps.items():
        one_mode(setup, mode, t_index, pipe, taesd, kl, size, frame, embeds, device, dtype, timer, frames, warmup,
                 results, deferred)


def one_mode(setup, mode, t_index, pipe, taesd, kl, size, frame, embeds, device, dtype, timer, frames, warmup,
             results, deferred):
    """The methods of one (set-up, mode); the compiled one deferred."""
    import fastdiff

    n = len(t_index)
    row = dict(setup=setup, mode=mode, steps=n, size=size, dtype=str(dtype).split(".")[-1])

    def record(method, fn, flops=None, **extra):
        try:
            times = timer.measure(fn, frames, warmup)
        except Exception as error:  # noqa: BLE001 - a method that can't run here is reported, not fatal
            results.append({**row, "method": method, "error": f"{type(error).__name__}: {error}"[:300]})
            return
        ms = statistics.median(times)
        results.append({**row, "method": method, "ms": round(ms, 3), "fps": round(1000 / ms, 2),
                        "p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))], 3), "flops": flops,
                        **extra})

    def make_stream(**options):
        stream = fastdiff.Stream(pipe, t_index, cfg="none", mode=mode, output_type="pt", height=size,
                                 width=size, **options)
        stream.set_vae(taesd)
        stream.prepare(PROMPT)
        return stream

    # fastdiff eager (and its FLOPs, the set-up's per-frame work)
    stream = make_stream()
    call = (lambda s=stream: s(frame)) if mode == "img2img" else stream
    with torch.inference_mode():
        for _ in range(n + 1):
            call()
        flops = flops_of(call)
    record("fastdiff eager", call, flops)

    # the same with the attention held to one kernel (xformers where it imports); back to SDPA after
    from fastdiff.attention import apply_attention

    for name in ATTENTION if device.type == "cuda" else ("sdpa-math",):
        try:
            other = make_stream(attention=name)
        except Exception as error:  # noqa: BLE001 - a kernel this machine lacks is reported
            results.append({**row, "method": f"fastdiff eager, {name}", "error": f"{type(error).__name__}: {error}"[:300]})
            continue
        record(f"fastdiff eager, {name}", (lambda s=other: s(frame)) if mode == "img2img" else other, flops)
        apply_attention(pipe.unet, "sdpa")

    # the floor: the same modules alone on prepared tensors
    unet = pipe.unet
    rows = torch.randn((n, 4, size // 8, size // 8), device=device, dtype=dtype)
    t_rows = stream.schedule.timesteps.to(device, torch.float32)
    cond = embeds.repeat(n, 1, 1)

    def floor():
        with torch.inference_mode():
            if mode == "img2img":
                taesd.encode(frame)
            unet(rows, t_rows, encoder_hidden_states=cond, return_dict=False)
            taesd.decode(rows[:1], return_dict=False)
    record("floor", floor, flops_of(floor))

    # StreamDiffusion, when it is installed, with its own post-processing to [0, 1] added
    try:
        from streamdiffusion import StreamDiffusion
    except ImportError:
        results.append({**row, "method": "StreamDiffusion", "error": "not installed (pip install streamdiffusion "
                                                                     "--no-deps)"})
    else:
        from diffusers import StableDiffusionPipeline

        sd_pipe = StableDiffusionPipeline(**{**pipe.components, "vae": taesd}, requires_safety_checker=False)
        sd = StreamDiffusion(sd_pipe, t_index_list=t_index, torch_dtype=dtype, width=size, height=size,
                             cfg_type="none")
        sd.prepare(PROMPT, num_inference_steps=50, guidance_scale=1.0)
        context = contextlib.nullcontext
        if device.type != "cuda":
            from stream import host_clock_cuda_events as context
        with context():
            raw = (lambda: sd(frame)) if mode == "img2img" else (lambda: sd.txt2img(1))
            record("StreamDiffusion", lambda: (raw() / 2 + 0.5).clamp(0, 1))

    # diffusers, per frame: tuned, and as a user builds it
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    cls = StableDiffusionImg2ImgPipeline if mode == "img2img" else StableDiffusionPipeline
    # as many denoiser calls as the stream makes per frame: n steps (img2img: strength ½ of 2n)
    call_args = dict(guidance_scale=0.0 if setup == "sd-turbo" else 1.0, output_type="pt")
    if mode == "img2img":
        call_args.update(image=frame, strength=0.5, num_inference_steps=2 * n)
    else:
        call_args.update(height=size, width=size, num_inference_steps=n)
    tuned = cls(**{**pipe.components, "vae": taesd}, requires_safety_checker=False)
    tuned.set_progress_bar_config(disable=True)
    record("diffusers tuned", lambda: tuned(prompt_embeds=embeds, **call_args))
    default_dtype = torch.float32
    default = cls(**{**{k: (v.to(default_dtype) if hasattr(v, "to") and isinstance(v, torch.nn.Module) else v)
                        for k, v in pipe.components.items()}, "vae": kl.to(device, default_dtype)},
                  requires_safety_checker=False)
    default.set_progress_bar_config(disable=True)
    default_args = dict(call_args)
    if mode == "img2img":
        default_args["image"] = frame.float()
    record("diffusers default", lambda: default(PROMPT, **default_args))
    for module in default.components.values():   # back to the benchmark's dtype for what follows
        if isinstance(module, torch.nn.Module):
            module.to(dtype)
    kl.to(dtype)

    def compiled():
        """The whole step compiled; first checked against a fresh eager stream on the same frames."""
        whole, eager = make_stream(compile="whole"), make_stream()
        inputs = [torch.rand(1, 3, size, size, device=device, dtype=dtype) for _ in range(n + 3)]
        try:
            with torch.inference_mode():
                started = time.perf_counter()
                outs = [(whole(f), eager(f)) if mode == "img2img" else (whole(), eager()) for f in inputs]
                build_s = time.perf_counter() - started
            a, b = outs[-1]
            diff = float((a.float() - b.float()).abs().max())
        except Exception as error:  # noqa: BLE001
            results.append({**row, "method": "fastdiff compiled", "error": f"{type(error).__name__}: {error}"[:300]})
            return
        ccall = (lambda: whole(frame)) if mode == "img2img" else whole
        record("fastdiff compiled", ccall, flops, max_abs_diff_vs_eager=round(diff, 5),
               compile_s=round(build_s, 1), whole_step=whole._whole is not None)
    deferred.append((setup, mode, str(dtype), compiled))


class Results:
    """The rows so far, written to --out after every row: a run cut short keeps what it measured."""

    def __init__(self, out: str, peak_tflops: float, argv, budget_s: float | None):
        self.out, self.peak, self.argv, self.rows = out, peak_tflops, argv, []
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s if budget_s else None
        os.makedirs(out, exist_ok=True)

    def left(self) -> float:
        """Seconds left of --budget-seconds (inf without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.perf_counter()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> str:
        report = {"environment": environment(self.argv, ("torch", "diffusers", "transformers", "streamdiffusion")),
                  "peak_tflops": self.peak, "seconds": round(time.perf_counter() - self.start, 1),
                  "results": self.rows}
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump(report, f, indent=2)
        markdown = table(self.rows, self.peak)
        with open(os.path.join(self.out, "results.md"), "w") as f:
            f.write(markdown + "\n")
        return markdown


def table(results: list, peak_tflops: float) -> str:
    lines = [f"matmul peak measured here: {peak_tflops:.1f} TFLOP/s", "",
             "| set-up | mode | steps | method | ms / frame | frames/s | × diffusers default | × StreamDiffusion "
             "| MFU |", "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    by_key = {(r["setup"], r["mode"], r["method"]): r for r in results}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['setup']} | {r['mode']} | {r['steps']} | {r['method']} | — | — | — | — | "
                         f"{r['error'][:60]} |")
            continue
        base = by_key.get((r["setup"], r["mode"], "diffusers default"), {})
        sd = by_key.get((r["setup"], r["mode"], "StreamDiffusion"), {})
        flops = r.get("flops") or by_key.get((r["setup"], r["mode"], "fastdiff eager"), {}).get("flops")
        mfu = f"{100 * flops * r['fps'] / (peak_tflops * 1e12):.1f}%" if flops else "—"
        ratio = lambda other: f"{r['fps'] / other['fps']:.2f}×" if other.get("fps") else "—"   # noqa: E731
        lines.append(f"| {r['setup']} | {r['mode']} | {r['steps']} | {r['method']} | {r['ms']:.2f} | "
                     f"{r['fps']:.1f} | {ratio(base)} | {ratio(sd)} | {mfu} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--quick", action="store_true", help="the tiny pipeline on the CPU (CI)")
    parser.add_argument("--frames", type=int, default=None, help="timed frames per method (default 50; quick 3)")
    parser.add_argument("--setups", default="sd-turbo,sd15-lcm")
    parser.add_argument("--bf16", action="store_true", help="also run the SD-Turbo set-up in bf16")
    parser.add_argument("--skip-compiled", action="store_true")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="start no compilation once this much time has passed, less --compile-seconds")
    parser.add_argument("--compile-seconds", type=float, default=150,
                        help="what one compiled set-up is allowed for (with --budget-seconds)")
    args = parser.parse_args(argv)
    setups = [s for s in args.setups.split(",") if s]
    for setup in setups:
        if setup not in ("sd-turbo", "sd15-lcm"):
            parser.error(f"--setups: unknown set-up {setup!r} (sd-turbo, sd15-lcm)")
    device = torch.device("cpu" if args.quick else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --quick on the CPU")
    if device.type == "cuda":   # the same for every method: cuDNN picks its convolution kernels once
        torch.backends.cudnn.benchmark = True
    frames = args.frames or (3 if args.quick else 50)
    warmup = 2 if args.quick else 10
    timer = Timer(device)
    dtype = torch.float32 if args.quick else torch.float16
    peak = matmul_peak(device, torch.float32 if args.quick else torch.bfloat16, args.quick)
    results = Results(args.out, peak, sys.argv if argv is None else ["benchmarks/gpu.py", *argv], args.budget_seconds)
    deferred: list = []
    for setup in setups:
        methods(setup, args.quick, device, dtype, timer, frames, warmup, results, deferred)
    if args.bf16 and not args.quick:
        methods("sd-turbo", False, device, torch.bfloat16, timer, frames, warmup, results, deferred)
    if not args.skip_compiled:
        # img2img first: the headline; then the 4-step stream, txt2img, bf16
        order = sorted(deferred, key=lambda job: (job[2] != str(dtype), job[1] != "img2img", job[0] != "sd-turbo"))
        for setup, mode, name, job in order:
            if results.left() < args.compile_seconds:
                results.append(dict(setup=setup, mode=mode, dtype=name.split(".")[-1], steps=None,
                                    method="fastdiff compiled", error="skipped: --budget-seconds spent"))
                continue
            job()
    print(results.save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
