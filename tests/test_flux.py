"""FLUX.1 pipelines (dev's guidance-distilled kind and schnell's) through fastdiff.accelerate and
fastdiff.Stream: diffusers' own images, the packed latents where a user sees them, the schedule
shifted by the image's size."""

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.architectures import tiny_flux_pipeline
from fastdiff.denoiser import IMAGE_PROMPT, Conditioning
from fastdiff.flux import pack, schedule_arguments, unpack
from fastdiff.sampling.guiders import make_guider
from fastdiff.stream.batch import LatentStream

ARGS = dict(height=64, width=64, num_inference_steps=4, output_type="np", max_sequence_length=32)
PICTURE = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def pipes():
    return {(distilled, img2img): tiny_flux_pipeline(distilled=distilled, img2img=img2img)
            for distilled in (True, False) for img2img in (False, True)}


def both(pipe, fast, *prompt, seed=0, **kwargs):
    """(the pipeline's output, fastdiff's) of one call, each from a generator at `seed`."""
    args = {**ARGS, **kwargs}
    return (pipe(*prompt, generator=torch.Generator().manual_seed(seed), **args).images,
            fast(*prompt, generator=torch.Generator().manual_seed(seed), **args).images)


def test_packing_is_the_pipelines():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    packed = pack(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack(packed, 6, 10), latents, rtol=0, atol=0)


def test_the_shift_is_the_pipelines(pipes):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = pipes[True, False].scheduler
    sigmas, mu = schedule_arguments(scheduler, 4, None, 24, 40)
    np.testing.assert_allclose(sigmas, np.linspace(1.0, 1 / 4, 4), rtol=1e-12)
    assert mu == pytest.approx(calculate_shift(12 * 20, 256, 4096, 0.5, 1.15))
    assert schedule_arguments(scheduler, 3, [0.9, 0.5, 0.2], 8, 8)[0] == [0.9, 0.5, 0.2]


@pytest.mark.parametrize("distilled", [True, False])
def test_txt2img_is_diffusers(pipes, distilled):
    pipe = pipes[distilled, False]
    fast = fastdiff.accelerate(pipe)
    a, b = both(pipe, fast, ["a red circle", "a blue square"])
    np.testing.assert_allclose(b, a, atol=2e-5)
    assert a.std() > 0.05   # pictures, not a flat colour
    # true classifier-free guidance over a negative prompt, beside the model's own guidance input
    a, b = both(pipe, fast, "a red circle", negative_prompt="blue", true_cfg_scale=3.0, guidance_scale=5.0, seed=1)
    np.testing.assert_allclose(b, a, atol=2e-5)
    # another size, its own shift; custom sigmas with a second prompt for T5
    a, b = both(pipe, fast, "a red circle", height=96, width=128)
    np.testing.assert_allclose(b, a, atol=2e-5)
    a, b = both(pipe, fast, "a red circle", prompt_2="a blue square", sigmas=[1.0, 0.7, 0.4, 0.1])
    np.testing.assert_allclose(b, a, atol=2e-5)


def test_guidance_is_the_models_input(pipes):
    fast = fastdiff.accelerate(pipes[True, False])
    low = fast("a red circle", guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **ARGS).images
    high = fast("a red circle", guidance_scale=8.0, generator=torch.Generator().manual_seed(0), **ARGS).images
    assert np.abs(high - low).max() > 1e-3


def test_latents_are_packed_where_a_user_sees_them(pipes):
    pipe = pipes[True, False]
    fast = fastdiff.accelerate(pipe)
    a, b = both(pipe, fast, "a red circle", output_type="latent")
    assert b.shape == a.shape == (1, 16, 64)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    given = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(5))
    a, b = both(pipe, fast, "a red circle", latents=given)
    np.testing.assert_allclose(b, a, atol=2e-5)
    seen = {"pipe": [], "fast": []}

    def halve(who):
        def callback(p, i, t, kwargs):
            seen[who].append(kwargs["latents"].clone())
            return {"latents": kwargs["latents"] * 0.5} if i == 1 else {}
        return callback

    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), callback_on_step_end=halve("pipe"), **ARGS)
    b = fast("a red circle", generator=torch.Generator().manual_seed(0), callback_on_step_end=halve("fast"), **ARGS)
    np.testing.assert_allclose(b.images, a.images, atol=2e-5)
    assert len(seen["fast"]) == len(seen["pipe"]) == 4
    for x, y in zip(seen["fast"], seen["pipe"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_a_calls_lora_scale_is_diffusers(pipes):
    """Flux names the LoRA scale's argument joint_attention_kwargs, as SD3 does."""
    from peft import LoraConfig

    pipe = tiny_flux_pipeline(distilled=False)
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"]))
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    fast = fastdiff.accelerate(pipe)
    full = both(pipe, fast, "a red circle")[1]
    a, b = both(pipe, fast, "a red circle", joint_attention_kwargs={"scale": 0.25})
    np.testing.assert_allclose(b, a, atol=2e-5)
    assert np.abs(b - full).max() > 1e-3   # the LoRA's share changed


def test_embeddings_and_generators(pipes):
    pipe = pipes[False, False]
    fast = fastdiff.accelerate(pipe)
    embeds, pooled, _ = pipe.encode_prompt("a red circle", prompt_2=None, max_sequence_length=32)
    make = lambda: [torch.Generator().manual_seed(k) for k in range(2)]
    args = dict(ARGS, prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_images_per_prompt=2)
    np.testing.assert_allclose(fast(generator=make(), **args).images, pipe(generator=make(), **args).images, atol=2e-5)


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_img2img_is_diffusers(pipes, strength):
    pipe = pipes[True, True]
    a, b = both(pipe, fastdiff.accelerate(pipe), "a red circle", image=PICTURE, strength=strength,
                num_inference_steps=5)
    np.testing.assert_allclose(b, a, atol=2e-5)


def test_img2img_given_latents_starts_from_them(pipes):
    """As the img2img pipelines that take latents do: they are the first step's, noised already."""
    pipe = pipes[False, True]
    given = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(7))
    a, b = both(pipe, fastdiff.accelerate(pipe), "a red circle", image=PICTURE, latents=given)
    np.testing.assert_allclose(b, a, atol=2e-5)


def test_bad_input_is_refused(pipes):
    fast = fastdiff.accelerate(pipes[True, False])
    for bad, named in [(dict(height=72), "height must be a positive multiple of 16"),
                       (dict(latents=torch.randn(1, 16, 8, 8)), "latents must be packed"),
                       (dict(true_cfg_scale="x", negative_prompt="blue"), "true_cfg_scale"),
                       (dict(joint_attention_kwargs={"scale": "x"}), r"joint_attention_kwargs\['scale'\]"),
                       (dict(max_sequence_length=600), "max_sequence_length"),
                       (dict(guidance_scale=float("nan")), "guidance_scale")]:
        with pytest.raises(ValueError, match=named):
            fast("a red circle", **{**ARGS, **bad})
    for bad in ("clip_skip", "cross_attention_kwargs"):   # not the Flux pipeline's arguments
        with pytest.raises(TypeError, match=bad):
            fast("a red circle", **{**ARGS, bad: 1})
    # an image prompt's rows are refused, not run without it
    rows = Conditioning(torch.zeros(1, 32, 32), {"pooled_projections": torch.zeros(1, 32), "guidance": torch.ones(1),
                                                 f"{IMAGE_PROMPT}0": torch.zeros(1, 1, 8)})
    with pytest.raises(ValueError, match="ip_adapter_image: fastdiff runs no IP-Adapter of a Flux transformer"):
        fast.denoiser(torch.zeros(1, 16, 8, 8), torch.ones(1), rows)


def test_the_stream_steps_the_pipelines_schedule(pipes):
    """A Flux stream's steps index the pipeline's own schedule (its sigmas shifted for the stream's
    size), its rows step as flow-matching Euler does one frame at a time, and a guidance-distilled
    model's guidance is each row's input, changed by update()."""
    pipe = pipes[True, True]
    stream = fastdiff.Stream(pipe, steps=[0, 2], num_inference_steps=4, height=64, width=64)
    assert (stream.cfg, stream.guidance_scale) == ("none", 7.0)   # the img2img pipeline's default guidance
    sigmas, mu = schedule_arguments(pipe.scheduler, 4, None, 8, 8)
    pipe.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    torch.testing.assert_close(stream.schedule.timesteps, pipe.scheduler.timesteps.double()[[0, 2]])

    denoiser = stream.denoiser
    with torch.inference_mode():
        cond, uncond = denoiser.encode_prompt(["a red circle", "a blue square"], None, 64, 64,
                                              options={"guidance": 7.0, "max_sequence_length": 32})
        latents = LatentStream(denoiser, stream.schedule, cond, uncond, (16, 8, 8), guider=make_guider("none"))
        groups = [torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(k)) for k in range(3)]
        outs = [o.latents for o in [latents.push(g) for g in groups] + latents.drain() if o is not None]
        s = pipe.scheduler.sigmas.double()
        ladder = [float(s[0]), float(s[2]), float(s[-1])]
        for group, out in zip(groups, outs):
            x = (1 - ladder[0]) * group + ladder[0] * latents.noise[0]
            for k, t in enumerate(stream.schedule.timesteps):
                u = denoiser(x, torch.full((2,), float(t)), cond)
                x = x + (ladder[k + 1] - ladder[k]) * u
            torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)

    stream.prepare("a red circle", max_sequence_length=32)
    frame = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    first = [stream(frame) for _ in range(3)][-1]
    assert first.shape == (3, 64, 64)
    stream.update(guidance_scale=1.0)
    assert stream.guidance_scale == 1.0
    assert (stream(frame) - first).abs().max() > 1e-4
    with pytest.raises(ValueError, match="cfg: FluxImg2ImgPipeline's model is guidance-distilled"):
        fastdiff.Stream(pipe, cfg="self")


def test_a_schnell_stream_draws_txt2img(pipes):
    stream = fastdiff.Stream(pipes[False, False], mode="txt2img", steps=[0, 1, 2, 3], num_inference_steps=4,
                             height=64, width=64)
    assert stream.cfg == "none"
    stream.prepare("a red circle", max_sequence_length=32)
    outs = [stream() for _ in range(5)]
    assert [o is None for o in outs] == [True, True, True, False, False]
    assert outs[-1].shape == (3, 64, 64) and torch.isfinite(outs[-1]).all()


def test_a_searched_schedule_runs_on_flux(pipes, tmp_path):
    """Timestep search on a Flux pipeline: its teacher runs the pipeline's shifted schedule from
    pure noise (timestep 1000, σ = 1), and the schedule found runs as its timesteps given by hand."""
    from fastdiff.tuning import search_steps

    pipe = pipes[True, False]
    found = search_steps(pipe, ["a red circle", "a blue square"], 2, method="dp", budget_minutes=1,
                         teacher_steps=6, fine_steps=12)
    assert found.timesteps[0] == 1000.0 and len(found.timesteps) == 2
    path = found.save(str(tmp_path / "flux-2.json"))
    searched = fastdiff.accelerate(pipe, schedule=path)
    args = dict(ARGS, num_inference_steps=2)
    by_hand = fastdiff.accelerate(pipe)("a red circle", timesteps=found.timesteps,
                                        generator=torch.Generator().manual_seed(0), **args).images
    np.testing.assert_allclose(searched("a red circle", generator=torch.Generator().manual_seed(0), **args).images,
                               by_hand, atol=1e-6)


def test_flow_timesteps_reach_pure_noise():
    from fastdiff.sampling.schedule import validate_timesteps

    assert validate_timesteps([1000, 612.5, 0], 1000, flow=True) == [1000.0, 612.5, 0.0]
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        validate_timesteps([1000, 500], 1000)
    with pytest.raises(ValueError, match="whole numbers"):
        validate_timesteps([900, 612.5], 1000)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\]"):
        validate_timesteps([1001, 500], 1000, flow=True)


def test_flux_on_onnxruntime_engines(pipes, tmp_path):
    """The transformer's engine takes unpacked latents (its size follows the image's, one engine for
    several) and makes the tokens and their ids inside: diffusers' images at two sizes, and a
    stream's frames as on the PyTorch modules."""
    pytest.importorskip("onnxruntime")
    pipe = pipes[True, False]
    options = {"cache_dir": str(tmp_path), "threads": 1, "components": ["denoiser"]}
    fast = fastdiff.accelerate(pipe, backend="onnxruntime",
                               engine_options={**options, "max_batch": 2, "resolutions": [(64, 64), (128, 192)]})
    assert fast.denoiser.module.runner.manifest["details"]["exporter"] == "dynamo"
    for size in ((64, 64), (128, 192)):
        args = dict(num_inference_steps=3, output_type="np", height=size[0], width=size[1])
        a = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0), **args).images
        b = fast(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0), **args).images
        np.testing.assert_allclose(b, a, atol=1e-4)
    with pytest.raises(ValueError, match="max_sequence_length: the onnxruntime engines take the prompt at 512"):
        fast("a red circle", max_sequence_length=32)

    frames = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    outs = []
    for backend in (None, "onnxruntime"):
        stream = fastdiff.Stream(pipes[True, True], steps=[1, 3], num_inference_steps=4, backend=backend,
                                 engine_options=options if backend else None)
        stream.prepare("a red circle")
        got = [stream(f) for f in frames]
        outs.append(torch.stack([o for o in got if o is not None] + stream.flush()))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=0)


def test_mask_cells_are_the_fill_pipelines():
    from diffusers import FluxFillPipeline

    from fastdiff.inpainting import mask_cells

    pipe = tiny_flux_pipeline(fill=True)
    mask = (torch.rand(2, 1, 32, 48) > 0.5).float()
    want, _ = FluxFillPipeline.prepare_mask_latents(pipe, mask, torch.zeros(2, 16, 4, 6), 2, 16, 1, 32, 48,
                                                    torch.float32, "cpu", None)
    torch.testing.assert_close(pack(mask_cells(mask, 8)), want, rtol=0, atol=0)   # before packing, the same cells


@pytest.mark.parametrize("options", [dict(), dict(strength=0.6, guidance_scale=10.0),
                                     dict(num_images_per_prompt=2, height=64, width=128)])
def test_fill_is_diffusers(options):
    """FLUX.1-Fill: the transformer reads the masked picture's latents and the mask's 8×8 cells."""
    pipe = tiny_flux_pipeline(fill=True)
    width = options.get("width", 64)
    mask = torch.zeros(1, 1, 64, width)
    mask[..., 16:48, 8:40] = 1
    picture = torch.rand(1, 3, 64, width, generator=torch.Generator().manual_seed(1))
    fast = fastdiff.accelerate(pipe)
    want, got = both(pipe, fast, "a red circle", image=picture, mask_image=mask,
                     **{**ARGS, "num_inference_steps": 3, **options})
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(fast._last_rows[0]) == want.shape[0]   # one row per image: the guidance is the model's input
    if not options:
        with pytest.raises(ValueError, match="masked_image_latents: fastdiff takes FluxFillPipeline's mask"):
            fastdiff.accelerate(pipe)("a red circle", image=picture, mask_image=mask,
                                      masked_image_latents=torch.zeros(1, 16, 384))
        with pytest.raises(ValueError, match="negative_prompt: FluxFillPipeline takes no negative prompt"):
            fastdiff.accelerate(pipe)("a red circle", image=picture, mask_image=mask, negative_prompt="blue")
        with pytest.raises(ValueError, match="mask_image is required by FluxFillPipeline"):
            fastdiff.accelerate(pipe)("a red circle", image=picture)
        with pytest.raises(ValueError, match="a Stream does not run an inpainting denoiser yet"):
            fastdiff.Stream(pipe)


@pytest.mark.parametrize("options", [dict(), dict(num_images_per_prompt=2, guidance_scale=10.0),
                                     dict(prompt=["a red circle", "a blue square"], height=64, width=128),
                                     dict(control_image=PICTURE.resize((80, 48)))])
def test_control_is_diffusers(options):
    """FLUX.1 Canny / Depth: the transformer reads the control picture's latents beside the latents
    (a tensor taken as the VAE's input, as the pipeline takes it; a PIL picture resized)."""
    pipe = tiny_flux_pipeline(control=True)
    width = options.get("width", 64)
    count = len(options.get("prompt", [""]))
    picture = torch.rand(count, 3, 64, width, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fast = fastdiff.accelerate(pipe)
    args = {**ARGS, "num_inference_steps": 3, "prompt": "a red circle", "control_image": picture, **options}
    want, got = both(pipe, fast, **args)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(fast._last_rows[0]) == want.shape[0]   # one row per image: the guidance is the model's input
    if not options:
        call = dict(prompt="a red circle", num_inference_steps=1)
        with pytest.raises(ValueError, match="control_image is required by FluxControlPipeline"):
            fast(**call)
        with pytest.raises(ValueError, match=r"control_image: give one picture or one per prompt \(1\), got 3"):
            fast(control_image=[PICTURE] * 3, **call)
        with pytest.raises(ValueError, match=r"control_image: a tensor is taken as the VAE's input, \[n, 3, 64, 64\]"):
            fast(control_image=torch.zeros(1, 3, 32, 32), **call)
        with pytest.raises(ValueError, match="reads their control picture's latents with every row; a Stream does not"):
            fastdiff.Stream(pipe)


@pytest.mark.parametrize("options", [dict(), dict(strength=1.0, num_images_per_prompt=2)])
def test_control_img2img_is_diffusers(options):
    """FluxControlImg2ImgPipeline: the control picture's latents beside an img2img call's, drawn first."""
    pipe = tiny_flux_pipeline(control=True, img2img=True)
    args = {**ARGS, "image": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)),
            "control_image": PICTURE, **options}
    want, got = both(pipe, fastdiff.accelerate(pipe), "a red circle", **args)
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("kind", ["fill", "control"])
def test_fill_and_control_on_onnxruntime_engines(kind, tmp_path):
    """FLUX.1-Fill's and Canny / Depth's engines take the latents and what each row adds to them as
    one grid of patches."""
    pytest.importorskip("onnxruntime")
    pipe = tiny_flux_pipeline(**{kind: True})
    if kind == "fill":
        mask = torch.zeros(1, 1, 64, 64)
        mask[..., 8:40, 16:48] = 1
        args = dict(image=torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)), mask_image=mask)
    else:
        args = dict(control_image=PICTURE)
    fast = fastdiff.accelerate(pipe, backend="onnxruntime", engine_options={
        "cache_dir": str(tmp_path), "threads": 1, "max_batch": 1, "components": ["denoiser"]})
    want, got = both(pipe, fast, "a red circle", **{**ARGS, **args, "num_inference_steps": 3, "max_sequence_length": 512})
    assert type(fast.denoiser.module).__name__ == "EngineModule"
    np.testing.assert_allclose(got, want, atol=1e-4)


KONTEXT = dict(num_inference_steps=3, output_type="np", max_sequence_length=32, max_area=64 * 64, _auto_resize=False)


@pytest.mark.parametrize("options", [dict(), dict(height=64, width=128, max_area=64 * 128),
                                     dict(negative_prompt="blue", true_cfg_scale=2.0, num_images_per_prompt=2),
                                     dict(prompt=["a red circle", "a blue square"], image=[PICTURE, PICTURE.rotate(90)]),
                                     dict(_auto_resize=True, num_inference_steps=1),
                                     dict(image=torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(3)))])
def test_kontext_is_diffusers(options):
    """FLUX.1 Kontext: the context picture's tokens after the image's (their ids' first axis 1), the
    image drawn at max_area pixels; the picture resized to Kontext's nearest training size unless
    _auto_resize=False; latents given as the image taken as they are, as the pipeline takes them."""
    pipe = tiny_flux_pipeline(kontext=True)
    fast = fastdiff.accelerate(pipe)
    args = {**KONTEXT, "prompt": "a red circle", "image": PICTURE.resize((80, 48)), **options}
    want, got = both(pipe, fast, **args)
    np.testing.assert_allclose(got, want, atol=1e-5)
    if not options:
        plain = both(pipe, fast, **{**args, "image": None})
        np.testing.assert_allclose(plain[1], plain[0], atol=1e-5)
        assert np.abs(plain[1] - got).max() > 1e-3   # the context picture acted
        with pytest.raises(ValueError, match="backend: FluxKontextPipeline's context picture runs on the PyTorch"):
            fastdiff.accelerate(pipe, backend="onnxruntime")
        with pytest.raises(ValueError, match="max_area must be"):
            fast("a red circle", max_area=0)
        with pytest.raises(ValueError, match="image: 2 context pictures for 3 images"):
            fast(["a", "b", "c"], image=[PICTURE, PICTURE], **{k: v for k, v in KONTEXT.items() if k != "output_type"})


@pytest.mark.parametrize("options", [dict(), dict(strength=1.0, num_images_per_prompt=2, negative_prompt="blue",
                                                  true_cfg_scale=2.0)])
def test_inpaint_with_the_plain_transformer_is_diffusers(options):
    """FluxInpaintPipeline: the known region blended back after each step on the unpacked latents; a
    step-end callback still sees them packed, as the pipeline shows them."""
    pipe = tiny_flux_pipeline(inpaint=True)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 8:40] = 1
    seen = []
    fast = fastdiff.accelerate(pipe)
    args = {**ARGS, "image": torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)), "mask_image": mask,
            **options}
    want, got = both(pipe, fast, "a red circle", **args)
    np.testing.assert_allclose(got, want, atol=1e-5)
    fast("a red circle", callback_on_step_end=lambda p, i, t, d: seen.append(tuple(d["latents"].shape)) or {},
         **{**args, "generator": torch.Generator().manual_seed(0)})
    assert seen and set(seen) == {(want.shape[0], 16, 64)}
