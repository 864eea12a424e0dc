"""The tuning tools judged on the shapes world, each by its anchor's own comparison, on the held-out set
of ``fastdiff bench quality`` (one, two, three objects; unstated attributes over several seeds):

- ``schedules``: searched steps against uniform steps (twice as many, and as many) and Align Your
  Steps, with full CFG at the model's guidance; the stream's searched schedule against the model's
  default stream steps in PSNR against the 50-step teacher on moving-shape clips;
- ``onestep``: the one-step adapter against the 25-step teacher, the base model's best one step and
  its 4-step LCM-style stream step, with and without the adapter's high-frequency term; in the
  stream, one step with the adapter against the model's default two steps without it;
- ``routing``: routed against the full model and against one pruned model of the same mean MACs;
  MACs per prompt kind; the measured speed of routed ``accelerate`` against the full model
  (``routing-speed``: that speed alone, both on an engine backend if asked).

    python benchmarks/tuning.py schedules [--schedules DIR] [--count 128] [--out out/tuning-schedules.json]
    python benchmarks/tuning.py onestep --adapter PATH [--ablation PATH] [--count 128]
    python benchmarks/tuning.py routing --router PATH[,PATH...] [--single PATH] [--each-code] [--count 128]
                                        [--draws N --seed S]
    python benchmarks/tuning.py routing-speed --router PATH [--backend onnxruntime [--workers 2]] [--per-kind 16]

Every row is one :class:`fastdiff.quality.QualityRow` on the same prompts, seeds and initial noise; with
``--draws N``, the mean over N initial noises (each against the teacher of the same noise).
"""

from __future__ import annotations

import argparse
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


def _rows(pipe, held, teachers, configs, batch=64):
    from fastdiff.quality import quality_row

    rows = []
    for label, steps, cfg, solver, options, call in configs:
        rows.append(quality_row(pipe, held, teachers, steps, cfg, solver, RUN["guidance"], RUN["seed"], batch,
                                RUN["rescale"], options, call, label))
        print(f"  {label}: done", file=sys.stderr)
    return rows


RUN = {"guidance": 5.0, "rescale": 0.0, "seed": 0}   # the model's guidance; the first draw's seed
SPEED_PAIRS = 9   # timed (full, routed) pairs of the routed speed-up


def schedules(pipe, held, teachers, folder, stream_steps, clip_frames=16):
    from fastdiff.tuning import Schedule
    from fastdiff.tuning.fitness import Trajectories
    from fastdiff.shapes import moving_shapes_clip

    configs = [("uniform", 8, "full", "ddim", None, None)]
    for k in (4, 2):
        configs.append(("uniform", k, "full", "ddim", None, None))
        for method in ("ays", "dp", ""):
            name = f"shapes-{k}{'-' + method if method else ''}.json"
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                label = {"": "searched (evolution)", "dp": "searched (DP)", "ays": "AYS"}[method]
                configs.append((label, k, "full", None, {"schedule": path}, None))
    rows = _rows(pipe, held, teachers, configs)
    stream_rows = []
    path = os.path.join(folder, "shapes-stream-2.json")
    if os.path.isfile(path):
        searched = Schedule.load(path, pipe)
        clip = [f for seed in range(2) for f in moving_shapes_clip(num_frames=clip_frames // 2, seed=seed)]
        run = Trajectories(pipe, ["a circle"], mode="stream", cfg="self", guidance_scale=1.2, solver="lcm",
                           teacher_steps=50, frames=clip, strength_timestep=searched.timesteps[0])
        pipe.scheduler.set_timesteps(50)
        default = [float(pipe.scheduler.timesteps[i]) for i in stream_steps]
        for label, timesteps in ((f"default {list(stream_steps)}", default), ("searched", searched.timesteps)):
            if timesteps[0] != searched.timesteps[0]:
                label += " (other strength)"
            _, metrics = run.score(timesteps)
            stream_rows.append({"label": label, "timesteps": [int(t) for t in timesteps], **metrics})
    return rows, stream_rows


def onestep_stream(pipe, adapter, steps, clip_frames=16):
    """The stream on moving-shape clips, PSNR against the 50-step teacher from the same first timestep:
    n = 2 (`steps`) and n = 1 without the adapter, n = 1 with it (no guidance: it carries its own)."""
    from fastdiff.shapes import moving_shapes_clip
    from fastdiff.tuning.adapters import attach_adapter, detach_adapter, load_adapter
    from fastdiff.tuning.fitness import Trajectories

    clip = [f for seed in range(2) for f in moving_shapes_clip(num_frames=clip_frames // 2, seed=seed)]
    pipe.scheduler.set_timesteps(50)
    times = [float(pipe.scheduler.timesteps[i]) for i in steps]
    rows = []
    for cfg in ("self", "none"):
        run = Trajectories(pipe, ["a circle"], mode="stream", cfg=cfg, guidance_scale=1.2, solver="lcm",
                           teacher_steps=50, frames=clip, strength_timestep=times[0])
        if cfg == "self":
            for label, timesteps in ((f"base, n = 2 {list(steps)}, self CFG", times),
                                     (f"base, n = 1 [{steps[0]}], self CFG", times[:1])):
                rows.append({"label": label, **run.score(timesteps)[1]})
        else:
            attach_adapter(pipe, load_adapter(adapter, pipe))
            try:
                rows.append({"label": f"adapter, n = 1 [{steps[0]}], no CFG", **run.score(times[:1])[1]})
            finally:
                detach_adapter(pipe)
    return rows


def onestep(pipe, held, teachers, adapter, ablation=None):
    configs = [("teacher: 25 steps, full CFG", 25, "full", "ddim", None, None),
               ("base, 1 step, no CFG", 1, "none", "ddim", None, None),
               ("base, 1 step, full CFG", 1, "full", "ddim", None, None),
               ("base, 4 steps, LCM step, no CFG", 4, "none", "lcm", None, None),
               ("adapter, 1 step", 1, "none", None, {"adapter": adapter}, None)]
    if ablation:
        configs.append(("adapter without the high-frequency term, 1 step", 1, "none", None, {"adapter": ablation}, None))
    return _rows(pipe, held, teachers, configs)


def routing(pipe, held, teachers, routers, single=None, steps=25, each_code=False):
    """Rows of the full model, each router in `routers` and the `single` pruned model; each router's
    MACs by prompt kind and its accuracy against the single model draw by draw; the first's speed.
    `each_code`: also every prompt on each code of the first router in turn (what each kind gains
    from a bigger code: the bound of any routing over those codes)."""
    from fastdiff.tuning import load_router

    named = {(f"routed {os.path.basename(os.path.normpath(r))}" if len(routers) > 1 else "routed"): r
             for r in routers}
    configs = [("full model", steps, "full", "ddim", None, None)]
    configs += [(label, steps, "full", "ddim", {"router": r}, None) for label, r in named.items()]
    if each_code:
        configs += [(f"every prompt on code {k}", steps, "full", "ddim", {"router": forced(routers[0], pipe, k)}, None)
                    for k in range(load_router(routers[0], pipe).codes)]
    if single:
        configs.append(("one pruned model (same mean MACs)", steps, "full", "ddim", {"router": single}, None))
    rows = _rows(pipe, held, teachers, configs)
    extra = {}
    for i, (label, router) in enumerate(named.items(), start=1):
        loaded = load_router(router, pipe)
        macs = {}
        for kind in ("one", "two", "three", "unstated"):
            codes = loaded.route(pipe, held.texts[held.of(kind)])
            per = loaded.details["macs_per_code"]
            macs[kind] = sum(per[int(c)] for c in codes) / len(codes) / loaded.details["macs_full"]
        extra[label] = {"macs_share_by_kind": macs,
                        "macs_share_mean_of_1_2_3": sum(macs[k] for k in ("one", "two", "three")) / 3,
                        "codes": loaded.codes, "macs_share_per_code": loaded.details["macs_ratio_per_code"]}
        if single:
            extra[label]["minus_single"] = paired_difference(rows[i].accuracy_by_draw, rows[-1].accuracy_by_draw)
    return rows, {**extra, **routed_speed(pipe, held, routers[0])}


def forced(router, pipe, code: int):
    """`router` loaded with every prompt routed to `code`."""
    from fastdiff.tuning import load_router

    loaded = load_router(router, pipe)
    loaded.route = lambda pipe, prompts, embeds=None: torch.full((len(prompts),), code, dtype=torch.long)
    return loaded


def paired_difference(a: list[float], b: list[float]) -> dict:
    """a − b draw by draw (the same initial noise): the mean, its standard error and the draws a wins;
    pairing removes what a draw's noise does to both."""
    diffs = [x - y for x, y in zip(a, b)]
    error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {"per_draw": diffs, "mean": statistics.fmean(diffs), "standard_error": error,
            "wins": sum(d > 0 for d in diffs), "draws": len(diffs)}


def routed_speed(pipe, held, router, per_kind=16, backend=None, workers=1):
    """Routed ``accelerate`` against the full model, alternating, on the same `per_kind` prompts of
    each kind, both on `backend` (None: PyTorch) with `workers` denoiser calls side by side; the
    speed-up is the median of the pairs' ratios (the host's speed drifts between pairs)."""
    import fastdiff

    prompts = [p for k in ("one", "two", "three") for p in held.texts[held.of(k)][:per_kind]]
    options = {"max_batch": len(prompts), "workers": workers} if backend else None
    full = fastdiff.accelerate(pipe, backend=backend, engine_options=options)
    routed = fastdiff.accelerate(pipe, router=router, backend=backend, engine_options=options)
    times = {"full": [], "routed": []}
    for rep in range(SPEED_PAIRS + 1):   # the first pair warms up, untimed
        for name, fast in (("full", full), ("routed", routed)):
            start = time.perf_counter()
            fast(prompts, num_inference_steps=8, guidance_scale=RUN["guidance"], output_type="latent",
                 generator=torch.Generator().manual_seed(0))
            if rep:
                times[name].append(time.perf_counter() - start)
    ratios = [f / r for f, r in zip(times["full"], times["routed"])]
    return {"backend": backend, "workers": workers, "speed_prompts": len(prompts),
            "seconds": {k: statistics.median(v) for k, v in times.items()},
            "speedup": statistics.median(ratios), "speedup_pairs": ratios}


def main(argv=None) -> int:
    from fastdiff.quality import format_table, held_out, teacher_pictures
    from fastdiff.shapes.model import GUIDANCE_RESCALE, GUIDANCE_SCALE, STREAM_STEPS, load_pipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tool", choices=["schedules", "onestep", "routing", "routing-speed"])
    parser.add_argument("--schedules", default=None, help="folder of shapes-K[-method].json (default: the shipped)")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--ablation", default=None, help="an adapter trained without the high-frequency term")
    parser.add_argument("--router", default=None, help="routing: one router, or several joined by commas")
    parser.add_argument("--single", default=None, help="a router of one code at the routed mean MACs")
    parser.add_argument("--each-code", action="store_true", help="routing: also every prompt on each code in turn")
    parser.add_argument("--backend", default=None, help="routing-speed: both models on this engine backend")
    parser.add_argument("--per-kind", type=int, default=16, help="routing-speed: prompts of each kind per call")
    parser.add_argument("--workers", type=int, default=1, help="routing-speed: engine_options['workers'] of both")
    parser.add_argument("--count", type=int, default=128)
    parser.add_argument("--unstated", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--draws", type=int, default=1,
                        help="initial noises each row is the mean over (its distance's spread is reported)")
    parser.add_argument("--seed", type=int, default=0, help="the first draw's seed (the next draws count on)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    RUN.update(guidance=GUIDANCE_SCALE, rescale=GUIDANCE_RESCALE, seed=args.seed)
    pipe = load_pipeline()
    held = held_out(args.count, args.unstated, args.repeats)
    if args.tool == "routing-speed":
        extra = routed_speed(pipe, held, args.router, args.per_kind, args.backend, args.workers)
        print(json.dumps(extra, indent=2))
        return _write(args, argv, [], extra)
    teachers = teacher_pictures(pipe, held, args.draws, 50, GUIDANCE_SCALE, args.seed, 64, GUIDANCE_RESCALE)
    extra = None
    if args.tool == "schedules":
        from fastdiff.shapes import artefact_path

        rows, extra = schedules(pipe, held, teachers, args.schedules or artefact_path("schedule"), STREAM_STEPS)
    elif args.tool == "onestep":
        rows = onestep(pipe, held, teachers, args.adapter, args.ablation)
        extra = {"stream": onestep_stream(pipe, args.adapter, STREAM_STEPS)}
    else:
        rows, extra = routing(pipe, held, teachers, args.router.split(","), args.single, each_code=args.each_code)
    print(format_table(rows))
    if extra:
        print(json.dumps(extra, indent=2))
    return _write(args, argv, rows, extra)


def _write(args, argv, rows, extra) -> int:
    from fastdiff.quality import rows_as_dicts

    out = args.out or f"out/tuning-{args.tool}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"environment": environment(["benchmarks/tuning.py", *(argv or sys.argv[1:])]),
                   **RUN, "rows": rows_as_dicts(rows), "extra": extra}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
