"""A ControlNet pipeline as a real-time stream: ``fastdiff.Stream`` against diffusers' ControlNet
img2img pipeline called once per frame, on the CPU.

The tiny random-weight SD-1.x ControlNet img2img pipeline (:func:`fastdiff.architectures.
tiny_controlnet_pipeline`, LCM, n = 2 steps: indices [32, 45] of the 50-step schedule), each
frame with its own control image. fastdiff: ``Stream(pipe, steps=[32, 45], cfg=...)`` in steady
state, ``stream(frame, control_image=control)`` — one UNet and one ControlNet call on 2 rows per
frame. diffusers: the same pipeline called per frame for two steps at strength 1.0 (its ControlNet
img2img pipeline takes no custom timesteps: LCM's own two, which cost what the stream's would),
guidance 1, precomputed ``prompt_embeds``, ``output_type="pt"`` — two UNet and two ControlNet calls
on one row. ``--backends onnxruntime`` adds the streams on engines (the UNet taking the residuals,
the ControlNet and the VAE each an ONNX Runtime session). The configurations take turns frame by
frame; each speed-up is the median over sweeps of the ratio of frame times in the same sweep, so
that the host's drift cancels.

    python benchmarks/controlnet.py [--frames 20] [--rounds 5] [--threads N] [--backends onnxruntime]
                                    [--out out/controlnet.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from machine import save_report  # noqa: E402

STEPS = [32, 45]
PROMPT = "a red circle"


def configurations(pipe, frames, controls, backends=(), cache_dir=None):
    """{label: a callable making one frame's output}, each cycling through the same inputs."""
    import fastdiff

    state = {"k": 0}

    def inputs():
        k = state["k"] = state["k"] + 1
        return frames[k % len(frames)], controls[k % len(controls)]

    def streamed(stream):
        frame, control = inputs()
        return stream(frame, control_image=control)

    calls = {}
    for backend in (None, *backends):
        for cfg in ("none", "self"):
            options = {"cache_dir": cache_dir} if backend else None
            stream = fastdiff.Stream(pipe, steps=STEPS, cfg=cfg, guidance_scale=1.2, backend=backend,
                                     engine_options=options)
            stream.prepare(PROMPT)
            calls[f"fastdiff {cfg}" + (f" {backend}" if backend else "")] = lambda s=stream: streamed(s)
    with torch.inference_mode():
        embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]

    def diffusers_frame():
        frame, control = inputs()
        return pipe(prompt_embeds=embeds, image=frame, control_image=control, strength=1.0,
                    num_inference_steps=len(STEPS), guidance_scale=1.0, output_type="pt").images
    calls["diffusers"] = diffusers_frame
    return calls


def measure(calls, frames: int, rounds: int) -> dict:
    """{label: [frame seconds]}, the labels taking turns frame by frame after a few untimed frames."""
    for call in calls.values():
        for _ in range(3):
            call()
    times = {label: [] for label in calls}
    for _ in range(rounds):
        for _ in range(frames):
            for label, call in calls.items():
                start = time.perf_counter()
                call()
                times[label].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20, help="timed frames per configuration per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--backends", default="", help="engine backends to add, comma-separated (onnxruntime)")
    parser.add_argument("--out", default="out/controlnet.json")
    args = parser.parse_args(argv)
    for name, value in (("--frames", args.frames), ("--rounds", args.rounds)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from fastdiff.architectures import tiny_controlnet_pipeline

    pipe = tiny_controlnet_pipeline("sd", img2img=True, scheduler="lcm")
    gen = torch.Generator().manual_seed(0)
    frames = [torch.rand(1, 3, 64, 64, generator=gen) for _ in range(4)]
    controls = [torch.rand(1, 3, 64, 64, generator=gen) for _ in range(4)]
    backends = [b for b in args.backends.split(",") if b]
    cache_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), "controlnet-engines")
    times = measure(configurations(pipe, frames, controls, backends, cache_dir), args.frames, args.rounds)
    base = times["diffusers"]
    speedups = {label: statistics.median(b / t for b, t in zip(base, ts)) for label, ts in times.items()}
    ms = {label: 1000 * statistics.median(ts) for label, ts in times.items()}
    print(f"tiny SD ControlNet img2img, LCM, steps {STEPS} of 50, 64×64, {args.rounds} rounds × {args.frames} frames")
    print("| configuration | ms / frame | frames / s | speed-up over diffusers |")
    print("|---|---:|---:|---:|")
    for label in times:
        print(f"| {label} | {ms[label]:.2f} | {1000 / ms[label]:.1f} | {speedups[label]:.2f}× |")
    save_report(args.out, "benchmarks/controlnet.py", argv or sys.argv[1:], steps=STEPS, ms_per_frame=ms,
                speedups=speedups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
