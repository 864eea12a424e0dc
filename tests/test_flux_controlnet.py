"""FLUX.1 ControlNets (diffusers' FluxControlNet[Img2Img]Pipeline) through fastdiff.accelerate: diffusers' own
images for nets that read the control picture's latents (InstantX's kind) or its pixels (XLabs'),
Union nets with their modes, several nets, and one Union net taking several pictures."""

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.architectures import tiny_controlnet_pipeline

ARGS = dict(prompt="a red circle", num_inference_steps=3, output_type="np", max_sequence_length=32)
rng = np.random.default_rng(0)
PICTURES = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]


def both(pipe, fast, seed=0, **kwargs):
    """(the pipeline's images, fastdiff's) of one call, each from a generator at `seed`."""
    args = {**ARGS, **kwargs}
    return (pipe(generator=torch.Generator().manual_seed(seed), **args).images,
            fast(generator=torch.Generator().manual_seed(seed), **args).images)


@pytest.mark.parametrize("net, options", [
    (dict(), dict(control_image=PICTURES[0], controlnet_conditioning_scale=0.7)),
    (dict(), dict(control_image=PICTURES[:2], prompt=["a red circle", "a blue square"], num_images_per_prompt=2,
                  control_guidance_start=0.4)),
    (dict(), dict(control_image=PICTURES[0], negative_prompt="blue", true_cfg_scale=4.0, height=64, width=96)),
    (dict(reads="pixels"), dict(control_image=PICTURES[0], control_guidance_end=0.6)),
    (dict(union=True), dict(control_image=torch.rand(1, 3, 64, 64) * 2 - 1, control_mode=2, guidance_scale=5.0)),
    (dict(nets=2), dict(control_image=PICTURES[:2], controlnet_conditioning_scale=[0.7, 1.2],
                        control_guidance_start=[0.0, 0.5])),
    (dict(union=True, wrap=True), dict(control_image=PICTURES, control_mode=[0, 3, 1],
                                       controlnet_conditioning_scale=[1.0, 0.5, 0.8],
                                       control_guidance_start=[0.0, 0.0, 0.3], control_guidance_end=[1.0, 0.7, 1.0])),
])
def test_flux_controlnet_is_diffusers(net, options):
    """Each kind of net gives diffusers' images (one generator, and one per image), and the control
    picture acts: another picture, or another mode, draws another image."""
    pipe = tiny_controlnet_pipeline("flux", **net)
    fast = fastdiff.accelerate(pipe)
    want, got = both(pipe, fast, **options)
    np.testing.assert_allclose(got, want, atol=1e-5)
    count = want.shape[0]
    generators = [torch.Generator().manual_seed(k) for k in range(count)]
    want = pipe(generator=generators, **{**ARGS, **options}).images
    got = fast(generator=[torch.Generator().manual_seed(k) for k in range(count)], **{**ARGS, **options}).images
    np.testing.assert_allclose(got, want, atol=1e-5)
    if "control_mode" in options and isinstance(options["control_mode"], int):
        changed = dict(options, control_mode=0)
    else:
        image = options["control_image"]
        changed = dict(options, control_image=[PICTURES[2]] * len(image) if isinstance(image, list) else PICTURES[2])
    other = fast(generator=torch.Generator().manual_seed(0), **{**ARGS, **changed}).images
    same = fast(generator=torch.Generator().manual_seed(0), **{**ARGS, **options}).images
    assert np.abs(other - same).max() > 1e-3   # a hundred times the tolerance diffusers' images are met to


def test_true_cfg_runs_the_nets_once_per_pair():
    """Under true CFG the nets read the positive prompt on a row and its negative twin alike: one
    run of the nets per pair, the transformer on both rows."""
    pipe = tiny_controlnet_pipeline("flux")
    rows = {"net": [], "transformer": []}
    for name, module in (("net", pipe.controlnet), ("transformer", pipe.transformer)):
        module.register_forward_pre_hook(lambda m, a, k, name=name: rows[name].append(len(k["hidden_states"])),
                                         with_kwargs=True)
    fastdiff.accelerate(pipe)(**{**ARGS, "prompt": ["a red circle", "a blue square"]}, control_image=PICTURES[0],
                              negative_prompt="green", true_cfg_scale=3.0)
    assert rows == {"net": [2, 2, 2], "transformer": [4, 4, 4]}


@pytest.mark.parametrize("net, options", [
    (dict(), dict(strength=0.8, num_images_per_prompt=2)),
    (dict(nets=2, union=True), dict(control_image=PICTURES[:2], control_mode=[1, 3], strength=1.0,
                                    controlnet_conditioning_scale=[1.0, 0.6])),
])
def test_flux_controlnet_img2img_is_diffusers(net, options):
    """FluxControlNetImg2ImgPipeline: the control pictures encoded before the image, as it draws them."""
    pipe = tiny_controlnet_pipeline("flux", img2img=True, **net)
    args = {"image": PICTURES[2], "control_image": PICTURES[0], "num_inference_steps": 4, **options}
    want, got = both(pipe, fastdiff.accelerate(pipe), **args)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_flux_controlnet_bad_input_is_refused():
    pipe = tiny_controlnet_pipeline("flux", union=True)
    fast = fastdiff.accelerate(pipe)
    call = dict(ARGS, num_inference_steps=1)
    with pytest.raises(ValueError, match="control_image is required by FluxControlNetPipeline"):
        fast(control_mode=1, **call)
    with pytest.raises(ValueError, match="control_mode is required by a Union ControlNet"):
        fast(control_image=PICTURES[0], **call)
    with pytest.raises(ValueError, match=r"control_mode must be an int in \[0, 4\)"):
        fast(control_image=PICTURES[0], control_mode=4, **call)
    with pytest.raises(ValueError, match="control_mode: a FluxControlNetModel takes one int"):
        fast(control_image=PICTURES[0], control_mode=[1], **call)
    with pytest.raises(ValueError, match=r"control_image: a tensor is taken as it is, \[n, 3, H, W\]"):
        fast(control_image=torch.zeros(1, 64, 64), control_mode=1, **call)
    with pytest.raises(ValueError, match="control_guidance_start"):
        fast(control_image=PICTURES[0], control_mode=1, control_guidance_start=0.8, control_guidance_end=0.5, **call)
    with pytest.raises(TypeError, match="does not take \\['guess_mode'\\]"):
        fast(control_image=PICTURES[0], control_mode=1, guess_mode=True, **call)
    with pytest.raises(ValueError, match="a Stream does not run FluxControlNetPipeline's ControlNets yet"):
        fastdiff.Stream(pipe)
    plain = fastdiff.accelerate(tiny_controlnet_pipeline("flux"))
    with pytest.raises(ValueError, match="is no Union ControlNet; it reads no mode"):
        plain(control_image=PICTURES[0], control_mode=1, **call)
    wrapped = fastdiff.accelerate(tiny_controlnet_pipeline("flux", union=True, wrap=True))
    with pytest.raises(ValueError, match="control_guidance_start: one Union ControlNet with 2 control images takes a"):
        wrapped(control_image=PICTURES[:2], control_mode=[0, 1], **call)
    with pytest.raises(ValueError, match="control_mode: 1 modes for 2 control images"):
        wrapped(control_image=PICTURES[:2], control_mode=[0], control_guidance_start=[0, 0],
                control_guidance_end=[1, 1], **call)


@pytest.mark.parametrize("net", [dict(), dict(reads="pixels", union=True)])
def test_flux_controlnet_on_onnxruntime_engines(net, tmp_path):
    """The transformer's engine takes the nets' summed samples as inputs, each net an engine of its
    own (its scale applied to its outputs): diffusers' images, with true CFG's rows and at two sizes."""
    pytest.importorskip("onnxruntime")
    pipe = tiny_controlnet_pipeline("flux", **net)
    fast = fastdiff.accelerate(pipe, backend="onnxruntime", engine_options={
        "cache_dir": str(tmp_path), "threads": 1, "max_batch": 1, "components": ["denoiser"],
        "resolutions": [(64, 64), (128, 192)]})
    assert {type(fast.denoiser.module).__name__, type(fast.denoiser.side_runners["controlnet/0"]).__name__} == \
        {"EngineModule"}
    mode = {"control_mode": 2} if net else {}
    for options in (dict(controlnet_conditioning_scale=0.7, control_guidance_end=0.6),
                    dict(negative_prompt="blue", true_cfg_scale=3.0, height=128, width=192)):
        want, got = both(pipe, fast, control_image=PICTURES[0], max_sequence_length=512, **mode, **options)
        np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="height/width 256×256 is outside what the controlnet engine was built for"):
        fast("a red circle", control_image=PICTURES[0], height=256, width=256, max_sequence_length=512, **mode)
