"""A stream's other prompts and size conditioning (prompt_2, clip_skip, SDXL's sizes), as diffusers
takes them, at prepare and at run time."""

import pytest
import torch

import fastdiff
from fastdiff.architectures import tiny_sd_pipeline, tiny_sdxl_pipeline
from fastdiff.denoiser import denoiser_for

FRAMES = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]


def run(pipe, update=None, prompt="a red circle", **prepare):
    stream = fastdiff.Stream(pipe, steps=[20, 40], cfg="self", guidance_scale=1.5)
    stream.prepare(prompt, **prepare)
    if update:
        stream.update(**update)
    outs = [stream(f) for f in FRAMES]
    return stream, torch.stack([o for o in outs if o is not None] + stream.flush())


def test_sdxl_stream_takes_prompt_2_and_size_conditioning():
    pipe = tiny_sdxl_pipeline(scheduler="lcm", img2img=True)
    _, plain = run(pipe)
    # prompt_2 reaches the second text encoder as diffusers encodes it
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt("a red circle", prompt_2="a blue square on white",
                                                             device="cpu", do_classifier_free_guidance=True)
    _, by_hand = run(pipe, prompt=None, prompt_embeds=cond, pooled_prompt_embeds=pooled)
    _, second = run(pipe, prompt_2="a blue square on white")
    torch.testing.assert_close(second, by_hand)
    assert (second - plain).abs().max() > 1e-3
    # size conditioning: the rows' time ids as the img2img pipeline class lays them out
    stream, sized = run(pipe, original_size=(128, 96), target_size=(64, 48), crops_coords_top_left=(4, 0))
    assert stream.latents.cond.extras["time_ids"][0].tolist() == [128, 96, 4, 0, 64, 48]
    assert (sized - plain).abs().max() > 1e-3
    # at run time: the same as a stream prepared with them (kept through other changes)
    _, changed = run(pipe, update=dict(prompt_2="a blue square on white"))
    torch.testing.assert_close(changed, second)
    stream, _ = run(pipe, prompt_2="a blue square on white", update=dict(guidance_scale=1.2, target_size=(64, 48)))
    assert stream._text == {"prompt_2": "a blue square on white", "target_size": (64, 48)}


def test_sd_stream_takes_clip_skip():
    pipe = tiny_sd_pipeline(scheduler="lcm", img2img=True)
    cond, _ = denoiser_for(pipe).encode_prompt(["a red circle"], None, 64, 64, options={"clip_skip": 1})
    _, by_hand = run(pipe, prompt=None, prompt_embeds=cond.embeds)
    _, skipped = run(pipe, clip_skip=1)
    torch.testing.assert_close(skipped, by_hand)
    assert (skipped - run(pipe)[1]).abs().max() > 1e-3


def test_stream_prompt_options_are_checked():
    sd = fastdiff.Stream(tiny_sd_pipeline(img2img=True))
    with pytest.raises(TypeError, match=r"Stream.prepare\(\) got \['prompt_2'\], which StableDiffusionImg2ImgPipeline"):
        sd.prepare("a red circle", prompt_2="a fox")
    with pytest.raises(ValueError, match="clip_skip"):
        sd.prepare("a red circle", clip_skip=99)
    sdxl = fastdiff.Stream(tiny_sdxl_pipeline(img2img=True))
    with pytest.raises(ValueError, match="target_size must be a pair of whole numbers"):
        sdxl.prepare("a red circle", target_size="big")
    sdxl.prepare("a red circle")
    with pytest.raises(TypeError, match=r"Stream.update\(\) got \['colour'\]"):
        sdxl.update(colour="red")
    with pytest.raises(ValueError, match="original_size"):
        sdxl.update(original_size=(0, 64))
    assert sdxl._text == {}   # a refused change leaves the stream as it was
