"""The TensorRT backend: what needs no TensorRT is tested everywhere (profiles, the refit weight map,
checked by refitting an ONNX file and running it in ONNX Runtime); engine builds, runs and refits are
tested where TensorRT imports and a GPU exists, and skipped elsewhere."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from fastdiff.engines import ShapeProfile, component, engine, stream_profile
from fastdiff.engines.tensorrt import profile_shapes
from fastdiff.architectures import tiny_sd_pipeline

needs_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
    reason="TensorRT engines need the tensorrt package and a CUDA GPU (neither is on the CPU CI machines)")


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline()


def test_optimisation_profile_follows_the_streams_rows_and_resolutions(pipe):
    profile = stream_profile(4, [(64, 64), (128, 96)])
    assert profile == ShapeProfile((1, 4, 4), (64, 64, 128), (64, 64, 96))
    shapes = profile_shapes(component(pipe, "denoiser"), profile)
    assert shapes["sample"] == ((1, 4, 8, 8), (4, 4, 8, 8), (4, 4, 16, 12))
    assert shapes["timestep"] == ((1,), (4,), (4,))
    assert shapes["encoder_hidden_states"] == ((1, 77, 32), (4, 77, 32), (4, 77, 32))
    assert profile_shapes(component(pipe, "vae_encoder"), profile)["images"][2] == (4, 3, 128, 96)


def test_refit_map_rebuilds_every_weight_of_the_onnx_file(pipe, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    from fastdiff.engines.onnx_export import export_onnx
    from fastdiff.engines.refit import apply_to_onnx, weight_map

    part = component(pipe, "text_encoder")   # linear layers: exporters store their weights transposed
    path = str(tmp_path / "model.onnx")
    export_onnx(part, path, ShapeProfile((1, 2, 2), (64, 64, 64), (64, 64, 64)))
    mapping = weight_map(path, part.module, torch.float32)
    assert mapping["unmapped"] == []
    mapped = {entry["param"] for entry in mapping["map"].values()}
    linear_weights = {n for n, m in part.module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {f"{n}.weight" for n in linear_weights} <= mapped

    # "a LoRA fused at another scale": every linear weight moves; the refitted graph must follow
    changed = copy.deepcopy(part.module)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in changed.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(0.05 * torch.randn(module.weight.shape, generator=generator))
    refitted = str(tmp_path / "refitted.onnx")
    apply_to_onnx(path, refitted, changed, mapping, torch.float32)
    ids = part.sample_inputs(2, 64, 64)[0]
    got = ort.InferenceSession(refitted, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        want = changed(ids).last_hidden_state   # after CLIP's final LayerNorm, as the export gives it
        before = part.module(ids).last_hidden_state
    error = (torch.from_numpy(got[0]) - want).abs().max().item()
    assert error <= 1e-4 * max(1.0, want.abs().max().item()), f"refitted ONNX − changed PyTorch = {error:.3g}"
    assert (want - before).abs().max().item() > 1e-2   # the change is visible, so the bound means something


def test_refit_refuses_to_leave_unplaced_weights_stale(pipe, tmp_path):
    """Exported graphs share equal constants, so some parameters have no initializer of their own: a
    refit cannot reach them, and must refuse once one of them changed (everywhere; no TensorRT)."""
    from fastdiff.engines.onnx_export import export_onnx
    from fastdiff.engines.refit import changed_unplaced, weight_map

    part = component(pipe, "denoiser")
    path = str(tmp_path / "unet.onnx")
    export_onnx(part, path, ShapeProfile((1, 2, 2), (64, 64, 64), (64, 64, 64)))
    mapping = weight_map(path, part.module, torch.float32)
    placed = {entry["param"] for entry in mapping["map"].values()}
    assert mapping["unplaced"], "the tiny UNet's export shares constants: some parameters have no place"
    assert set(mapping["unplaced"]) == set(part.module.state_dict()) - placed
    changed = copy.deepcopy(part.module)
    with torch.no_grad():   # what a fused LoRA changes: the placed weights
        for name, p in changed.named_parameters():
            if name in placed:
                p.mul_(1.01)
    assert changed_unplaced(changed, mapping, torch.float32) == []
    name = next(iter(mapping["unplaced"]))
    with torch.no_grad():
        changed.get_parameter(name).add_(0.5)
    assert changed_unplaced(changed, mapping, torch.float32) == [name]


def test_tensorrt_options_are_checked(pipe, tmp_path):
    part = component(pipe, "vae_decoder")
    profile = ShapeProfile((1, 1, 1), (64, 64, 64), (64, 64, 64))
    with pytest.raises(ValueError, match="options are TensorRT's"):
        engine(part, "onnxruntime", profile=profile, options={"refit": True}, cache_dir=str(tmp_path))


def test_controlnet_profiles_follow_each_level_of_the_unet():
    """A ControlNet pipeline's UNet takes each residual at its level's size, its ControlNet the
    control image at the pixels' size: every input's range follows the profile's."""
    from fastdiff.architectures import tiny_controlnet_pipeline
    from fastdiff.controlnet import with_controlnet
    from fastdiff.denoiser import denoiser_for
    from fastdiff.engines.components import denoiser_component, side_component

    pipe = tiny_controlnet_pipeline("sd")
    adapter = with_controlnet(denoiser_for(pipe), pipe)
    profile = stream_profile(2, [(64, 64), (128, 192)])
    unet = profile_shapes(denoiser_component(adapter), profile)
    assert unet["down_residual_0"] == ((1, 32, 8, 8), (2, 32, 8, 8), (2, 32, 16, 24))
    assert unet["down_residual_3"] == ((1, 64, 4, 4), (2, 64, 4, 4), (2, 64, 8, 12))   # after the downsampler
    assert unet["mid_residual"] == ((1, 64, 4, 4), (2, 64, 4, 4), (2, 64, 8, 12))
    net = side_component(adapter, "controlnet/0")
    assert profile_shapes(net, profile)["controlnet_cond"] == ((1, 3, 64, 64), (2, 3, 64, 64), (2, 3, 128, 192))
    assert net.outputs == ["down_residual_0", "down_residual_1", "down_residual_2", "down_residual_3", "mid_residual"]


def test_dit_controlnet_profiles_follow_the_grid_of_tokens():
    """FLUX.1's and SD3's transformers take their nets' block samples as grids of tokens, the nets
    the latents (Flux's as 2×2 patches) and the control picture: every input's range follows the
    profile's, so one TensorRT engine takes every size it was built for."""
    from fastdiff.architectures import tiny_controlnet_pipeline
    from fastdiff.controlnet import with_controlnet
    from fastdiff.denoiser import denoiser_for
    from fastdiff.engines.components import denoiser_component, side_component

    profile = stream_profile(2, [(64, 64), (128, 192)])
    for pipe, width in ((tiny_controlnet_pipeline("flux"), 32), (tiny_controlnet_pipeline("sd3"), 32)):
        adapter = with_controlnet(denoiser_for(pipe), pipe)
        shapes = profile_shapes(denoiser_component(adapter), profile)
        assert shapes["controlnet_block_0"] == ((1, 4, 4, width), (2, 4, 4, width), (2, 8, 12, width))
        net = profile_shapes(side_component(adapter, "controlnet/0"), profile)
        condition = (16, 4, 2, 4, 2) if adapter.family == "flux" else (16, 8, 8)
        assert net["condition"][0] == (1, *condition)
    pipe = tiny_controlnet_pipeline("flux", reads="pixels")   # XLabs' nets read the picture's pixels
    net = profile_shapes(side_component(with_controlnet(denoiser_for(pipe), pipe), "controlnet/0"), profile)
    assert net["condition"] == ((1, 3, 64, 64), (2, 3, 64, 64), (2, 3, 128, 192))


@needs_tensorrt
@pytest.mark.gpu
def test_controlnet_stream_on_tensorrt_matches_pytorch(tmp_path):
    from fastdiff.architectures import tiny_controlnet_pipeline
    import fastdiff

    pipe = tiny_controlnet_pipeline("sd", img2img=True, scheduler="lcm").to("cuda")
    frames = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)).cuda() for i in range(3)]
    controls = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(9 + i)).cuda() for i in range(3)]
    outs = []
    for backend in (None, "tensorrt"):
        stream = fastdiff.Stream(pipe, steps=[20, 40], cfg="self", guidance_scale=1.5, backend=backend,
                                 engine_options={"cache_dir": str(tmp_path)} if backend else None)
        stream.prepare("a red circle")
        got = [stream(f, control_image=c) for f, c in zip(frames, controls)]
        outs.append([o for o in got if o is not None] + stream.flush())
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=0)


@needs_tensorrt
@pytest.mark.gpu
def test_tensorrt_engine_matches_pytorch_and_refits(tmp_path):
    pipe = tiny_sd_pipeline().to("cuda")
    part = component(pipe, "denoiser")
    profile = stream_profile(2, [(64, 64)])
    runner = engine(part, "tensorrt", profile=profile, cache_dir=str(tmp_path), options={"refit": True, "cuda_graph": True})
    inputs = part.sample_inputs(2, 64, 64, device="cuda")
    feeds = dict(zip([spec.name for spec in part.inputs], inputs))
    with torch.no_grad():
        want = part.graph(*inputs)
    for _ in range(2):   # the second call replays the captured CUDA graph
        got = runner(feeds)[0]
        assert (got - want).abs().max().item() <= 1e-2 * max(1.0, want.abs().max().item())
    import json
    import os

    mapping = json.load(open(os.path.join(runner.folder, "refit_map.json")))
    placed = {entry["param"] for entry in mapping["map"].values()}
    with torch.no_grad():   # the weights a refit can reach (what a fused LoRA changes)
        for name, p in pipe.unet.named_parameters():
            if name in placed:
                p.mul_(1.01)
        want = part.graph(*inputs)
    runner.refit(pipe.unet)
    got = runner(feeds)[0]
    assert (got - want).abs().max().item() <= 1e-2 * max(1.0, want.abs().max().item())
    unplaced = next(iter(mapping["unplaced"]), None)
    if unplaced is not None:   # one it cannot: refused, not left stale
        with torch.no_grad():
            pipe.unet.get_parameter(unplaced).add_(0.5)
        with pytest.raises(RuntimeError, match="no place"):
            runner.refit(pipe.unet)
