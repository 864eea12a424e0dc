"""An IP-Adapter's image prompt through fastdiff.accelerate (against diffusers) and fastdiff.Stream."""

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff
from fastdiff.architectures import tiny_controlnet_pipeline, tiny_ip_adapter, tiny_sd_pipeline, tiny_sdxl_pipeline


def picture(seed):
    return Image.fromarray((np.random.RandomState(seed).rand(64, 64, 3) * 255).astype("uint8"))


def gen():
    return torch.Generator().manual_seed(1)


@pytest.mark.parametrize("kind,guidance_scale", [("sd", 4.0), ("sd", 1.0), ("sdxl", 4.0), ("controlnet", 4.0)])
def test_image_prompt_matches_diffusers(kind, guidance_scale):
    """The image's embeddings on the conditional rows, the negative ones on the unconditional rows,
    for every image of the call; given as embeddings too (the negative ones first under guidance)."""
    pipe = tiny_ip_adapter({"sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline,
                            "controlnet": lambda: tiny_controlnet_pipeline("sd")}[kind]())
    args = dict(prompt=["a red circle", "a blue fox"], num_images_per_prompt=2, num_inference_steps=3,
                guidance_scale=guidance_scale, output_type="np")
    if kind == "controlnet":
        args["image"] = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    expected = pipe(generator=gen(), ip_adapter_image=picture(0), **args).images
    fast = fastdiff.accelerate(pipe)
    np.testing.assert_allclose(fast(generator=gen(), ip_adapter_image=picture(0), **args).images, expected, atol=2e-5)
    assert np.abs(fast(generator=gen(), ip_adapter_image=picture(1), **args).images - expected).max() > 1e-3
    embeds = pipe.prepare_ip_adapter_image_embeds(picture(0), None, "cpu", 1, guidance_scale > 1)
    np.testing.assert_allclose(fast(generator=gen(), ip_adapter_image_embeds=embeds, **args).images, expected, atol=2e-5)


def test_stream_image_prompt():
    pipe = tiny_ip_adapter(tiny_sd_pipeline(scheduler="lcm", img2img=True))
    frames = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def outputs(cfg="self", change=None, **prompt):
        stream = fastdiff.Stream(pipe, steps=[20, 40], cfg=cfg, guidance_scale=1.5)
        stream.prepare("a red circle", **prompt)
        if change:
            stream.update(**change)
        outs = [stream(f) for f in frames]
        return torch.stack([o for o in outs if o is not None] + stream.flush())

    own = outputs(ip_adapter_image=picture(0))
    assert (outputs(ip_adapter_image=picture(1)) - own).abs().max() > 1e-3
    torch.testing.assert_close(outputs(ip_adapter_image=picture(1), change={"ip_adapter_image": picture(0)}), own)
    positive = pipe.prepare_ip_adapter_image_embeds(picture(0), None, "cpu", 1, False)
    torch.testing.assert_close(outputs(ip_adapter_image_embeds=positive), own)
    both = pipe.prepare_ip_adapter_image_embeds(picture(0), None, "cpu", 1, True)   # cfg "full": negatives first
    torch.testing.assert_close(outputs("full", ip_adapter_image_embeds=both), outputs("full", ip_adapter_image=picture(0)))


def test_image_prompt_inputs_are_checked():
    plain = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="ip_adapter_image: the pipeline has no IP-Adapter loaded"):
        fastdiff.accelerate(plain)("a red circle", ip_adapter_image=picture(0), num_inference_steps=2)
    pipe = tiny_ip_adapter(tiny_sd_pipeline())
    fast = fastdiff.accelerate(pipe)
    for kwargs, named in ((dict(), "ip_adapter_image is required"),
                          (dict(ip_adapter_image_embeds=torch.zeros(2, 1, 32)), "list of 3-d tensors"),
                          (dict(ip_adapter_image_embeds=[torch.zeros(3, 1, 32)]), "ip_adapter_image_embeds: embeddings of"),
                          (dict(ip_adapter_image="face.png"), "ip_adapter_image")):
        with pytest.raises(ValueError, match=named):
            fast("a red circle", num_inference_steps=2, guidance_scale=4.0, **kwargs)



def test_image_prompt_on_onnxruntime_engines(tmp_path):
    """The UNet's engine takes the image embeddings as inputs: diffusers' images; another
    ``set_ip_adapter_scale`` or an unloaded adapter builds the engines again (an engine holds the
    scales as constants); more than one image per adapter is refused, not dropped."""
    pytest.importorskip("onnxruntime")
    pipe = tiny_ip_adapter(tiny_sd_pipeline())
    args = dict(prompt=["a red circle", "a blue fox"], num_inference_steps=3, guidance_scale=4.0, output_type="np")
    fast = fastdiff.accelerate(pipe, backend="onnxruntime",
                               engine_options={"cache_dir": str(tmp_path), "threads": 1, "max_batch": 2,
                                               "components": ["denoiser"]})
    assert [i.name for i in fast.denoiser.module.component.inputs][-1] == "image_embeds_0"
    assert fast.denoiser.module.runner.manifest["details"]["exporter"] == "dynamo"
    for scale in (1.0, 0.3):
        pipe.set_ip_adapter_scale(scale)
        expected = pipe(generator=gen(), ip_adapter_image=picture(0), **args).images
        np.testing.assert_allclose(fast(generator=gen(), ip_adapter_image=picture(0), **args).images, expected,
                                   atol=1e-4)
    assert fast.denoiser.module.component.state == {"ip_adapter_scales": [[0.3]] * 4}
    with pytest.raises(ValueError, match="the engines take one image per IP-Adapter, got \\[2\\]"):
        fast(ip_adapter_image=[[picture(0), picture(1)]], **args)
    pipe.unload_ip_adapter()
    np.testing.assert_allclose(fast(generator=gen(), **args).images, pipe(generator=gen(), **args).images, atol=1e-4)


def test_stream_image_prompt_on_onnxruntime_engines(tmp_path):
    pytest.importorskip("onnxruntime")
    pipe = tiny_ip_adapter(tiny_sd_pipeline(scheduler="lcm", img2img=True))
    frames = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    outs = []
    for backend in (None, "onnxruntime"):
        options = {"cache_dir": str(tmp_path), "threads": 1, "components": ["denoiser"]} if backend else None
        stream = fastdiff.Stream(pipe, steps=[20, 40], cfg="self", guidance_scale=1.5, backend=backend,
                                 engine_options=options)
        stream.prepare("a red circle", ip_adapter_image=picture(0))
        got = [stream(f) for f in frames]
        outs.append(torch.stack([o for o in got if o is not None] + stream.flush()))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=0)


def test_engines_refuse_an_image_projection_of_many_tokens():
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    pytest.importorskip("onnxruntime")
    pipe = tiny_ip_adapter(tiny_sd_pipeline())
    pipe.unet.encoder_hid_proj.image_projection_layers[0] = IPAdapterPlusImageProjection(
        embed_dims=32, output_dims=32, hidden_dims=32, depth=1, dim_head=8, heads=2, num_queries=4)
    with pytest.raises(ValueError, match="backend: engines take IP-Adapters with one embedding per image.*"
                                         "not IPAdapterPlusImageProjection"):
        fastdiff.accelerate(pipe, backend="onnxruntime")
