"""Inpainting pipelines through fastdiff.accelerate, against diffusers' own calls: UNets that read
the mask (9 channels) and plain ones whose known region is blended back after each step."""

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.architectures import tiny_inpaint_pipeline


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


IMAGE = torch.rand(1, 3, 64, 64, generator=gen(5))


def box(top, left):
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., top:top + 32, left:left + 32] = 1.0
    return mask


@pytest.mark.parametrize("family,reads_mask,scheduler,strength", [
    ("sd", True, "ddim", 1.0), ("sd", False, "euler", 0.7), ("sd", True, "lcm", 0.8), ("sd", False, "lcm", 1.0),
    ("sdxl", True, "ddim", 0.7), ("sdxl", False, "ddim", 1.0)])
def test_inpainting_matches_diffusers(family, reads_mask, scheduler, strength):
    """Strength 1 starts from pure noise, less from the noised image; LCM draws fresh noise each
    step (the generator's draws in the pipeline's order); two images per prompt from one mask."""
    pipe = tiny_inpaint_pipeline(family, reads_mask, scheduler=scheduler)
    args = dict(prompt=["a red circle", "a blue fox"], image=IMAGE, mask_image=box(16, 8), num_inference_steps=4,
                guidance_scale=4.0, strength=strength, num_images_per_prompt=2, output_type="np")
    expected = pipe(generator=gen(), **args).images
    fast = fastdiff.accelerate(pipe)
    np.testing.assert_allclose(fast(generator=gen(), **args).images, expected, atol=2e-5)
    moved = dict(args, mask_image=box(24, 30))   # the mask is read
    assert np.abs(fast(generator=gen(), **moved).images - expected).max() > 1e-2


def test_inpainting_takes_masked_latents_generators_and_step_callbacks():
    pipe = tiny_inpaint_pipeline("sd", reads_mask=False)
    fast = fastdiff.accelerate(pipe)
    args = dict(prompt="a red circle", image=IMAGE, mask_image=box(16, 8), num_inference_steps=3, output_type="np")
    gens = lambda: [gen(3), gen(4)]
    expected = pipe(generator=gens(), num_images_per_prompt=2, **args).images
    np.testing.assert_allclose(fast(generator=gens(), num_images_per_prompt=2, **args).images, expected, atol=2e-5)
    seen = []

    def record(p, i, t, tensors):   # a callback sees the latents after the blend, as the pipeline's does
        seen.append(tensors["latents"].clone())
        return {}
    plain = fast(generator=gen(), **args).images
    np.testing.assert_allclose(fast(generator=gen(), callback_on_step_end=record, **args).images, plain, atol=1e-6)
    assert len(seen) == 3
    masked = torch.randn(1, 4, 8, 8, generator=gen(9))
    reader = tiny_inpaint_pipeline("sd", reads_mask=True)
    given = dict(args, masked_image_latents=masked)
    np.testing.assert_allclose(fastdiff.accelerate(reader)(generator=gen(), **given).images,
                               reader(generator=gen(), **given).images, atol=2e-5)


def test_inpainting_inputs_are_checked():
    pipe = tiny_inpaint_pipeline("sd")
    fast = fastdiff.accelerate(pipe)
    base = dict(prompt="a red circle", image=IMAGE, mask_image=box(0, 0), num_inference_steps=2)
    bad = [(dict(mask_image=None), "mask_image is required by StableDiffusionInpaintPipeline"),
           (dict(mask_image="mask.png"), "mask_image must be an image"),
           (dict(padding_mask_crop=8), "padding_mask_crop: image must be a PIL image"),
           (dict(masked_image_latents=torch.zeros(1, 4, 4, 4)), r"masked_image_latents must be a tensor of shape \[n, 4, 8, 8\]"),
           (dict(mask_image=torch.zeros(3, 1, 64, 64), prompt=["a", "b"]), "mask_image has 3 masks for a batch of 2"),
           (dict(latents=torch.zeros(1, 4, 8, 8), strength=0.5), "latents: an inpainting call given its latents"),
           (dict(image=torch.zeros(1, 4, 8, 8)), "image: an inpainting call takes pictures, not latents")]
    for kwargs, named in bad:
        with pytest.raises(ValueError, match=named):
            fast(**{**base, **kwargs})
    with pytest.raises(ValueError, match="a Stream does not run an inpainting denoiser yet"):
        fastdiff.Stream(pipe)


def test_inpainting_unet_on_onnxruntime_engines(tmp_path):
    """The inpainting UNet's engine takes its nine channels: diffusers' images."""
    pytest.importorskip("onnxruntime")
    pipe = tiny_inpaint_pipeline("sd")
    fast = fastdiff.accelerate(pipe, backend="onnxruntime",
                               engine_options={"cache_dir": str(tmp_path), "threads": 1, "max_batch": 2,
                                               "components": ["denoiser"]})
    assert fast.denoiser.module.component.inputs[0].shape[1] == 9
    args = dict(prompt=["a red circle", "a blue fox"], image=IMAGE, mask_image=box(16, 8), num_inference_steps=3,
                guidance_scale=4.0, output_type="np")
    np.testing.assert_allclose(fast(generator=gen(), **args).images, pipe(generator=gen(), **args).images, atol=1e-4)


@pytest.mark.parametrize("reads_mask,strength", [(True, 1.0), (False, 0.7)])
def test_sd3_inpainting_matches_diffusers_latents(reads_mask, strength):
    """SD3's inpainting pipeline (33-channel transformer, or the plain one blended back): diffusers'
    latents. Its pictures differ by the VAE's shift, which diffusers' SD3 inpainting pipeline leaves
    out of its decode (its encode takes it off); fastdiff decodes as SD3's other pipelines do."""
    pipe = tiny_inpaint_pipeline("sd3", reads_mask)
    args = dict(prompt=["a red circle", "a blue fox"], image=IMAGE, mask_image=box(16, 8), num_inference_steps=3,
                guidance_scale=4.0, strength=strength, output_type="latent")
    expected = pipe(generator=gen(), **args).images
    fast = fastdiff.accelerate(pipe)
    torch.testing.assert_close(fast(generator=gen(), **args).images, expected, atol=2e-5, rtol=0)
    if reads_mask:   # given masked latents: SD3's pipeline shifts and scales them as it does its own
        given = dict(args, masked_image_latents=torch.randn(1, 16, 8, 8, generator=gen(9)))
        torch.testing.assert_close(fast(generator=gen(), **given).images, pipe(generator=gen(), **given).images,
                                   atol=2e-5, rtol=0)
    config = pipe.vae.config
    with torch.no_grad():
        decoded = pipe.vae.decode(expected / config.scaling_factor + config.shift_factor, return_dict=False)[0]
    pictures = pipe.image_processor.postprocess(decoded, output_type="np")
    np.testing.assert_allclose(fast(generator=gen(), **dict(args, output_type="np")).images, pictures, atol=2e-5)


def test_inpainting_crops_around_the_mask_and_pastes_back():
    """``padding_mask_crop``: the region around the mask (widened by the padding) is cut out, drawn at
    the model's size and pasted back into the picture given: diffusers' pictures, pixel for pixel."""
    from PIL import Image

    picture = Image.fromarray((np.random.RandomState(3).rand(96, 80, 3) * 255).astype("uint8"))
    cover = np.zeros((96, 80), dtype=np.uint8)
    cover[30:60, 20:44] = 255
    mask = Image.fromarray(cover)
    pipe = tiny_inpaint_pipeline("sd", reads_mask=False)
    args = dict(prompt=["a red circle", "a blue fox"], image=picture, mask_image=mask, num_inference_steps=3,
                guidance_scale=4.0, padding_mask_crop=4)
    expected = pipe(generator=gen(), **args).images
    got = fastdiff.accelerate(pipe)(generator=gen(), **args).images
    assert [g.size for g in got] == [(80, 96)] * 2
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(got[0])[:20], np.asarray(picture)[:20])   # far from the mask: kept
    fast = fastdiff.accelerate(pipe)
    for kwargs, named in ((dict(output_type="np"), "padding_mask_crop: output_type must be 'pil'"),
                          (dict(padding_mask_crop=-1), "padding_mask_crop"),
                          (dict(mask_image=torch.zeros(1, 1, 96, 80)), "padding_mask_crop: mask_image must be a PIL")):
        with pytest.raises(ValueError, match=named):
            fast(**{**args, **kwargs})
