"""Stream batching and residual CFG against a sequential reference written from the equations.

The reference denoises one group of frames at a time, step by step, with its own coefficients read
from the diffusers scheduler, and keeps the residual S exactly as the equations in
fastdiff.sampling.guidance state them. The stream must give the same latents for every frame.
"""

import pytest
import torch

from fastdiff.denoiser import denoiser_for
from fastdiff.sampling.guiders import make_guider
from fastdiff.sampling.schedule import step_schedule
from fastdiff.stream.batch import LatentStream
from fastdiff.architectures import tiny_sd_pipeline

G, DELTA = 2.5, 0.7


def reference_coefficients(scheduler, steps, solver):
    """(t, α, β, α', β', c_skip, c_out) per step, straight from the scheduler's tables."""
    scheduler.set_timesteps(50)
    ts = [int(scheduler.timesteps[i]) for i in steps]
    abar = [float(scheduler.alphas_cumprod[t]) for t in ts]
    end = float(scheduler.final_alpha_cumprod) if solver == "ddim" else 1.0
    nxt = abar[1:] + [end]
    rows = []
    for t, a, an in zip(ts, abar, nxt):
        if solver == "lcm":
            c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
        else:
            c_skip, c_out = 0.0, 1.0
        rows.append((t, a**0.5, (1 - a) ** 0.5, an**0.5, (1 - an) ** 0.5, c_skip, c_out))
    return rows


def sequential_reference(unet_call, cond, uncond, clean, noise, coeffs, cfg, solver):
    """Denoise one group of frames through all steps, one denoiser call (or two, for full CFG) per step."""
    t0, a0, b0 = coeffs[0][:3]
    x = a0 * clean + b0 * noise[0]
    S = noise[0].clone()
    for i, (t, a, b, an, bn, c_skip, c_out) in enumerate(coeffs):
        tt = torch.full((x.shape[0],), float(t))
        e_c = unet_call(x, tt, cond)
        if cfg == "none":
            eps = e_c
        elif cfg == "full":
            e_u = unet_call(x, tt, uncond)
            eps = e_u + G * (e_c - e_u)
        else:
            if cfg == "initialize" and i == 0:
                S = unet_call(x, tt, uncond)
            eps = DELTA * S + G * (e_c - DELTA * S)
        x0 = (x - b * eps) / a
        if solver == "lcm":
            x0 = c_out * x0 + c_skip * x
        injected = noise[min(i + 1, len(coeffs) - 1)] if solver == "lcm" else eps
        x_next = an * x0 + bn * injected
        if cfg in ("self", "initialize") and bn > 0:
            dx = c_out * (b * S - b * eps) / a + c_skip * b * S
            S = injected + (an / bn) * dx
        x = x_next
    return x


def assert_same_latents(out, ref, tol=1e-5):
    """Equal up to float rounding, measured against the latents' own scale: random weights give
    latents of magnitude 1..500, and batch size changes the UNet's rounding slightly."""
    assert out.shape == ref.shape
    scale = ref.abs().max().item() + 1.0
    assert (out - ref).abs().max().item() <= tol * scale, ((out - ref).abs().max().item(), scale)


@pytest.fixture(scope="module")
def pipes():
    return {"ddim": tiny_sd_pipeline(scheduler="ddim"), "lcm": tiny_sd_pipeline(scheduler="lcm")}


STEP_SETS = {1: [40], 2: [32, 45], 4: [5, 20, 32, 45]}


@pytest.mark.parametrize("solver", ["ddim", "lcm"])
@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("F", [1, 3])
def test_stream_equals_sequential_denoising(pipes, solver, cfg, n, F):
    pipe = pipes[solver]
    denoiser = denoiser_for(pipe)
    steps = STEP_SETS[n]
    schedule = step_schedule(pipe.scheduler, steps=steps, num_inference_steps=50)
    prompts = ["a red circle", "a blue square", "a green fox"][:F]
    with torch.inference_mode():
        cond, uncond = denoiser.encode_prompt(prompts, None, 64, 64)
        stream = LatentStream(denoiser, schedule, cond, uncond, (4, 8, 8), guider=make_guider(cfg, G, DELTA),
                              generator=torch.Generator().manual_seed(3))
        groups = [torch.randn(F, 4, 8, 8, generator=torch.Generator().manual_seed(100 + k)) for k in range(n + 2)]
        outputs = [stream.push(g, tag=k) for k, g in enumerate(groups)]
        assert all(o is None for o in outputs[: n - 1]), "output must lag input by n-1 calls"
        outputs = [o for o in outputs if o is not None] + stream.drain()
        assert [o.tag for o in outputs] == list(range(len(groups))), "each group leaves with its own tag"
        outputs = [o.latents for o in outputs]
        assert len(outputs) == len(groups) and stream.in_flight == 0
        coeffs = reference_coefficients(pipe.scheduler, steps, solver)
        for group, out in zip(groups, outputs):
            ref = sequential_reference(denoiser, cond, uncond, group, stream.noise, coeffs, cfg, solver)
            assert_same_latents(out, ref)


def test_rows_per_call_by_mode(pipes):
    pipe = pipes["ddim"]
    denoiser = denoiser_for(pipe)
    schedule = step_schedule(pipe.scheduler, steps=[10, 30, 45])
    with torch.inference_mode():
        cond, uncond = denoiser.encode_prompt(["a red circle"] * 2, None, 64, 64)
    seen = []
    real_call = denoiser.__class__.__call__

    class Counting(type(denoiser)):
        def __call__(self, latents, t, c):
            seen.append(latents.shape[0])
            assert len(t) == latents.shape[0] == len(c)
            return real_call(self, latents, t, c)

    counting = Counting(pipe, pipe.unet)
    expected = {"none": 6, "full": 12, "self": 6, "initialize": 8}
    for cfg, rows in expected.items():
        stream = LatentStream(counting, schedule, cond, uncond, (4, 8, 8), guider=make_guider(cfg, G))
        assert stream.rows_per_call == rows
        seen.clear()
        with torch.inference_mode():
            for _ in range(5):
                stream.push(torch.zeros(2, 4, 8, 8))
        assert seen[-1] == rows, (cfg, seen)


def one_prompt(pipe):
    """(denoiser, 2-step schedule, cond, uncond) for 'a red circle'."""
    denoiser = denoiser_for(pipe)
    with torch.inference_mode():
        cond, uncond = denoiser.encode_prompt(["a red circle"], None, 64, 64)
    return denoiser, step_schedule(pipe.scheduler, steps=[20, 40]), cond, uncond


def test_guidance_scale_one_gives_conditional_estimate(pipes):
    """At g = 1 every mode reduces to ε_c: none/full/self/initialize agree."""
    denoiser, schedule, cond, uncond = one_prompt(pipes["ddim"])
    with torch.inference_mode():
        results = {}
        for cfg in ("none", "full", "self", "initialize"):
            stream = LatentStream(denoiser, schedule, cond, uncond, (4, 8, 8), guider=make_guider(cfg, 1.0),
                                  generator=torch.Generator().manual_seed(0))
            clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
            results[cfg] = [g.latents for g in [stream.push(clean)] + stream.drain() if g is not None]
    for cfg in ("full", "self", "initialize"):
        torch.testing.assert_close(results[cfg][-1], results["none"][-1], rtol=1e-5, atol=1e-5)


def test_fresh_noise_differs_from_fixed(pipes):
    denoiser, schedule, cond, uncond = one_prompt(pipes["lcm"])
    with torch.inference_mode():
        clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        outs = {}
        for mode in ("fixed", "fresh"):
            stream = LatentStream(denoiser, schedule, cond, uncond, (4, 8, 8), noise=mode,
                                  guider=make_guider("none"), generator=torch.Generator().manual_seed(0))
            outs[mode] = [o.latents for o in (stream.push(clean) for _ in range(4)) if o is not None]
    # Fixed noise: the same input gives the same output every time; fresh noise does not.
    torch.testing.assert_close(outs["fixed"][0], outs["fixed"][-1])
    assert not torch.allclose(outs["fresh"][0], outs["fresh"][-1])


def flow_reference(model, cond, uncond, clean, noise, sigmas, timesteps, cfg):
    """Flow-matching Euler, one group at a time: x' = x + (σ' − σ)·u, guidance on the velocity u for
    none/full; residual guidance in ε = x + (1−σ)·u with x0 = (x − σ·ε)/(1−σ) for self/initialize."""
    x = (1 - sigmas[0]) * clean + sigmas[0] * noise[0]
    S = noise[0].clone()
    for i, t in enumerate(timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        tt = torch.full((x.shape[0],), float(t))
        u_c = model(x, tt, cond)
        if cfg in ("none", "full"):
            u = u_c if cfg == "none" else model(x, tt, uncond) + G * (u_c - model(x, tt, uncond))
            x = x + (s_next - s) * u
            continue
        if cfg == "initialize" and i == 0:
            S = x + (1 - s) * model(x, tt, uncond)
        e_c = x + (1 - s) * u_c
        eps = DELTA * S + G * (e_c - DELTA * S)
        x0 = (x - s * eps) / (1 - s)
        x_next = (1 - s_next) * x0 + s_next * eps
        if s_next > 0:
            S = eps + ((1 - s_next) / s_next) * (s * S - s * eps) / (1 - s)
        x = x_next
    return x


@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("F", [1, 3])
def test_dit_stream_equals_sequential_flow_euler(cfg, n, F):
    from fastdiff.architectures import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    denoiser = denoiser_for(pipe)
    steps = {1: [10], 2: [10, 30], 4: [5, 15, 30, 45]}[n]
    schedule = step_schedule(pipe.scheduler, steps=steps, num_inference_steps=50)
    pipe.scheduler.set_timesteps(50)
    sigmas = [float(pipe.scheduler.sigmas[i]) for i in steps] + [float(pipe.scheduler.sigmas[-1])]
    timesteps = [float(pipe.scheduler.timesteps[i]) for i in steps]
    prompts = ["a red circle", "a blue square", "a green fox"][:F]
    shape = (denoiser.in_channels, 8, 8)
    with torch.inference_mode():
        cond, uncond = denoiser.encode_prompt(prompts, None, 64, 64)
        stream = LatentStream(denoiser, schedule, cond, uncond, shape, guider=make_guider(cfg, G, DELTA))
        groups = [torch.randn((F,) + shape, generator=torch.Generator().manual_seed(k)) for k in range(n + 1)]
        outputs = [o.latents for o in [o for o in (stream.push(g) for g in groups) if o is not None] + stream.drain()]
        assert len(outputs) == len(groups)
        for group, out in zip(groups, outputs):
            ref = flow_reference(denoiser, cond, uncond, group, stream.noise, sigmas, timesteps, cfg)
            assert_same_latents(out, ref)


@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("mode", ["img2img", "txt2img"])
def test_a_packed_stream_equals_the_slot_by_slot_one(pipes, cfg, n, mode):
    """packed=True keeps a full stream's slots in two alternating buffers that the step writes into;
    its groups must equal the slot-by-slot stream's through the filling, the steady state, a look at
    its slots half-way (which unpacks them, to be packed again at the next push) and the drain."""
    pipe = pipes["lcm"]
    denoiser = denoiser_for(pipe)
    schedule = step_schedule(pipe.scheduler, steps=STEP_SETS[n], num_inference_steps=50)
    F = 2
    with torch.inference_mode():
        cond, uncond = denoiser.encode_prompt(["a red circle", "a blue square"], None, 64, 64)
        groups = [None if mode == "txt2img" else torch.randn(F, 4, 8, 8, generator=torch.Generator().manual_seed(200 + k))
                  for k in range(n + 5)]
        results = {}
        for packed in (False, True):
            stream = LatentStream(denoiser, schedule, cond, uncond, (4, 8, 8), guider=make_guider(cfg, G, DELTA),
                                  generator=torch.Generator().manual_seed(3), packed=packed)
            outs = []
            for k, g in enumerate(groups):
                if k == n + 2:
                    assert (stream._packed is not None) == packed and stream.in_flight == n - 1
                    assert all(slot is not None for slot in stream.slots) and stream._packed is None
                finished = stream.push(g, tag=k)
                if finished is not None:
                    outs.append((finished.tag, finished.latents.clone()))   # packed: rows of its buffers
            outs += [(f.tag, f.latents) for f in stream.drain()]
            results[packed] = outs
    assert [t for t, _ in results[True]] == [t for t, _ in results[False]] == list(range(len(groups)))
    for (_, a), (_, b) in zip(results[True], results[False]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_a_multistep_stream_keeps_each_groups_history(pipes, packed):
    """DPM-Solver++(2M) carries each row's last x̂0 along with it: with groups in every slot, each
    group leaves as it would alone in the stream."""
    pipe = pipes["ddim"]
    denoiser = denoiser_for(pipe)
    schedule = step_schedule(pipe.scheduler, steps=STEP_SETS[4], num_inference_steps=50, solver="dpmpp2m")
    assert schedule.history_weight.abs().max() > 0   # second-order steps inside
    F = 2
    with torch.inference_mode():
        cond, uncond = denoiser.encode_prompt(["a red circle", "a blue square"], None, 64, 64)
        groups = [torch.randn(F, 4, 8, 8, generator=torch.Generator().manual_seed(300 + k)) for k in range(7)]

        def new_stream(noise=None):
            stream = LatentStream(denoiser, schedule, cond, uncond, (4, 8, 8), guider=make_guider("full", G, DELTA),
                                  generator=torch.Generator().manual_seed(3), packed=packed)
            stream.noise = noise
            return stream
        together = new_stream()
        outs = {}
        for k, g in enumerate(groups):
            finished = together.push(g, tag=k)
            if finished is not None:   # packed: rows of its buffers, written again two calls later
                outs[finished.tag] = finished.latents.clone()
        outs.update({f.tag: f.latents for f in together.drain()})
        assert sorted(outs) == list(range(len(groups)))
        for k, g in enumerate(groups):
            alone = new_stream(together.noise)
            assert alone.push(g, tag=k) is None
            assert_same_latents(outs[k], alone.drain()[0].latents)
