"""fastdiff.Stream as a user drives it: frames in, frames out, runtime changes, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.stream.runner import StreamRunner
from fastdiff.architectures import tiny_sd_pipeline, tiny_vae


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(scheduler="lcm", img2img=True)


def frames(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 64, 64, generator=g) for _ in range(count)]


def run_stream(stream, inputs):
    outs = [stream(f) for f in inputs]
    return [o for o in outs if o is not None] + stream.flush()


def test_lag_and_flush_return_every_frame(pipe):
    stream = fastdiff.Stream(pipe, steps=[10, 25, 40], cfg="none")
    stream.prepare("a red circle")
    assert stream.lag == 2
    outs = [stream(f) for f in frames(5)]
    assert outs[:2] == [None, None] and all(o.shape == (3, 64, 64) for o in outs[2:])
    rest = stream.flush()
    assert len(rest) == 2 and stream.flush() == []


def test_frame_buffer_takes_and_returns_lists(pipe):
    stream = fastdiff.Stream(pipe, steps=[20, 40], cfg="self", frame_buffer=3)
    stream.prepare("a red circle")
    assert stream.rows_per_call == 6
    assert stream(frames(3)) is None
    out = stream(frames(3, seed=1))
    assert isinstance(out, list) and len(out) == 3
    assert len(stream.flush()) == 3


def test_same_frames_through_stream_and_one_by_one(pipe):
    """A frame's output does not depend on the other frames it shares calls with (fixed noise)."""
    stream = fastdiff.Stream(pipe, steps=[20, 40], cfg="none", output_type="latent")
    stream.prepare("a red circle")
    together = run_stream(stream, frames(4))
    for i, frame in enumerate(frames(4)):
        alone = fastdiff.Stream(pipe, steps=[20, 40], cfg="none", output_type="latent")
        alone.prepare("a red circle")
        out = run_stream(alone, [frame])[0]
        torch.testing.assert_close(out, together[i], rtol=1e-4, atol=1e-4)


def test_input_types_agree(pipe):
    stream = fastdiff.Stream(pipe, steps=[40], cfg="none", output_type="np")
    stream.prepare("a red circle")
    array = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    from_np = stream(array)
    from_pil = stream(Image.fromarray(array))
    from_pt = stream(torch.from_numpy(array).permute(2, 0, 1))
    assert from_np.shape == (64, 64, 3) and from_np.dtype == np.float32
    np.testing.assert_allclose(from_np, from_pil, atol=1e-5)
    np.testing.assert_allclose(from_np, from_pt, atol=1e-5)


def test_prompt_change_keeps_frames_in_flight_and_unconditional(pipe):
    kwargs = dict(steps=[10, 25, 40], cfg="full", guidance_scale=3.0, output_type="latent")
    changed = fastdiff.Stream(pipe, **kwargs)
    changed.prepare("a red circle")
    uncond_before = changed.latents.uncond.embeds.clone()
    inputs = frames(8)
    outs = [changed(f) for f in inputs[:4]]
    changed.update(prompt="a blue square")
    torch.testing.assert_close(changed.latents.uncond.embeds, uncond_before)
    outs += [changed(f) for f in inputs[4:]]
    outs = [o for o in outs if o is not None] + changed.flush()
    assert len(outs) == 8                       # nothing lost across the change

    always_blue = fastdiff.Stream(pipe, **kwargs)
    always_blue.prepare("a blue square")
    blue = run_stream(always_blue, inputs)
    # Frames that entered after the change saw only the new prompt; earlier ones did not.
    for i in range(4, 8):
        torch.testing.assert_close(outs[i], blue[i], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(outs[0], blue[0], atol=1e-3)


def test_prompt_embeddings_stand_in_for_prompts_each_side_apart(pipe):
    kwargs = dict(steps=[10, 25, 40], cfg="full", guidance_scale=3.0, output_type="latent", frame_buffer=2)
    inputs = [frames(2, seed=s) for s in range(5)]

    def latents(prepare, change=None, *, at=2):
        stream = fastdiff.Stream(pipe, **kwargs)
        stream.prepare(**prepare)
        outs = []
        for i, group in enumerate(inputs):
            if i == at and change is not None:
                stream.update(**change)
            outs += stream(group) or []
        return outs + stream.flush()   # frame by frame

    def embeds(*prompts):
        return pipe.encode_prompt(list(prompts), "cpu", 1, False)[0]

    by_text = latents(dict(prompt=["a red circle", "a blue square"], negative_prompt="dark"),
                      dict(prompt="a green triangle"))
    # one row a frame, then one row for both frames; the negative side stays text throughout
    by_embeds = latents(dict(prompt_embeds=embeds("a red circle", "a blue square"), negative_prompt="dark"),
                        dict(prompt_embeds=embeds("a green triangle")))
    assert len(by_text) == len(by_embeds) == 10
    for a, b in zip(by_text, by_embeds):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the negative side as embeddings, changed alone: the prompt is kept
    mixed = latents(dict(prompt=["a red circle", "a blue square"], negative_prompt_embeds=embeds("bright")),
                    dict(negative_prompt_embeds=embeds("dark")))
    by_text = latents(dict(prompt=["a red circle", "a blue square"], negative_prompt="bright"),
                      dict(negative_prompt="dark"))
    for a, b in zip(mixed, by_text):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(mixed[-1], by_embeds[-1])
    stream = fastdiff.Stream(pipe, **kwargs)
    stream.prepare(prompt_embeds=embeds("a red circle"))
    assert stream.prompt is None
    stream.update(prompt="a red circle")   # text again: the embeddings of that side are dropped
    assert stream.prompt == "a red circle" and stream.latents.cond.embeds.shape[0] == 2
    for bad, named in [(dict(prompt_embeds=embeds("a", "b", "c")), "1 or frame_buffer=2 rows, got 3"),
                       (dict(prompt="a fox", prompt_embeds=embeds("a fox")), "prompt and prompt_embeds"),
                       (dict(prompt_embeds=embeds("a fox")[..., :8]), "prompt_embeds must be a float tensor")]:
        with pytest.raises(ValueError, match=named):
            stream.update(**bad)
        assert stream.prompt == "a red circle"


def test_a_refused_update_changes_nothing_and_loses_no_frame(pipe, tmp_path):
    kwargs = dict(steps=[10, 25, 40], cfg="full", guidance_scale=3.0, output_type="latent")
    refused, untouched = fastdiff.Stream(pipe, **kwargs), fastdiff.Stream(pipe, **kwargs)
    inputs = frames(6)
    for stream in (refused, untouched):
        stream.prepare("a red circle")
    outs = {id(s): [s(f) for f in inputs[:4]] for s in (refused, untouched)}
    state = (refused.steps, refused.schedule, refused.height, refused.guider, refused.prompt, refused.latents)
    bad = [(dict(steps=[10, 40], prompt=""), "prompt"), (dict(guidance_scale=5.0, height=60), "height"),
           (dict(prompt="a blue fox", num_inference_steps=0), "num_inference_steps"), (dict(width=0), "width"),
           (dict(negative_prompt="dark", delta="big"), "delta"), (dict(steps=20), "steps must be a list"),
           (dict(steps=str(tmp_path / "missing.json")), "schedule")]
    for arguments, named in bad:
        with pytest.raises(ValueError, match=named):
            refused.update(**arguments)
        assert (refused.steps, refused.schedule, refused.height, refused.guider, refused.prompt, refused.latents) == state
    for stream in (refused, untouched):
        outs[id(stream)] += [stream(f) for f in inputs[4:]] + stream.flush()
    got, expected = ([o for o in outs[id(s)] if o is not None] for s in (refused, untouched))
    assert len(got) == len(expected) == 6
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_guidance_and_delta_change_at_run_time(pipe):
    stream = fastdiff.Stream(pipe, steps=[20, 40], cfg="self", guidance_scale=1.0, output_type="latent")
    stream.prepare("a red circle")
    frame = frames(1)[0]
    first = run_stream(stream, [frame])[0]
    stream.update(guidance_scale=4.0, delta=0.5)
    assert stream.latents.guider is stream.guider and (stream.guidance_scale, stream.delta) == (4.0, 0.5)
    second = run_stream(stream, [frame])[0]
    assert not torch.allclose(first, second, atol=1e-3)


def test_steps_and_resolution_change_drain_in_flight_frames(pipe):
    stream = fastdiff.Stream(pipe, steps=[10, 25, 40], cfg="self")
    stream.prepare("a red circle")
    outs = [stream(f) for f in frames(3)]
    drained = stream.update(steps=[30, 45], height=128, width=96)
    assert len([o for o in outs if o is not None]) + len(drained) == 3
    assert stream.lag == 1 and stream.latent_shape == (4, 16, 12)
    big = torch.rand(3, 128, 96)
    assert stream(big) is None and stream(big).shape == (3, 128, 96)


def test_vae_swap_is_one_call(pipe):
    stream = fastdiff.Stream(pipe, steps=[20, 40], cfg="self")
    stream.prepare("a red circle")
    kl_out = run_stream(stream, frames(2))
    stream.set_vae(tiny_vae("tiny"))
    tiny_out = run_stream(stream, frames(2))
    assert len(tiny_out) == 2 and tiny_out[0].shape == (3, 64, 64)
    assert not torch.allclose(kl_out[0], tiny_out[0])
    with pytest.raises(ValueError, match="vae has 3 latent channels"):
        from diffusers import AutoencoderTiny
        stream.set_vae(AutoencoderTiny(latent_channels=3))


def test_tiny_vae_in_every_mode():
    pipe = tiny_sd_pipeline(scheduler="lcm", vae="tiny")
    for mode in ("img2img", "txt2img"):
        for cfg in ("none", "full", "self", "initialize"):
            stream = fastdiff.Stream(pipe, steps=[20, 40], cfg=cfg, guidance_scale=2.0, mode=mode)
            stream.prepare("a red circle")
            outs = run_stream(stream, frames(2) if mode == "img2img" else [None, None])
            assert len(outs) == 2 and all(torch.isfinite(o).all() for o in outs)


def test_similarity_filter_skips_still_frames_and_counts_them(pipe):
    stream = fastdiff.Stream(pipe, steps=[20, 40], cfg="none", similarity_filter=0.98, max_skip_frames=3)
    stream.prepare("a red circle")
    still = frames(1)[0]
    outs = [stream(still) for _ in range(12)]
    assert stream.skipped_frames > 0
    # The stream never skips before it has an output to reuse; after that every call returns one.
    assert outs[0] is None and all(o is not None for o in outs[1:])
    # A run of skips never exceeds max_skip_frames.
    assert stream.filter.skip_run <= 3
    changed = stream(torch.rand(3, 64, 64))
    assert not stream.last_skipped and changed is not None


def test_runner_with_a_real_stream_keeps_order(pipe):
    stream = fastdiff.Stream(pipe, steps=[20, 40], cfg="self")
    stream.prepare("a red circle")
    inputs = frames(6)
    with StreamRunner(stream, max_queue=4) as runner:
        for f in inputs:
            runner.put(f)
    results = list(runner)
    assert [r.index for r in results] == list(range(6))
    reference = fastdiff.Stream(pipe, steps=[20, 40], cfg="self")
    reference.prepare("a red circle")
    expected = run_stream(reference, inputs)
    for r, e in zip(results, expected):
        torch.testing.assert_close(r.image, e, rtol=1e-4, atol=1e-4)
    stats = runner.stats()
    assert stats.processed == 6 and stats.dropped == 0


BAD_STREAM_ARGS = [
    (dict(mode="video"), "mode must be one of"),
    (dict(cfg="double"), "cfg must be one of"),
    (dict(frame_buffer=0), "frame_buffer must be an integer ≥ 1"),
    (dict(steps=[45, 32]), "steps must be increasing"),
    (dict(steps=[32, 32]), "steps must not repeat"),
    (dict(steps=[32, 50]), r"steps must lie in \[0, 50\)"),
    (dict(steps=[-1]), r"steps must lie in \[0, 50\)"),
    (dict(timesteps=[100, 500]), "timesteps must be decreasing"),
    (dict(timesteps=[1000]), r"timesteps must lie in \[0, 1000\)"),
    (dict(guidance_scale=-1), "guidance_scale must be a finite number ≥ 0"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(delta="big"), "delta must be a finite number"),
    (dict(delta=float("inf")), "delta must be a finite number"),
    (dict(guidance_rescale=0.7), "guidance_rescale applies to cfg='full' only"),
    (dict(height=60), "height must be a positive multiple of 8"),
    (dict(noise="pink"), "noise must be one of"),
    (dict(output_type="gif"), "output_type must be one of"),
    (dict(similarity_filter=1.5), r"similarity_filter must be a finite number in \(0.0, 1.0\) or None"),
]


@pytest.mark.parametrize("kwargs,message", BAD_STREAM_ARGS)
def test_bad_stream_arguments_are_named(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastdiff.Stream(pipe, **kwargs)


def test_bad_frames_and_prompts_are_named(pipe):
    stream = fastdiff.Stream(pipe, steps=[20, 40])
    with pytest.raises(RuntimeError, match="prepare"):
        stream(frames(1)[0])
    with pytest.raises(ValueError, match="prompt must not be empty"):
        stream.prepare("")
    with pytest.raises(ValueError, match="prompt is .* tokens long"):
        stream.prepare("red " * 100)
    stream.prepare("a red circle")
    with pytest.raises(ValueError, match="image is 32×32"):
        stream(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="image must have 3 channels"):
        stream(torch.rand(4, 64, 64))
    with pytest.raises(ValueError, match="image must hold uint8 or floating-point"):
        stream(torch.ones(3, 64, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="image must be one of"):
        stream("frame.png")
    with pytest.raises(ValueError, match="image is required by an img2img stream"):
        stream()
    txt = fastdiff.Stream(pipe, steps=[0, 40], mode="txt2img")
    txt.prepare("a red circle")
    with pytest.raises(ValueError, match="image must not be given to a txt2img stream"):
        txt(frames(1)[0])
    batch = fastdiff.Stream(pipe, steps=[20, 40], frame_buffer=3)
    batch.prepare(["a red circle"] * 3)
    with pytest.raises(ValueError, match="image must be a list of frame_buffer=3 frames, got 2"):
        batch(frames(2))
    with pytest.raises(ValueError, match="prompt must be one string or a list of frame_buffer=3"):
        batch.update(prompt=["a", "b"])


@pytest.mark.parametrize("backend", ["inductor", "onnxruntime"])
def test_the_compiled_whole_step_equals_the_eager_stream_through_prompt_and_guidance_changes(pipe, backend):
    """encode + denoiser + step + decode as one graph once the stream is full: a prompt change is an
    input of the graph (no rebuild), a guidance change rebuilds it (its coefficients are baked in)."""
    import shutil

    if backend == "inductor":
        if shutil.which("g++") is None and shutil.which("c++") is None:
            pytest.skip("torch.compile on the CPU needs a C++ compiler")
        # a one-level UNet and AutoencoderTiny: fewer kinds of C++ kernel for Inductor to build cold
        pipe = tiny_sd_pipeline(scheduler="lcm", img2img=True, vae="tiny", levels=1)
    clip = frames(8)
    outputs, built = {}, []
    for compile in (None, "whole"):
        stream = fastdiff.Stream(pipe, [20, 40], cfg="self", guidance_scale=1.4, compile=compile,
                                 compile_backend=backend, output_type="pt")
        stream.prepare("a red circle")
        outs = []
        for i, frame in enumerate(clip):
            if i == 3:
                stream.update(prompt="a blue square")
            if i == 6 and backend == "onnxruntime":   # (a second torch.compile would cost CI a minute)
                stream.update(guidance_scale=2.0)
            outs.append(stream(frame, tag=i))
            if compile:
                built.append(stream._whole)
        outputs[compile] = outs + stream.flush()
    assert built[1] is not None and built[2] is built[5]   # compiled once full; the prompt change kept it
    if backend == "onnxruntime":
        assert built[6] is not None and built[6] is not built[5]   # the guidance change rebuilt it
    assert len(outputs[None]) == len(outputs["whole"]) == len(clip) + 1
    for eager, whole in zip(outputs[None], outputs["whole"]):
        if eager is None:
            assert whole is None
        else:
            torch.testing.assert_close(whole, eager, rtol=1e-4, atol=1e-4)


def test_the_whole_step_in_onnxruntime_runs_txt2img_with_a_frame_buffer(pipe):
    """No pixels, no residual, F = 2 frames per call: the graph takes only the inputs the step has."""
    outputs = {}
    for compile in (None, "whole"):
        stream = fastdiff.Stream(pipe, [0, 30, 45], mode="txt2img", cfg="none", frame_buffer=2, compile=compile,
                                 compile_backend="onnxruntime", output_type="pt")
        stream.prepare("a red circle")
        calls = [stream() for _ in range(5)]
        assert [o is None for o in calls] == [True, True, False, False, False]
        # every frame, in order: each full call's list of F, then flush's frames
        outputs[compile] = [f for o in calls if o is not None for f in o] + stream.flush()
    assert stream._whole is not None and stream._whole._present == (True, True, True, False)
    assert len(outputs[None]) == len(outputs["whole"]) == 10
    for eager, whole in zip(outputs[None], outputs["whole"]):
        torch.testing.assert_close(whole, eager, rtol=1e-4, atol=1e-4)


def test_compile_whole_refuses_an_unknown_backend_and_per_module_engines(pipe):
    with pytest.raises(ValueError, match="compile_backend"):
        fastdiff.Stream(pipe, [20, 40], compile="whole", compile_backend="tvm")
    with pytest.raises(ValueError, match="give one of the two"):
        fastdiff.Stream(pipe, [20, 40], compile="whole", backend="onnxruntime")
