"""Per-frame cost of fastdiff.Stream against the floor, diffusers per frame and StreamDiffusion.

    python benchmarks/stream.py [--frames 30] [--rounds 5] [--size 64] [--out results.json]
                                [--threads N] [--sd-postprocess]

One run measures, side by side, img2img and txt2img with AutoencoderKL and AutoencoderTiny on the
tiny random-weight SD-1.x pipeline (:func:`fastdiff.architectures.tiny_sd_pipeline`, LCM scheduler,
n = 2 steps: indices [32, 45] of the 50-step schedule for img2img, [0, 45] for txt2img), on the
CPU, eager PyTorch, float32. The default 64×64 px (8×8 latents) is the size at which this pipeline
matches the reference scale on this machine (floor ≈ 14.6 ms/frame img2img with AutoencoderKL);
at 128 px the floor is ≈ 2× that (the UNet, not the VAE, dominates: the tiny AutoencoderKL is
only a little slower than the AutoencoderTiny at these sizes).

- floor: one denoiser call on the stream's n·F rows (F = 1, the stream's own conditioning and
  timesteps) + one VAE encode (img2img only) + one VAE decode, on prepared tensors: the least work
  a frame needs.
- fastdiff: ``fastdiff.Stream`` in steady state, cfg "none" and "self"; input a [1, 3, H, W] float
  tensor in [0, 1], ``output_type="pt"``.
- diffusers: StableDiffusionImg2ImgPipeline / StableDiffusionPipeline built from the same
  components, called once per frame on the same 2 timesteps (``timesteps=`` the stream's, strength
  1.0), guidance_scale 1 (no CFG batch), precomputed ``prompt_embeds``, ``output_type="pt"``.
- StreamDiffusion (``pip install streamdiffusion --no-deps``, 0.1.1, it pins diffusers 0.24 but
  imports and runs against the current one unchanged): ``StreamDiffusion(pipe, t_index_list,
  torch_dtype=float32, cfg_type=...)``, ``prepare(prompt, num_inference_steps=50, ...)``;
  img2img calls ``stream(frame)``, txt2img calls ``stream.txt2img(1)`` (what its wrapper calls).
  Its ``__call__`` times itself with ``torch.cuda.Event``, which cannot be built without CUDA
  ("Tried to instantiate dummy base class Event"), so while its frames run (and only then) this
  script swaps ``torch.cuda.Event`` for a host-clock stand-in and ``torch.cuda.synchronize`` for a
  no-op (:func:`host_clock_cuda_events`). Its TensorRT and stable-fast accelerations need CUDA and
  are not run. Its ``__call__`` and ``txt2img`` return the decoded image in [-1, 1] without
  post-processing (fastdiff and diffusers return [0, 1] tensors), which favours it;
  ``--sd-postprocess`` adds its own ``denormalize``, ``(x / 2 + 0.5).clamp(0, 1)``, to its frames
  (its ``image_utils`` module cannot be imported here: it needs torchvision).

Configurations are interleaved: each of ``--rounds`` rounds visits the four (mode, VAE) groups in
a shuffled order; in a group, after a few untimed frames each, the six configurations (which share
the pipeline's weights) take turns frame by frame, in a shuffled order per sweep, for ``--frames``
sweeps; every frame is timed alone. The table gives the median per-frame time over all frames,
frames/s = 1000 / that, and "% of floor" and the speed-ups as medians over sweeps of the ratio of
two configurations' frame times in the same sweep, so that load from other processes on the
machine, which drifts, cancels as far as it can. p10 is the 10th percentile of the frame times.

Threads: torch's default (one per core) unless ``--threads``. When another process keeps a core
busy, every OpenMP parallel region waits for the descheduled second thread: on the 2-core CI
machine a tiny-KL decode went from 11 ms to 0.5-0.7 s, and nothing measured means anything. The
load average at start is printed; with a busy machine use ``--threads 1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from machine import environment  # noqa: E402
from fastdiff import Stream  # noqa: E402
from fastdiff.architectures import tiny_sd_pipeline  # noqa: E402

PROMPT = "a watercolor painting of a red fox in a green tree"
STEPS = {"img2img": [32, 45], "txt2img": [0, 45]}
NUM_INFERENCE_STEPS = 50
GUIDANCE_SCALE = 1.2   # used by cfg="self" (both streams); cfg="none" ignores it
METHODS = ("floor", "fastdiff none", "fastdiff self", "diffusers", "StreamDiffusion none", "StreamDiffusion self")
SETTLE_FRAMES = 3      # untimed frames each configuration runs at the start of each round
WARMUP_FRAMES = 10     # untimed frames when a configuration is built


# -- StreamDiffusion on the CPU --------------------------------------------------------------------
class _HostEvent:
    """Stand-in for torch.cuda.Event: record() reads the host clock, elapsed_time() gives ms."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end: "_HostEvent") -> float:
        return (end.t - self.t) * 1e3


@contextlib.contextmanager
def host_clock_cuda_events():
    """Within the block, torch.cuda.Event is :class:`_HostEvent` and torch.cuda.synchronize a no-op."""
    saved = torch.cuda.Event, torch.cuda.synchronize
    torch.cuda.Event, torch.cuda.synchronize = _HostEvent, (lambda device=None: None)
    try:
        yield
    finally:
        torch.cuda.Event, torch.cuda.synchronize = saved


# -- configurations ----------------------------------------------------------------------------------
class Config:
    """One (mode, vae, method): ``frame()`` does one frame's work; ``context`` wraps its timed runs."""

    def __init__(self, mode, vae, method, frame, context=contextlib.nullcontext):
        self.mode, self.vae, self.method = mode, vae, method
        self.frame, self.context = frame, context
        self.rounds: list[list[float]] = []   # per round, each timed frame's seconds

    @property
    def key(self):
        return f"{self.mode}/{self.vae}/{self.method}"


def make_frames(size: int, count: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(1, 3, size, size, generator=g) for _ in range(count)]


def cycle(frames):
    state = {"i": 0}

    def next_frame():
        state["i"] = (state["i"] + 1) % len(frames)
        return frames[state["i"]]
    return next_frame


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """StreamDiffusion's own post-processing (its image_utils.denormalize), for --sd-postprocess."""
    return (images / 2 + 0.5).clamp(0, 1)


def build_configs(size: int, skipped: dict, sd_postprocess: bool = False) -> list[Config]:
    from diffusers import StableDiffusionImg2ImgPipeline

    configs = []
    frames = make_frames(size)
    for vae in ("kl", "tiny"):
        pipe = tiny_sd_pipeline(seed=0, scheduler="lcm", vae=vae, sample_size=size // 8)
        pipe.set_progress_bar_config(disable=True)
        img2img = StableDiffusionImg2ImgPipeline(**pipe.components, requires_safety_checker=False)
        img2img.set_progress_bar_config(disable=True)
        unet, codec_vae = pipe.unet, pipe.vae
        with torch.inference_mode():
            prompt_embeds = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
        for mode in ("img2img", "txt2img"):
            steps = STEPS[mode]
            streams = {}
            for cfg in ("none", "self"):
                s = Stream(pipe, steps=steps, num_inference_steps=NUM_INFERENCE_STEPS, cfg=cfg,
                           guidance_scale=GUIDANCE_SCALE, mode=mode, output_type="pt", height=size, width=size)
                s.prepare(PROMPT)
                streams[cfg] = s
            ref = streams["none"]
            n = len(ref.schedule)
            timesteps = ref.schedule.timesteps.to(torch.float32)
            int_timesteps = [int(t) for t in ref.schedule.timesteps.round()]

            # floor: the stream's rows through the UNet, one encode, one decode, nothing else
            x_rows = torch.randn((n,) + ref.latent_shape)
            embeds = ref.latents.cond.tile(n).embeds
            pixels = frames[0] * 2 - 1

            def floor(mode=mode, unet=unet, vae_=codec_vae, x_rows=x_rows, t=timesteps, embeds=embeds, pixels=pixels):
                if mode == "img2img":
                    vae_.encode(pixels)
                unet(x_rows, t, encoder_hidden_states=embeds, return_dict=False)
                return vae_.decode(x_rows[:1], return_dict=False)[0]
            configs.append(Config(mode, vae, "floor", floor))

            for cfg, s in streams.items():
                if mode == "img2img":
                    nxt = cycle(frames)
                    fn = (lambda s=s, nxt=nxt: s(nxt()))
                else:
                    fn = s
                configs.append(Config(mode, vae, f"fastdiff {cfg}", fn))

            if mode == "img2img":
                nxt = cycle(frames)
                fn = (lambda p=img2img, nxt=nxt, ts=int_timesteps, pe=prompt_embeds: p(
                    prompt_embeds=pe, image=nxt(), strength=1.0, timesteps=ts,
                    guidance_scale=1.0, output_type="pt").images)
            else:
                fn = (lambda p=pipe, ts=int_timesteps, pe=prompt_embeds: p(
                    prompt_embeds=pe, timesteps=ts, guidance_scale=1.0, height=size, width=size,
                    output_type="pt").images)
            configs.append(Config(mode, vae, "diffusers", fn))

            for cfg in ("none", "self"):
                method = f"StreamDiffusion {cfg}"
                try:
                    import streamdiffusion
                    sd = streamdiffusion.StreamDiffusion(
                        pipe, t_index_list=steps, torch_dtype=torch.float32, width=size, height=size,
                        frame_buffer_size=1, cfg_type=cfg)
                    sd.prepare(PROMPT, num_inference_steps=NUM_INFERENCE_STEPS, guidance_scale=GUIDANCE_SCALE)
                except Exception as e:   # noqa: BLE001 - record why it cannot run, and go on
                    skipped[f"{mode}/{vae}/{method}"] = f"{type(e).__name__}: {e}"
                    continue
                post = denormalize if sd_postprocess else (lambda images: images)
                if mode == "img2img":
                    nxt = cycle(frames)
                    fn = (lambda sd=sd, nxt=nxt, post=post: post(sd(nxt())))
                    configs.append(Config(mode, vae, method, fn, host_clock_cuda_events))
                else:
                    configs.append(Config(mode, vae, method, (lambda sd=sd, post=post: post(sd.txt2img(1)))))
    return configs


# -- measuring ---------------------------------------------------------------------------------------
def run_frames(config: Config, count: int, timed: bool) -> list[float]:
    times = []
    with torch.inference_mode(), config.context():
        for _ in range(count):
            t0 = time.perf_counter()
            out = config.frame()
            t1 = time.perf_counter()
            if timed:
                times.append(t1 - t0)
    assert out is not None, f"{config.key} returned None in steady state"
    return times


def measure(configs: list[Config], frames: int, rounds: int, skipped: dict, seed: int = 0):
    """Every round visits the (mode, VAE) groups in a shuffled order; within a group the
    configurations take turns frame by frame (a shuffled turn order per sweep), so the floor and
    the methods compared with it run under the same load."""
    for c in list(configs):   # warm-up, and a first check that each one runs at all
        try:
            run_frames(c, WARMUP_FRAMES, timed=False)
        except Exception as e:  # noqa: BLE001
            skipped[c.key] = f"{type(e).__name__}: {e}"
            configs.remove(c)
    groups: dict = {}
    for c in configs:
        groups.setdefault((c.mode, c.vae), []).append(c)
    rng = random.Random(seed)
    group_order = list(groups)
    for r in range(rounds):
        rng.shuffle(group_order)
        for g in group_order:
            members = list(groups[g])
            for c in members:
                run_frames(c, SETTLE_FRAMES, timed=False)
            times = {c.key: [] for c in members}
            with torch.inference_mode():
                for _ in range(frames):
                    rng.shuffle(members)
                    for c in members:
                        with c.context():
                            t0 = time.perf_counter()
                            out = c.frame()
                            t1 = time.perf_counter()
                        assert out is not None, f"{c.key} returned None in steady state"
                        times[c.key].append(t1 - t0)
            for c in members:
                c.rounds.append(times[c.key])
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)


def paired_ratio(a: Config, b: Config) -> float:
    """Median over all sweeps of b's frame time / a's frame time in the same sweep."""
    return statistics.median(y / x for ra, rb in zip(a.rounds, b.rounds) for x, y in zip(ra, rb))


def summarise(configs: list[Config], skipped: dict) -> list[dict]:
    by_key = {c.key: c for c in configs}
    rows = []
    for mode in ("img2img", "txt2img"):
        for vae in ("kl", "tiny"):
            floor = by_key.get(f"{mode}/{vae}/floor")
            for method in METHODS:
                key = f"{mode}/{vae}/{method}"
                c = by_key.get(key)
                if c is None:
                    rows.append({"mode": mode, "vae": vae, "method": method, "skipped": skipped.get(key, "not run")})
                    continue
                all_ms = [t * 1e3 for rnd in c.rounds for t in rnd]
                row = {"mode": mode, "vae": vae, "method": method, "ms": statistics.median(all_ms),
                       "round_median_ms": [statistics.median(rnd) * 1e3 for rnd in c.rounds],
                       "round_mean_ms": [statistics.fmean(rnd) * 1e3 for rnd in c.rounds],
                       "frame_ms": all_ms}
                row["fps"] = 1e3 / row["ms"]
                row["p10_ms"] = statistics.quantiles(all_ms, n=10)[0] if len(all_ms) > 1 else all_ms[0]
                if floor is not None:
                    row["of_floor"] = paired_ratio(c, floor)
                    row["of_floor_rounds"] = [statistics.median(f) / statistics.median(m)
                                              for f, m in zip(floor.rounds, c.rounds)]
                rows.append(row)
    return rows


def paired(configs, mode, vae, a, b):
    """How many times faster a is than b: median over sweeps of b_ms / a_ms, same-sweep pairs."""
    by_key = {c.key: c for c in configs}
    ca, cb = by_key.get(f"{mode}/{vae}/{a}"), by_key.get(f"{mode}/{vae}/{b}")
    if ca is None or cb is None:
        return None
    return paired_ratio(ca, cb)


def table(rows, configs) -> str:
    vae_name = {"kl": "AutoencoderKL", "tiny": "AutoencoderTiny"}
    lines = ["| mode | VAE | method | ms/frame | frames/s | % of floor | fastdiff speed-up | p10 ms |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        head = f"| {row['mode']} | {vae_name[row['vae']]} | {row['method']} |"
        if "skipped" in row:
            lines.append(f"{head} – | – | – | not run: {row['skipped'][:80]} | – |")
            continue
        speedup = ""
        m = row["method"]
        if m == "diffusers":
            s = [paired(configs, row["mode"], row["vae"], f"fastdiff {c}", "diffusers") for c in ("none", "self")]
            speedup = " / ".join(f"{x:.2f}×" for x in s if x is not None) + " (none / self)"
        elif m.startswith("StreamDiffusion"):
            cfg = m.split()[-1]
            s = paired(configs, row["mode"], row["vae"], f"fastdiff {cfg}", m)
            speedup = f"{s:.3f}× (cfg {cfg})" if s is not None else ""   # the bar is > 1.00
        of_floor = f"{100 * row['of_floor']:.1f}%" if "of_floor" in row else "–"
        lines.append(f"{head} {row['ms']:.2f} | {row['fps']:.1f} | {of_floor} | {speedup} | {row['p10_ms']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=30, help="timed frames per configuration per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all configurations")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (a multiple of 8; latents are size/8)")
    parser.add_argument("--out", default=None, help="write every timing to this JSON file")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: leave torch's default). On a shared machine whose "
                             "other core is busy, torch's 2 OpenMP threads stall at every parallel region "
                             "(a KL decode went from 11 ms to 0.5-0.7 s); --threads 1 then gives usable numbers")
    parser.add_argument("--sd-postprocess", action="store_true",
                        help="apply StreamDiffusion's denormalize to its outputs, so all three return [0, 1] tensors")
    args = parser.parse_args(argv)
    if args.size % 8 or args.size <= 0:
        parser.error("--size must be a positive multiple of 8")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment([os.path.relpath(os.path.abspath(__file__), os.getcwd())] + argv,
                      ("torch", "diffusers", "transformers", "streamdiffusion"))
    print(f"command: {env['command']}")
    print(f"machine: {env['cpu']}, {env['cores']} cores (torch threads {env['torch_threads']}), Python {env['python']}, "
          f"load average at start {' '.join(env['load_average'] or ['?'])}")
    print(f"versions: torch {env['torch']}, diffusers {env['diffusers']}, transformers {env['transformers']}, "
          f"streamdiffusion {env['streamdiffusion']}")
    print(f"date: {env['date']}")
    print(f"setup: tiny SD-1.x pipeline (random weights), LCM, n=2 steps (img2img {STEPS['img2img']}, "
          f"txt2img {STEPS['txt2img']} of {NUM_INFERENCE_STEPS}), {args.size}×{args.size} px "
          f"({args.size // 8}×{args.size // 8} latents), float32, eager, {args.rounds} rounds × {args.frames} frames, "
          f"StreamDiffusion output {'denormalized to [0, 1]' if args.sd_postprocess else 'raw [-1, 1] (as it returns it)'}")

    import diffusers
    diffusers.utils.logging.set_verbosity_error()   # LCM warns on every call with custom timesteps
    torch.manual_seed(0)
    skipped: dict = {}
    configs = build_configs(args.size, skipped, args.sd_postprocess)
    measure(configs, args.frames, args.rounds, skipped)
    rows = summarise(configs, skipped)
    print()
    print(table(rows, configs))
    if skipped:
        print()
        for key, why in skipped.items():
            print(f"not run: {key}: {why}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "args": vars(args), "rows": rows, "skipped": skipped}, f, indent=1)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
