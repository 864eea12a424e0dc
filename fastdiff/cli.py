"""The `fastdiff` command: `fastdiff generate` (txt2img), `fastdiff stream` (img2img on frames),
`fastdiff build` (engines ahead of time), `fastdiff demo` (the real-time web demo) and
`fastdiff bench quality` (the quality of sampling configurations on the shapes model)."""

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

from .artefacts import StaleArtefactError
from .checks import MAX_SEED
from .quality import SOLVERS as QUALITY_SOLVERS
from .sampling.guidance import CFG_MODES
from .sampling.schedule import SOLVERS

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
CLIPS = ("moving-shapes",)

# The library names the offending argument first in its ValueErrors; the option it came from.
OPTION_OF = {
    "steps": "--steps", "num_inference_steps": "--steps", "cfg": "--cfg", "guidance_scale": "--guidance-scale",
    "delta": "--delta", "frame_buffer": "--frame-buffer", "similarity_filter": "--similarity-filter",
    "height": "--height", "width": "--width", "prompt": "--prompt", "negative_prompt": "--negative-prompt",
    "pipe": "--model", "model": "--model", "components": "--components", "batch": "--batch",
    "resolutions": "--resolution", "backend": "--backend", "guidance_rescale": "--guidance-rescale",
    "schedule": "--schedule", "adapter": "--adapter", "adapter_scheduler": "--adapter", "scale": "--adapter-scale",
    "router": "--router", "codes": "--codes", "target": "--target", "attention": "--attention",
    "compile": "--compile", "compile_backend": "--compile", "prompt_rows": "--prompt-rows", "finetune": "--finetune",
    "routers": "--join", "opset": "--opset",
}
# One vocabulary for what runs the model, in every command: "torch" is the pipeline's own modules,
# the rest are fastdiff's engine backends.
BACKEND_CHOICES = ("torch", "auto", "onnxruntime", "tensorrt", "aoti", "inductor")
SEED = click.IntRange(0, MAX_SEED)


@contextlib.contextmanager
def usage_errors(**hints):
    """Show the library's argument errors as click usage errors on the option, without a traceback;
    `hints` name the option of an argument where this command's differs from :data:`OPTION_OF`'s."""
    try:
        yield
    except ValueError as error:
        name = str(error).split(" ", 1)[0].rstrip(":")
        hint = hints.get(name, OPTION_OF.get(name))
        if hint is None:
            raise click.UsageError(str(error)) from error
        raise click.BadParameter(str(error), param_hint=f"'{hint}'") from error
    except StaleArtefactError as error:   # a file made for another model: its message says which and what to do
        raise click.ClickException(str(error)) from error


def check_device(device: str | None) -> torch.device:
    """The torch device to run on (default CUDA when there is one), checked before anything loads."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise click.BadParameter(str(error), param_hint="'--device'") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise click.BadParameter(f"{device} asked for, but {why}; use --device cpu, or install a CUDA build of "
                                 "torch (see the README)", param_hint="'--device'")
    return device


def load_pipeline(model: str, device: torch.device):
    """The pipeline --model names, through the one resolver every command uses
    (:func:`fastdiff.models.load_model`). Streams use only the components, so a txt2img pipeline
    serves img2img too."""
    from .models import OFFLINE_MODELS, load_model

    with usage_errors():
        pipe = load_model(model, device=device)
    if model in OFFLINE_MODELS and model != "shapes":
        click.echo(f"note: --model {model} has random weights, so its images are noise; pass a pipeline "
                   "folder or a hub id for real ones", err=True)
    return pipe


def pick_adapter(adapter: str, model: str, steps: int | None) -> str | None:
    """--adapter PATH, none, or auto — the shapes model's shipped one-step adapter at --steps 1."""
    if adapter == "none":
        return None
    if adapter == "auto":
        if model != "shapes" or steps != 1:
            return None
        from .shapes import artefact_path

        path = artefact_path("onestep")
        return path if os.path.isfile(os.path.join(path, "manifest.json")) else None
    if not os.path.exists(adapter):
        raise click.BadParameter(f"no LoRA folder or .safetensors file at {adapter}", param_hint="'--adapter'")
    return adapter


def pick_router(router: str | None, model: str) -> str | None:
    """--router PATH, or 'shapes' — the shapes model's shipped router."""
    if router is None:
        return None
    if router == "shapes":
        from .shapes import artefact_path

        path = artefact_path("router")
        if model != "shapes":
            raise click.BadParameter("the shapes router goes with --model shapes", param_hint="'--router'")
        if not os.path.isfile(os.path.join(path, "manifest.json")):   # an install that left package data out
            raise click.BadParameter(f"the shapes router is missing from {path}: reinstall fastdiff, or make one "
                                     "with `fastdiff tune route --out DIR` and pass --router DIR", param_hint="'--router'")
        return path
    if not os.path.isdir(router):
        raise click.BadParameter(f"no router folder at {router}", param_hint="'--router'")
    return router


def pick_schedule(schedule: str, model: str, steps: int | None) -> tuple[str | None, int]:
    """(schedule file or None, steps): --schedule PATH (its step count unless --steps says so), none,
    or auto — the shapes model's shipped schedule for the step count, when there is one."""
    from .tuning.schedules import Schedule

    if schedule == "none":
        return None, steps or 25
    if schedule == "auto":
        steps = steps or 25
        if model != "shapes":
            return None, steps
        from .shapes import artefact_path

        path = os.path.join(artefact_path("schedule"), f"shapes-{steps}.json")
        return (path if os.path.isfile(path) else None), steps
    try:
        found = Schedule.load(schedule)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--schedule'") from error
    if steps is not None and steps != found.steps:
        raise click.BadParameter(f"{schedule} has {found.steps} steps, not --steps {steps}", param_hint="'--schedule'")
    return schedule, found.steps


def stream_steps(model: str) -> list[int]:
    """The img2img stream's steps by default: the shapes model's own (which keep the input), else
    StreamDiffusion's [32, 45]."""
    if model == "shapes":
        from .shapes.model import STREAM_STEPS

        return list(STREAM_STEPS)
    return [32, 45]


def engine_backend(backend: str) -> str | None:
    """--backend as the library takes it: None runs the pipeline's own PyTorch modules."""
    return None if backend == "torch" else backend


def parse_steps(ctx, param, value):
    """'32,45' → [32, 45]; order and range are the library's to check (None: the model's default)."""
    if value is None:
        return None
    try:
        return [int(s) for s in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers such as 32,45, got {value!r}") from None


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:length] or "prompt"


model_option = click.option("--model", default="shapes", show_default=True,
                            help="'shapes' (the embedded model, offline), 'tiny', 'tiny-sdxl', 'tiny-sd3', "
                                 "'tiny-flux' (random weights), an architecture with random weights ('sd15', "
                                 "'sd-turbo', 'sdxl', 'sd3'), a local pipeline folder or a hub id.")
attention_option = click.option("--attention", default="sdpa", show_default=True, metavar="NAME",
                                help="Attention kernel: sdpa, sdpa-flash, sdpa-efficient, sdpa-math, sdpa-cudnn, "
                                     "xformers, or a diffusers attention backend (flash, flex, sage, ...).")
backend_option = click.option("--backend", type=click.Choice(BACKEND_CHOICES), default="torch", show_default=True,
                              help="What runs the model: 'torch' (its own modules) or an engine backend, built "
                                   "(or loaded from the engine cache, e.g. after `fastdiff build`).")
device_option = click.option("--device", default=None, help="torch device; default cuda when available, else cpu.")
height_option = click.option("--height", type=int, default=None, help="Image height (default: the model's).")
width_option = click.option("--width", type=int, default=None, help="Image width (default: the model's).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Real-time diffusers pipelines: generate images, stream frames through img2img, build engines,
    serve the demo, measure quality."""
    # The commands show their own progress; the libraries' per-file loading bars are noise here.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


@main.command(short_help="Generate images from prompts (txt2img).")
@click.argument("prompts", metavar="PROMPT...", nargs=-1, required=True)
@model_option
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="num_inference_steps (default: the schedule's, else 25).")
@click.option("--schedule", default="auto", show_default=True, metavar="auto|none|PATH",
              help="A searched step schedule (fastdiff tune steps); auto: the shapes model's shipped one for "
                   "--steps, when there is one.")
@click.option("--adapter", default="auto", show_default=True, metavar="auto|none|PATH",
              help="A LoRA adapter (ours from `fastdiff tune onestep`, or LCM/TCD/Hyper-SD/Lightning/DMD2, "
                   "Hyper-SD3/Hyper-FLUX/FLUX.1-Turbo); auto: "
                   "the shapes model's shipped one-step adapter when --steps is 1.")
@click.option("--adapter-scale", type=click.FloatRange(min=0), default=None,
              help="The adapter's LoRA weight (default: its family's card's, else 1).")
@click.option("--router", default=None, metavar="shapes|PATH",
              help="A prompt router (fastdiff tune route): each prompt runs on its pruned sub-network; "
                   "'shapes': the shapes model's shipped one.")
@click.option("--negative-prompt", default=None, help="What to guide away from (full CFG), for every PROMPT.")
@click.option("--guidance-scale", type=click.FloatRange(min=0), default=None,
              help="Guidance scale (default: the adapter's, the shapes model's own, else the pipeline's).")
@click.option("--guidance-rescale", type=click.FloatRange(0, 1), default=None,
              help="diffusers' guidance_rescale for full CFG (default: the shapes model's own, else 0).")
@click.option("--cfg", type=click.Choice(CFG_MODES), default=None,
              help="Guidance mode (default: 'full' when guidance scale > 1, else 'none').")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Each prompt is generated from this seed.")
@click.option("--num-images", type=click.IntRange(min=1), default=1, show_default=True, help="Images per prompt.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/generate"),
              show_default=True, help="Folder the PNGs are written to.")
@height_option
@width_option
@backend_option
@attention_option
@click.option("--image", "image_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Start from this picture (img2img), resized to the model's size with --mask.")
@click.option("--strength", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="How much of --image is made anew (default: the pipeline's; 1 with --mask).")
@click.option("--mask", "mask_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Inpaint: white where --image is made anew, black where it is kept.")
@device_option
def generate(prompts, model, steps, schedule, adapter, adapter_scale, router, negative_prompt, guidance_scale,
             guidance_rescale, cfg, seed, num_images, out, height, width, backend, attention, image_path, strength,
             mask_path, device):
    """Generate images for each PROMPT with the accelerated pipeline and write them as PNGs."""
    from tqdm import tqdm

    from .accelerate import accelerate
    from .text_inputs import call_defaults

    if any(not p.strip() for p in prompts):   # checked before anything loads
        raise click.BadParameter("a prompt must not be empty", param_hint="PROMPT")
    if image_path is None and (mask_path is not None or strength is not None):
        raise click.UsageError("--mask and --strength apply to a picture: give --image too")
    pictures = {}
    if image_path is not None:
        pictures["image"] = read_picture(image_path, "--image", "RGB")
        if mask_path is not None:
            pictures["mask_image"] = read_picture(mask_path, "--mask", "L")
        if strength is not None:
            pictures["strength"] = strength
    router = pick_router(router, model)
    # a router's sub-networks don't carry an adapter: with --router, 'auto' picks none
    adapter = pick_adapter("none" if router is not None and adapter == "auto" else adapter, model, steps)
    asked_steps = steps
    schedule, steps = pick_schedule(schedule if adapter is None else "none", model, steps)
    device = check_device(device)
    if guidance_rescale and (cfg not in (None, "full") or (guidance_scale is not None and guidance_scale <= 1)):
        raise click.BadParameter("it rescales full CFG (--cfg full, --guidance-scale > 1)",
                                 param_hint="'--guidance-rescale'")
    pipe = load_pipeline(model, device)
    if pictures:   # the same model's img2img or inpainting pipeline, sharing its modules
        pipe = picture_pipeline(pipe, inpaint="mask_image" in pictures)
    if model == "shapes" and adapter is None:   # the settings its quality figures were measured at
        from .shapes.model import GUIDANCE_RESCALE, GUIDANCE_SCALE

        guidance_scale = GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        if guidance_rescale is None and "guidance_rescale" in call_defaults(pipe):   # img2img's takes none
            guidance_rescale = GUIDANCE_RESCALE
    extra = {"guidance_rescale": guidance_rescale} if guidance_rescale and (guidance_scale or 0) > 1 \
        and cfg in (None, "full") else {}   # the shapes model's own rescale where it applies
    with usage_errors(prompt="PROMPT"):
        try:
            fast = accelerate(pipe, cfg=cfg, backend=engine_backend(backend), schedule=schedule, adapter=adapter,
                              adapter_scale=adapter_scale, router=router, attention=attention)
        except ImportError as error:   # an engine or attention backend whose packages are missing
            raise click.UsageError(str(error)) from error
    if adapter is not None:
        sampling = fast.adapter.sampling
        steps = asked_steps or sampling.steps   # the adapter's own step count unless --steps says otherwise
        click.echo(f"adapter {adapter} ({fast.adapter.family}): {sampling.steps} step(s), "
                   f"{type(fast.scheduler).__name__}, LoRA weight {fast.adapter_scale:g}", err=True)
    if schedule is not None:
        click.echo(f"schedule {schedule}: timesteps {[int(t) for t in fast.schedules[steps].timesteps]}", err=True)
    out.mkdir(parents=True, exist_ok=True)
    written, seconds = [], 0.0
    for i, prompt in enumerate(tqdm(prompts, desc="generate", unit="prompt")):
        # A seed per prompt: a prompt's images don't depend on the prompts before it.
        generator = torch.Generator(fast.denoiser.device).manual_seed(seed)
        start = time.perf_counter()
        with usage_errors(prompt="PROMPT"):
            images = fast(prompt, negative_prompt=negative_prompt, num_inference_steps=steps,
                          guidance_scale=guidance_scale, generator=generator, num_images_per_prompt=num_images,
                          height=height, width=width, output_type="pil", **extra, **pictures).images
        seconds += time.perf_counter() - start
        for k, image in enumerate(images):
            path = out / f"{i:03d}-{slug(prompt)}-{k}.png"
            image.save(path)
            written.append(path)
    n = len(written)
    click.echo(f"wrote {n} image{'s' * (n != 1)} to {out}")
    if router is not None:
        full = fast.router.details.get("macs_full")
        click.echo(f"routed: {fast.last_call_macs / 1e6:.1f} M MACs in the last denoiser call"
                   + (f" (the full model: {full * 2 * num_images / 1e6:.1f} M per prompt's rows)" if full else ""))
    click.echo(f"{seconds / n:.3f} s/image, {n / seconds:.2f} images/s (generation only, first call included)")


def read_picture(path: Path, hint: str, mode: str) -> Image.Image:
    """A picture file in `mode` ("RGB", or "L" for a mask), or a usage error naming the option."""
    try:
        with Image.open(path) as picture:
            return ImageOps.exif_transpose(picture).convert(mode)
    except OSError as error:
        raise click.BadParameter(f"{path} is not a picture ({error})", param_hint=f"'{hint}'") from None


def picture_pipeline(pipe, inpaint: bool):
    """`pipe`'s img2img (or inpainting) pipeline over the same modules."""
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    kind = AutoPipelineForInpainting if inpaint else AutoPipelineForImage2Image
    try:
        made = kind.from_pipe(pipe)
    except ValueError as error:   # a family with no such pipeline (SD3 inpainting...)
        raise click.UsageError(f"--{'mask' if inpaint else 'image'}: {type(pipe).__name__} has no "
                               f"{'inpainting' if inpaint else 'img2img'} pipeline in diffusers ({error})") from None
    made.set_progress_bar_config(disable=True)
    return made


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
    return len(paths), _opened(paths)


def _opened(paths):
    """Each file as an RGB image, read lazily (a long clip never has to fit in memory); a file that is
    not a readable image stops the stream with a usage error naming it."""
    for path in paths:
        try:
            with Image.open(path) as image:
                yield image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as error:   # PIL's errors for unknown, damaged and truncated files
            raise click.BadParameter(f"{path.name} is not a readable image ({error})", param_hint="'--input'") from None


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
@click.option("--prompt", default="a large red circle on the left, blue background", show_default=True,
              help="The prompt (the shapes model knows only its own words: see the README).")
@click.option("--negative-prompt", default=None)
@model_option
@click.option("--steps", default=None, callback=parse_steps, metavar="I,J,...",
              help="Indices into the 50-step schedule, noisiest first; one denoising step each (default: the "
                   "shapes model's, which keep the input picture; else 32,45).")
@click.option("--cfg", type=click.Choice(CFG_MODES), default=None,
              help="Guidance mode (default: self; a Flux model's: none, as its pipelines draw).")
@click.option("--guidance-scale", type=float, default=None,
              help="Default 1.2; a guidance-distilled Flux model's input, default its pipeline's.")
@click.option("--delta", type=float, default=1.0, show_default=True, help="Residual-guidance strength.")
@click.option("--frame-buffer", type=int, default=1, show_default=True,
              help="Frames per call. The last group is padded by repeating its last frame; "
                   "the padding's outputs are discarded.")
@click.option("--similarity-filter", type=float, default=None, metavar="THRESH",
              help="Skip frames more similar than THRESH (e.g. 0.98) to the last processed one, reusing its output.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Noise seed (and the clip's).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out/stream"),
              show_default=True, help="Folder the output frames are written to.")
@click.option("--adapter", default=None, metavar="PATH", help="A LoRA adapter loaded into the denoiser.")
@click.option("--adapter-scale", type=click.FloatRange(min=0), default=None,
              help="The adapter's LoRA weight (default: its family's card's, else 1).")
@height_option
@width_option
@backend_option
@click.option("--compile", "compile_backend", type=click.Choice(["none", "inductor", "onnxruntime"]), default="none",
              show_default=True, help="Compile the whole steady step (encode, denoiser, step, decode) as one graph: "
                                      "torch.compile, or one ONNX Runtime session. Not with --backend.")
@attention_option
@device_option
def stream(input_dir, clip, frames, prompt, negative_prompt, model, steps, cfg, guidance_scale, delta,
           frame_buffer, similarity_filter, seed, out, adapter, adapter_scale, height, width, backend, compile_backend,
           attention, device):
    """Stream frames through img2img and write one output frame per input frame.

    Frames are center-cropped to the stream's aspect ratio and resized to its resolution
    (--height/--width, default the model's). Output frame i (frame_00000.png ...) belongs to input
    frame i; the frames still in flight at the end are flushed, so none is lost.
    """
    from tqdm import tqdm

    from .streaming import Stream
    from .stream.runner import StreamRunner

    total, inputs = read_frames(input_dir, clip, frames, seed)
    if not prompt.strip():
        raise click.BadParameter("the prompt must not be empty", param_hint="'--prompt'")
    device = check_device(device)
    pipe = load_pipeline(model, device)
    with usage_errors():
        s = Stream(pipe, steps or stream_steps(model), cfg=cfg, guidance_scale=guidance_scale, delta=delta,
                   frame_buffer=frame_buffer, similarity_filter=similarity_filter, seed=seed, height=height,
                   width=width, output_type="pil",
                   backend=engine_backend(backend), adapter=adapter, adapter_scale=adapter_scale, attention=attention,
                   compile=None if compile_backend == "none" else "whole",
                   compile_backend="inductor" if compile_backend == "none" else compile_backend)
        s.prepare(prompt, negative_prompt)
    out.mkdir(parents=True, exist_ok=True)

    written = skipped = 0
    fitted = (ImageOps.fit(frame, (s.width, s.height)) for frame in inputs)
    # The runner pairs outputs with inputs (the stream lags n−1 calls), pads a last partial group
    # of --frame-buffer frames and discards the padding's outputs, and flushes at close.
    runner = StreamRunner(s, max_queue=2 * frame_buffer, when_full="block")
    unreadable = None
    with tqdm(total=total, desc="stream", unit="frame") as bar:
        with runner:
            try:
                for frame in fitted:
                    runner.put(frame)
                    counts = write_results(ready_results(runner), out)
                    written, skipped = written + counts[0], skipped + counts[1]
                    bar.update(counts[0])
            except click.BadParameter as error:   # the frames before it still come out
                unreadable = error
        counts = write_results(runner, out)
        written, skipped = written + counts[0], skipped + counts[1]
        bar.update(counts[0])
    if unreadable is not None:
        raise click.BadParameter(f"{unreadable.message}; the {written} frame(s) before it are in {out}",
                                 param_hint="'--input'")

    stats = runner.stats()
    padded = -total % frame_buffer
    fps, p50, p95 = stats.frames_per_s, stats.latency_p50_s * 1000, stats.latency_p95_s * 1000
    click.echo(f"frames in: {total}, frames out: {written} (in {out}), skipped by the similarity filter: "
               f"{skipped}" + (f", padding: {padded} repeated frame(s), outputs discarded" if padded else ""))
    click.echo(f"{fps:.2f} frames/s; latency per frame p50 {p50:.1f} ms, p95 {p95:.1f} ms "
               f"(frame in → its output out, {s.lag} call(s) of lag)")


def parse_resolutions(ctx, param, values):
    """('512x512', '768x512') → [(512, 512), (768, 512)] (height×width)."""
    try:
        return [tuple(int(v) for v in value.lower().split("x", 1)) for value in values] or None
    except ValueError:
        raise click.BadParameter(f"expected HEIGHTxWIDTH such as 512x512, got {values!r}") from None


@main.command(short_help="Build engines (ONNX Runtime, TensorRT, AOTInductor) for a pipeline.")
@click.option("--model", default="shapes", show_default=True,
              help="'shapes' (the embedded model), 'tiny', 'tiny-sdxl', 'tiny-sd3', 'tiny-flux', an architecture "
                   "with random weights ('sd15', 'sd-turbo', 'sdxl', 'sd3'), a local pipeline folder or a hub id.")
@click.option("--components", default=None, metavar="NAME,...",
              help="Of denoiser, vae_encoder, vae_decoder, text_encoder, text_encoder_2 (default: the profile's).")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt", "aoti"]), default="auto",
              show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="Engine precision (default: the model's dtype).")
@click.option("--profile", default=None, metavar="FAMILY",
              help="Shape profile file engines/profiles/FAMILY.json (default: the model's, when there is one).")
@click.option("--resolution", "resolutions", multiple=True, callback=parse_resolutions, metavar="HxW",
              help="Image size to build for; repeat for several (the first is optimised for).")
@click.option("--batch", default=None, metavar="MIN,OPT,MAX",
              help="Batch range (rows per call); a stream of n steps and F frames uses n·F.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder (default: the engine cache, $FASTDIFF_ENGINE_CACHE or ~/.cache/fastdiff/engines).")
@click.option("--rebuild", is_flag=True, help="Rebuild artefacts even when up to date, and replace stale ones.")
@click.option("--opset", type=click.IntRange(min=18), default=18, show_default=True, help="ONNX opset.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="ONNX exporter; auto tries dynamo, then TorchScript.")
@device_option
def build(model, components, backend, precision, profile, resolutions, batch, out, rebuild, opset, exporter, device):
    """Export, optimise and build engines into the engine cache; up-to-date ones are skipped.

    Streams and accelerate() load them with engine_options={"cache_dir": OUT} when their batch and
    size fall within what was built.
    """
    from .engines.build import build_engines, default_profile, summary
    from .engines.profiles import load_family_profile

    batch_range = None
    if batch is not None:
        try:
            batch_range = tuple(int(v) for v in batch.split(","))
        except ValueError:
            raise click.BadParameter(f"expected MIN,OPT,MAX such as 1,2,4, got {batch!r}", param_hint="'--batch'") from None
    pipe = load_pipeline(model, check_device(device))
    try:
        defaults = load_family_profile(profile) if profile else default_profile(model, pipe)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="'--profile'" if profile else "'--model'") from error
    names = components.split(",") if components else None
    if out is not None:
        try:   # before any export: a path through a file is found now, not after the first engine
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise click.BadParameter(f"can't make the folder {out}: {error}", param_hint="'--out'") from None
    with usage_errors(height="--resolution", width="--resolution"):
        try:
            built = build_engines(pipe, components=names, backend=backend, precision=precision,
                                  resolutions=resolutions, batch=batch_range, out_dir=str(out) if out else None,
                                  rebuild=rebuild, opset=opset, exporter=exporter, defaults=defaults)
        except ImportError as error:  # an engine backend whose packages are missing
            raise click.BadParameter(str(error), param_hint="'--backend'") from error
    click.echo(summary(built))


@main.command(short_help="Serve the real-time demo app: webcam, moving shapes or txt2img in a browser.")
@model_option
@backend_option
@click.option("--steps", default=None, callback=parse_steps, metavar="I,J,...",
              help="img2img steps (indices into the 50-step schedule; default: the shapes model's, else 32,45).")
@click.option("--cfg", type=click.Choice(CFG_MODES), default="self", show_default=True, help="Guidance mode.")
@click.option("--guidance-scale", type=float, default=1.2, show_default=True, help="Each session's starting value.")
@click.option("--prompt", default=None, help="Each session's starting prompt (default: a shapes caption).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback lets other machines use the model.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--max-sessions", type=click.IntRange(min=1), default=4, show_default=True,
              help="Clients served at once; more are refused.")
@click.option("--max-message-bytes", type=click.IntRange(min=1024), default=1 << 20, show_default=True,
              help="Largest frame or control message a client may send.")
@click.option("--max-frame-side", type=click.IntRange(min=16), default=1024, show_default=True,
              help="Largest width or height of a client's frames.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads (default: torch's).")
@click.option("--router", default=None, metavar="shapes|PATH", help="A prompt router for every session's stream.")
@device_option
def demo(model, backend, steps, cfg, guidance_scale, prompt, host, port, max_sessions, max_message_bytes,
         max_frame_side, threads, router, device):
    """Serve the demo page and its WebSocket at http://HOST:PORT/ (one model, a session per browser tab)."""
    try:
        import uvicorn

        from .demo import DemoConfig, create_app, server_config
    except ImportError as error:
        raise click.UsageError(f"the demo needs its extra: pip install \"fastdiff[demo]\" ({error})") from error
    options = {} if prompt is None else {"prompt": prompt}
    with usage_errors(max_frame_side="--max-frame-side", max_sessions="--max-sessions",
                      max_message_bytes="--max-message-bytes"):
        config = DemoConfig(steps=tuple(steps or stream_steps(model)), cfg=cfg, guidance_scale=guidance_scale,
                            backend=backend, max_sessions=max_sessions, max_message_bytes=max_message_bytes,
                            max_frame_side=max_frame_side, threads=threads, router=pick_router(router, model),
                            **options)
    pipe = load_pipeline(model, check_device(device))
    with usage_errors():
        try:
            app = create_app(pipe, config)
        except ImportError as error:  # an engine backend whose packages are missing
            raise click.BadParameter(str(error), param_hint="'--backend'") from error
    if host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(f"warning: listening on {host}: other machines can reach this server", err=True)
    if port:  # port 0 picks a free one, which uvicorn prints once it listens
        click.echo(f"fastdiff demo: open http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{port}/",
                   err=True)
    uvicorn.Server(server_config(app, config, host, port)).run()



def read_prompts(path: Path | None, model: str, count: int, kind: str, repeats: int = 1, **kinds) -> list[str]:
    """Prompts for a search: one per line of --prompt-file, else the shapes world's (search prompts
    drawn from their own seeds, disjoint from the held-out evaluation prompts, of each of `kinds`
    if given; the unstated ones `repeats` times each, for coverage)."""
    if path is not None:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise click.BadParameter(f"{path} holds no prompts", param_hint="'--prompt-file'")
        return prompts
    if model != "shapes" and not os.path.isdir(model):
        raise click.BadParameter("give --prompt-file for a model outside the shapes world", param_hint="'--prompt-file'")
    from .shapes.render import tuning_prompts

    return tuning_prompts(kind, count, repeats, **kinds)


@main.command(short_help="Serve the real-time demo on Ray Serve: replicas, autoscaling, sessions pinned.")
@model_option
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="A fixed number of replicas (default: autoscaling from --min-replicas).")
@click.option("--min-replicas", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--max-replicas", type=click.IntRange(min=1), default=None, help="Autoscaling's ceiling (default 8).")
@click.option("--target-sessions", type=float, default=None,
              help="Ongoing sessions per replica autoscaling aims at (default: 3/4 of --max-sessions).")
@click.option("--address", default=None, help="A Ray cluster to join ('auto': the local one); default: start Ray here.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--max-sessions", type=click.IntRange(min=1), default=4, show_default=True, help="Sessions per replica.")
@click.option("--cfg", type=click.Choice(CFG_MODES), default="self", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads per replica.")
@device_option
def serve(model, replicas, min_replicas, max_replicas, target_sessions, address, host, port, max_sessions, cfg,
          threads, device):
    """The demo's page and /ws protocol, served by Ray Serve replicas of --model."""
    try:
        from .serve import serve as run
    except ImportError as error:
        raise click.UsageError(str(error)) from error
    from .demo import DemoConfig

    with usage_errors():
        config = DemoConfig(cfg=cfg, max_sessions=max_sessions, threads=threads)
        try:
            url = run(model, config, host=host, port=port, address=address, block=False, replicas=replicas,
                      min_replicas=min_replicas, max_replicas=max_replicas, target_sessions=target_sessions,
                      device=device)
        except ImportError as error:
            raise click.UsageError(str(error)) from error
    click.echo(f"fastdiff serve: open {url}/ (Ray Serve; Ctrl-C stops)", err=True)
    import time as _time

    try:
        while True:
            _time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve as ray_serve

        ray_serve.shutdown()


@main.group()
def tune():
    """Offline searches that write artefacts the runtime loads (timestep schedules, ...)."""


@tune.command(name="steps", short_help="Search the few timesteps that lose least (a schedule file).")
@model_option
@click.option("--steps", "steps", type=click.IntRange(1, 64), required=True, help="Number of denoising steps.")
@click.option("--method", type=click.Choice(["evolution", "dp", "ays", "uniform"]), default="evolution",
              show_default=True, help="evolution (AutoDiffusion), dp (BOSS/GITS), ays (Align Your Steps).")
@click.option("--mode", type=click.Choice(["pipeline", "stream"]), default="pipeline", show_default=True,
              help="pipeline: txt2img from pure noise; stream: the stream's img2img LCM step on a moving-shapes clip.")
@click.option("--budget-minutes", type=float, default=10.0, show_default=True, help="Time budget of the search.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Search prompts, one per line (default: the shapes world's).")
@click.option("--prompts", "count", type=click.IntRange(min=1), default=48, show_default=True,
              help="How many shapes-world search prompts.")
@click.option("--eval-prompts", "eval_count", type=click.IntRange(min=0), default=64, show_default=True,
              help="Held-out shapes-world prompts the result is also measured on (0: none).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Seeds of each shapes-world prompt that leaves attributes unstated: what the coverage "
                   "term of the fitness is measured on (1: no coverage term).")
@click.option("--teacher-steps", type=click.IntRange(min=2), default=50, show_default=True)
@click.option("--cfg", type=click.Choice(CFG_MODES), default=None, help="Guidance mode (default: full; stream: self).")
@click.option("--guidance-scale", type=click.FloatRange(min=0), default=None,
              help="Guidance scale (default: the shapes model's; stream: 1.2).")
@click.option("--guidance-rescale", type=click.FloatRange(0, 1), default=None)
@click.option("--solver", type=click.Choice(SOLVERS), default=None,
              help="The step the schedule is for (default: ddim; stream: lcm; dpmpp2m: DPM-Solver++ 2M, "
                   "with --cfg full or none).")
@click.option("--strength-step", type=click.IntRange(0, 49), default=None,
              help="Stream mode: the first timestep, as an index into the 50-step schedule (img2img's strength; "
                   "default: the first of the model's default stream steps).")
@click.option("--frames", type=click.IntRange(min=1), default=16, show_default=True, help="Stream mode: clip frames.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--resume", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Evolution: a state file, written each generation; a rerun continues from it.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The schedule (.json).")
@device_option
def tune_steps(model, steps, method, mode, budget_minutes, prompt_file, count, eval_count, repeats, teacher_steps, cfg,
               guidance_scale, guidance_rescale, solver, strength_step, frames, seed, resume, out, device):
    """Search STEPS timesteps for --model against a --teacher-steps teacher and write the schedule to
    --out; `fastdiff generate --schedule OUT` and `fastdiff.accelerate(pipe, schedule=OUT)` use it."""
    from .tuning import search_steps, shapes_judge

    if budget_minutes <= 0:
        raise click.BadParameter(f"must be > 0, got {budget_minutes}", param_hint="'--budget-minutes'")
    if not str(out).endswith(".json"):
        raise click.BadParameter(f"the schedule is a .json file, got {out}", param_hint="'--out'")
    prompts = read_prompts(prompt_file, model, count, "search", repeats)
    shapes = prompt_file is None
    eval_prompts = read_prompts(None, model, eval_count, "eval", repeats) if shapes and eval_count else []
    pipe = load_pipeline(model, check_device(device))
    if model == "shapes":
        from .shapes.model import GUIDANCE_RESCALE, GUIDANCE_SCALE

        if mode == "pipeline":
            guidance_scale = GUIDANCE_SCALE if guidance_scale is None else guidance_scale
            guidance_rescale = GUIDANCE_RESCALE if guidance_rescale is None else guidance_rescale
    options = {}
    if mode == "stream":
        from .shapes import moving_shapes_clip
        from .stream.prepare import Prepared

        parts = Prepared(pipe)   # the stream's 50-step schedule at its size (Flux's shifted by it)
        parts.set_own_schedule(50, *parts.size(None, None))
        first = pipe.scheduler.timesteps[stream_steps(model)[0] if strength_step is None else strength_step]
        # the search runs on whole timesteps (a flow model's shifted ones are fractional)
        options = dict(frames=moving_shapes_clip(num_frames=frames, seed=seed),
                       strength_timestep=float(round(float(first))))
        prompts, eval_prompts = prompts[:1], []
    click.echo(f"searching {steps} steps for {model} by {method} ({mode}), {len(prompts)} search prompts, "
               f"{len(eval_prompts)} held-out, teacher {teacher_steps} steps", err=True)

    def progress(entry):
        click.echo(f"  generation {entry['generation']}: best fitness {entry['fitness']:.5f} {entry['best']} "
                   f"({entry['evaluations']} evaluated)", err=True)

    with usage_errors():
        schedule = search_steps(pipe, prompts, steps, method, budget_minutes, mode=mode, cfg=cfg,
                                guidance_scale=guidance_scale, guidance_rescale=guidance_rescale or 0.0, solver=solver,
                                eval_prompts=eval_prompts, teacher_steps=teacher_steps,
                                judge=shapes_judge if shapes and mode == "pipeline" else None, seed=seed,
                                resume=str(resume) if resume else None, progress=progress, **options)
    schedule.save(str(out))
    search = schedule.fitness["search"]["metrics"]
    click.echo(f"timesteps {[int(t) for t in schedule.timesteps]} ({schedule.solver}); search: "
               + ", ".join(f"{k} {v:.4g}" for k, v in search.items() if v is not None))
    if "eval" in schedule.fitness:
        click.echo("held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in schedule.fitness["eval"]["metrics"].items()
                                            if v is not None))
    click.echo(f"written to {out}", err=True)


@tune.command(name="onestep", short_help="Train a one-step LoRA adapter (HiPA-style).")
@model_option
@click.option("--rank", type=click.IntRange(1, 512), default=16, show_default=True)
@click.option("--minutes", type=float, default=30.0, show_default=True, help="Time budget of the training.")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Training steps (default: the budget).")
@click.option("--targets", type=click.Choice(["attention", "attention+conv+ff"]), default="attention+conv+ff",
              show_default=True, help="Which layers get LoRA.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Training prompts, one per line (default: the shapes world's).")
@click.option("--prompts", "count", type=click.IntRange(min=1), default=1024, show_default=True,
              help="How many shapes-world training prompts.")
@click.option("--teachers", type=click.IntRange(min=1), default=8192, show_default=True,
              help="Teacher samples (prompt, noise) computed once and cached.")
@click.option("--teacher-steps", type=click.IntRange(min=2), default=8, show_default=True)
@click.option("--teacher-solver", type=click.Choice(["ddim", "dpmpp2m"]), default="dpmpp2m", show_default=True)
@click.option("--guidance-scale", type=click.FloatRange(min=0), default=None,
              help="The teacher's guidance (default: the shapes model's).")
@click.option("--guidance-rescale", type=click.FloatRange(0, 1), default=None)
@click.option("--hf-weight", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the high-frequency (Laplacian) term; 0 for the ablation.")
@click.option("--loss", type=click.Choice(["l2", "huber"]), default="huber", show_default=True,
              help="The error terms' shape: squared, or pseudo-Huber (toward the median: crisper).")
@click.option("--timestep", type=click.IntRange(min=0), default=None,
              help="The timestep of the one step, taken from pure noise (default: the scheduler's first).")
@click.option("--dmd-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Weight of distribution matching (DMD: a fake score trained on the student's pictures); "
                   "for an adapter already trained (--init).")
@click.option("--init", type=click.Path(exists=True, path_type=Path), default=None,
              help="Start from this adapter of ours (same rank and targets).")
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Teacher cache and checkpoints; a rerun with the same settings resumes.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="The adapter folder.")
@device_option
def tune_onestep(model, rank, minutes, iterations, targets, prompt_file, count, teachers, teacher_steps,
                 teacher_solver, guidance_scale, guidance_rescale, hf_weight, loss, timestep, dmd_weight, init, batch,
                 workdir, seed, out, device):
    """Train a LoRA on --model's frozen denoiser so that one step draws what --teacher-steps draw, and
    write it (diffusers' LoRA format + a manifest) to --out."""
    from .tuning.onestep import train_onestep

    if minutes <= 0:
        raise click.BadParameter(f"must be > 0, got {minutes}", param_hint="'--minutes'")
    prompts = read_prompts(prompt_file, model, count, "search")
    pipe = load_pipeline(model, check_device(device))
    if model == "shapes":
        from .shapes.model import GUIDANCE_RESCALE, GUIDANCE_SCALE

        guidance_scale = GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        guidance_rescale = GUIDANCE_RESCALE if guidance_rescale is None else guidance_rescale
    from tqdm import tqdm

    bar = tqdm(total=iterations, desc="onestep", unit="step")

    def progress(entry):
        if "loss" in entry:
            bar.update(entry["step"] - bar.n)
            bar.set_postfix({key: f"{entry[key]:.4f}" for key in ("loss", "high", "match", "fake") if key in entry})
        else:
            click.echo(f"teacher samples: {entry['count']} in {entry['seconds']} s", err=True)

    with usage_errors():
        trained = train_onestep(pipe, prompts, rank, minutes, iterations=iterations, targets=targets,
                                teachers=teachers, teacher_steps=teacher_steps, teacher_solver=teacher_solver,
                                guidance_scale=guidance_scale or 5.0,
                                guidance_rescale=guidance_rescale or 0.0, batch=batch, hf_weight=hf_weight,
                                loss=loss, timestep=timestep, dmd_weight=dmd_weight,
                                init=str(init) if init else None, seed=seed,
                                workdir=str(workdir) if workdir else None, progress=progress)
    bar.close()
    saved = trained.save(str(out))
    first, last = trained.details["first_loss"], trained.details["final_loss"]
    click.echo(f"{trained.details['iterations']} steps, loss {first['loss']:.4f} -> {last['loss']:.4f}; "
               f"written to {saved.path}")


@tune.command(name="route", short_help="Train a prompt router over pruned sub-networks (APTP).")
@click.option("--model", default="shapes", show_default=True, help="'shapes' (its renderer gives the training pictures).")
@click.option("--codes", type=click.IntRange(min=1), default=4, show_default=True, help="Architecture codes K.")
@click.option("--target", type=float, default=0.6, show_default=True,
              help="Mean share of the full model's MACs to aim at, in (0, 1].")
@click.option("--spread", type=click.FloatRange(0, 1, max_open=True), default=0.15, show_default=True,
              help="Grade the codes' sizes over target × (1 ± spread); 0: one shared target (APTP's).")
@click.option("--plan", type=click.Choice(["need", "scores"]), default="need", show_default=True,
              help="Balance the codes over each prompt's loss in each code (need) or the router's scores (APTP).")
@click.option("--groups", type=click.IntRange(min=1, max=64), default=4, show_default=True,
              help="Width groups per ResNet and feed-forward layer (4: pruned widths stay multiples of 16 "
                   "channels on the shapes model).")
@click.option("--finetune", type=click.Choice(["per-code", "shared"]), default=None,
              help="Each code's sub-network its own adapter, or one adapter on the full network trained "
                   "through every prompt's code.  [default: shared with --nested, else per-code]")
@click.option("--prompt-rows", type=click.IntRange(min=1), default=1, show_default=True,
              help="Rows of each prompt in a routing batch (other noises and timesteps): the plan by need gives "
                   "them one code, by their mean need. Must divide --batch.")
@click.option("--nested", is_flag=True, help="Codes nested in one pruned network: one ranking of the gates, "
                                             "each code a larger share of it.")
@click.option("--minutes", type=float, default=40.0, show_default=True,
              help="Whole budget: routing, then a third of it fine-tuning the sub-networks.")
@click.option("--iterations", type=click.IntRange(min=1), default=None, help="Steps of each phase (default: the budget).")
@click.option("--batch", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--join", default=None, metavar="DIR,DIR,...",
              help="Route over these routers' codes instead (e.g. single pruned models made apart with --codes 1 "
                   "at different --target): only a new router is trained, for --minutes, each code serving an "
                   "equal share of the prompts, or with --target the most even shares of that mean MACs.")
@click.option("--calibrate", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              metavar="DIR", help="No training: shift router DIR's codes so that the prompts it will serve "
                                  "(--prompt-file) cost --target of the full model's MACs on average.")
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="With --calibrate: a sample of the prompts to serve, one per line (default: the shapes "
                   "world's tuning prompts, 256 each of one, two and three objects).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="The router folder.")
@device_option
@click.pass_context
def tune_route(ctx, model, codes, target, spread, plan, groups, finetune, prompt_rows, nested, minutes, iterations,
               batch, seed, join, calibrate, prompt_file, out, device):
    """Train a router that sends each prompt to one of --codes pruned sub-networks of --model, at
    --target of its MACs on average, and write router, codes and sub-networks to --out."""
    from .tuning.routing import calibrate_router, join_routers, train_router

    given = {o for o in ctx.params if ctx.get_parameter_source(o) is not click.core.ParameterSource.DEFAULT}
    if calibrate is not None:
        extra = sorted(given - {"calibrate", "target", "prompt_file", "model", "out", "device"})
        if extra:
            raise click.UsageError(f"--calibrate trains nothing; --{extra[0].replace('_', '-')} doesn't apply")
        if "target" not in given:
            raise click.UsageError("--calibrate needs the --target to calibrate to")
        pipe = load_pipeline(model, check_device(device))
        prompts = read_prompts(prompt_file, model, 768, "search", kinds=("one", "two", "three"))
        with usage_errors(router="--calibrate", prompts="--prompt-file"):
            router = calibrate_router(pipe, str(calibrate), prompts, target)
        router.save(str(out))
        landed = router.details["calibration"]["landed"]
        click.echo(f"{len(prompts)} prompts routed at {100 * landed:.1f}% of the full model's MACs on average "
                   f"(target {100 * target:.1f}%); written to {out}")
        return
    if prompt_file is not None:
        raise click.UsageError("--prompt-file goes with --calibrate: routing trains on the renderer's pictures")
    if join is not None:
        members = [p for p in join.split(",") if p]
        join_target = target if "target" in given else None   # else equal shares of the prompts
        misplaced = sorted(given & {"codes", "spread", "plan", "groups", "finetune", "nested"})
        if misplaced:
            raise click.UsageError(f"--join takes the codes of its routers as they are; --{misplaced[0]} doesn't apply")
        if len(members) < 2 or not all(os.path.isdir(p) for p in members):
            raise click.BadParameter(f"two or more router folders, joined by commas; got {join!r}", param_hint="'--join'")

    if not 0 < target <= 1:
        raise click.BadParameter(f"must be in (0, 1], got {target}", param_hint="'--target'")
    if minutes <= 0:
        raise click.BadParameter(f"must be > 0, got {minutes}", param_hint="'--minutes'")
    if model != "shapes" and not os.path.isdir(model):
        raise click.BadParameter("routing trains on pictures of its prompts: the shapes model (or a shapes-world "
                                 "folder) brings its renderer", param_hint="'--model'")
    pipe = load_pipeline(model, check_device(device))
    from .shapes.render import batch_tensors

    def draw(count, generator):
        seed_now = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return batch_tensors(count, seed_now)

    def progress(entry):
        if entry["stage"] == "route":
            click.echo(f"  route {entry['step']}: loss {entry['loss']:.4f}, distill {entry['distill']:.4f}, "
                       f"MACs {100 * entry['macs_ratio']:.0f}%, codes used {entry['used_codes']}", err=True)
        else:
            click.echo(f"  finetune {entry['step']}: " + ", ".join(f"code {k} {v:.4f}" for k, v in entry["losses"].items()),
                       err=True)

    with usage_errors():
        if join is not None:
            router = join_routers(pipe, members, None, draw, minutes=minutes, target=join_target,
                                  iterations=iterations, batch=batch, prompt_rows=prompt_rows, seed=seed,
                                  progress=progress)
        else:
            router = train_router(pipe, None, draw, codes=codes, target=target, spread=spread, by_need=plan == "need",
                                  groups=groups, finetune=finetune,
                                  nested=nested, prompt_rows=prompt_rows, minutes=minutes, iterations=iterations,
                                  batch=batch, seed=seed, progress=progress)
    router.save(str(out))
    shares = ", ".join(f"{100 * r:.0f}%" for r in router.details["macs_ratio_per_code"])
    click.echo(f"{router.codes} codes at {shares} of the full model's MACs; written to {out}")


@main.group()
def bench():
    """Measure fastdiff configurations."""


@bench.command(short_help="Quality of sampling configurations on the shapes model.")
@click.option("--model", default="shapes", show_default=True,
              help="'shapes' or a local folder of a pipeline trained on the shapes world (64×64 scenes).")
@click.option("--steps", default="50,25,8,4,2,1", show_default=True, callback=parse_steps, metavar="K,K,...",
              help="Numbers of denoising steps, one row each.")
@click.option("--cfg", "cfgs", default="full,self,none", show_default=True, metavar="MODE,...",
              help=f"CFG modes, one row each per step count ({', '.join(CFG_MODES)}).")
@click.option("--solver", type=click.Choice(QUALITY_SOLVERS), default="ddim", show_default=True,
              help="ddim: DDIM's step; lcm: the stream's x0 re-noising step; dpmpp2m: DPM-Solver++ 2M "
                   "(with --cfg full or none).")
@click.option("--guidance-scale", type=click.FloatRange(min=0), default=None,
              help="Guidance scale (default: the shapes model's).")
@click.option("--guidance-rescale", type=click.FloatRange(0, 1), default=None,
              help="guidance_rescale of full CFG (default: the shapes model's).")
@click.option("--count", type=click.IntRange(min=1), default=128, show_default=True,
              help="Held-out prompts per kind (one, two, three objects).")
@click.option("--unstated", type=click.IntRange(min=1), default=32, show_default=True,
              help="Held-out prompts that leave attributes unstated ...")
@click.option("--repeats", type=click.IntRange(min=2), default=8, show_default=True,
              help="... each drawn from this many seeds, for coverage.")
@click.option("--teacher-steps", type=click.IntRange(min=1), default=50, show_default=True,
              help="DDIM steps of the full-CFG teacher the PSNR is measured against.")
@click.option("--schedule", default=None, metavar="PATH", multiple=True,
              help="Searched step schedules (fastdiff tune steps): rows of their step counts run them.")
@click.option("--adapter", default=None, metavar="PATH", help="A LoRA adapter every row but the teacher runs with.")
@click.option("--router", default=None, metavar="shapes|PATH", help="A prompt router every row but the teacher runs with.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--draws", type=click.IntRange(min=1), default=1, show_default=True,
              help="Initial noises each row is the mean over (seeds --seed, --seed + 1, ...); the distance's "
                   "spread over them is shown beside it.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("out/quality.json"),
              show_default=True, help="JSON file the configuration and rows are written to.")
@device_option
def quality(model, steps, cfgs, solver, guidance_scale, guidance_rescale, count, unstated, repeats, teacher_steps,
            schedule, adapter, router, seed, draws, out, device):
    """Prompt accuracy (1, 2, 3 objects; unstated attributes), coverage, PSNR against a many-step
    teacher, Fréchet shape distance and seconds per image for each (steps, CFG mode), printed as a
    Markdown table and written to --out."""
    import json

    from .quality import format_table, quality_table, rows_as_dicts
    from .shapes.model import GUIDANCE_RESCALE, GUIDANCE_SCALE

    modes = [m.strip() for m in cfgs.split(",") if m.strip()]
    unknown = [m for m in modes if m not in CFG_MODES]
    if unknown or not modes:
        raise click.BadParameter(f"expected modes from {', '.join(CFG_MODES)}, got {cfgs!r}", param_hint="'--cfg'")
    if any(k < 1 for k in steps):
        raise click.BadParameter(f"step counts must be ≥ 1, got {steps}", param_hint="'--steps'")
    guidance_scale = GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    guidance_rescale = GUIDANCE_RESCALE if guidance_rescale is None else guidance_rescale
    pipe = load_pipeline(model, check_device(device))
    config = dict(model=model, solver=solver, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
                  count=count, unstated=unstated, repeats=repeats, teacher_steps=teacher_steps, seed=seed,
                  draws=draws, threads=torch.get_num_threads())
    click.echo(f"quality of {model}: {count} prompts each of 1, 2 and 3 objects, {unstated} unstated × {repeats} "
               f"seeds, guidance {guidance_scale} (rescale {guidance_rescale}), teacher {teacher_steps} DDIM steps "
               "with full CFG", err=True)
    options, label = {}, []
    if schedule:
        options["schedule"], label = list(schedule), label + ["searched"]
    if adapter:
        options["adapter"], label = adapter, label + ["adapter"]
    if router:
        options["router"], label = pick_router(router, model), label + ["routed"]
    config.update(schedule=list(schedule) or None, adapter=adapter, router=router)
    try:   # the output and the files asked for are checked before the teacher's pictures are drawn
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise click.BadParameter(f"can't write {out}: {error}", param_hint="'--out'") from None
    if out.is_dir():
        raise click.BadParameter(f"{out} is a folder; give a file", param_hint="'--out'")
    with usage_errors():
        if options:
            from .accelerate import accelerate

            accelerate(pipe, **options).set_adapter(None)
        rows = quality_table(pipe, steps, modes, None if options else solver, guidance_scale, count, teacher_steps,
                             seed, progress=lambda r: click.echo(f"  {r.steps} steps, cfg {r.cfg}: done", err=True),
                             guidance_rescale=guidance_rescale, unstated=unstated, repeats=repeats, options=options,
                             label=" ".join(label), draws=draws)
    click.echo(format_table(rows))
    out.write_text(json.dumps(dict(config=config, rows=rows_as_dicts(rows)), indent=2))
    click.echo(f"written to {out}", err=True)
