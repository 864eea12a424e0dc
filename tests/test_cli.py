import functools
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import fastdiff.architectures
from fastdiff.cli import main
from fastdiff.shapes import artefact_path

SHIPPED_ROUTER = artefact_path("router")


@pytest.fixture(autouse=True)
def cached_tiny_pipeline(monkeypatch):
    # Building the tiny pipeline costs about a second; every command here can share one per kind.
    monkeypatch.setattr(fastdiff.architectures, "tiny_sd_pipeline", _cached_tiny)


@functools.cache
def _cached_tiny(**kwargs):
    return _build_tiny(**kwargs)


_build_tiny = fastdiff.architectures.tiny_sd_pipeline


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def pngs(folder):
    return sorted(folder.glob("*.png"))


def test_python_dash_m_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "fastdiff", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "Usage: fastdiff" in result.stdout and "stream" in result.stdout


def test_generate_writes_images_and_a_summary(tmp_path):
    result = run("generate", "a red circle", "a blue square", "--num-images", 2, "--steps", 2, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    files = pngs(tmp_path)
    assert len(files) == 4
    assert all(Image.open(f).size == (64, 64) for f in files)
    assert "wrote 4 images" in result.output
    assert re.search(r"s/image, [\d.]+ images/s", result.output)


def test_generate_draws_with_a_flux_pipeline(tmp_path):
    result = run("generate", "a red circle", "--model", "tiny-flux", "--steps", 2, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert [Image.open(f).size for f in pngs(tmp_path)] == [(64, 64)]
    assert "random weights" in result.output


def test_stream_runs_a_flux_pipeline_with_its_own_guidance(tmp_path):
    """FLUX.1-dev's stream draws without guidance rows, the guidance scale its model's input."""
    result = run("stream", "--clip", "moving-shapes", "--frames", 3, "--model", "tiny-flux", "--steps", "40,45",
                 "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert len(pngs(tmp_path)) == 3
    refused = run("stream", "--clip", "moving-shapes", "--frames", 3, "--model", "tiny-flux", "--cfg", "self",
                  "--out", tmp_path / "refused")
    assert refused.exit_code == 2 and "guidance-distilled" in refused.output, refused.output
    # its stream's steps searched: the shifted schedule's first timestep, rounded to the search's whole ones
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    searched = run("tune", "steps", "--model", "tiny-flux", "--mode", "stream", "--solver", "ddim", "--cfg", "none",
                   "--steps", 2, "--method", "dp", "--teacher-steps", 6, "--frames", 2, "--prompt-file", prompts,
                   "--out", tmp_path / "flux-stream-2.json")
    assert searched.exit_code == 0, searched.output
    assert re.search(r"timesteps \[471, \d+\]", searched.output), searched.output


def test_generate_from_a_picture_and_a_mask(tmp_path):
    """--image runs the model's img2img pipeline, --mask its inpainting one: the kept region of the
    picture stays (what the mask leaves black), the rest is drawn anew."""
    scene = np.zeros((64, 64, 3), dtype=np.uint8)
    scene[:, :32] = (200, 30, 30)
    Image.fromarray(scene).save(tmp_path / "scene.png")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    moved = run("generate", "a blue square", "--steps", 4, "--image", tmp_path / "scene.png", "--strength", 0.5,
                "--out", tmp_path / "img2img")
    assert moved.exit_code == 0, moved.output
    assert len(pngs(tmp_path / "img2img")) == 1
    inpainted = run("generate", "a blue square", "--steps", 4, "--image", tmp_path / "scene.png", "--mask",
                    tmp_path / "mask.png", "--out", tmp_path / "inpaint")
    assert inpainted.exit_code == 0, inpainted.output
    picture = np.asarray(Image.open(pngs(tmp_path / "inpaint")[0]), dtype=float)
    kept, made = picture[8:56, 4:24], picture[8:56, 40:60]   # away from the mask's edge
    assert np.abs(kept - scene[8:56, 4:24]).mean() < 40 and np.abs(made - scene[8:56, 40:60]).mean() > 40
    for args, hint in ((("--mask", tmp_path / "mask.png"), "give --image too"),
                       (("--strength", 0.5), "give --image too"),
                       (("--image", tmp_path / "mask.png", "--strength", 0), "--strength"),
                       (("--image", tmp_path / "nothing.png"), "--image")):
        refused = run("generate", "a blue square", *args, "--out", tmp_path)
        assert refused.exit_code != 0 and hint in refused.output, refused.output
    (tmp_path / "text.png").write_text("not a picture")
    refused = run("generate", "a blue square", "--image", tmp_path / "text.png", "--out", tmp_path)
    assert refused.exit_code != 0 and "is not a picture" in refused.output


def test_generate_uses_the_shapes_models_guidance_unless_told(tmp_path, monkeypatch):
    from fastdiff.accelerate import AcceleratedPipeline
    from fastdiff.shapes.model import GUIDANCE_SCALE

    seen = []
    original = AcceleratedPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["guidance_scale"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AcceleratedPipeline, "__call__", spy)
    # (at 2 steps: at 1 the shipped one-step adapter runs with its own sampling, no guidance)
    assert run("generate", "a red circle", "--steps", 2, "--out", tmp_path).exit_code == 0
    assert run("generate", "a red circle", "--steps", 2, "--guidance-scale", 2, "--out", tmp_path).exit_code == 0
    assert run("generate", "a red circle", "--steps", 1, "--out", tmp_path).exit_code == 0
    assert seen == [GUIDANCE_SCALE, 2.0, None]
    spied = []
    monkeypatch.setattr(AcceleratedPipeline, "__call__", lambda self, *a, **kw: spied.append(kw) or original(self, *a, **kw))
    assert run("generate", "a red circle", "--steps", 2, "--negative-prompt", "a blue square", "--out",
               tmp_path).exit_code == 0
    assert spied[0]["negative_prompt"] == "a blue square"
    refused = run("generate", "a red circle", "--steps", 2, "--negative-prompt", "\ud800", "--out", tmp_path)
    assert refused.exit_code != 0 and "'--negative-prompt'" in refused.output


@pytest.mark.parametrize("frame_buffer", [1, 4])  # 6 frames in groups of 4: the last group is padded
def test_stream_clip_writes_one_output_per_input(tmp_path, frame_buffer):
    result = run("stream", "--clip", "moving-shapes", "--frames", 6, "--frame-buffer", frame_buffer, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert [f.name for f in pngs(tmp_path)] == [f"frame_{i:05d}.png" for i in range(6)]
    assert "frames in: 6, frames out: 6" in result.output
    assert re.search(r"[\d.]+ frames/s; latency per frame p50 [\d.]+ ms, p95 [\d.]+ ms", result.output)
    assert ("padding: 2 repeated" in result.output) == (frame_buffer == 4)


def test_stream_can_run_its_steady_step_as_one_onnxruntime_graph(tmp_path):
    outputs = {}
    for compile in ("none", "onnxruntime"):
        result = run("stream", "--clip", "moving-shapes", "--frames", 5, "--compile", compile, "--out", tmp_path / compile)
        assert result.exit_code == 0, result.output
        assert "frames in: 5, frames out: 5" in result.output
        outputs[compile] = [np.asarray(Image.open(f), dtype=np.int16) for f in pngs(tmp_path / compile)]
    for eager, whole in zip(outputs["none"], outputs["onnxruntime"]):
        assert np.abs(eager - whole).max() <= 1   # the same frames, up to 8-bit rounding


def test_stream_reads_a_folder_and_resizes(tmp_path):
    frames = tmp_path / "in"
    frames.mkdir()
    for i in range(3):
        Image.new("RGB", (96, 48), (80 * i, 40, 200)).save(frames / f"{i}.png")
    (frames / "notes.txt").write_text("not a frame")
    out = tmp_path / "out"
    result = run("stream", "--input", frames, "--out", out, "--similarity-filter", 0.98)
    assert result.exit_code == 0, result.output
    assert len(pngs(out)) == 3 and Image.open(pngs(out)[0]).size == (64, 64)
    assert "frames in: 3, frames out: 3" in result.output
    (frames / "3.png").write_bytes((frames / "0.png").read_bytes()[:40])   # a damaged frame after three good ones
    (frames / "4.png").write_bytes((frames / "0.png").read_bytes())
    damaged = tmp_path / "damaged"
    result = run("stream", "--input", frames, "--out", damaged)
    assert result.exit_code == 2 and "3.png is not a readable image" in result.output, result.output
    assert "the 3 frame(s) before it are in" in result.output and "Traceback" not in result.output
    assert [p.name for p in pngs(damaged)] == [f"frame_{i:05d}.png" for i in range(3)]   # none before it lost


@pytest.mark.parametrize("args,option", [
    (["stream", "--clip", "moving-shapes", "--steps", "45,32"], "--steps"),
    (["stream", "--clip", "moving-shapes", "--steps", "a,b"], "--steps"),
    (["stream", "--clip", "moving-shapes", "--frame-buffer", "0"], "--frame-buffer"),
    (["stream", "--clip", "moving-shapes", "--cfg", "bogus"], "--cfg"),
    (["stream", "--input", "/no/such/folder"], "--input"),
    (["stream", "--clip", "moving-shapes", "--similarity-filter", "1.5"], "--similarity-filter"),
    (["stream", "--clip", "moving-shapes", "--model", "/no/such/model"], "--model"),
    (["stream"], "--input"),
    (["stream", "--clip", "moving-shapes", "--compile", "onnxruntime", "--backend", "onnxruntime"], "--compile"),
    (["generate", "x", "--cfg", "bogus"], "--cfg"),
    (["generate", "x", "--height", "60"], "--height"),
    (["generate", "x", "--height", "0"], "--height"),
    (["generate", "x", "--seed", str(2**64)], "--seed"),
    (["generate", "x", "--cfg", "self", "--guidance-rescale", "0.5"], "--guidance-rescale"),
])
def test_bad_options_are_usage_errors_naming_the_option(args, option, tmp_path):
    result = run(*args, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert option in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, ValueError)


@pytest.mark.parametrize("args, named", [(["--spread", "1"], "--spread"), (["--plan", "random"], "--plan"),
                                         (["--target", "0"], "--target"), (["--codes", "0"], "--codes"),
                                         (["--prompt-rows", "5"], "--prompt-rows"),
                                         (["--nested", "--finetune", "per-code"], "--finetune"),
                                         (["--join", "/no/such,/nor/this"], "--join"),
                                         (["--join", f"{SHIPPED_ROUTER},{SHIPPED_ROUTER}", "--codes", "2"], "--codes"),
                                         (["--join", f"{SHIPPED_ROUTER},{SHIPPED_ROUTER}", "--target", "2"], "--target"),
                                         (["--join", f"{SHIPPED_ROUTER},{SHIPPED_ROUTER}"], "--join")])
def test_tune_route_names_its_bad_options(tmp_path, args, named):
    result = run("tune", "route", *args, "--minutes", 1, "--out", tmp_path / "router")
    assert result.exit_code == 2 and named in result.output, result.output
    assert not (tmp_path / "router").exists()


def test_tune_route_calibrates_a_router_to_the_prompts_it_will_serve(tmp_path):
    from fastdiff.shapes.model import load_pipeline
    from fastdiff.tuning import load_router

    result = run("tune", "route", "--calibrate", SHIPPED_ROUTER, "--target", 0.5, "--out", tmp_path / "calibrated")
    assert result.exit_code == 0, result.output
    assert re.search(r"768 prompts routed at 50\.\d% of the full model's MACs", result.output)
    calibrated = load_router(str(tmp_path / "calibrated"), load_pipeline())
    assert calibrated.fields["target"] == 0.5 and abs(calibrated.details["calibration"]["landed"] - 0.5) < 0.01
    served = tmp_path / "served.txt"
    served.write_text("a small red circle at the top, blue background\n\n"
                      "a large gray square in the center and a small pink triangle at the top left, white background\n")
    bad = [(["--calibrate", SHIPPED_ROUTER, "--target", 0.5, "--minutes", 1], "--minutes"),
           (["--calibrate", SHIPPED_ROUTER], "--target"),
           (["--calibrate", SHIPPED_ROUTER, "--target", 0.9, "--prompt-file", served], "--target"),
           (["--calibrate", tmp_path, "--target", 0.5], "--calibrate"),
           (["--prompt-file", served, "--minutes", 1], "--prompt-file")]
    for args, named in bad:
        refused = run("tune", "route", *args, "--out", tmp_path / "refused")
        assert refused.exit_code == 2 and named in refused.output, (args, refused.output)
    assert not (tmp_path / "refused").exists()
    result = run("tune", "route", "--calibrate", SHIPPED_ROUTER, "--target", 0.6, "--prompt-file", served,
                 "--out", tmp_path / "two")
    assert result.exit_code == 0 and "2 prompts routed at" in result.output, result.output


@pytest.mark.parametrize("option, path", [("--schedule", artefact_path("schedule") + "/shapes-4.json"),
                                          ("--adapter", artefact_path("onestep"))])
def test_a_file_made_for_another_model_is_refused_with_its_reason_not_a_traceback(tmp_path, option, path):
    result = run("generate", "a red circle", "--model", "tiny", option, path, "--out", tmp_path)
    assert result.exit_code == 1 and "was made for something else (" in result.output, result.output
    assert "Traceback" not in result.output and not pngs(tmp_path)


def test_generate_runs_on_the_shipped_router(tmp_path):
    result = run("generate", "a red circle", "a green square and a blue circle", "--router", "shapes", "--steps", 2,
                 "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert len(pngs(tmp_path)) == 2
    assert re.search(r"routed: [\d.]+ M MACs in the last denoiser call", result.output)
    refused = run("generate", "a red circle", "--model", "tiny", "--router", "shapes", "--out", tmp_path)
    assert refused.exit_code != 0 and "--router" in refused.output
