"""fastdiff.accelerate(pipe) against the diffusers pipeline it wraps."""

import os

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

import fastdiff
from fastdiff.architectures import tiny_sd_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(pipe, seed=1, **kwargs):
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


@pytest.fixture(scope="module")
def txt2img():
    pipe = tiny_sd_pipeline(scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "lcm"])
@pytest.mark.parametrize("guidance_scale", [1.0, 6.0])
def test_txt2img_matches_diffusers(scheduler, guidance_scale):
    """Same seed, scheduler and steps: full CFG (g > 1) and no CFG give diffusers' own images —
    LCM's re-noising included, as its noise is drawn in the pipeline's order."""
    pipe = tiny_sd_pipeline(scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt=["a red circle", "a blue fox"], num_inference_steps=5, guidance_scale=guidance_scale,
                num_images_per_prompt=2, negative_prompt=["dark", "bright"])
    expected = run(pipe, **args)
    got = run(fastdiff.accelerate(pipe), **args)
    assert got.shape == expected.shape == (4, 64, 64, 3)
    assert expected.std() > 0.01           # a real picture, not a constant
    np.testing.assert_allclose(got, expected, atol=2e-5)


@pytest.mark.parametrize("scheduler,eta", [("tcd", 0.3), ("tcd", 0.0), ("ddim", 0.5)])
def test_stochastic_steps_match_diffusers(scheduler, eta):
    """TCD's gamma and DDIM's η put fresh noise back each step; drawn in the pipeline's order, the
    images are diffusers' own."""
    pipe = tiny_sd_pipeline(scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt=["a red circle", "a blue fox"], num_inference_steps=4, guidance_scale=3.0, eta=eta)
    expected = run(pipe, **args)
    np.testing.assert_allclose(run(fastdiff.accelerate(pipe), **args), expected, atol=2e-5)
    if eta:   # and the noise matters: another seed, another picture
        assert np.abs(run(pipe, seed=2, **args) - expected).max() > 1e-3


def test_guidance_rescale_matches_diffusers():
    pipe = tiny_sd_pipeline(scheduler="ddim", prediction_type="v_prediction")
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt=["a red circle", "a blue fox"], num_inference_steps=5, guidance_scale=7.0)
    plain = run(pipe, **args)
    expected = run(pipe, guidance_rescale=0.7, **args)
    assert np.abs(plain - expected).max() > 1e-4   # the rescale changes the picture
    np.testing.assert_allclose(run(fastdiff.accelerate(pipe), guidance_rescale=0.7, **args), expected, atol=2e-5)
    with pytest.raises(ValueError, match="guidance_rescale"):
        fastdiff.accelerate(pipe, cfg="self")(guidance_rescale=0.7, **args)


def test_guidance_changes_the_image(txt2img):
    fast = fastdiff.accelerate(txt2img)
    a = run(fast, prompt="a red circle", num_inference_steps=4, guidance_scale=1.0)
    b = run(fast, prompt="a red circle", num_inference_steps=4, guidance_scale=8.0)
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_img2img_matches_diffusers(scheduler):
    pipe = tiny_sd_pipeline(scheduler=scheduler, img2img=True)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    args = dict(prompt="a red circle", image=image, num_inference_steps=10, strength=0.6, guidance_scale=4.0)
    np.testing.assert_allclose(run(fastdiff.accelerate(pipe), **args), run(pipe, **args), atol=2e-5)
    with pytest.raises(ValueError, match="latents: StableDiffusionImg2ImgPipeline takes no latents"):
        run(fastdiff.accelerate(pipe), latents=torch.randn(1, 4, 8, 8), **args)


@pytest.mark.parametrize("prompts,images,per_prompt,generators", [(2, 1, 1, False), (1, 1, 2, False), (2, 2, 2, False),
                                                                   (2, 1, 1, True)])
def test_img2img_batches_match_diffusers(prompts, images, per_prompt, generators):
    """Fewer images than the batch: encoded once and repeated whole, as diffusers does (one
    generator per image: repeated first, each encoded with its own)."""
    pipe = tiny_sd_pipeline(img2img=True)
    batch = prompts * per_prompt
    args = dict(prompt=["a red circle", "a blue fox"][:prompts], num_inference_steps=3, guidance_scale=4.0,
                image=torch.rand(images, 3, 64, 64, generator=torch.Generator().manual_seed(5)),
                num_images_per_prompt=per_prompt, output_type="np")
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(batch)] if generators \
        else torch.Generator().manual_seed(1)
    expected = pipe(generator=gens(), **args).images
    assert expected.shape[0] == batch
    np.testing.assert_allclose(fastdiff.accelerate(pipe)(generator=gens(), **args).images, expected, atol=2e-5)
    if prompts == 2 and images == 1:
        with pytest.raises(ValueError, match="image has 3 images for a batch of 2"):
            fastdiff.accelerate(pipe)(**dict(args, image=torch.rand(3, 3, 64, 64)))


def test_output_types_and_dataclass(txt2img):
    fast = fastdiff.accelerate(txt2img)
    out = fast("a red circle", num_inference_steps=2)
    assert isinstance(out, StableDiffusionPipelineOutput)
    assert out.images[0].size == (64, 64)
    pt = fast("a red circle", num_inference_steps=2, output_type="pt").images
    assert pt.shape == (1, 3, 64, 64) and 0 <= pt.min() and pt.max() <= 1
    latents = fast("a red circle", num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8)
    images, nsfw = fast("a red circle", num_inference_steps=2, output_type="np", return_dict=False)
    assert images.shape == (1, 64, 64, 3) and nsfw is None


def test_user_latents_match_diffusers(txt2img):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    args = dict(prompt="a blue square", num_inference_steps=3, latents=latents, guidance_scale=3.0)
    np.testing.assert_allclose(run(fastdiff.accelerate(txt2img), **args), run(txt2img, **args), atol=2e-5)


def test_residual_cfg_runs_n_rows(txt2img):
    fast = fastdiff.accelerate(txt2img, cfg="self")
    rows = []
    unet_forward = txt2img.unet.forward
    handle = txt2img.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        image = run(fast, prompt="a red circle", num_inference_steps=4, guidance_scale=3.0)
    finally:
        handle.remove()
    assert rows == [1, 1, 1, 1]            # 4 steps, 1 row each: no unconditional pass
    assert np.isfinite(image).all()
    assert txt2img.unet.forward == unet_forward


def test_unsupported_pipeline_and_arguments(txt2img):
    class NotAPipeline:
        pass

    with pytest.raises(ValueError, match="pipe: NotAPipeline is not supported.*StableDiffusionPipeline"):
        fastdiff.accelerate(NotAPipeline())
    fast = fastdiff.accelerate(txt2img)
    with pytest.raises(TypeError, match="callback_steps"):   # diffusers' deprecated callbacks
        fast("a red circle", callback=print, callback_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        fast("a red circle", output_type="gif")
    with pytest.raises(ValueError, match="prompt must not be empty"):
        fast("  ")
    with pytest.raises(ValueError, match="image is not an argument"):
        fast("a red circle", image=torch.rand(1, 3, 64, 64))
    with pytest.raises(ValueError, match="cfg must be one of"):
        fastdiff.accelerate(txt2img, cfg="double")
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        fast("a red circle", num_images_per_prompt=0)


def test_bad_call_arguments_are_named_before_anything_runs(txt2img):
    fast = fastdiff.accelerate(txt2img)
    bad = [(dict(num_inference_steps="4"), "num_inference_steps"), (dict(num_inference_steps=2.0), "num_inference_steps"),
           (dict(num_inference_steps=True), "num_inference_steps"), (dict(num_inference_steps=0), "num_inference_steps"),
           (dict(guidance_scale="7"), "guidance_scale"), (dict(guidance_scale=True), "guidance_scale"),
           (dict(guidance_rescale="x"), "guidance_rescale"), (dict(eta="x"), "eta"), (dict(eta=True), "eta"),
           (dict(strength=0.5), "strength applies to img2img"), (dict(height=0), "height"), (dict(width=0), "width"),
           (dict(latents=np.zeros((1, 4, 8, 8))), "latents must be a torch.Tensor"),
           (dict(generator=5), "generator must be"), (dict(generator=[torch.Generator()] * 3), "generator: 3")]
    for kwargs, named in bad:
        with pytest.raises(ValueError, match=named):
            fast("a red circle", **{"num_inference_steps": 2, **kwargs})
    args = dict(prompt=["a red circle", "a blue fox"], num_inference_steps=2)   # one generator per image, as diffusers
    expected = txt2img(**args, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="np").images
    got = fast(**args, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="np").images
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_custom_pipeline_files_load_from_a_saved_pipeline(tmp_path, txt2img):
    txt2img.save_pretrained(tmp_path)
    for name, kwargs in (("fastdiff_txt2img", {}),
                         ("fastdiff_img2img", {"image": torch.rand(1, 3, 64, 64), "strength": 0.5})):
        custom = DiffusionPipeline.from_pretrained(
            tmp_path, custom_pipeline=os.path.join(REPO, "pipelines", f"{name}.py"), trust_remote_code=True)
        custom.set_progress_bar_config(disable=True)
        out = run(custom, prompt="a red circle", num_inference_steps=4, **kwargs)
        assert out.shape == (1, 64, 64, 3)
        base = type(custom).__mro__[1]
        plain = base(**custom.components)
        plain.set_progress_bar_config(disable=True)
        np.testing.assert_allclose(out, run(plain, prompt="a red circle", num_inference_steps=4, **kwargs), atol=2e-5)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
@pytest.mark.parametrize("img2img", [False, True])
def test_sdxl_and_sd3_match_diffusers(family, img2img):
    """SDXL's added conditions and SD3's flow-matching transformer (σ = 1 first step included)."""
    from fastdiff.architectures import tiny_sd3_pipeline, tiny_sdxl_pipeline

    pipe = (tiny_sdxl_pipeline if family == "sdxl" else tiny_sd3_pipeline)(img2img=img2img)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=4.0)
    if img2img:
        args.update(image=torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)), strength=0.7)
    expected = run(pipe, **args)
    assert expected.std() > 0.01
    np.testing.assert_allclose(run(fastdiff.accelerate(pipe), **args), expected, atol=2e-5)
    assert np.isfinite(run(fastdiff.accelerate(pipe, cfg="self"), **args)).all()
    if img2img:   # given latents are the first step's, noised already: the image is not read
        args["latents"] = torch.randn((1, 4 if family == "sdxl" else 16, 8, 8), generator=torch.Generator().manual_seed(4))
        np.testing.assert_allclose(run(fastdiff.accelerate(pipe), **args), run(pipe, **args), atol=2e-5)


@pytest.mark.parametrize("family,img2img", [("sd", False), ("sd", True), ("sdxl", True), ("sd3", False),
                                            ("sd3", True)])
def test_sigmas_and_img2img_timesteps_match_diffusers(family, img2img):
    """Custom sigmas as diffusers takes them (Euler's list ends with the terminal σ, flow matching's
    does not, and SD3's are shifted), and img2img's strength cutting them — and custom timesteps —
    as the pipelines do."""
    from fastdiff.architectures import tiny_sd3_pipeline, tiny_sdxl_pipeline

    make = {"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline}.get(family)
    pipe = make(scheduler="euler", img2img=img2img) if make else tiny_sd3_pipeline(img2img=img2img)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a red circle", guidance_scale=4.0,
                sigmas=[1.0, 0.8, 0.55, 0.3] if family == "sd3" else [14.6, 6.0, 2.5, 0.9, 0.3, 0.0])
    if img2img:
        args.update(image=torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)), strength=0.5)
    expected = run(pipe, **args)
    assert expected.std() > 0.01
    np.testing.assert_allclose(run(fastdiff.accelerate(pipe), **args), expected, atol=2e-5)
    if family == "sd":
        assert np.abs(run(pipe, **{**args, "sigmas": [14.6, 3.0, 0.0]}) - expected).max() > 1e-3   # they matter
    if img2img and family != "sd3":   # SD3's pipelines take no timesteps
        args = dict(args, timesteps=[999, 749, 499, 249], sigmas=None)
        np.testing.assert_allclose(run(fastdiff.accelerate(pipe), **args), run(pipe, **args), atol=2e-5)


@pytest.mark.parametrize("scheduler", ["euler", "lcm"])
def test_sdxl_base_and_refiner_hand_over_as_diffusers(scheduler):
    """SDXL's ensemble of experts: the base stops at denoising_end and returns noisy latents (Euler's
    σ-scaled, as the pipeline holds them); the refiner takes them as its image and goes on from
    denoising_start without new noise. Each equals diffusers' own, and latents as an img2img image
    work without the hand-over too."""
    from fastdiff.architectures import tiny_sdxl_pipeline

    base, refiner = tiny_sdxl_pipeline(scheduler=scheduler), tiny_sdxl_pipeline(scheduler=scheduler, img2img=True, seed=1)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    args = dict(prompt="a red circle", num_inference_steps=10, guidance_scale=4.0)
    latent = lambda pipe: pipe(generator=torch.Generator().manual_seed(1), denoising_end=0.7, output_type="latent",
                               **args).images
    handed = latent(base)
    torch.testing.assert_close(latent(fastdiff.accelerate(base)), handed, atol=1e-4, rtol=1e-5)
    assert handed.std() > 1.0   # still noisy: the base stopped part-way
    for kwargs in (dict(denoising_start=0.7), dict(strength=0.5)):
        expected = run(refiner, image=handed, **kwargs, **args)
        assert expected.std() > 0.01
        np.testing.assert_allclose(run(fastdiff.accelerate(refiner), image=handed, **kwargs, **args), expected, atol=2e-5)
    fast = fastdiff.accelerate(refiner)
    for kwargs, error, named in ((dict(denoising_start=1.5), ValueError, "denoising_start"),
                                 (dict(denoising_start=0.8, denoising_end=0.6), ValueError, "must be below"),
                                 (dict(denoising_start=0.9999), ValueError, "denoising_start leaves no step")):
        with pytest.raises(error, match=named):
            fast(image=handed, **kwargs, **args)
    with pytest.raises(TypeError, match="denoising_start"):   # SDXL img2img's only
        fastdiff.accelerate(base)(denoising_start=0.5, **args)
    with pytest.raises(TypeError, match="denoising_end"):
        fastdiff.accelerate(tiny_sd_pipeline())(denoising_end=0.5, **args)
    with pytest.raises(ValueError, match="denoising_end: this pipeline was wrapped with steps"):
        fastdiff.accelerate(base, steps=[0, 5])(denoising_end=0.5, **args)


@pytest.mark.parametrize("kind", ["sdxl", "sdxl-img2img", "sdxl-refiner", "sd3"])
def test_other_prompts_and_size_conditioning_match_diffusers(kind):
    """SDXL's and SD3's prompts for their other text encoders, SDXL's size and crop conditioning
    (each pipeline class's own rules for the negative side) and the refiner's aesthetic scores."""
    from fastdiff.architectures import tiny_sd3_pipeline, tiny_sdxl_pipeline

    pipe = {"sdxl": lambda: tiny_sdxl_pipeline(), "sdxl-img2img": lambda: tiny_sdxl_pipeline(img2img=True),
            "sdxl-refiner": lambda: tiny_sdxl_pipeline(refiner=True), "sd3": tiny_sd3_pipeline}[kind]()
    pipe.set_progress_bar_config(disable=True)
    base = dict(prompt=["a red circle", "a blue fox"], num_inference_steps=3, guidance_scale=4.0)
    if kind != "sdxl" and kind != "sd3":
        base.update(image=torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(8)), strength=0.7)
    if kind == "sd3":
        variants = [dict(prompt_2=["a green square", "x"], prompt_3=["y", "z"], negative_prompt_2=["dark", "light"]),
                    dict(max_sequence_length=64)]
    else:   # (the refiner's one text encoder reads `prompt`: diffusers passes it no prompt_2)
        variants = [] if kind == "sdxl-refiner" else [dict(prompt_2=["a green square", "x"],
                                                           negative_prompt_2=["dark", "light"])]
        variants += [
                    dict(original_size=(128, 96), crops_coords_top_left=(4, 8), negative_original_size=(32, 32),
                         negative_crops_coords_top_left=(2, 2),
                         **({"aesthetic_score": 3.0} if kind == "sdxl-refiner" else {"negative_target_size": (48, 64)}))]
    for extra in variants:
        # one prompt with negative sizes: SDXL's txt2img pipeline gives a batch's rows its negative
        # and positive size ids in turn, not by side (fastdiff gives each side its own)
        call = dict(base, prompt="a red circle") if "negative_original_size" in extra else base
        expected = run(pipe, **call, **extra)
        assert np.abs(expected - run(pipe, **call)).max() > 1e-3   # they change the picture
        np.testing.assert_allclose(run(fastdiff.accelerate(pipe), **call, **extra), expected, atol=2e-5)
    fast = fastdiff.accelerate(pipe)
    with pytest.raises(ValueError, match="prompt_2 must be one string or 2"):
        fast(**base, prompt_2=["a", "b", "c"])
    if kind == "sd3":
        with pytest.raises(ValueError, match="max_sequence_length must be an integer in"):
            fast(**base, max_sequence_length=600)
    if kind != "sd3":
        for bad, named in ((dict(original_size=(0, 64)), "original_size must be a pair"),
                           (dict(crops_coords_top_left="0,0"), "crops_coords_top_left must be a pair")):
            with pytest.raises(ValueError, match=named):
                fast(**base, **bad)


def test_other_prompts_belong_to_their_families(txt2img):
    with pytest.raises(TypeError, match="prompt_2"):   # SD 1.x has one text encoder
        fastdiff.accelerate(txt2img)("a red circle", prompt_2="a blue fox")
    from fastdiff.architectures import tiny_sdxl_pipeline

    with pytest.raises(TypeError, match="aesthetic_score"):   # the img2img (refiner) pipeline's
        fastdiff.accelerate(tiny_sdxl_pipeline())("a red circle", aesthetic_score=6.0)


def test_clip_skip_reads_an_earlier_text_layer(txt2img):
    """SD's prompt from the text encoder's layer before the last (its final norm applied; the
    negative prompt's as usual), as diffusers computes it — whose own SD path can't run with
    transformers 5's CLIPTextModel; SDXL's against diffusers' own call."""
    from fastdiff.architectures import tiny_sdxl_pipeline

    te, args = txt2img.text_encoder, dict(num_inference_steps=3, guidance_scale=4.0)
    ids = txt2img.tokenizer(["a red circle"], padding="max_length", max_length=txt2img.tokenizer.model_max_length,
                            return_tensors="pt").input_ids
    with torch.no_grad():
        skipped = te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])
        negative = txt2img.encode_prompt("", "cpu", 1, False)[0]
    expected = run(txt2img, prompt_embeds=skipped, negative_prompt_embeds=negative, **args)
    got = run(fastdiff.accelerate(txt2img), prompt="a red circle", clip_skip=1, **args)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert np.abs(got - run(txt2img, prompt="a red circle", **args)).max() > 1e-3
    assert not hasattr(te, "text_model") and not any("text_model" in k for k in te.state_dict())   # left as it was
    sdxl = tiny_sdxl_pipeline()
    np.testing.assert_allclose(run(fastdiff.accelerate(sdxl), prompt="a red circle", clip_skip=1, **args),
                               run(sdxl, prompt="a red circle", clip_skip=1, **args), atol=2e-5)
    for bad in (-1, 3, 1.5):   # the tiny encoder has 2 layers
        with pytest.raises(ValueError, match="clip_skip must be an integer"):
            fastdiff.accelerate(txt2img)("a red circle", clip_skip=bad, **args)


def test_bad_sigmas_are_named(txt2img):
    euler = tiny_sd_pipeline(scheduler="euler")
    fast = fastdiff.accelerate(euler)
    for sigmas, named in ((5.0, "sigmas must be a list"), (["a"], "sigmas must be numbers"), ([], "at least one"),
                          ([3.0, -1.0], "non-negative"), ([3.0, float("nan")], "non-negative"),
                          ([1.0, 2.0], "decreasing"), ([1.0], "no step")):
        with pytest.raises(ValueError, match=named):
            fast("a red circle", sigmas=sigmas)
    with pytest.raises(ValueError, match="give timesteps or sigmas"):
        fast("a red circle", sigmas=[3.0, 0.0], timesteps=[999])
    with pytest.raises(ValueError, match="sigmas: DDIMScheduler.set_timesteps takes no custom sigmas"):
        fastdiff.accelerate(txt2img)("a red circle", sigmas=[3.0, 0.0])


def test_steps_index_each_calls_schedule(txt2img):
    """``steps`` (the stream's t_index_list) for every call: all indices are the pipeline's own call;
    for img2img, the first one sets the strength, as explicit timesteps at strength 1 do."""
    args = dict(prompt="a red circle", num_inference_steps=4, guidance_scale=3.0)
    np.testing.assert_allclose(run(fastdiff.accelerate(txt2img, steps=[0, 1, 2, 3]), **args), run(txt2img, **args),
                               atol=2e-5)
    pipe = tiny_sd_pipeline(scheduler="lcm", img2img=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    fast = fastdiff.accelerate(pipe, steps=[32, 45], cfg="self")
    pipe.scheduler.set_timesteps(50)
    chosen = [int(pipe.scheduler.timesteps[i]) for i in (32, 45)]
    got = run(fast, prompt="a red circle", image=image, guidance_scale=1.4)
    same = run(fastdiff.accelerate(pipe, cfg="self"), prompt="a red circle", image=image, guidance_scale=1.4,
               timesteps=chosen, strength=1.0)
    assert got.std() > 0.01
    np.testing.assert_array_equal(got, same)
    for kwargs, named in ((dict(strength=0.5), "strength: this pipeline was wrapped with steps"),
                          (dict(timesteps=chosen), "timesteps: this pipeline"), (dict(sigmas=[3.0, 0.0]), "sigmas: this"),
                          (dict(num_inference_steps=40), "steps must lie in \\[0, 40\\)")):
        with pytest.raises(ValueError, match=named):
            fast("a red circle", image=image, **kwargs)
    for steps, named in (([45, 32], "increasing"), ([-1, 3], "negative"), ("32", "schedule file"), (32, "list of step indices"),
                         ([1.5], "integers")):
        with pytest.raises(ValueError, match=named):
            fastdiff.accelerate(pipe, steps=steps)
    with pytest.raises(ValueError, match="not both"):
        fastdiff.accelerate(txt2img, steps=[0, 2], schedule="x.json")


def test_prompt_embeds_give_the_images_of_the_prompts_they_encode(txt2img):
    """Embeddings made elsewhere (e.g. weighted prompts) instead of prompts, as diffusers takes them:
    the same images as the prompts, and as the pipeline given the same embeddings."""
    prompts, negatives = ["a red circle", "a blue fox"], ["dark", "bright"]
    cond, uncond = txt2img.encode_prompt(prompts, "cpu", 1, True, negatives)
    args = dict(num_inference_steps=3, guidance_scale=6.0, num_images_per_prompt=2)
    fast = fastdiff.accelerate(txt2img)
    by_text = run(fast, prompt=prompts, negative_prompt=negatives, **args)
    by_embeds = run(fast, prompt_embeds=cond, negative_prompt_embeds=uncond, **args)
    assert by_text.std() > 0.01
    np.testing.assert_array_equal(by_embeds, by_text)
    np.testing.assert_allclose(by_embeds, run(txt2img, prompt_embeds=cond, negative_prompt_embeds=uncond, **args),
                               atol=2e-5)
    # prompt embeddings with text negatives, and alone (the empty prompt's row as the unconditional)
    np.testing.assert_array_equal(run(fast, prompt_embeds=cond, negative_prompt=negatives, **args), by_text)
    np.testing.assert_allclose(run(fast, prompt_embeds=cond, **args), run(txt2img, prompt_embeds=cond, **args),
                               atol=2e-5)


@pytest.mark.parametrize("scheduler", ["ddim", "lcm", "euler"])
def test_step_end_callback_sees_and_changes_the_latents_as_in_diffusers(scheduler):
    """Euler's latents are k-diffusion's x0 + σ·ε, the stream's α·x0 + β·ε: the callback sees the pipeline's."""
    pipe = tiny_sd_pipeline(scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def recorder(seen, stop_at=None):
        def callback(p, i, t, kwargs):
            seen.append((i, float(t), kwargs["latents"].clone(), p.num_timesteps))
            if stop_at is not None and i == stop_at:
                p._interrupt = True
            return {"latents": kwargs["latents"] * 0.9} if i == 1 else {}   # changed once, mid-way
        return callback

    args = dict(prompt=["a red circle", "a blue fox"], num_inference_steps=4, guidance_scale=6.0)
    ours, theirs = [], []
    got = run(fastdiff.accelerate(pipe), callback_on_step_end=recorder(ours), **args)
    expected = run(pipe, callback_on_step_end=recorder(theirs), **args)
    assert [(i, t, n) for i, t, _, n in ours] == [(i, t, n) for i, t, _, n in theirs] and len(ours) == 4
    for (_, _, mine, _), (_, _, want, _) in zip(ours, theirs):
        torch.testing.assert_close(mine, want, atol=1e-4, rtol=1e-4)   # Euler's σ-scaled latents reach 15
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert np.abs(got - run(fastdiff.accelerate(pipe), **args)).max() > 1e-3   # the change took effect
    ours, theirs = [], []   # interrupted after the second step: the latents reached are decoded
    got = run(fastdiff.accelerate(pipe), callback_on_step_end=recorder(ours, stop_at=1), **args)
    expected = run(pipe, callback_on_step_end=recorder(theirs, stop_at=1), **args)
    assert len(ours) == len(theirs) == 2
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_a_calls_lora_scale_matches_diffusers():
    from peft import LoraConfig, inject_adapter_in_model

    pipe = tiny_sd_pipeline(scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]), pipe.text_encoder)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    args = dict(prompt=["a red circle", "a blue fox"], num_inference_steps=3, guidance_scale=5.0)
    fast = fastdiff.accelerate(pipe)
    full = run(fast, **args)
    for scale in (0.5, 0.0):
        got = run(fast, cross_attention_kwargs={"scale": scale}, **args)
        np.testing.assert_allclose(got, run(pipe, cross_attention_kwargs={"scale": scale}, **args), atol=2e-5)
        assert np.abs(got - full).max() > 1e-3   # the LoRA's share changed
    np.testing.assert_array_equal(run(fast, **args), full)   # and is back after the call
    for bad, named in [({"scale": "x"}, r"cross_attention_kwargs\['scale'\]"), ({"ip_adapter_masks": 1}, "only"),
                       ([0.5], "only")]:
        with pytest.raises(ValueError, match=named):
            fast(cross_attention_kwargs=bad, **args)


def test_bad_step_end_callbacks_are_named(txt2img):
    from diffusers.callbacks import SDCFGCutoffCallback

    fast = fastdiff.accelerate(txt2img)
    args = dict(prompt="a red circle", num_inference_steps=2)
    bad = [(dict(callback_on_step_end=5), "callback_on_step_end must be callable"),
           (dict(callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"]),
            "the latents only"),
           (dict(callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5)), "the latents only"),
           (dict(callback_on_step_end=lambda *a: None), "must return a dict"),
           (dict(callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"][..., :4]}), "latents of shape"),
           (dict(callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * float("nan")}), "NaN")]
    for kwargs, named in bad:
        with pytest.raises(ValueError, match=named):
            fast(**args, **kwargs)


def test_bad_prompt_embeds_are_named(txt2img):
    fast = fastdiff.accelerate(txt2img)
    cond = txt2img.encode_prompt(["a red circle"], "cpu", 1, False)[0]
    bad = [(dict(prompt="a red circle", prompt_embeds=cond), "prompt and prompt_embeds: give one"),
           (dict(prompt_embeds=cond, negative_prompt="dark", negative_prompt_embeds=cond), "negative_prompt and"),
           (dict(prompt_embeds=cond[0]), r"prompt_embeds must be a float tensor of shape \[batch, tokens, 32\]"),
           (dict(prompt_embeds=cond[..., :16]), "prompt_embeds must be a float tensor"),
           (dict(prompt_embeds=cond.tolist()), "got list"),
           (dict(prompt_embeds=cond * float("nan")), "prompt_embeds holds NaN"),
           (dict(prompt_embeds=cond, negative_prompt_embeds=cond.repeat(2, 1, 1)), "negative_prompt_embeds has 2 rows"),
           (dict(prompt_embeds=cond, negative_prompt_embeds=cond[:, :40]), "must have one shape per row"),
           (dict(prompt=["a", "b"], negative_prompt_embeds=cond), "negative_prompt_embeds has 1 rows but prompt has 2"),
           (dict(prompt_embeds=cond, pooled_prompt_embeds=cond[:, 0]), "the unet denoiser takes no pooled_prompt_embeds")]
    for kwargs, named in bad:
        with pytest.raises(ValueError, match=named):
            fast(num_inference_steps=2, **kwargs)


def test_sdxl_takes_pooled_prompt_embeds():
    from fastdiff.architectures import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    pipe.set_progress_bar_config(disable=True)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt("a red circle", negative_prompt="dark")
    args = dict(num_inference_steps=3, guidance_scale=4.0)
    fast = fastdiff.accelerate(pipe)
    by_text = run(fast, prompt="a red circle", negative_prompt="dark", **args)
    embeds = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=uncond_pooled)
    np.testing.assert_array_equal(run(fast, **embeds, **args), by_text)
    np.testing.assert_allclose(run(fast, **embeds, **args), run(pipe, **embeds, **args), atol=2e-5)
    with pytest.raises(ValueError, match="pooled_prompt_embeds and prompt_embeds come together"):
        fast(prompt_embeds=cond, num_inference_steps=2)


def test_size_that_the_model_cannot_take_is_refused(txt2img):
    with pytest.raises(ValueError, match="height must be a positive multiple of 8, got 65"):
        fastdiff.accelerate(txt2img)("a red circle", height=65, num_inference_steps=2)
    out = fastdiff.accelerate(txt2img)("a red circle", height=96, width=32, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 96, 32, 3)


@pytest.mark.parametrize("prediction_type,guidance_scale", [("epsilon", 6.0), ("v_prediction", 1.0)])
def test_dpm_solver_2m_matches_diffusers(prediction_type, guidance_scale):
    """DPM-Solver++ 2M, diffusers' most used multistep scheduler, runs as its own second-order step:
    each row carries its last x̂0 between calls."""
    from diffusers import DPMSolverMultistepScheduler

    pipe = tiny_sd_pipeline(scheduler="ddim", prediction_type=prediction_type)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    args = dict(prompt=["a red circle", "a blue fox"], num_inference_steps=6, guidance_scale=guidance_scale)
    expected = run(pipe, **args)
    np.testing.assert_allclose(run(fastdiff.accelerate(pipe), **args), expected, atol=2e-5)
    first_order = run(fastdiff.accelerate(pipe, solver="ddim"), **args)
    assert np.abs(first_order - expected).max() > 1e-4   # the history term matters
    with pytest.raises(ValueError, match="dpmpp2m"):
        fastdiff.accelerate(pipe, cfg="self", solver="dpmpp2m")(**args)


@pytest.mark.parametrize("kind", ["pndm", "dpm-solver++ sde"])
def test_a_step_it_does_not_run_is_taken_first_order_and_said(kind):
    """SD 1.x's PNDM (which lists a timestep twice) and the stochastic DPM-Solver++ (which holds x
    itself, not k-diffusion's x0 + σ·ε) take their own timesteps, noise scale and end with the
    first-order step: PNDM's pictures are the DDIM pipeline's at the same timesteps, DPM-Solver's its
    own first-order variant's. A warning names the scheduler once per wrapper; an explicit solver or
    a scheduler whose step runs says nothing."""
    import warnings

    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    pipe = tiny_sd_pipeline(scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    if kind == "pndm":
        pipe.scheduler = PNDMScheduler.from_config(config, skip_prk_steps=True)
        reference = DDIMScheduler.from_config(config)
        name = "PNDMScheduler"
    else:
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="sde-dpmsolver++")
        reference = DPMSolverMultistepScheduler.from_config(config, solver_order=1)
        name = "DPMSolverMultistepScheduler"
    args = dict(prompt=["a red circle", "a blue fox"], num_inference_steps=4, guidance_scale=5.0)
    own = run(pipe, **args)
    fast = fastdiff.accelerate(pipe)
    with pytest.warns(UserWarning, match=f"{name}'s own step"):
        got = run(fast, **args)
    scheduler, pipe.scheduler = pipe.scheduler, reference
    expected = run(pipe, **args)
    pipe.scheduler = scheduler
    assert expected.std() > 0.01
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert np.abs(own - expected).max() > 1e-4   # the scheduler's own step draws other pictures
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(fast, **args)                                    # said once
        run(fastdiff.accelerate(pipe, solver="ddim"), **args)
        pipe.scheduler = DDIMScheduler.from_config(config)
        run(fastdiff.accelerate(pipe), **args)
    assert not [w for w in caught if "own step" in str(w.message)]


@pytest.mark.parametrize("task", ["txt2img", "inpaint"])
def test_the_swap_benchmark_runs_and_fastdiff_gives_the_pipelines_images(tmp_path, task):
    import json
    import subprocess
    import sys

    out = tmp_path / "pipeline.json"
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "pipeline.py"), "--model", "tiny", "--prompts", "2",
                    "--steps", "2", "--rounds", "1", "--task", task, "--out", str(out)], check=True,
                   capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["task"] == task
    assert set(result["speedups"]) == {"diffusers", "fastdiff"}
    assert result["max_pixel_difference"]["fastdiff"] < 1e-4   # the same images as the pipeline it swaps
    assert all(s > 0 for s in result["seconds"].values()) and result["environment"]["command"].startswith("python")
