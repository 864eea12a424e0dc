"""fastdiff.Stream and fastdiff.accelerate with engines give PyTorch's frames.

Tolerance: frames are [0, 1] tensors; the largest absolute difference from the PyTorch run of the
same stream is at most 1e-3 (the engines differ from PyTorch by ~1e-6 per call; a wrong input
order or a missing conditioning changes frames by O(0.1)).
"""

from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.engines.attach import refit_engines
from fastdiff.engines.modules import EngineModule, EngineVAE
from fastdiff.architectures import tiny_sd3_pipeline, tiny_sd_pipeline

FRAME_TOLERANCE = 1e-3
PROMPT = "a red circle on the left"


def frames(n=4, size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, size, size, generator=generator) for _ in range(n)]


def run_stream(pipe, backend, **kwargs):
    stream = fastdiff.Stream(pipe, [32, 45], cfg="self", guidance_scale=1.2, seed=3, backend=backend, **kwargs)
    stream.prepare(PROMPT)
    outputs = [stream(frame) for frame in frames()]
    outputs = [o for o in outputs if o is not None] + stream.flush()
    return stream, torch.stack(outputs)


def small_unet_pipeline():
    """The tiny SD pipeline with a one-level UNet and AutoencoderTiny: quick for Inductor to compile."""
    return tiny_sd_pipeline(scheduler="lcm", vae="tiny", levels=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One engine cache for the test session's engine tests: later tests load (or find covering
    profiles in) what earlier ones built, as users' streams do."""
    return str(tmp_path_factory.getbasetemp() / "engine-cache")


def test_stream_with_onnxruntime_gives_pytorchs_frames(cache_dir):
    pytest.importorskip("onnxruntime")
    pipe = tiny_sd_pipeline(scheduler="lcm")
    _, want = run_stream(pipe, None)
    stream, got = run_stream(pipe, "onnxruntime", engine_options={"cache_dir": cache_dir, "threads": 1})
    assert isinstance(stream.denoiser.module, EngineModule) and isinstance(stream.codec.vae, EngineVAE)
    assert stream.engines.backend == "onnxruntime"
    assert stream.engines.profiles["denoiser"].batch == (1, 2, 2)   # n = 2 rows once full
    assert pipe.unet is stream.denoiser.original                      # the user's pipeline is untouched
    with pytest.raises(ValueError, match="only TensorRT engines refit"):
        refit_engines(stream.denoiser)
    error = (got - want).abs().max().item()
    assert error <= FRAME_TOLERANCE, f"max |onnxruntime − PyTorch| over frames = {error:.3g}"
    assert (want[1:] - want[:-1]).abs().max() > 10 * FRAME_TOLERANCE   # frames differ: the bound means something


def test_stream_with_a_float16_engine_for_a_float32_pipeline(cache_dir):
    """precision="fp16": the engine runs a float16 copy of the graph; the pipeline stays float32.
    Tolerance 1e-2 on [0, 1] frames (float16 rounding through two steps and the decoder)."""
    pytest.importorskip("onnxruntime")
    pipe = tiny_sd_pipeline(scheduler="lcm")
    _, want = run_stream(pipe, None)
    options = {"cache_dir": cache_dir, "threads": 1, "precision": "fp16", "components": ["denoiser"]}
    stream, got = run_stream(pipe, "onnxruntime", engine_options=options)
    runner = stream.denoiser.module.runner
    assert runner.manifest["fields"]["precision"] == "fp16"
    assert runner.session.get_inputs()[0].type == "tensor(float16)"
    assert next(pipe.unet.parameters()).dtype == torch.float32 and got.dtype == torch.float32
    error = (got - want).abs().max().item()
    assert 0 < error <= 1e-2, f"max |float16 engine − float32 PyTorch| = {error:.3g}"


def test_stream_with_inductor_gives_pytorchs_frames():
    pipe = small_unet_pipeline()
    _, want = run_stream(pipe, None)
    options = {"components": ["denoiser", "vae_decoder"]}
    stream, got = run_stream(pipe, "inductor", engine_options=options)
    assert stream.engines.backend == "inductor"
    assert stream.codec.vae.encoder is None and stream.codec.vae.decoder is not None
    error = (got - want).abs().max().item()
    assert error <= FRAME_TOLERANCE, f"max |inductor − PyTorch| over frames = {error:.3g}"
    # the stream's shapes are fixed: more frames compile nothing new
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    for frame in frames(6, seed=1):
        stream(frame)
    assert counters["stats"]["unique_graphs"] == graphs


def test_accelerate_with_onnxruntime_gives_pytorchs_images(cache_dir):
    pytest.importorskip("onnxruntime")
    pipe = tiny_sd3_pipeline()   # the DiT, flow matching
    kwargs = dict(num_inference_steps=2, guidance_scale=2.0, output_type="pt")
    want = fastdiff.accelerate(pipe)(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    fast = fastdiff.accelerate(pipe, backend="onnxruntime",
                               engine_options={"cache_dir": cache_dir, "threads": 1, "max_batch": 2})
    got = fast(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert fast.engines.profiles["denoiser"].batch == (1, 2, 4)
    error = (got - want).abs().max().item()
    assert error <= FRAME_TOLERANCE, f"max |onnxruntime − PyTorch| = {error:.3g}"
    with pytest.raises(ValueError, match="height/width 128×128 is outside"):
        fast(PROMPT, height=128, width=128, **kwargs)
    with pytest.raises(ValueError, match="6 rows reach the denoiser engine.*a larger max_batch"):
        fast([PROMPT] * 3, **kwargs)
    # embeddings given instead of the prompt: the engine's images; of another text length, refused
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(PROMPT, None, None)
    embeds = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=uncond_pooled)
    torch.testing.assert_close(fast(generator=torch.Generator().manual_seed(0), **embeds, **kwargs).images, got)
    short = {**embeds, "prompt_embeds": cond[:, :40], "negative_prompt_embeds": uncond[:, :40]}
    with pytest.raises(ValueError, match="prompt_embeds has 40 tokens; the onnxruntime engines take 333"):
        fast(**short, **kwargs)
    with pytest.raises(ValueError, match="joint_attention_kwargs: the LoRA scale of a call needs the PyTorch modules"):
        fast(PROMPT, joint_attention_kwargs={"scale": 0.5}, **kwargs)   # SD3 names it so


def test_accelerate_with_inductor_gives_pytorchs_images():
    pipe = small_unet_pipeline()
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, output_type="pt")
    want = fastdiff.accelerate(pipe)(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    fast = fastdiff.accelerate(pipe, backend="inductor", engine_options={"components": ["denoiser", "vae_decoder"]})
    got = fast(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    error = (got - want).abs().max().item()
    assert error <= FRAME_TOLERANCE, f"max |inductor − PyTorch| = {error:.3g}"


def test_backend_errors_are_clear():
    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="backend must be"):
        fastdiff.Stream(pipe, backend="onnx")
    with pytest.raises(ValueError, match="engine_options needs a backend"):
        fastdiff.Stream(pipe, engine_options={"precision": "fp16"})
    with pytest.raises(ValueError, match="unknown keys"):
        fastdiff.Stream(pipe, backend="onnxruntime", engine_options={"opset": 17})
    with pytest.raises(ValueError, match="components"):
        fastdiff.accelerate(pipe, backend="onnxruntime", engine_options={"components": ["text_encoder"]})
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"engine_options\['max_batch'\] must be an integer"):
            fastdiff.accelerate(pipe, backend="onnxruntime", engine_options={"max_batch": bad})
    with pytest.raises(ValueError, match="runs on CUDA devices only"):
        from fastdiff.engines.backends import check_backend
        from unittest import mock
        with mock.patch("fastdiff.engines.backends.missing_requirements", return_value=[]):
            check_backend("tensorrt", torch.device("cpu"))


def test_a_missing_backend_names_the_package(monkeypatch):
    import importlib.util

    from fastdiff.engines.backends import check_backend

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    with pytest.raises(ImportError, match="needs tensorrt"):
        check_backend("tensorrt", torch.device("cpu"))


def test_auto_says_which_backend_it_picked(caplog):
    pytest.importorskip("onnxruntime")
    from fastdiff.engines import resolve_backend

    with caplog.at_level("WARNING", logger="fastdiff.engines"):
        assert resolve_backend("auto", torch.device("cpu")) == "onnxruntime"
    assert "picked 'onnxruntime'" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stream_with_inductor_cuda_graphs_on_cuda():
    """torch.compile's "reduce-overhead" (CUDA graphs) on the GPU; float16 against float16 eager."""
    pipe = tiny_sd_pipeline(scheduler="lcm").to("cuda", torch.float16)

    def run(backend):
        stream = fastdiff.Stream(pipe, [32, 45], cfg="self", seed=3, backend=backend)
        stream.prepare(PROMPT)
        outs = [stream(f.to("cuda")) for f in frames()]
        return torch.stack([o for o in outs if o is not None] + stream.flush()).float()

    want = run(None)
    got = run("inductor")
    assert (got - want).abs().max().item() <= 2e-2   # float16 kernels differ by more than float32 ones
