"""The stream step: guiders, the folded affine step against the equations, guidance rescale."""

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler

from fastdiff.denoiser import Conditioning
from fastdiff.sampling.guidance import rescale_guidance
from fastdiff.sampling.guiders import make_guider
from fastdiff.sampling.schedule import step_schedule
from fastdiff.sampling.step import carries_state, reference_update, step_rows, stream_step

STEPS = {1: [30], 2: [20, 40], 4: [5, 20, 32, 45]}
SCHEDULERS = {
    ("ddim", "epsilon"): lambda: DDIMScheduler(prediction_type="epsilon"),
    ("ddim", "v_prediction"): lambda: DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                     timestep_spacing="trailing"),
    ("lcm", "epsilon"): lambda: LCMScheduler(prediction_type="epsilon"),
    ("lcm", "v_prediction"): lambda: LCMScheduler(prediction_type="v_prediction"),
    ("ddim", "flow"): lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    ("dpmpp2m", "epsilon"): lambda: DDIMScheduler(prediction_type="epsilon"),
    ("dpmpp2m", "v_prediction"): lambda: DDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                        timestep_spacing="trailing"),
}


def rows_for(key, cfg, n, F, new, g=2.5, delta=0.7):
    solver, _ = key
    schedule = step_schedule(SCHEDULERS[key](), steps=STEPS[n], num_inference_steps=50, solver=solver)
    slots = list(range(n)) if new else list(range(1, n))
    steps = torch.tensor(slots).repeat_interleave(F)
    cond = Conditioning(torch.randn(len(steps), 3, 8))
    guider = make_guider(cfg, g, delta)
    rows = step_rows(schedule, steps, cond, cond, F if new else 0, guider, "cpu", torch.float32)
    return rows, guider


def random_inputs(rows, guider, seed=0):
    gen = torch.Generator().manual_seed(seed)
    R = len(rows)
    shape = (4, 8, 8)

    def draw(k):
        return torch.randn((k,) + shape, generator=gen)
    extra = guider.uncond_rows(R, rows.new)
    return dict(x=draw(R), out_c=draw(R), out_u=draw(extra) if extra else None,
                residual=draw(R) if carries_state(guider, rows.solver) else None,
                noise=draw(rows.noise_rows) if rows.noise_rows else None)


@pytest.mark.parametrize("key", list(SCHEDULERS), ids=lambda k: "-".join(k))
@pytest.mark.parametrize("cfg", ["none", "full", "self", "initialize"])
@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("F", [1, 3])
def test_folded_step_equals_the_step_functions(key, cfg, n, F):
    if key[0] == "dpmpp2m" and cfg in ("self", "initialize"):
        with pytest.raises(ValueError, match="dpmpp2m"):
            rows_for(key, cfg, n, F, True)
        return
    for new in (True, False) if n > 1 else (True,):
        rows, guider = rows_for(key, cfg, n, F, new)
        assert rows.folded is not None
        first = random_inputs(rows, guider)
        # a second call with the same noise tensor (a stream's fixed noise) takes its kept term
        for inputs in (first, dict(random_inputs(rows, guider, seed=1), noise=first["noise"])):
            want_x, want_s = reference_update(guider, rows, **inputs)
            got_x, got_s = rows.folded(**inputs)
            torch.testing.assert_close(got_x, want_x, rtol=1e-5, atol=1e-5)
            if carries_state(guider, rows.solver):
                staying = int((rows.beta_next > 0).sum())   # the residual of rows leaving is dropped
                torch.testing.assert_close(got_s[:staying], want_s[:staying], rtol=1e-5, atol=1e-5)
            else:
                assert got_s is None and want_s is None


def test_folded_step_is_a_few_multiply_adds():
    rows, guider = rows_for(("lcm", "epsilon"), "self", 4, 1, True)
    # x' depends on x, the conditional output, the residual and the noise: four terms, no more
    assert sorted(name for name, _ in rows.folded.x_terms) == ["noise", "out_c", "residual", "x"]
    rows, guider = rows_for(("ddim", "epsilon"), "none", 2, 1, True)
    assert sorted(name for name, _ in rows.folded.x_terms) == ["out_c", "x"]


def test_stream_step_folded_and_unfolded_agree_through_a_model():
    key, cfg = ("lcm", "v_prediction"), "initialize"
    rows, guider = rows_for(key, cfg, 4, 3, True)
    plain, _ = rows_for(key, cfg, 4, 3, True)
    plain.folded = None
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))

    def denoiser(x, t, cond):   # any function of the rows: the step only sees its outputs
        assert x.shape[0] == len(t) == len(cond)
        return torch.einsum("oc,bchw->bohw", weight, x) * (1 + t.view(-1, 1, 1, 1) / 1000)

    inputs = random_inputs(rows, guider, seed=2)
    args = (inputs["x"], rows, inputs["residual"], guider, inputs["noise"])
    folded = stream_step(denoiser, *args)
    unfolded = stream_step(denoiser, inputs["x"], plain, inputs["residual"], guider, inputs["noise"])
    for a, b in zip(folded, unfolded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_guidance_rescale_follows_its_formula_and_is_not_folded():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    guided = uncond + 7.0 * (cond - uncond)
    out = rescale_guidance(guided, cond, 0.7)
    for i in range(2):
        ratio = cond[i].std() / guided[i].std()
        torch.testing.assert_close(out[i], 0.7 * guided[i] * ratio + 0.3 * guided[i])
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.0), guided)
    rows, guider = rows_for(("ddim", "v_prediction"), "full", 2, 1, True)
    guider = make_guider("full", 7.0, guidance_rescale=0.7)
    assert not guider.affine
    with pytest.raises(ValueError, match="guidance_rescale"):
        make_guider("self", 1.5, guidance_rescale=0.7)
    with pytest.raises(ValueError, match="guidance_rescale"):
        make_guider("full", 5.0, guidance_rescale=1.5)


def test_guider_row_layouts():
    for cfg, extra in (("none", 0), ("full", 6), ("self", 0), ("initialize", 2)):
        guider = make_guider(cfg, 2.0)
        assert guider.model_rows(6, 2) == 6 + extra
        x = torch.arange(6.0).view(6, 1, 1, 1)
        latents = guider.model_latents(x, 2)
        assert latents.shape[0] == 6 + extra
        out_c, out_u = guider.split(latents, 2)
        assert torch.equal(out_c, x) and (out_u is None) == (extra == 0)
    with pytest.raises(ValueError, match="cfg"):
        make_guider("half")
    with pytest.raises(ValueError, match="guidance_scale"):
        make_guider("full", -1.0)
