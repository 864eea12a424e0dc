"""SD3 ControlNets (diffusers' StableDiffusion3ControlNetPipeline) through fastdiff.accelerate:
diffusers' own images for InstantX's nets and SD3.5's, one net or several, on engines too."""

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.architectures import tiny_controlnet_pipeline

ARGS = dict(prompt="a red circle", num_inference_steps=4, output_type="np")
rng = np.random.default_rng(0)
PICTURES = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(3)]


def both(pipe, fast, **kwargs):
    """(the pipeline's images, fastdiff's) of one call; the pipeline draws its control latents from
    torch's global generator, seeded alike before each."""
    args = {**ARGS, **kwargs}
    torch.manual_seed(5)
    want = pipe(generator=torch.Generator().manual_seed(0), **args).images
    torch.manual_seed(5)
    return want, fast(generator=torch.Generator().manual_seed(0), **args).images


@pytest.mark.parametrize("net, options", [
    (dict(), dict(control_image=PICTURES[0], controlnet_conditioning_scale=0.7)),
    (dict(zero_pooled=False), dict(control_image=PICTURES[:2], prompt=["a red circle", "a blue square"],
                                   num_images_per_prompt=2, negative_prompt="green", control_guidance_end=0.5)),
    (dict(), dict(control_image=torch.rand(1, 3, 64, 96) * 2 - 1, guidance_scale=1.0, height=64, width=96)),
    (dict(nets=2), dict(control_image=PICTURES[:2], controlnet_conditioning_scale=[0.5, 1.0],
                        control_guidance_start=[0.0, 0.5])),
])
def test_sd3_controlnet_is_diffusers(net, options):
    """Each kind of net gives diffusers' images, and the control picture acts."""
    pipe = tiny_controlnet_pipeline("sd3", **net)
    fast = fastdiff.accelerate(pipe)
    want, got = both(pipe, fast, **options)
    np.testing.assert_allclose(got, want, atol=1e-5)
    image = options["control_image"]
    other = dict(options, control_image=[PICTURES[2]] * len(image) if isinstance(image, list) else
                 torch.zeros_like(image) if isinstance(image, torch.Tensor) else PICTURES[2])
    assert np.abs(both(pipe, fast, **other)[1] - got).max() > 1e-3


def test_sd35_controlnet_without_prompt_tokens_is_diffusers():
    """SD3.5's large nets read no prompt tokens and take the transformer's patch embedding."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    base = tiny_controlnet_pipeline("sd3", zero_pooled=False)
    config = {k: v for k, v in base.controlnet.config.items() if not k.startswith("_")}
    torch.manual_seed(3)
    net = SD3ControlNetModel.from_config({**config, "joint_attention_dim": None, "use_pos_embed": False}).eval()
    with torch.no_grad():
        for layer in [*net.controlnet_blocks, net.pos_embed_input.proj]:
            torch.nn.init.normal_(layer.weight, std=0.3)
    pipe = StableDiffusion3ControlNetPipeline(**{**base.components, "controlnet": net})
    want, got = both(pipe, fastdiff.accelerate(pipe), control_image=PICTURES[0])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_sd3_controlnet_bad_input_is_refused():
    pipe = tiny_controlnet_pipeline("sd3", nets=2)
    fast = fastdiff.accelerate(pipe)
    call = dict(ARGS, num_inference_steps=1)
    with pytest.raises(ValueError, match="control_image is required by StableDiffusion3ControlNetPipeline"):
        fast(**call)
    with pytest.raises(ValueError, match="2 ControlNets take a list of 2 control images"):
        fast(control_image=PICTURES[0], **call)
    with pytest.raises(ValueError, match="controlnet_conditioning_scale: 3 values for 2 ControlNets"):
        fast(control_image=PICTURES[:2], controlnet_conditioning_scale=[1, 1, 1], **call)
    with pytest.raises(TypeError, match="does not take \\['control_mode'\\]"):
        fast(control_image=PICTURES[:2], control_mode=1, **call)
    with pytest.raises(ValueError, match="a Stream does not run StableDiffusion3ControlNetPipeline's ControlNets yet"):
        fastdiff.Stream(pipe)


def test_sd3_controlnets_on_onnxruntime_engines(tmp_path):
    """The transformer's engine takes the nets' summed block samples as inputs, each net an engine
    of its own (its scale applied to its outputs): diffusers' images with guidance's rows."""
    pytest.importorskip("onnxruntime")
    pipe = tiny_controlnet_pipeline("sd3", nets=2, zero_pooled=False)
    fast = fastdiff.accelerate(pipe, backend="onnxruntime", engine_options={
        "cache_dir": str(tmp_path), "threads": 1, "max_batch": 1, "components": ["denoiser"]})
    assert {type(m).__name__ for m in (fast.denoiser.module, *fast.denoiser.side_runners.values())} == {"EngineModule"}
    assert len(fast.denoiser.side_runners) == 2
    want, got = both(pipe, fast, control_image=PICTURES[:2], negative_prompt="blue",
                     controlnet_conditioning_scale=[1.0, 0.5], control_guidance_start=[0.0, 0.4])
    np.testing.assert_allclose(got, want, atol=1e-4)
