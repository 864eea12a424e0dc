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
    with pytest.raises(ValueError, match="backend: a ControlNet pipeline runs on its PyTorch modules"):
        fastdiff.accelerate(pipe, backend="onnxruntime")
    with pytest.raises(ValueError, match="router: the pruned sub-networks take no ControlNet"):
        fastdiff.accelerate(pipe, router="shapes")
    with pytest.raises(ValueError, match="pipe: StableDiffusionControlNetPipeline has a ControlNet"):
        fastdiff.Stream(pipe)
