"""Which shape the shapes model draws for each shape a prompt asks for: the evaluator's reading of
the object of the asked colour, counted per (asked, read) pair, on the held-out prompts and initial
noise of ``fastdiff bench quality``, for the model and for rendered scenes of the same prompts.

Prompt accuracy folds shape into one of five attributes; this says which shape loses it.

    python benchmarks/shapes_errors.py [--count 256] [--steps 25] [--out out/shapes-errors.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from machine import environment  # noqa: E402

SHAPES = ("circle", "square", "triangle")


def confusion(images, prompts, value_range=None) -> dict[str, dict[str, int]]:
    """{asked shape: {read shape or "missing": count}} over every object the prompts ask for."""
    from fastdiff.shapes.evaluate import read_scenes
    from fastdiff.shapes.metrics import read_object
    from fastdiff.shapes.render import parse_caption

    counts = {shape: Counter() for shape in SHAPES}
    for prompt, scene in zip(prompts, read_scenes(images, value_range)):
        for want in parse_caption(prompt).objects:
            got = read_object(want, scene)
            counts[want.shape][got.shape if got else "missing"] += 1
    return {shape: dict(c) for shape, c in counts.items()}


def main(argv=None) -> int:
    from fastdiff.quality import KINDS, generate, held_out
    from fastdiff.shapes.model import GUIDANCE_RESCALE, GUIDANCE_SCALE, load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=256, help="held-out prompts per kind")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", default="out/shapes-errors.json")
    args = parser.parse_args(argv)
    pipe = load_pipeline()
    held = held_out(args.count, 2, 2)
    result = {}
    for kind in KINDS:
        texts = held.texts[held.of(kind)]
        images, _ = generate(pipe, texts, args.steps, "full", "ddim", GUIDANCE_SCALE, guidance_rescale=GUIDANCE_RESCALE)
        result[kind] = {"model": confusion(images, texts, (0.0, 1.0)),
                        "rendered": confusion(held.rendered[held.of(kind)], texts)}
        for source in ("model", "rendered"):
            print(f"{kind:5s} {source:8s} " + "  ".join(
                f"{asked}: " + ", ".join(f"{read} {n}" for read, n in sorted(got.items(), key=lambda kv: -kv[1]))
                for asked, got in result[kind][source].items()), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"environment": environment(["benchmarks/shapes_errors.py", *(argv or sys.argv[1:])]),
                   "steps": args.steps, "guidance": [GUIDANCE_SCALE, GUIDANCE_RESCALE], "confusion": result}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
