"""One-step adapters on the tiny pipeline: training lowers the loss; the file is plain diffusers';
its effect on the weights is exact; scales, swaps, known families, kohya files, bad input."""

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from click.testing import CliRunner
from diffusers import DPMSolverMultistepScheduler

import fastdiff
from fastdiff.architectures import tiny_sd_pipeline, tiny_sdxl_pipeline
from fastdiff.artefacts import StaleArtefactError
from fastdiff.cli import main
from fastdiff.tuning.adapters import ADAPTER_NAME, load_adapter
from fastdiff.stream.prepare import Prepared
from fastdiff.tuning.onestep import (HUBER_C, DistributionMatching, error, laplacian, teacher_targets,
                                     train_onestep)

PROMPTS = ["a red circle", "a blue square"]


def tiny():
    return tiny_sd_pipeline(scheduler="ddim")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pipe = tiny()
    adapter = train_onestep(pipe, PROMPTS, rank=4, minutes=2, iterations=30, teachers=16, teacher_steps=4, batch=8,
                            workdir=str(tmp_path_factory.mktemp("work")))
    folder = str(tmp_path_factory.mktemp("adapters") / "tiny-onestep")
    return pipe, adapter, adapter.save(folder)


def run(fast, **kwargs):
    return fast(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def test_training_lowers_the_loss_and_writes_a_manifest(trained):
    _, adapter, saved = trained
    first, last = adapter.details["first_loss"]["loss"], adapter.details["final_loss"]["loss"]
    assert last < 0.7 * first, (first, last)
    manifest = saved.manifest
    assert manifest["fields"]["rank"] == 4 and manifest["fields"]["steps"] == 1
    assert {"to_q", "to_k", "to_v", "conv1"} <= set(manifest["fields"]["targets"])
    assert manifest["sampling"]["steps"] == 1 and manifest["sampling"]["timesteps"]
    assert set(os.listdir(saved.path)) == {"pytorch_lora_weights.safetensors", "manifest.json"}


def test_the_file_loads_with_plain_diffusers(trained):
    _, _, saved = trained
    plain = tiny()
    before = run(plain, num_inference_steps=1, guidance_scale=1.0)
    plain.load_lora_weights(saved.path)   # diffusers alone, no fastdiff involved
    after = run(plain, num_inference_steps=1, guidance_scale=1.0)
    assert np.abs(after - before).max() > 1e-3


def test_scale_zero_is_the_base_model_and_scale_one_is_the_merged_weights(trained):
    pipe, _, saved = trained
    base = run(fastdiff.accelerate(pipe), num_inference_steps=2, guidance_scale=1.0)
    fast = fastdiff.accelerate(pipe, adapter=saved.path, adapter_scale=0.0)
    np.testing.assert_array_equal(run(fast, num_inference_steps=2, guidance_scale=1.0), base)
    fast.set_adapter(saved.path, 1.0)
    with_lora = run(fast, num_inference_steps=2, guidance_scale=1.0)
    assert np.abs(with_lora - base).max() > 1e-3
    # the same as merging B·A·(α/r) into every targeted weight by hand
    merged = tiny()
    state = load_file(os.path.join(saved.path, "pytorch_lora_weights.safetensors"))
    with torch.no_grad():
        for key, down in state.items():
            if not key.endswith("lora_A.weight"):
                continue
            up = state[key.replace("lora_A", "lora_B")]
            name = key[len("unet."):-len(".lora_A.weight")]
            weight = merged.unet.get_submodule(name).weight
            delta = (up.flatten(1) @ down.flatten(1)).view(weight.shape) if weight.dim() == 4 else up @ down
            weight += delta   # α = r: a scale of one
    np.testing.assert_allclose(run(fastdiff.accelerate(merged), num_inference_steps=2, guidance_scale=1.0),
                               with_lora, atol=1e-5)
    fast.set_adapter(None)
    np.testing.assert_array_equal(run(fast, num_inference_steps=2, guidance_scale=1.0), base)


def test_the_adapter_sets_one_step_and_its_timestep(trained):
    pipe, _, saved = trained
    fast = fastdiff.accelerate(pipe, adapter=saved.path)
    calls = []
    real = fast.denoiser.run
    fast.denoiser.run = lambda module, x, t, c: calls.append((x.shape[0], float(t[0]))) or real(module, x, t, c)
    try:
        run(fast)   # no steps, no guidance: the adapter's
    finally:
        del fast.denoiser.run
    assert calls == [(2, saved.sampling.timesteps[0])]   # one call, unguided, at the trained timestep
    fast.set_adapter(None)


def test_a_later_timestep_is_trained_and_then_sampled_at(tmp_path):
    pipe = tiny()
    adapter = train_onestep(pipe, PROMPTS, rank=2, iterations=1, teachers=2, teacher_steps=2, batch=2, timestep=600,
                            loss="huber")
    saved = adapter.save(str(tmp_path / "at-600"))
    assert tuple(saved.sampling.timesteps) == (600,)
    assert adapter.details["settings"]["loss"] == "huber" and adapter.details["final_loss"]["loss"] > 0
    fast = fastdiff.accelerate(pipe, adapter=saved.path)
    calls = []
    real = fast.denoiser.run
    fast.denoiser.run = lambda module, x, t, c: calls.append(float(t[0])) or real(module, x, t, c)
    run(fast)
    assert calls == [600.0]
    with pytest.raises(ValueError, match="timestep"):
        train_onestep(pipe, PROMPTS, iterations=1, timestep=pipe.scheduler.config.num_train_timesteps)


def test_a_mismatched_base_is_refused(trained):
    _, _, saved = trained
    other = tiny_sd_pipeline(seed=1)
    with pytest.raises(StaleArtefactError, match="base"):
        fastdiff.accelerate(other, adapter=saved.path)


def test_a_damaged_adapter_is_refused(trained, tmp_path):
    import json
    import shutil

    pipe, _, saved = trained
    for damage, named in [("weights", "does not match its digest"), ("truncated", "missing or not"),
                          ("sampling", "does not match its own digest"), ("garbage", "manifest.json is damaged")]:
        copy = shutil.copytree(saved.path, tmp_path / damage)
        weights, manifest = copy / "pytorch_lora_weights.safetensors", copy / "manifest.json"
        if damage == "weights":   # the same size, other bytes
            data = bytearray(weights.read_bytes())
            data[-100:] = bytes(100)
            weights.write_bytes(bytes(data))
        elif damage == "truncated":
            weights.write_bytes(weights.read_bytes()[:-100])
        elif damage == "sampling":
            edited = json.loads(manifest.read_text())
            edited["sampling"]["timesteps"] = [t // 2 for t in edited["sampling"]["timesteps"]]   # a later step
            manifest.write_text(json.dumps(edited))
        else:
            manifest.write_text("{bad")
        with pytest.raises(StaleArtefactError, match=named):
            fastdiff.accelerate(pipe, adapter=str(copy))


def test_adapters_attached_in_turn_under_inference_mode(trained):
    # The quality harness builds each accelerated pipeline inside torch.inference_mode, so the LoRA
    # layers of the first adapter are inference tensors when the second one is checked and loaded.
    _, _, saved = trained
    pipe = tiny()
    with torch.inference_mode():
        first = run(fastdiff.accelerate(pipe, adapter=saved.path))
        second = run(fastdiff.accelerate(pipe, adapter=saved.path))
    np.testing.assert_array_equal(first, second)


def test_set_adapter_rescales_a_compiled_denoiser_without_recompiling(trained):
    pipe, _, saved = trained
    compiles = []

    def counting_backend(graph, inputs):
        compiles.append(1)
        return graph.forward

    fast = fastdiff.accelerate(pipe, adapter=saved.path, adapter_scale=1.0)
    fast.denoiser.module = torch.compile(pipe.unet, backend=counting_backend, dynamic=False)
    try:
        one = run(fast, num_inference_steps=1, guidance_scale=1.0)
        n = len(compiles)
        fast.set_adapter(saved.path, 0.3)
        three = run(fast, num_inference_steps=1, guidance_scale=1.0)
        assert len(compiles) == n and n >= 1   # the scale is a tensor: no guard failed, nothing recompiled
        assert np.abs(one - three).max() > 1e-4   # and yet the output changed
    finally:
        fast.denoiser.module = fast.denoiser.original
        fast.set_adapter(None)


def test_stream_set_adapter_changes_the_frames(trained):
    pipe, _, saved = trained
    stream = fastdiff.Stream(pipe, [30], cfg="none", output_type="latent", adapter=saved.path)
    stream.prepare("a red circle")
    frame = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    with_adapter = stream(frame)
    stream.set_adapter(saved.path, scale=0.0)
    without = stream(frame)
    assert not torch.allclose(with_adapter, without)
    assert stream.adapter_ready()
    stream.set_adapter(None)


def test_known_families_set_their_scheduler(trained, tmp_path):
    pipe, _, saved = trained
    weights = os.path.join(saved.path, "pytorch_lora_weights.safetensors")
    lcm = str(tmp_path / "lcm-lora-tiny.safetensors")
    shutil.copy(weights, lcm)
    fast = fastdiff.accelerate(pipe, adapter=lcm)
    assert type(fast.scheduler).__name__ == "LCMScheduler" and type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert fast.adapter.sampling.steps == 4 and fast.adapter.family == "lcm"
    assert run(fast).shape == (2, 64, 64, 3)
    tcd = str(tmp_path / "my-tcd-adapter.safetensors")
    shutil.copy(weights, tcd)
    assert type(fastdiff.accelerate(pipe, adapter=tcd).scheduler).__name__ == "TCDScheduler"
    hyper = str(tmp_path / "Hyper-SD15-2steps-lora.safetensors")
    shutil.copy(weights, hyper)
    assert load_adapter(hyper).sampling.steps == 2 and load_adapter(hyper).sampling.guidance_scale == 1.0
    hyper_cfg = str(tmp_path / "Hyper-SD15-12steps-CFG-lora.safetensors")   # guidance kept: its card's 5
    shutil.copy(weights, hyper_cfg)
    assert (load_adapter(hyper_cfg).sampling.steps, load_adapter(hyper_cfg).sampling.guidance_scale) == (12, 5.0)
    unified = str(tmp_path / "Hyper-SD15-1step-lora.safetensors")   # the one-step unified LoRA: TCD at eta 1
    shutil.copy(weights, unified)
    fast = fastdiff.accelerate(pipe, adapter=unified)
    assert (type(fast.scheduler).__name__, fast.adapter.sampling.steps, fast.adapter.sampling.eta) == ("TCDScheduler", 1, 1.0)
    assert run(fast).shape == (2, 64, 64, 3)
    fast.set_adapter(None)
    mystery = str(tmp_path / "mystery.safetensors")
    shutil.copy(weights, mystery)
    with pytest.raises(ValueError, match="adapter_scheduler"):
        fastdiff.accelerate(pipe, adapter=mystery)
    fast = fastdiff.accelerate(pipe, adapter=mystery, adapter_scheduler="lcm")
    assert type(fast.scheduler).__name__ == "LCMScheduler"
    fast.set_adapter(None)
    with pytest.raises(ValueError, match="adapter_scheduler must be one of"):
        load_adapter(mystery, adapter_scheduler="bogus")
    with pytest.raises(ValueError, match="adapter_scheduler: this adapter is fastdiff's own"):
        load_adapter(saved.path, adapter_scheduler="lcm")


def a_lora_of(pipe, folder, name: str) -> str:
    """A random LoRA on `pipe`'s transformer saved as diffusers saves one, under `name`."""
    from peft import LoraConfig, get_peft_model_state_dict

    model = pipe.transformer
    torch.manual_seed(5)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                 init_lora_weights="gaussian"), adapter_name="made")
    state = get_peft_model_state_dict(model, adapter_name="made")
    for key, value in state.items():   # PEFT starts B at zero: a LoRA that changes nothing
        if "lora_B" in key:
            value.copy_(torch.randn_like(value))
    model.delete_adapters("made")
    type(pipe).save_lora_weights(str(folder), transformer_lora_layers=state, weight_name=name)
    return os.path.join(str(folder), name)


@pytest.mark.parametrize("name, steps, guidance", [("Hyper-FLUX.1-dev-8steps-lora.safetensors", 8, 3.5),
                                                   ("FLUX.1-Turbo-Alpha.safetensors", 8, 3.5),
                                                   ("Hyper-SD3-4steps-CFG-lora.safetensors", 4, 3.0)])
def test_flow_matching_families_sample_as_their_cards_say(name, steps, guidance, tmp_path):
    """Hyper-SD3, Hyper-FLUX and FLUX.1-Turbo keep the pipeline's flow-matching Euler, at their cards'
    steps, guidance and LoRA weight (0.125 for Hyper-SD's): diffusers' images with the same LoRA."""
    from fastdiff.architectures import tiny_flux_pipeline, tiny_sd3_pipeline

    make = tiny_sd3_pipeline if "SD3" in name else tiny_flux_pipeline
    lora = a_lora_of(make(), tmp_path, name)
    weight = 0.125 if name.startswith("Hyper") else 1.0
    plain = make()
    plain.load_lora_weights(lora, adapter_name="theirs")
    plain.set_adapters(["theirs"], [weight])
    want = plain("a red circle", num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    pipe = make()
    fast = fastdiff.accelerate(pipe, adapter=lora)
    assert fast.scheduler is pipe.scheduler and fast.adapter_scale == weight
    got = fast("a red circle", output_type="np", generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - run_without_lora(make, steps, guidance)).max() > 1e-3   # the LoRA acted
    with pytest.raises(ValueError, match=r"adapter_scheduler must be one of \('hyper'"):
        fastdiff.accelerate(make(), adapter=lora, adapter_scheduler="lcm")   # the UNets' families don't apply


def run_without_lora(make, steps, guidance):
    return make()("a red circle", num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images


def test_a_hyper_flux_file_from_the_command_line_and_in_a_stream(tmp_path):
    from fastdiff.architectures import tiny_flux_pipeline

    lora = a_lora_of(tiny_flux_pipeline(), tmp_path, "Hyper-FLUX.1-dev-16steps-lora.safetensors")
    for scale, said in ((None, "LoRA weight 0.125"), ("0.5", "LoRA weight 0.5")):
        args = ["generate", "--model", "tiny-flux", "--adapter", lora, "--out", str(tmp_path / "out"), "a red circle"]
        result = CliRunner().invoke(main, args + (["--adapter-scale", scale] if scale else []))
        assert result.exit_code == 0, result.output
        assert f"(hyper): 16 step(s), FlowMatchEulerDiscreteScheduler, {said}" in result.output
    stream = fastdiff.Stream(tiny_flux_pipeline(img2img=True), adapter=lora)
    stream.prepare("a red circle")
    frames = [stream(torch.rand(3, 64, 64)) for _ in range(3)] + stream.flush()
    assert stream.adapter_scale == 0.125 and sum(f is not None for f in frames) == 3


def test_a_unet_family_name_on_a_flux_pipeline_is_refused_naming_its_families(tmp_path):
    from fastdiff.architectures import tiny_flux_pipeline

    lora = a_lora_of(tiny_flux_pipeline(), tmp_path, "lcm-lora-flux.safetensors")
    with pytest.raises(ValueError, match=r"names no known family \(hyper, turbo\)"):
        fastdiff.accelerate(tiny_flux_pipeline(), adapter=lora)


def to_kohya(state: dict) -> dict:
    """Our LoRA (PEFT keys) written in kohya's layout: lora_unet_<path with _>.lora_down/up.weight + alpha."""
    out = {}
    for key, value in state.items():
        path, kind = key[len("unet."):].rsplit(".lora_", 1)   # kind: "A.weight" or "B.weight"
        name = "lora_unet_" + path.replace(".", "_")
        out[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        if kind.startswith("A"):
            out[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    return out


def test_a_kohya_file_gives_the_same_weights_as_peft_loading_ours(trained, tmp_path):
    pipe, _, saved = trained
    state = load_file(os.path.join(saved.path, "pytorch_lora_weights.safetensors"))
    kohya = str(tmp_path / "lcm-kohya.safetensors")
    save_file(to_kohya(state), kohya)
    ours = fastdiff.accelerate(pipe, adapter=saved.path)
    want = run(ours, num_inference_steps=2, guidance_scale=1.0)
    ours.set_adapter(None)
    theirs = fastdiff.accelerate(pipe, adapter=kohya, adapter_scheduler="hyper")
    theirs.own_scheduler = None   # compare the weights alone, on the same scheduler
    got = run(theirs, num_inference_steps=2, guidance_scale=1.0)
    theirs.set_adapter(None)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_bad_input_is_named(tmp_path):
    pipe = tiny()
    with pytest.raises(ValueError, match="rank"):
        train_onestep(pipe, PROMPTS, rank=0, iterations=1)
    with pytest.raises(ValueError, match="targets"):
        train_onestep(pipe, PROMPTS, targets="everything", iterations=1)
    with pytest.raises(ValueError, match="teacher_solver"):
        train_onestep(pipe, PROMPTS, teacher_solver="lcm", iterations=1)
    with pytest.raises(ValueError, match="loss"):
        train_onestep(pipe, PROMPTS, loss="l1", iterations=1)
    with pytest.raises(ValueError, match="dmd_weight"):
        train_onestep(pipe, PROMPTS, dmd_weight=-1.0, iterations=1)
    with pytest.raises(ValueError, match="init"):
        train_onestep(pipe, PROMPTS, init=str(tmp_path / "missing"), iterations=1)
    (tmp_path / "a-file").write_text("")
    for arguments, named in [({"batch": 0}, "batch"), ({"lr": float("nan")}, "lr"), ({"teacher_steps": "2"}, "teacher_steps"),
                             ({"guidance_scale": "5"}, "guidance_scale"), ({"seed": "x"}, "seed"),
                             ({"workdir": str(tmp_path / "a-file")}, "workdir"), ({"prompts": [3]}, "prompts")]:
        arguments = {"prompts": PROMPTS, **arguments}
        with pytest.raises(ValueError, match=named):   # before any teacher is drawn
            train_onestep(pipe, arguments.pop("prompts"), iterations=1, **arguments)
    with pytest.raises(ValueError, match="adapter: no LoRA"):
        fastdiff.accelerate(pipe, adapter=str(tmp_path / "missing"))
    sdxl = tiny_sdxl_pipeline()
    foreign = tmp_path / "sdxl"
    sdxl_adapter = train_onestep(tiny(), PROMPTS, rank=2, iterations=1, teachers=2, teacher_steps=2, batch=2)
    sdxl_adapter.save(str(foreign))
    with pytest.raises((ValueError, StaleArtefactError)):
        fastdiff.accelerate(sdxl, adapter=str(foreign))


@pytest.mark.parametrize("solver", ["ddim", "dpmpp2m"])
def test_the_teachers_are_what_the_pipeline_draws_with_their_solver(solver):
    pipe = tiny()
    if solver == "dpmpp2m":   # against diffusers' own DPM-Solver++ 2M
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    parts = Prepared(pipe)
    height, width = parts.size(None, None)
    noise = torch.randn((2, *parts.latent_shape(height, width)), generator=torch.Generator().manual_seed(3))
    cond, uncond = parts.encode(PROMPTS, None, height, width)
    teachers = teacher_targets(parts, cond, uncond, noise, 4, 5.0, 0.0, solver=solver)
    drawn = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, output_type="latent",
                 latents=noise * pipe.scheduler.init_noise_sigma).images
    torch.testing.assert_close(teachers, drawn.float(), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(teachers, teacher_targets(parts, cond, uncond, noise, 2, 5.0, 0.0, solver=solver))


def test_the_huber_error_leads_to_the_median_where_the_squared_error_leads_to_the_mean():
    # a picture's pixel that the teacher draws as a shape in one case of four: fitted by the squared
    # error it is a quarter-shade, by the pseudo-Huber error it stays background
    targets = torch.tensor([0.0, 0.0, 0.0, 1.0])
    fitted = {}
    for loss in ("l2", "huber"):
        value = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.Adam([value], lr=0.01)
        for _ in range(600):
            optimizer.zero_grad()
            error(value.expand(4), targets, loss).backward()
            optimizer.step()
        fitted[loss] = value.item()
    assert abs(fitted["l2"] - 0.25) < 0.02, fitted
    assert abs(fitted["huber"]) < 2 * HUBER_C, fitted


def test_the_high_frequency_term_is_a_laplacian():
    flat = torch.ones(1, 3, 8, 8)
    assert laplacian(flat).abs().max() == 0
    edge = torch.zeros(1, 1, 8, 8)
    edge[..., 4:] = 1
    assert laplacian(edge).abs().sum() > 0
    assert ADAPTER_NAME == "fastdiff"


def test_an_onnxruntime_stream_keeps_running_on_the_old_engine_while_the_new_one_builds(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    pipe, _, saved = trained
    options = {"cache_dir": str(tmp_path), "threads": 1, "components": ["denoiser"]}
    stream = fastdiff.Stream(pipe, [40], cfg="none", output_type="latent", backend="onnxruntime",
                             engine_options=options, adapter=saved.path, adapter_scale=1.0)
    stream.prepare("a red circle")
    frame = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    full = stream(frame)
    old_engine = stream.denoiser.module
    stream.set_adapter(saved.path, scale=0.0, wait=False)   # a new cache key: a rebuild, in the background
    during = stream(frame)   # served meanwhile, by an engine either way
    assert isinstance(during, torch.Tensor)
    stream._pending.join(timeout=600)
    assert stream.adapter_ready() and stream.denoiser.module is not old_engine
    off = stream(frame)
    assert not torch.allclose(off, full)   # the rebuilt engine has the adapter at scale 0
    plain = fastdiff.Stream(pipe, [40], cfg="none", output_type="latent")
    plain.prepare("a red circle")
    torch.testing.assert_close(off, plain(frame), rtol=1e-3, atol=1e-3)
    from fastdiff.tuning.adapters import detach_adapter

    detach_adapter(pipe)   # the module's pipeline, as the other tests found it


@pytest.mark.parametrize("args, option", [
    (["--teacher-solver", "lcm"], "--teacher-solver"), (["--loss", "l1"], "--loss"), (["--minutes", "0"], "--minutes"),
    (["--rank", "0"], "--rank"), (["--teachers", "0"], "--teachers"), (["--dmd-weight", "-1"], "--dmd-weight"),
    (["--init", "/no/such/adapter"], "--init"),
])
def test_tune_onestep_names_its_bad_options(args, option, tmp_path):
    result = CliRunner().invoke(main, ["tune", "onestep", "--model", "tiny", *args, "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and option in result.output, result.output
    assert not (tmp_path / "a").exists()


def test_tune_onestep_writes_an_adapter_with_its_teachers_and_loss_recorded(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "tiny-onestep"
    result = CliRunner().invoke(main, ["tune", "onestep", "--model", "tiny", "--prompt-file", str(prompts),
                                       "--rank", "2", "--iterations", "2", "--teachers", "4", "--teacher-steps", "3",
                                       "--teacher-solver", "ddim", "--loss", "huber", "--batch", "2",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    settings = load_adapter(str(out)).manifest["details"]["settings"]
    assert (settings["teacher_solver"], settings["teacher_steps"], settings["teachers"], settings["loss"]) == (
        "ddim", 3, 4, "huber")


def test_distribution_matching_pulls_by_the_fake_minus_the_real_estimate():
    pipe = tiny()
    parts = Prepared(pipe)
    height, width = parts.size(None, None)
    cond, uncond = parts.encode(PROMPTS, None, height, width)
    base = parts.denoiser.original
    before = {k: v.clone() for k, v in base.state_dict().items()}
    matching = DistributionMatching(base, pipe.scheduler, 3.0, 0.0)
    x0 = torch.randn(2, *parts.latent_shape(height, width), generator=torch.Generator().manual_seed(1))

    def pull(rng):
        leaf = x0.clone().requires_grad_(True)
        matching.loss(leaf, cond.embeds, uncond.embeds, rng).backward()
        return leaf.grad * leaf.numel()

    # the fake score starts as the base, guided alike: the two agree and nothing pulls
    assert pull(torch.Generator().manual_seed(0)).abs().max() < 1e-4
    for _ in range(3):
        matching.update_fake(x0, cond.embeds, uncond.embeds, torch.Generator().manual_seed(2))
    torch.testing.assert_close(base.state_dict(), before)   # only the fake learns
    grad = pull(torch.Generator().manual_seed(3))
    # the same noise, drawn again: the pull is (x̂0_fake − x̂0_real) / mean |x0 − x̂0_real|, both guided
    rng = torch.Generator().manual_seed(3)
    t = torch.randint(matching.low, matching.high, (2,), generator=rng)
    eps = torch.randn(x0.shape, generator=rng)
    cumulative = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x = cumulative.sqrt() * x0 + (1 - cumulative).sqrt() * eps
    with torch.no_grad():
        def x0_of(module):   # the tiny pipeline predicts ε
            out_c, out_u = (module(x, t, encoder_hidden_states=e).sample for e in (cond.embeds, uncond.embeds))
            return (x - (1 - cumulative).sqrt() * (out_u + 3.0 * (out_c - out_u))) / cumulative.sqrt()
        real, fake = x0_of(base), x0_of(matching.fake)
    weight = (x0 - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    assert (fake - real).abs().max() > 1e-3
    torch.testing.assert_close(grad, (fake - real) / weight, rtol=1e-3, atol=1e-4)


def test_the_fake_score_learns_the_velocity_of_a_v_prediction_model():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type="v_prediction")
    matching = DistributionMatching(tiny().unet, scheduler, 3.0, 0.0)
    rng = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=rng), torch.randn(3, 4, 8, 8, generator=rng)
    t = torch.tensor([20, 500, 970])
    alpha, beta = matching.alpha[t].view(-1, 1, 1, 1), matching.beta[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(matching.target(x0, eps, alpha, beta), scheduler.get_velocity(x0, eps, t))


def test_training_starts_from_an_adapter_and_resumes_with_its_fake_score(trained, tmp_path, monkeypatch):
    from peft.utils import get_peft_model_state_dict
    from fastdiff.tuning import onestep

    monkeypatch.setattr(onestep, "DMD_WARMUP", 3)   # the fake score's head start, short on a tiny model
    pipe, _, saved = trained
    kwargs = dict(rank=4, teachers=4, teacher_steps=2, batch=2, dmd_weight=1.0, init=saved.path)
    kept = train_onestep(pipe, PROMPTS, iterations=1, lr=0.0, **kwargs)   # lr 0: the LoRA it started from
    start = {k.removeprefix("unet."): v for k, v in load_file(saved.weights).items()}
    torch.testing.assert_close(get_peft_model_state_dict(kept.student), start)
    assert kept.details["settings"]["dmd_weight"] == 1.0 and kept.details["settings"]["init"]
    assert {"match", "fake"} <= set(kept.details["final_loss"])
    # two steps at once, or one and then one more after a restart: the same student
    whole = train_onestep(pipe, PROMPTS, iterations=2, workdir=str(tmp_path / "a"), **kwargs)
    train_onestep(pipe, PROMPTS, iterations=1, workdir=str(tmp_path / "b"), **kwargs)
    updates, update = [], onestep.DistributionMatching.update_fake
    monkeypatch.setattr(onestep.DistributionMatching, "update_fake",
                        lambda self, x0, *args: updates.append(len(x0)) or update(self, x0, *args))
    resumed = train_onestep(pipe, PROMPTS, iterations=2, workdir=str(tmp_path / "b"), **kwargs)
    assert resumed.details["iterations"] == 2 and updates == [1]   # step 2 alone: no head start again
    # ... on pictures of its own: half a batch of fresh noises beside the regression's pairs
    assert resumed.details["settings"]["dmd_noise"] == "fresh"
    torch.testing.assert_close(get_peft_model_state_dict(resumed.student), get_peft_model_state_dict(whole.student))
    with pytest.raises(ValueError, match="init.*rank 2"):
        train_onestep(pipe, PROMPTS, rank=2, iterations=1, teachers=2, teacher_steps=2, batch=2, init=saved.path)
