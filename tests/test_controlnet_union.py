"""SDXL's Union ControlNets (ControlNet++: diffusers' StableDiffusionXLControlNetUnion[Img2Img]Pipeline)
through fastdiff.accelerate: diffusers' own images for one Union net reading one picture or several
(each of its kind of control, weighed by its scale inside the net), and for several Union nets."""

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
    args = {**ARGS, **kwargs}
    return (pipe(generator=torch.Generator().manual_seed(0), **args).images,
            fast(generator=torch.Generator().manual_seed(0), **args).images)


@pytest.mark.parametrize("net, options", [
    (dict(), dict(control_image=PICTURES[0], control_mode=1)),
    (dict(), dict(control_image=PICTURES[:2], control_mode=[1, 3], controlnet_conditioning_scale=[0.8, 0.5],
                  control_guidance_end=[1.0, 0.5], negative_prompt="blue", num_images_per_prompt=2)),
    (dict(nets=2), dict(control_image=PICTURES[:2], control_mode=[1, 3], controlnet_conditioning_scale=[0.8, 0.5],
                        control_guidance_start=[0.0, 0.5])),
    (dict(img2img=True), dict(image=PICTURES[2], control_image=PICTURES[:2], control_mode=[1, 3], strength=0.7)),
])
def test_union_controlnet_is_diffusers(net, options):
    """Each layout gives diffusers' images, and the kind of control acts: another mode draws another image."""
    pipe = tiny_controlnet_pipeline("sdxl", union=True, **net)
    fast = fastdiff.accelerate(pipe)
    want, got = both(pipe, fast, **options)
    np.testing.assert_allclose(got, want, atol=1e-5)
    modes = options["control_mode"]
    other = dict(options, control_mode=[2] * len(modes) if isinstance(modes, list) else 2)
    assert np.abs(both(pipe, fast, **other)[1] - got).max() > 1e-3


def test_union_controlnet_bad_input_is_refused(tmp_path):
    pipe = tiny_controlnet_pipeline("sdxl", union=True)
    fast = fastdiff.accelerate(pipe)
    call = dict(ARGS, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"control_mode is required by a Union ControlNet: an int in \[0, 6\)"):
        fast(control_image=PICTURES[0], **call)
    with pytest.raises(ValueError, match=r"control_mode is required by a Union ControlNet: an int in \[0, 6\)"):
        fast(control_image=PICTURES[0], control_mode=6, **call)
    with pytest.raises(ValueError, match="control_mode: 1 modes for 2 control images"):
        fast(control_image=PICTURES[:2], control_mode=[1], **call)
    with pytest.raises(ValueError, match="backend: SDXL's Union ControlNets run on the PyTorch modules"):
        fastdiff.accelerate(pipe, backend="onnxruntime", engine_options={"cache_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="control_mode is required by a Union ControlNet"):
        fastdiff.Stream(pipe)


def test_a_union_stream_keeps_each_frames_pictures():
    """A Union net's stream: each frame's pictures (one per kind of control) stay with it through its
    steps — every output is the one that frame gets alone in a fresh stream — and the kinds act."""
    pipe = tiny_controlnet_pipeline("sdxl", union=True, img2img=True, scheduler="lcm")
    make = lambda mode=(1, 3): fastdiff.Stream(pipe, steps=[20, 40], cfg="none", control_mode=list(mode))
    frames = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    controls = [[PICTURES[k % 3], PICTURES[(k + 1) % 3]] for k in range(3)]

    def outputs(stream, frames, controls):
        stream.prepare("a red circle")
        outs = [stream(f, control_image=c) for f, c in zip(frames, controls)]
        return [o for o in outs if o is not None] + stream.flush()
    outs = outputs(make(), frames, controls)
    assert len(outs) == 3
    for frame, control, out in zip(frames, controls, outs):
        torch.testing.assert_close(outputs(make(), [frame], [control])[0], out, atol=1e-4, rtol=0)   # batched or alone
    assert (outputs(make((2, 3)), frames[:1], controls[:1])[0] - outs[0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="control_mode: 1 modes for 2 control images"):
        fastdiff.Stream(tiny_controlnet_pipeline("sdxl", union=True, nets=2), control_mode=[1])
    with pytest.raises(ValueError, match="2 ControlNets take a list of 2 control images"):
        make().prepare("a red circle", control_image=PICTURES[0])
    with pytest.raises(ValueError, match="control_mode: StableDiffusionXLControlNetPipeline's ControlNets are no Union"):
        fastdiff.Stream(tiny_controlnet_pipeline("sdxl"), control_mode=1)
