"""ONNX export + ONNX Runtime parity with PyTorch, for every exportable component of the tiny pipelines.

Tolerance (float32, CPU): the largest absolute difference from PyTorch is at most 1e-4 times the
output's largest magnitude (at least 1); ONNX Runtime's fused kernels differ from PyTorch's by
~1e-6 here, a wrong graph by O(1).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime (pip install fastdiff[onnx])")
pytest.importorskip("onnxscript", reason="the ONNX tests need onnxscript (pip install fastdiff[onnx])")

from fastdiff.engines import ShapeProfile, component, engine  # noqa: E402
from fastdiff.engines.modules import EngineModule  # noqa: E402
from fastdiff.architectures import tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline  # noqa: E402

RELATIVE_TOLERANCE = 1e-4
PROFILE = ShapeProfile(batch=(1, 2, 4), height=(64, 64, 64), width=(64, 64, 64))

PIPELINES = {
    "sd": lambda: tiny_sd_pipeline(),
    "sd-taesd": lambda: tiny_sd_pipeline(vae="tiny"),
    "sdxl": lambda: tiny_sdxl_pipeline(),
    "sd3": lambda: tiny_sd3_pipeline(),
}
CASES = [
    ("sd", "denoiser"), ("sd", "vae_encoder"), ("sd", "vae_decoder"), ("sd", "text_encoder"),
    ("sd-taesd", "vae_encoder"), ("sd-taesd", "vae_decoder"),
    ("sdxl", "denoiser"), ("sdxl", "text_encoder_2"),
    ("sd3", "denoiser"),
]


@pytest.fixture(scope="module")
def pipes():
    return {}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One engine cache for the test session's engine tests: later tests load (or find covering
    profiles in) what earlier ones built, as users' streams do."""
    return str(tmp_path_factory.getbasetemp() / "engine-cache")


def pipeline(pipes, name):
    if name not in pipes:
        pipes[name] = PIPELINES[name]()
    return pipes[name]


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = (got.float() - want.float()).abs().max().item()
    bound = RELATIVE_TOLERANCE * max(1.0, want.abs().max().item())
    assert error <= bound, f"{what}: max |ONNX Runtime − PyTorch| = {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("pipe_name,name", CASES, ids=[f"{p}-{c}" for p, c in CASES])
def test_onnxruntime_matches_pytorch(pipes, cache_dir, pipe_name, name):
    part = component(pipeline(pipes, pipe_name), name)
    runner = engine(part, "onnxruntime", profile=PROFILE, cache_dir=cache_dir, threads=1)
    manifest = json.load(open(os.path.join(runner.folder, "manifest.json")))
    assert manifest["details"]["exporter"] in ("dynamo", "torchscript")
    if name == "denoiser":   # the dynamo exporter handles every denoiser: no fallback
        assert manifest["details"]["exporter"] == "dynamo", manifest["details"]["fallback_reason"]
    assert manifest["fields"]["opset"] >= 18
    # batch 3: neither the traced batch (2) nor a profile bound, so the batch axis must be dynamic
    inputs = part.sample_inputs(3, 64, 64)
    with torch.no_grad():
        want = part.graph(*inputs)
    want = list(want) if isinstance(want, tuple) else [want]
    got = runner(dict(zip([spec.name for spec in part.inputs], inputs)))
    assert len(got) == len(part.outputs)
    for g, w, out_name in zip(got, want, part.outputs):
        assert_close(g, w, f"{pipe_name} {name} {out_name}")


def test_torchscript_exporter_as_the_fallback(pipes, tmp_path):
    import onnxruntime as ort

    from fastdiff.engines.onnx_export import export_onnx

    part = component(pipeline(pipes, "sd-taesd"), "vae_decoder")
    inputs = part.sample_inputs(2, 64, 64)
    with torch.no_grad():
        want = part.graph(*inputs)
    path = str(tmp_path / "decoder.onnx")
    info = export_onnx(part, path, PROFILE, exporter="torchscript")
    assert info["exporter"] == "torchscript" and info["fallback_reason"] is None
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"latents": inputs[0].numpy()})[0]
    assert_close(torch.from_numpy(got), want, "torchscript-exported decoder")


def test_dynamic_height_and_width(pipes, tmp_path):
    part = component(pipeline(pipes, "sd-taesd"), "vae_decoder")
    profile = ShapeProfile(batch=(1, 1, 2), height=(64, 64, 128), width=(64, 128, 128))
    runner = engine(part, "onnxruntime", profile=profile, cache_dir=str(tmp_path), threads=1)
    # torch.export cannot yet prove the decoder's size guards, so this one falls back, and says so
    assert runner.manifest["details"]["exporter"] in ("dynamo", "torchscript")
    for height, width in ((64, 128), (128, 64)):
        inputs = part.sample_inputs(1, height, width)
        with torch.no_grad():
            want = part.graph(*inputs)
        assert_close(runner({"latents": inputs[0]})[0], want, f"decoder at {height}×{width}")


def test_engine_module_takes_the_unets_own_call(pipes, cache_dir):
    pipe = pipeline(pipes, "sdxl")
    part = component(pipe, "denoiser")
    runner = engine(part, "onnxruntime", profile=PROFILE, cache_dir=cache_dir, threads=1)
    module = EngineModule(part, runner, torch.float32, PROFILE)
    x, t, embeds, pooled, ids = part.sample_inputs(2, 64, 64)
    added = {"text_embeds": pooled, "time_ids": ids}
    with torch.no_grad():
        want = pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
    got = module(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]
    assert_close(got, want, "sdxl unet through EngineModule")
    assert module.config is pipe.unet.config
    with pytest.raises(ValueError, match="return_dict"):
        module(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added)
    x, t, embeds, pooled, ids = part.sample_inputs(5, 64, 64)   # beyond the profile's 4 rows
    with pytest.raises(ValueError, match="batch: 5 rows"):
        module(x, t, encoder_hidden_states=embeds, return_dict=False,
               added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})


def test_weights_beyond_protobufs_limit_go_to_external_data(pipes, tmp_path, monkeypatch):
    import onnxruntime as ort

    from fastdiff.engines import onnx_export

    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 1000)   # as if the decoder were over 2 GB
    part = component(pipeline(pipes, "sd-taesd"), "vae_decoder")
    path = str(tmp_path / "model.onnx")
    info = onnx_export.export_onnx(part, path, PROFILE, exporter="torchscript")
    assert info["external_data"] and os.path.isfile(path + ".data")
    assert os.path.getsize(path) < 100_000 < os.path.getsize(path + ".data")
    latents = part.sample_inputs(1, 64, 64)[0]
    got = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"latents": latents.numpy()})[0]
    with torch.no_grad():
        assert_close(torch.from_numpy(got), part.graph(latents), "decoder with external data")


def test_bad_arguments_are_named(pipes, tmp_path):
    pipe = pipeline(pipes, "sd")
    with pytest.raises(ValueError, match="component must be one of"):
        component(pipe, "unet")
    with pytest.raises(ValueError, match="text_encoder_2"):
        component(pipe, "text_encoder_2")
    part = component(pipe, "vae_decoder")
    with pytest.raises(ValueError, match="backend must be"):
        engine(part, "onnx", profile=PROFILE, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="precision must be"):
        engine(part, "onnxruntime", profile=PROFILE, precision="int8", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="threads must be"):
        engine(part, "onnxruntime", profile=PROFILE, threads=0, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="profile must be a ShapeProfile"):
        engine(part, "onnxruntime", profile={"batch": [1, 1, 1]}, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="batch must be"):
        ShapeProfile(batch=(2, 1, 4), height=(64, 64, 64), width=(64, 64, 64))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        engine(part, "onnxruntime", profile=ShapeProfile((1, 1, 1), (60, 60, 60), (64, 64, 64)),
               cache_dir=str(tmp_path))
    for bad, named in [({"opset": 10**6}, "opset"), ({"rebuild": "no"}, "rebuild"), ({"options": "x"}, "options")]:
        with pytest.raises(ValueError, match=named):   # before anything is exported or cached
            engine(part, "onnxruntime", profile=PROFILE, cache_dir=str(tmp_path / "refused"), **bad)
    assert not (tmp_path / "refused").exists() or not any(
        f.endswith(".onnx") for _, _, files in os.walk(tmp_path / "refused") for f in files)
