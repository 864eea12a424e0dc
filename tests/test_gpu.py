"""The stream and the drop-in pipeline on a CUDA device in half precision (skipped without one)."""

import pytest
import torch

import fastdiff
from fastdiff.architectures import tiny_sd_pipeline

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stream_on_cuda_matches_cpu_float32(dtype):
    cpu = tiny_sd_pipeline(scheduler="lcm", img2img=True)
    gpu = tiny_sd_pipeline(scheduler="lcm", img2img=True).to("cuda", dtype)
    frames = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    outputs = {}
    for name, pipe in (("cpu", cpu), ("gpu", gpu)):
        stream = fastdiff.Stream(pipe, steps=[20, 40], cfg="self", guidance_scale=1.4)
        stream.prepare("a red circle")
        outs = [stream(f.to(pipe.device)) for f in frames]
        outputs[name] = [o for o in outs if o is not None] + stream.flush()
    for a, b in zip(outputs["cpu"], outputs["gpu"]):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.float().cpu(), a, atol=0.05, rtol=0)


def test_accelerate_on_cuda_half():
    pipe = tiny_sd_pipeline(scheduler="ddim").to("cuda", torch.float16)
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: torch.Generator("cuda").manual_seed(0)
    expected = pipe("a red circle", num_inference_steps=4, generator=gen(), output_type="pt").images
    got = fastdiff.accelerate(pipe)("a red circle", num_inference_steps=4, generator=gen(), output_type="pt").images
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=0)


def test_controlnet_on_cuda_half():
    """A ControlNet pipeline through accelerate (against diffusers) and as a stream (against the
    same stream on the CPU in float32), in half precision."""
    from fastdiff.architectures import tiny_controlnet_pipeline

    pipe = tiny_controlnet_pipeline("sd").to("cuda", torch.float16)
    control = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    gen = lambda: torch.Generator("cuda").manual_seed(0)
    args = dict(prompt="a red circle", image=control, num_inference_steps=4, output_type="pt")
    expected = pipe(generator=gen(), **args).images
    got = fastdiff.accelerate(pipe)(generator=gen(), **args).images
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=0)
    outputs = {}
    for name, device, dtype in (("cpu", "cpu", torch.float32), ("gpu", "cuda", torch.float16)):
        p = tiny_controlnet_pipeline("sd", img2img=True, scheduler="lcm").to(device, dtype)
        stream = fastdiff.Stream(p, steps=[20, 40], cfg="none")
        stream.prepare("a red circle")
        frames = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(3)]
        outs = [stream(f.to(device), control_image=control.to(device)) for f in frames]
        outputs[name] = [o for o in outs if o is not None] + stream.flush()
    for a, b in zip(outputs["cpu"], outputs["gpu"]):
        torch.testing.assert_close(b.float().cpu(), a, atol=0.05, rtol=0)
