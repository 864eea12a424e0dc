"""The `fastdiff` command: `fastdiff generate` (txt2img) and `fastdiff stream` (img2img on frames)."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import time
from pathlib import Path

import click
import torch
from PIL import Image, ImageOps

# transformers warns at import about optional image processors the CLI never uses.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from .sampling.guidance import CFG_MODES

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
CLIPS = ("moving-shapes",)

# The library names the offending argument first in its ValueErrors; the option it came from.
OPTION_OF = {
    "steps": "--steps", "num_inference_steps": "--steps", "cfg": "--cfg", "guidance_scale": "--guidance-scale",
    "delta": "--delta", "frame_buffer": "--frame-buffer", "similarity_filter": "--similarity-filter",
    "height": "--height", "width": "--width", "prompt": "--prompt", "negative_prompt": "--negative-prompt",
    "pipe": "--model",
}


@contextlib.contextmanager
def usage_errors(prompt_hint: str = "--prompt"):
    """Show the library's argument errors as click usage errors on the option, without a traceback."""
    try:
        yield
    except ValueError as error:
        name = str(error).split(" ", 1)[0].rstrip(":")
        hint = prompt_hint if name == "prompt" else OPTION_OF.get(name)
        if hint is None:
            raise click.UsageError(str(error)) from error
        raise click.BadParameter(str(error), param_hint=f"'{hint}'") from error


def load_pipeline(model: str, img2img: bool, device: str | None):
    """The embedded shapes model, the "tiny" pipeline (random weights, built offline), or a local
    diffusers folder. Streams use only the components, so a txt2img pipeline serves img2img too."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise click.BadParameter(str(error), param_hint="'--device'") from error
    if model == "shapes":
        from .shapes.model import load_pipeline as load_shapes_pipeline

        pipe = load_shapes_pipeline()
    elif model == "tiny":
        from .testing import tiny_sd_pipeline

        pipe = tiny_sd_pipeline(scheduler="lcm", img2img=img2img)
        click.echo("note: --model tiny has random weights, so its images are noise; "
                   "pass a local pipeline folder for real ones", err=True)
    elif os.path.isdir(model):
        from diffusers import DiffusionPipeline

        try:  # the stream only uses the components, so the folder's pipeline class doesn't matter
            pipe = DiffusionPipeline.from_pretrained(model)
        except (OSError, ValueError) as error:
            raise click.BadParameter(f"cannot load a pipeline from {model}: {error}", param_hint="'--model'") from error
    else:  # a hub id would mean a download; the CLI only reads local folders
        raise click.BadParameter(f"{model!r} is neither 'shapes', 'tiny' nor a local pipeline folder",
                                 param_hint="'--model'")
    return pipe.to(device)


def parse_steps(ctx, param, value):
    """'32,45' → [32, 45]; order and range are the library's to check."""
    try:
        return [int(s) for s in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 32,45, got {value!r}") from None


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


model_option = click.option("--model", default="shapes", show_default=True,
                            help="'shapes' (the embedded model, offline), 'tiny' (random weights) or a local "
                                 "diffusers pipeline folder.")
device_option = click.option("--device", default=None, help="torch device; default cuda when available, else cpu.")
height_option = click.option("--height", type=int, default=None, help="Image height (default: the model's).")
width_option = click.option("--width", type=int, default=None, help="Image width (default: the model's).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Real-time diffusers pipelines: generate images, or stream frames through img2img."""


@main.command(short_help="Generate images from prompts (txt2img).")
@click.argument("prompts", metavar="PROMPT...", nargs=-1, required=True)
@model_option
@click.option("--steps", type=int, default=25, show_default=True, help="num_inference_steps.")
@click.option("--guidance-scale", type=float, default=None, help="Guidance scale (default: the pipeline's).")
@click.option("--cfg", type=click.Choice(CFG_MODES), default=None,
              help="Guidance mode (default: 'full' when guidance scale > 1, else 'none').")
@click.option("--seed", type=int, default=0, show_default=True, help="Each prompt is generated from this seed.")
@click.option("--num-images", type=click.IntRange(min=1), default=1, show_default=True, help="Images per prompt.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/generate"),
              show_default=True, help="Folder the PNGs are written to.")
@height_option
@width_option
@device_option
def generate(prompts, model, steps, guidance_scale, cfg, seed, num_images, out, height, width, device):
    """Generate images for each PROMPT with the accelerated pipeline and write them as PNGs."""
    from tqdm import tqdm

    from .accelerate import accelerate

    pipe = load_pipeline(model, img2img=False, device=device)
    with usage_errors(prompt_hint="PROMPT"):
        fast = accelerate(pipe, cfg=cfg)
    out.mkdir(parents=True, exist_ok=True)
    written, seconds = [], 0.0
    for i, prompt in enumerate(tqdm(prompts, desc="generate", unit="prompt")):
        # A seed per prompt: a prompt's images don't depend on the prompts before it.
        generator = torch.Generator(fast.denoiser.device).manual_seed(seed)
        start = time.perf_counter()
        with usage_errors(prompt_hint="PROMPT"):
            images = fast(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                          num_images_per_prompt=num_images, height=height, width=width, output_type="pil").images
        seconds += time.perf_counter() - start
        for k, image in enumerate(images):
            path = out / f"{i:03d}-{slug(prompt)}-{k}.png"
            image.save(path)
            written.append(path)
    n = len(written)
    click.echo(f"wrote {n} image{'s' * (n != 1)} to {out}")
    click.echo(f"{seconds / n:.3f} s/image, {n / seconds:.2f} images/s (generation only, first call included)")


def read_frames(input_dir, clip, frames, seed):
    """(count, iterator of RGB frames): the folder's PNG/JPEG files in name order, or a generated clip."""
    if (input_dir is None) == (clip is None):
        raise click.UsageError("give exactly one of --input FOLDER or --clip moving-shapes")
    if clip is not None:
        from .shapes import moving_shapes_clip

        images = moving_shapes_clip(num_frames=frames or 32, seed=seed)
        return len(images), iter(images)
    paths = sorted(p for p in input_dir.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not paths:
        raise click.BadParameter(f"no PNG or JPEG files in {input_dir}", param_hint="'--input'")
    paths = paths[:frames] if frames else paths
    # Read lazily: a long clip never has to fit in memory.
    return len(paths), (Image.open(p).convert("RGB") for p in paths)


def write_results(results, out) -> tuple[int, int]:
    """Write each delivered frame as frame_NNNNN.png; (written, skipped by the filter)."""
    written = skipped = 0
    for result in results:
        result.image.save(out / f"frame_{result.index:05d}.png")
        written += 1
        skipped += result.skipped
    return written, skipped


def ready_results(runner):
    """The results already delivered, without waiting."""
    while True:
        try:
            yield runner.get(timeout=0)
        except queue.Empty:
            return


@main.command(short_help="Stream video frames through img2img.")
@click.option("--input", "input_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of PNG/JPEG frames, read in name order.")
@click.option("--clip", type=click.Choice(CLIPS), help="Use a generated clip instead of --input.")
@click.option("--frames", type=click.IntRange(min=1), default=None,
              help="Clip length (default 32); with --input, use only the first N files.")
@click.option("--prompt", default="a watercolor painting", show_default=True)
@click.option("--negative-prompt", default=None)
@model_option
@click.option("--steps", default="32,45", show_default=True, callback=parse_steps, metavar="I,J,...",
              help="Indices into the 50-step schedule, noisiest first; one denoising step each.")
@click.option("--cfg", type=click.Choice(CFG_MODES), default="self", show_default=True, help="Guidance mode.")
@click.option("--guidance-scale", type=float, default=1.2, show_default=True)
@click.option("--delta", type=float, default=1.0, show_default=True, help="Residual-guidance strength.")
@click.option("--frame-buffer", type=int, default=1, show_default=True,
              help="Frames per call. The last group is padded by repeating its last frame; "
                   "the padding's outputs are discarded.")
@click.option("--similarity-filter", type=float, default=None, metavar="THRESH",
              help="Skip frames more similar than THRESH (e.g. 0.98) to the last processed one, reusing its output.")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed (and the clip's).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/stream"),
              show_default=True, help="Folder the output frames are written to.")
@height_option
@width_option
@device_option
def stream(input_dir, clip, frames, prompt, negative_prompt, model, steps, cfg, guidance_scale, delta,
           frame_buffer, similarity_filter, seed, out, height, width, device):
    """Stream frames through img2img and write one output frame per input frame.

    Frames are center-cropped to the stream's aspect ratio and resized to its resolution
    (--height/--width, default the model's). Output frame i (frame_00000.png ...) belongs to input
    frame i; the frames still in flight at the end are flushed, so none is lost.
    """
    from tqdm import tqdm

    from .stream import Stream
    from .stream.runner import StreamRunner

    total, inputs = read_frames(input_dir, clip, frames, seed)
    pipe = load_pipeline(model, img2img=True, device=device)
    with usage_errors():
        s = Stream(pipe, steps, cfg=cfg, guidance_scale=guidance_scale, delta=delta, frame_buffer=frame_buffer,
                   similarity_filter=similarity_filter, seed=seed, height=height, width=width, output_type="pil")
        s.prepare(prompt, negative_prompt)
    out.mkdir(parents=True, exist_ok=True)

    written = skipped = 0
    fitted = (ImageOps.fit(frame, (s.width, s.height)) for frame in inputs)
    # The runner pairs outputs with inputs (the stream lags n−1 calls), pads a last partial group
    # of --frame-buffer frames and discards the padding's outputs, and flushes at close.
    runner = StreamRunner(s, max_queue=2 * frame_buffer, when_full="block")
    with tqdm(total=total, desc="stream", unit="frame") as bar:
        with runner:
            for frame in fitted:
                runner.put(frame)
                counts = write_results(ready_results(runner), out)
                written, skipped = written + counts[0], skipped + counts[1]
                bar.update(counts[0])
        counts = write_results(runner, out)
        written, skipped = written + counts[0], skipped + counts[1]
        bar.update(counts[0])

    stats = runner.stats()
    padded = -total % frame_buffer
    fps, p50, p95 = stats.frames_per_s, stats.latency_p50_s * 1000, stats.latency_p95_s * 1000
    click.echo(f"frames in: {total}, frames out: {written} (in {out}), skipped by the similarity filter: "
               f"{skipped}" + (f", padding: {padded} repeated frame(s), outputs discarded" if padded else ""))
    click.echo(f"{fps:.2f} frames/s; latency per frame p50 {p50:.1f} ms, p95 {p95:.1f} ms "
               f"(frame in → its output out, {s.lag} call(s) of lag)")

