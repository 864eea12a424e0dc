"""ControlNet pipelines through fastdiff.accelerate, against diffusers' own calls."""

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.architectures import tiny_controlnet_pipeline, tiny_sd_pipeline


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def image(seed):
    return torch.rand(1, 3, 64, 64, generator=gen(seed))


def bars(k):
    """A control image unlike another's (noise images all look alike to a ControlNet): a bright band."""
    out = torch.zeros(1, 3, 64, 64)
    out[..., 16 * (k % 4):16 * (k % 4) + 16, :] = 1.0
    return out


@pytest.mark.parametrize("family,img2img,nets,guess_mode", [("sd", False, 1, False), ("sd", True, 2, True),
                                                            ("sdxl", False, 2, False), ("sdxl", True, 1, True)])
def test_controlnet_matches_diffusers(family, img2img, nets, guess_mode):
    """One ControlNet or several (their residuals summed), each with its scale and share of the steps,
    guess mode (unconditional rows without residuals), two prompts sharing one control image."""
    pipe = tiny_controlnet_pipeline(family, img2img, nets)
    control = image(7) if nets == 1 else [image(7), image(9)]
    args = dict(prompt=["a red circle", "a blue fox"], num_inference_steps=4, guidance_scale=4.0, guess_mode=guess_mode,
                control_guidance_start=0.0 if nets == 1 else [0.0, 0.25], control_guidance_end=0.6,
                controlnet_conditioning_scale=0.7 if nets == 1 else [0.7, 1.2], output_type="np")
    args.update(dict(image=image(8), control_image=control, strength=0.8) if img2img else dict(image=control))
    expected = pipe(generator=gen(), **args).images
    fast = fastdiff.accelerate(pipe)
    np.testing.assert_allclose(fast(generator=gen(), **args).images, expected, atol=2e-5)
    off = dict(args, controlnet_conditioning_scale=0.0)   # the control matters, and is what fastdiff adds
    np.testing.assert_allclose(fast(generator=gen(), **off).images, pipe(generator=gen(), **off).images, atol=2e-5)
    assert np.abs(fast(generator=gen(), **off).images - expected).max() > 1e-2
    assert np.isfinite(fastdiff.accelerate(pipe, cfg="self")(generator=gen(), **args).images).all()
    if family == "sd" and not img2img:   # the cost counted includes the ControlNet's
        plain = fastdiff.accelerate(tiny_sd_pipeline())
        plain(args["prompt"], num_inference_steps=2)
        assert fast.last_call_macs > plain.last_call_macs * 1.2


def test_controlnet_inputs_are_checked():
    pipe = tiny_controlnet_pipeline("sd", nets=2)
    fast = fastdiff.accelerate(pipe)
    pair = [image(1), image(2)]
    bad = [(dict(), "image is required by StableDiffusionControlNetPipeline"),
           (dict(image=image(1)), "image: 2 ControlNets take a list of 2"),
           (dict(image=[image(1), "x.png"]), "image must be an image"),
           (dict(image=[image(1), torch.rand(3, 64)]), "image must be an image"),
           (dict(image=pair, controlnet_conditioning_scale=[1.0]), "controlnet_conditioning_scale: 1 values for 2"),
           (dict(image=pair, controlnet_conditioning_scale="1"), "controlnet_conditioning_scale"),
           (dict(image=pair, control_guidance_start=0.5, control_guidance_end=0.4), "must be below"),
           (dict(image=pair, control_guidance_end=1.5), "control_guidance_end"),
           (dict(image=pair, guess_mode="yes"), "guess_mode must be True or False"),
           (dict(image=[torch.rand(3, 3, 64, 64), image(2)], prompt=["a", "b"]), "3 images for 2 prompts"),
           (dict(image=[image(1), torch.rand(1, 3, 32, 32)]), "differ in size")]
    for kwargs, named in bad:
        with pytest.raises(ValueError, match=named):
            fast(**{"prompt": "a red circle", "num_inference_steps": 2, **kwargs})
    with pytest.raises(TypeError, match="control_image"):   # not a ControlNet pipeline's argument
        fastdiff.accelerate(tiny_sd_pipeline())("a red circle", control_image=image(1))
    with pytest.raises(ValueError, match="router: the pruned sub-networks take no ControlNet"):
        fastdiff.accelerate(pipe, router="shapes")


def stream_outputs(stream, frames, controls):
    outs = [stream(f, control_image=c) if c is not None else stream(f) for f, c in zip(frames, controls)]
    return [o for o in outs if o is not None] + stream.flush()


@pytest.mark.parametrize("nets,cfg", [(1, "self"), (2, "full")])
def test_stream_frames_keep_their_control_images(nets, cfg):
    """Frames at different steps of one call each use their own control image: every output is
    the one that frame gets alone in a fresh stream; the standing image stands in for a call's."""
    pipe = tiny_controlnet_pipeline("sd", img2img=True, nets=nets, scheduler="lcm")
    make = lambda **kw: fastdiff.Stream(pipe, steps=[20, 30, 40], cfg=cfg, guidance_scale=1.5, **kw)
    frames = [image(10 + k) for k in range(4)]
    controls = [bars(k) if nets == 1 else [bars(k), bars(k + 1)] for k in range(4)]
    stream = make()
    stream.prepare("a red circle")
    outs = stream_outputs(stream, frames, controls)
    assert len(outs) == 4
    for frame, control, out in zip(frames, controls, outs):
        alone = make()
        alone.prepare("a red circle")
        torch.testing.assert_close(stream_outputs(alone, [frame], [control])[0], out, atol=1e-5, rtol=0)
    standing = make()
    standing.prepare("a red circle", control_image=controls[0])
    same = stream_outputs(standing, frames, [None] * 4)
    torch.testing.assert_close(same[0], outs[0], atol=1e-5, rtol=0)
    assert (same[-1] - outs[-1]).abs().max() > 1e-3   # the last frame's own control image mattered
    off = make(controlnet_conditioning_scale=0.0)
    off.prepare("a red circle", control_image=controls[0])
    changed = make()
    changed.prepare("a red circle", control_image=controls[0])
    changed.update(controlnet_conditioning_scale=0.0)
    torch.testing.assert_close(stream_outputs(changed, frames, [None] * 4), stream_outputs(off, frames, [None] * 4))
    assert stream.macs_per_call > 0


def test_stream_control_in_txt2img_with_a_frame_buffer():
    pipe = tiny_controlnet_pipeline("sd", scheduler="lcm")
    stream = fastdiff.Stream(pipe, mode="txt2img", steps=[0, 25], frame_buffer=2, cfg="none")
    stream.prepare("a red circle")
    first = stream(control_image=[bars(0), bars(2)])
    assert first is None
    pair = stream(control_image=bars(3))
    assert len(pair) == 2 and (pair[0] - pair[1]).abs().max() > 1e-3   # each frame its own control image
    with pytest.raises(ValueError, match="control image: 3 images for 2 frames"):
        stream(control_image=torch.rand(3, 3, 64, 64))


def test_stream_control_inputs_are_checked():
    pipe = tiny_controlnet_pipeline("sd", img2img=True)
    stream = fastdiff.Stream(pipe)
    stream.prepare("a red circle")
    with pytest.raises(ValueError, match="control_image is required"):
        stream(image(1))
    with pytest.raises(ValueError, match="controlnet_conditioning_scale"):
        stream.update(controlnet_conditioning_scale="high")
    with pytest.raises(ValueError, match="guess_mode must be True or False"):
        fastdiff.Stream(pipe, guess_mode=1)
    with pytest.raises(ValueError, match="compile: a ControlNet pipeline's stream"):
        fastdiff.Stream(pipe, compile="whole")
    plain = fastdiff.Stream(tiny_sd_pipeline(img2img=True))
    with pytest.raises(ValueError, match="has no ControlNet"):
        fastdiff.Stream(tiny_sd_pipeline(img2img=True), controlnet_conditioning_scale=0.5)
    plain.prepare("a red circle")
    with pytest.raises(ValueError, match="control_image: StableDiffusionImg2ImgPipeline has no ControlNet"):
        plain(image(1), control_image=image(2))


def test_rows_at_steps_where_the_nets_act_differently_run_apart():
    """A call whose rows sit at steps inside and outside a net's range: each row as if alone."""
    pipe = tiny_controlnet_pipeline("sd")
    d = fastdiff.accelerate(pipe).denoiser
    cond, uncond = d.encode_prompt(["a red circle"] * 2, [""] * 2, 64, 64)
    cond = d.with_images(cond, [torch.cat([bars(0), bars(2)])], True)
    latents, t = torch.randn(2, 4, 8, 8, generator=gen(3)), torch.tensor([900.0, 300.0])
    d.set_scales([1.0], {900.0: [1.0], 300.0: [0.0]})
    with torch.inference_mode():
        both = d(latents, t, cond)
        alone = [d(latents[i:i + 1], t[i:i + 1], cond.rows(slice(i, i + 1))) for i in range(2)]
        d.set_scales([1.0], None)
        acting = d(latents[1:], t[1:], cond.rows(slice(1, 2)))
    torch.testing.assert_close(both, torch.cat(alone), atol=1e-5, rtol=0)
    assert (alone[1] - acting).abs().max() > 1e-3   # the row outside the range ran without the net


def test_controlnet_benchmark_runs(tmp_path):
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "controlnet.json"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "controlnet.py")
    subprocess.run([sys.executable, script, "--frames", "1", "--rounds", "1", "--out", str(out)], check=True,
                   capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert set(result["speedups"]) == {"fastdiff none", "fastdiff self", "diffusers"}
    assert all(ms > 0 for ms in result["ms_per_frame"].values()) and result["steps"] == [32, 45]


@pytest.mark.parametrize("frame_buffer", [1, 2])
def test_runner_hands_each_frame_its_control_image(frame_buffer):
    """Frames put with their control images come out as the stream called directly makes them."""
    from fastdiff.stream.runner import StreamRunner

    pipe = tiny_controlnet_pipeline("sd", img2img=True, scheduler="lcm")
    make = lambda: fastdiff.Stream(pipe, steps=[20, 40], cfg="none", frame_buffer=frame_buffer)
    frames, controls = [image(10 + k) for k in range(4)], [bars(k) for k in range(4)]
    direct = make()
    direct.prepare("a red circle")
    groups = [(frames[i:i + frame_buffer], controls[i:i + frame_buffer]) for i in range(0, 4, frame_buffer)]
    expected = []
    for f, c in groups:
        out = direct(f[0], control_image=c[0]) if frame_buffer == 1 else direct(f, control_image=c)
        expected += [] if out is None else ([out] if frame_buffer == 1 else out)
    expected += direct.flush()
    stream = make()
    stream.prepare("a red circle")
    with StreamRunner(stream, max_queue=8) as runner:
        for f, c in zip(frames, controls):
            runner.put(f, control_image=c)
    got = [r.image for r in runner]
    assert len(got) == len(expected) == 4
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_stream_standing_control_image_changes_and_follows_a_resize():
    pipe = tiny_controlnet_pipeline("sd", img2img=True, scheduler="lcm")
    make = lambda: fastdiff.Stream(pipe, steps=[20, 40], cfg="none")
    frames = [image(10 + k) for k in range(3)]
    given = make()
    given.prepare("a red circle")
    expected = stream_outputs(given, frames, [bars(1)] * 3)
    changed = make()
    changed.prepare("a red circle", control_image=bars(0))
    changed.update(control_image=bars(1))   # for the calls that give none, from now on
    torch.testing.assert_close(stream_outputs(changed, frames, [None] * 3), expected)
    changed.update(height=32, width=32)   # the standing image follows the new size
    out = stream_outputs(changed, [image(1)[..., :32, :32]] * 2, [None] * 2)
    assert out[0].shape[-2:] == (32, 32)


def test_residual_shapes_are_what_the_nets_give():
    from fastdiff.controlnet import residual_shapes

    for family in ("sd", "sdxl"):
        pipe = tiny_controlnet_pipeline(family)
        added = {} if family == "sd" else {"added_cond_kwargs": {
            "text_embeds": torch.randn(1, pipe.text_encoder_2.config.projection_dim), "time_ids": torch.zeros(1, 6)}}
        with torch.no_grad():
            down, mid = pipe.controlnet(torch.randn(1, 4, 8, 16), torch.tensor([10.0]), return_dict=False,
                                        encoder_hidden_states=torch.randn(1, 77, pipe.unet.config.cross_attention_dim),
                                        controlnet_cond=torch.rand(1, 3, 64, 128), **added)
        got = [(r.shape[1], 8 // r.shape[2], 16 // r.shape[3]) for r in [*down, mid]]
        assert got == [(c, f, f) for c, f in residual_shapes(pipe.unet.config)]


def test_controlnet_runs_on_onnxruntime_engines(tmp_path):
    """The UNet's engine takes the residuals, each ControlNet is an engine of its own: diffusers'
    images at two sizes (the residual inputs' sizes follow the image's), with guess mode, two nets
    each with its scale and steps, one of them a global-pool net (residuals of 1×1, spread out: it acts
    alone on the first step)."""
    pytest.importorskip("onnxruntime")
    pipe = tiny_controlnet_pipeline("sd", nets=2)
    pipe.controlnet.nets[1].register_to_config(global_pool_conditions=True)
    fast = fastdiff.accelerate(pipe, backend="onnxruntime", engine_options={
        "cache_dir": str(tmp_path), "threads": 1, "max_batch": 2, "resolutions": [(64, 64), (128, 128)],
        "components": ["denoiser"]})
    assert {"denoiser", "controlnet/0", "controlnet/1"} <= set(fast.engines.profiles)
    assert type(fast.denoiser.side_runners["controlnet/1"]).__name__ == "EngineModule"
    for size, guess_mode in ((64, True), (128, False)):
        control = [bars(1), bars(2)] if size == 64 else [torch.rand(1, 3, 128, 128, generator=gen(k)) for k in (3, 4)]
        args = dict(prompt=["a red circle", "a blue fox"], image=control, num_inference_steps=3, guidance_scale=4.0,
                    guess_mode=guess_mode, controlnet_conditioning_scale=[0.7, 1.3], control_guidance_start=[0.4, 0.0],
                    height=size, width=size, output_type="np")
        expected = pipe(generator=gen(), **args).images
        np.testing.assert_allclose(fast(generator=gen(), **args).images, expected, atol=1e-4)
    eager = fastdiff.accelerate(pipe)
    eager(generator=gen(), **args)
    assert fast.last_call_macs == eager.last_call_macs > 0   # counted on the PyTorch nets, the ControlNets' too
    off = dict(args, controlnet_conditioning_scale=0.0)   # zeros reach the UNet's residual inputs
    np.testing.assert_allclose(fast(generator=gen(), **off).images, pipe(generator=gen(), **off).images, atol=1e-4)


def test_controlnet_stream_on_onnxruntime_engines(tmp_path):
    """An SDXL ControlNet img2img stream on engines gives the PyTorch stream's frames, each frame
    with its own control image."""
    pytest.importorskip("onnxruntime")
    pipe = tiny_controlnet_pipeline("sdxl", img2img=True, scheduler="lcm")
    frames, controls = [image(10 + k) for k in range(3)], [bars(k) for k in range(3)]
    outs = []
    for backend in (None, "onnxruntime"):
        options = {"cache_dir": str(tmp_path), "threads": 1, "components": ["denoiser"]} if backend else None
        stream = fastdiff.Stream(pipe, steps=[20, 40], cfg="self", guidance_scale=1.5, backend=backend,
                                 engine_options=options)
        stream.prepare("a red circle")
        outs.append(stream_outputs(stream, frames, controls))
    assert len(outs[1]) == 3
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_build_script_builds_what_a_controlnet_pipeline_loads(tmp_path):
    """`fastdiff build` of a ControlNet pipeline builds its UNet with the residual inputs and each
    net; accelerate then loads them rather than building."""
    pytest.importorskip("onnxruntime")
    from fastdiff.engines.build import build_engines
    from fastdiff.engines.components import available_components

    pipe = tiny_controlnet_pipeline("sd", nets=2)
    assert available_components(pipe)[-2:] == ["controlnet/0", "controlnet/1"]
    built = build_engines(pipe, components=["denoiser", "controlnet/0", "controlnet/1"], backend="onnxruntime",
                          resolutions=[(64, 64)], batch=(1, 2, 4), out_dir=str(tmp_path), progress=False)
    assert [b.status for b in built] == ["built"] * 3
    assert [b.exporter for b in built] == ["dynamo"] * 3   # the graphs' *rest inputs bound, not a fallback
    fast = fastdiff.accelerate(pipe, backend="onnxruntime", engine_options={
        "cache_dir": str(tmp_path), "threads": 1, "max_batch": 2, "components": ["denoiser"]})
    runners = [fast.denoiser.module.runner] + [r.runner for r in fast.denoiser.side_runners.values()]
    assert [r.built_now for r in runners] == [False] * 3
    assert sorted(r.folder for r in runners) == sorted(b.folder for b in built)
    with pytest.raises(ValueError, match="components: .controlnet/0. is not one of this pipeline.s"):
        build_engines(tiny_sd_pipeline(), components=["controlnet/0"], backend="onnxruntime", out_dir=str(tmp_path),
                      resolutions=[(64, 64)], progress=False)
