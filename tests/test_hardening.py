"""Hardening: non-finite input refused, non-finite output reported, the SDXL VAE upcast, per-component
precision, the exported text encoder's outputs, export leftovers, build-then-use, clear model errors."""

import os
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fastdiff
from fastdiff.architectures import tiny_sd_pipeline, tiny_vae
from fastdiff.cli import main
from fastdiff.engines.attach import check_options, precision_of
from fastdiff.engines.components import component
from fastdiff.engines.onnx_export import _remove_strays
from fastdiff.vae import LatentCodec


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(scheduler="lcm")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_frame_holding_nan_or_inf_is_refused(pipe, bad):
    stream = fastdiff.Stream(pipe, [20, 40], output_type="latent")
    stream.prepare("a red circle")
    frame = np.full((64, 64, 3), 0.5, dtype=np.float32)
    frame[3, 4, 1] = bad
    with pytest.raises(ValueError, match="image holds NaN or infinite"):
        stream(frame)
    tensor = torch.full((3, 64, 64), 0.5)
    tensor[0, 0, 0] = bad
    with pytest.raises(ValueError, match="image holds NaN"):
        stream(tensor)
    assert stream(torch.full((3, 64, 64), 0.5)) is None   # the stream lives on: the good frame enters


def test_a_float_frame_outside_zero_one_is_refused(pipe):
    stream = fastdiff.Stream(pipe, [20, 40], output_type="latent")
    stream.prepare("a red circle")
    for frame in (np.full((64, 64, 3), 200.0, dtype=np.float32), torch.full((3, 64, 64), -0.5)):
        with pytest.raises(ValueError, match="float frames are in \\[0, 1\\]"):
            stream(frame)
    assert stream(np.full((64, 64, 3), 200, dtype=np.uint8)) is None   # 0–255 as uint8 is a frame
    assert stream(torch.full((3, 64, 64), 1.005)) is not None   # a resampler's overshoot passes


def test_accelerate_refuses_non_finite_latents_and_images(pipe):
    fast = fastdiff.accelerate(pipe)
    latents = torch.zeros(1, 4, 8, 8)
    latents[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="latents holds NaN"):
        fast("a red circle", latents=latents, num_inference_steps=1, output_type="np")
    img2img = fastdiff.accelerate(tiny_sd_pipeline(img2img=True))
    image = torch.full((1, 3, 64, 64), 0.5)
    image[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="image holds NaN"):
        img2img("a red circle", image=image, num_inference_steps=2, strength=0.5, output_type="np")


def test_a_non_finite_output_is_reported_once_naming_the_component(pipe):
    stream = fastdiff.Stream(pipe, [40], output_type="np")
    stream.prepare("a red circle")
    real_decode = stream.codec.decode_unit
    stream.codec.decode_unit = lambda latents: real_decode(latents) * float("inf")   # as an fp16 overflow would
    frame = np.full((64, 64, 3), 0.5, dtype=np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream(frame)
        stream(frame)
    reports = [w for w in caught if "produced NaN or infinite" in str(w.message)]
    assert len(reports) == 1 and "vae_decoder" in str(reports[0].message)


def test_a_force_upcast_vae_decodes_in_float32():
    import copy

    vae = tiny_vae(force_upcast=True).half()
    codec = LatentCodec(vae)
    latents = torch.randn(1, 4, 8, 8)
    out = codec.decode(latents)
    assert out.dtype == torch.float32
    reference = LatentCodec(copy.deepcopy(vae).float(), upcast=False).decode(latents)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)   # the fp16 weights, decoded in fp32
    assert LatentCodec(vae, upcast=False).decode(latents).dtype == torch.float16   # unless told otherwise


@pytest.mark.parametrize("kind", ["kl", "tiny"])
@pytest.mark.parametrize("way", ["direct", "slicing", "engine-like"])
def test_the_codec_frame_paths_equal_the_diffusers_round_trips(kind, way):
    """encode_unit / decode_unit skip the VAE classes' own [-1, 1] conversions and the posterior;
    they must give what encode / decode give on [-1, 1] images, whether they call the VAE's parts
    or (slicing a batch; a VAE that is not a diffusers module) its encode / decode."""
    torch.manual_seed(0)
    vae = tiny_vae(kind, scaling_factor=0.5, shift_factor=0.1)
    if way == "slicing":
        vae.enable_slicing()
    codec = LatentCodec(vae)
    if way == "engine-like":   # what engines put in the codec's hands: encode / decode only
        class Wrapped:
            def __init__(self, inner):
                self.inner, self.config = inner, inner.config

            def encode(self, x, return_dict=True):
                return self.inner.encode(x, return_dict=return_dict)

            def decode(self, z, return_dict=True):
                return self.inner.decode(z, return_dict=return_dict)

            def parameters(self):
                return self.inner.parameters()
        vae = codec.vae = Wrapped(vae)
    assert codec._direct(vae, 2) == (None if way != "direct" else kind)
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        latents = codec.encode(images * 2 - 1)
        torch.testing.assert_close(codec.encode_unit(images), latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(codec.encode_unit(images, scaled=False) * 0.5, latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(codec.decode_unit(latents), codec.decode(latents) / 2 + 0.5, rtol=1e-5, atol=1e-5)


def test_the_codec_follows_its_vae_moved_or_swapped():
    """The codec finds the VAE's dtype once, not per frame: it must still follow module.to() and a
    VAE swapped in (engines swap it)."""
    vae = tiny_vae()
    codec = LatentCodec(vae)
    assert codec.dtype == torch.float32
    vae.to(torch.float64)
    assert codec.dtype == torch.float64
    assert codec.decode(torch.randn(1, 4, 8, 8)).dtype == torch.float64
    codec.vae = tiny_vae().half()
    assert codec.dtype == torch.float16


def test_engine_precision_per_component_and_the_upcast_vae():
    vae = tiny_vae(force_upcast=True).half()
    assert precision_of({}, "vae_decoder", vae, "onnxruntime") == "fp32"
    assert precision_of({}, "denoiser", vae, "onnxruntime") is None
    assert precision_of({"precision": "fp16"}, "vae_decoder", vae) == "fp16"   # the user asked
    assert precision_of({"precision": {"vae_decoder": "bf16"}}, "vae_decoder", vae) == "bf16"
    assert precision_of({}, "vae_decoder", vae, "inductor") is None
    with pytest.raises(ValueError, match="per component"):
        check_options({"precision": {"unet": "fp16"}})
    with pytest.raises(ValueError, match="engine_options must be a dict"):
        check_options([1])
    with pytest.raises(ValueError, match="rebuild"):   # a string would read as true and rebuild every time
        check_options({"rebuild": "no"})


def test_the_exported_text_encoder_gives_clips_own_last_hidden_state(pipe):
    part = component(pipe, "text_encoder")
    ids = part.sample_inputs(2, 64, 64)[0]
    with torch.no_grad():
        last, penultimate, pooled = part.graph(ids)
        out = pipe.text_encoder(ids, output_hidden_states=True)
    torch.testing.assert_close(last, out.last_hidden_state)   # after the final LayerNorm
    torch.testing.assert_close(penultimate, out.hidden_states[-2])
    torch.testing.assert_close(pooled, out.pooler_output)
    assert (out.hidden_states[-1] - out.last_hidden_state).abs().max() > 1e-3   # the two really differ


def test_export_strays_are_removed_once_merged(tmp_path):
    folder = tmp_path
    (folder / "earlier.txt").write_text("kept")
    before = set(os.listdir(folder))
    for name in ("model.onnx", "model.onnx.data", "onnx__MatMul_123", "unet.conv_in.weight"):
        (folder / name).write_bytes(b"x")
    strays = _remove_strays(str(folder), before, str(folder / "model.onnx"))
    assert sorted(strays) == ["onnx__MatMul_123", "unet.conv_in.weight"]
    assert sorted(os.listdir(folder)) == ["earlier.txt", "model.onnx", "model.onnx.data"]


def test_a_build_followed_by_a_use_hits_the_cache(tmp_path):
    out = tmp_path / "engines"
    result = CliRunner().invoke(main, ["build", "--model", "tiny", "--backend", "onnxruntime", "--components",
                                       "denoiser,vae_encoder,vae_decoder", "--out", str(out)])
    assert result.exit_code == 0, result.output
    pipe = tiny_sd_pipeline(scheduler="lcm")   # the same weights `--model tiny` builds
    fast = fastdiff.accelerate(pipe, backend="onnxruntime", engine_options={"cache_dir": str(out), "threads": 1})
    folders = set(fast.engines.folders.values())
    assert folders <= {str(out / name) for name in os.listdir(out)}   # nothing new was built beside them
    stream = fastdiff.Stream(pipe, [20, 40], backend="onnxruntime", engine_options={"cache_dir": str(out), "threads": 1})
    stream.prepare("a red circle")
    assert set(stream.engines.folders.values()) <= {str(out / name) for name in os.listdir(out)}


def test_model_errors_say_what_is_wrong(tmp_path):
    result = CliRunner().invoke(main, ["build", "--model", "nosuchmodel"])
    assert result.exit_code == 2 and "--model" in result.output
    assert "stacktrace" not in result.output and "hub" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["build", "--model", str(empty)])
    assert result.exit_code == 2 and "not a diffusers pipeline" in result.output
    assert result.output.count("model:") <= 1   # no doubled prefix


def test_a_cuda_device_without_cuda_is_a_usage_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(main, ["generate", "--model", "tiny", "--device", "cuda", "--out", str(tmp_path), "a"])
    assert result.exit_code == 2 and "--device" in result.output and "Traceback" not in result.output


def test_bad_arguments_are_refused_before_anything_loads(tmp_path, monkeypatch):
    import fastdiff.models

    monkeypatch.setattr(fastdiff.models, "load_model", lambda *a, **k: pytest.fail("loaded before checking"))
    for args in (["generate", "--steps", "0", "a"], ["generate", "  "], ["stream", "--clip", "moving-shapes",
                                                                         "--prompt", " "]):
        result = CliRunner().invoke(main, args + ["--out", str(tmp_path)] if args[0] == "stream" else args)
        assert result.exit_code == 2, (args, result.output)


def test_unknown_words_are_warned_about_once(pipe):
    from fastdiff.denoiser import _WARNED_WORDS, check_prompts

    _WARNED_WORDS.discard("zebra")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_prompts("a zebra", "prompt", [pipe.tokenizer], False)
        check_prompts("a zebra", "prompt", [pipe.tokenizer], False)
    assert [str(w.message).count("'zebra'") for w in caught] == [1]


def test_the_attention_option_is_honoured_and_checked(pipe):
    fast = fastdiff.accelerate(pipe, attention="sdpa-math")
    assert fast.denoiser.attention == "sdpa-math"
    from torch.nn.attention import SDPBackend

    seen = []
    real_run = fast.denoiser.run

    def spying_run(*args, **kwargs):   # what the denoiser's own calls may use
        from torch._C import _get_flash_sdp_enabled, _get_math_sdp_enabled

        seen.append((_get_math_sdp_enabled(), _get_flash_sdp_enabled()))
        return real_run(*args, **kwargs)

    fast.denoiser.run = spying_run
    try:
        math = fast("a red circle", num_inference_steps=1, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images
    finally:
        del fast.denoiser.run
    assert seen == [(True, False)]   # one denoiser call, held to the math kernel
    default = fastdiff.accelerate(pipe)("a red circle", num_inference_steps=1, output_type="np",
                                        generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(math, default, atol=1e-4)
    assert SDPBackend.MATH is not None
    with pytest.raises(ValueError, match="attention must be one of"):
        fastdiff.accelerate(pipe, attention="fastest")
    with pytest.raises(ValueError, match="dispatcher"):
        fastdiff.accelerate(pipe, attention="flex")
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ImportError, match="pip install xformers"):
            fastdiff.Stream(pipe, attention="xformers")


def test_the_pipelines_own_attention_processors_are_kept_unless_one_is_asked_for():
    from diffusers.models.attention_processor import AttnProcessor2_0

    class XFormersStandIn(AttnProcessor2_0):   # named as xformers' processors are; runs SDPA here
        pass

    pipe = tiny_sd_pipeline()
    pipe.unet.set_attn_processor(XFormersStandIn())
    fastdiff.accelerate(pipe)
    fastdiff.Stream(pipe, cfg="none")
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {XFormersStandIn}   # the user's choice stands
    fastdiff.accelerate(pipe, attention="sdpa")
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}


def test_the_quick_finite_test_agrees_with_the_elementwise_one():
    from fastdiff.images import all_finite, check_finite

    big = torch.full((4, 3, 8, 8), 3e38)   # finite, but their sum is not: the exact test decides
    cases = {"finite": torch.rand(1, 3, 64, 64), "huge but finite": big,
             "fp16 frame whose half sum would overflow": torch.full((1, 3, 256, 256), 60000.0, dtype=torch.float16)}
    for kind, bad in {"NaN": float("nan"), "+Inf": float("inf"), "-Inf": float("-inf")}.items():
        x = torch.rand(1, 3, 64, 64)
        x[0, 1, 5, 7] = bad
        cases[kind] = x
    both = torch.rand(1, 3, 64, 64)
    both[0, 0, 0, 0], both[0, 2, 3, 3] = float("inf"), float("-inf")   # their sum is NaN
    cases["+Inf and -Inf"] = both
    for kind, x in cases.items():
        assert all_finite(x) == bool(torch.isfinite(x).all()), kind
        if not bool(torch.isfinite(x).all()):
            with pytest.raises(ValueError, match="frame holds NaN or infinite"):
                check_finite(x, "frame")
            with pytest.raises(ValueError, match="frame holds NaN or infinite"):
                check_finite(x.numpy(), "frame")
        else:
            check_finite(x, "frame")
            check_finite(x.float().numpy(), "frame")
