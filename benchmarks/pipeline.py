"""The drop-in swap timed: a diffusers pipeline call against the same call through
``fastdiff.accelerate(pipe)``, eager and on engine backends, on the CPU.

Every configuration makes the same images from the same call (prompts, steps, guidance, seed):
``fastdiff`` runs the pipeline's own steps and full CFG, so its pictures equal the pipeline's (the
script checks it); ``fastdiff <backend>`` puts the denoiser and VAE on engines (built first,
untimed). Residual CFG (``cfg="self"``) is left out: it is the stream's guidance for a few steps at
low guidance, and over a pipeline's 25 steps it spoils the pictures. Configurations take turns call
by call; each speed-up is the median of same-round ratios against the pipeline, so that the host's
drift between rounds cancels. ``--task inpaint`` times the model's inpainting pipeline instead
(diffusers' ``AutoPipelineForInpainting`` over the same modules; a picture and a mask over its right
half, strength 1). ``--model tiny-flux`` times a FLUX.1-dev-shaped pipeline of random weights, as
small as the tests' (its pictures noise: the ratio says what the swap costs on Flux's path, not what
a real Flux model gains); ``--model tiny-sd3`` an SD3-shaped one. ``--task controlnet`` times the
model's ControlNet pipeline (the tiny ones': a ControlNet of random weights, one control picture;
FLUX.1's reading its latents, InstantX's kind); ``--true-cfg S`` gives a Flux call a negative
prompt at ``true_cfg_scale`` S.

    python benchmarks/pipeline.py [--model shapes|tiny|tiny-flux|tiny-sd3] [--task txt2img|inpaint|controlnet]
                                  [--prompts 4] [--steps 25] [--rounds 7] [--backends onnxruntime] [--true-cfg S]
                                  [--threads N] [--out out/pipeline.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from machine import save_report  # noqa: E402

PROMPTS = ["a large red circle on the left, blue background", "a small yellow triangle at the top right",
           "a green square and a purple circle, white background", "a blue triangle and a red square, black background"]


def configurations(pipe, backends):
    """(label, callable) of each configuration; engines are built here, before any timing."""
    import fastdiff

    return [("diffusers", pipe), ("fastdiff", fastdiff.accelerate(pipe))] + [
        (f"fastdiff {backend}", fastdiff.accelerate(pipe, backend=backend)) for backend in backends]


def run(pipe, call, rounds, backends):
    """{label: seconds per call (median)}, {label: speed-up over diffusers}, and the largest pixel
    difference of each configuration's images from the pipeline's, for `call` (the pipeline's arguments)."""
    configs = configurations(pipe, backends)

    def draw(fn):   # SD3's ControlNet pipeline draws its control latents from torch's global generator
        torch.manual_seed(0)
        return fn(**call, generator=torch.Generator().manual_seed(0))
    images = {label: draw(fn).images for label, fn in configs}
    differs = {label: float(np.abs(images[label] - images["diffusers"]).max()) for label, _ in configs}
    times = {label: [] for label, _ in configs}
    for _ in range(rounds):
        for label, fn in configs:
            start = time.perf_counter()
            draw(fn)
            times[label].append(time.perf_counter() - start)
    base = times["diffusers"]
    speedups = {label: statistics.median(b / t for b, t in zip(base, ts)) for label, ts in times.items()}
    return {label: statistics.median(ts) for label, ts in times.items()}, speedups, differs


def load(model: str):
    """The pipeline and the guidance its model is drawn with."""
    if model == "shapes":
        from fastdiff.shapes.model import GUIDANCE_SCALE, load_pipeline

        pipe, guidance = load_pipeline(), {"guidance_scale": GUIDANCE_SCALE}
    elif model == "tiny-flux":   # FLUX.1-dev's kind: the guidance scale is the model's input, no CFG rows
        from fastdiff.architectures import tiny_flux_pipeline

        pipe, guidance = tiny_flux_pipeline(), {"guidance_scale": 3.5}
    elif model == "tiny-sd3":
        from fastdiff.architectures import tiny_sd3_pipeline

        pipe, guidance = tiny_sd3_pipeline(), {"guidance_scale": 5.0}
    else:
        from fastdiff.architectures import tiny_sd_pipeline

        pipe, guidance = tiny_sd_pipeline(scheduler="ddim"), {"guidance_scale": 5.0}
    pipe.set_progress_bar_config(disable=True)
    return pipe, guidance


def inpainting(pipe):
    """`pipe`'s inpainting pipeline over the same modules, and a call's picture and mask."""
    from diffusers import AutoPipelineForInpainting

    inpaint = AutoPipelineForInpainting.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    picture = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1.0
    return inpaint, {"image": picture, "mask_image": mask}


def controlled(model: str):
    """The tiny model's ControlNet pipeline, and a call's control picture."""
    from fastdiff.architectures import tiny_controlnet_pipeline

    family = {"tiny": "sd", "tiny-flux": "flux", "tiny-sd3": "sd3"}.get(model)
    if family is None:
        raise SystemExit(f"--task controlnet: the tiny models have ControlNet pipelines, not {model!r}")
    pipe = tiny_controlnet_pipeline(family)
    picture = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return pipe, {"image" if family == "sd" else "control_image": picture}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["shapes", "tiny", "tiny-flux", "tiny-sd3"], default="shapes")
    parser.add_argument("--task", choices=["txt2img", "inpaint", "controlnet"], default="txt2img")
    parser.add_argument("--true-cfg", type=float, default=None, help="a Flux call's true_cfg_scale, with a negative "
                        "prompt")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per call (one image each)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per configuration, taking turns")
    parser.add_argument("--backends", default="", help="comma-separated engine backends (e.g. onnxruntime)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default="out/pipeline.json")
    args = parser.parse_args(argv)
    for name, value, low in (("--prompts", args.prompts, 1), ("--steps", args.steps, 1), ("--rounds", args.rounds, 1)):
        if value < low:
            parser.error(f"{name} must be at least {low}, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, guidance = load(args.model)
    pictures = {}
    if args.task == "inpaint":
        pipe, pictures = inpainting(pipe)
    elif args.task == "controlnet":
        pipe, pictures = controlled(args.model)
    if args.true_cfg is not None:
        if args.model != "tiny-flux":
            parser.error("--true-cfg applies to --model tiny-flux")
        pictures.update(negative_prompt="a green square", true_cfg_scale=args.true_cfg)
    call = dict(prompt=(PROMPTS * args.prompts)[:args.prompts], num_inference_steps=args.steps, output_type="np",
                **guidance, **pictures)
    backends = [b for b in args.backends.split(",") if b]
    seconds, speedups, differs = run(pipe, call, args.rounds, backends)
    print(f"{args.model} {args.task}, {args.prompts} prompts × {args.steps} steps, {guidance}, {args.rounds} rounds"
          + (f", true_cfg_scale {args.true_cfg}" if args.true_cfg is not None else ""))
    print("| configuration | s / call | speed-up over diffusers | max pixel difference from diffusers |")
    print("|---|---:|---:|---:|")
    for label in seconds:
        print(f"| {label} | {seconds[label]:.3f} | {speedups[label]:.2f}× | {differs[label]:.1e} |")
    save_report(args.out, "benchmarks/pipeline.py", argv or sys.argv[1:], model=args.model, task=args.task,
                prompts=args.prompts,
                steps=args.steps, guidance=guidance, seconds=seconds, speedups=speedups, max_pixel_difference=differs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
