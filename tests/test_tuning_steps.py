"""Timestep search: DP on a known cost matrix, the evolutionary search's determinism and validity,
schedule files, and their use by accelerate, the stream and the command line (tiny pipelines)."""

import itertools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import fastdiff
from fastdiff.architectures import tiny_sd3_pipeline, tiny_sd_pipeline
from fastdiff.artefacts import StaleArtefactError
from fastdiff.cli import main
from fastdiff.tuning import Schedule, search_steps
from fastdiff.tuning.steps import (ays_schedule, crossover, evolution_search, is_valid, least_cost_path, mutate,
                                   uniform_timesteps)

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(scheduler="ddim")


def test_dp_finds_the_known_least_cost_path():
    rng = np.random.default_rng(0)
    n = 7
    cost = np.triu(rng.random((n + 1, n + 1)) + 0.1, 1)
    cost[cost == 0] = np.inf
    for jumps in (1, 2, 3, 5):
        nodes, total = least_cost_path(cost, jumps)
        brute = min(((0, *inner, n) for inner in itertools.combinations(range(1, n), jumps - 1)),
                    key=lambda path: sum(cost[a, b] for a, b in zip(path, path[1:])))
        assert tuple(nodes) == brute
        assert total == pytest.approx(sum(cost[a, b] for a, b in zip(brute, brute[1:])))
    with pytest.raises(ValueError, match="jumps"):
        least_cost_path(cost, n + 1)


def test_mutation_and_crossover_never_propose_invalid_sets():
    rng = np.random.default_rng(1)
    for _ in range(500):
        steps = int(rng.integers(2, 6))
        a = [999] + sorted(rng.choice(999, steps - 1, replace=False).tolist(), reverse=True)
        b = [999] + sorted(rng.choice(999, steps - 1, replace=False).tolist(), reverse=True)
        for child in (mutate(a, rng, 0.5), crossover(a, b, rng)):
            assert is_valid(child, 999) and len(child) == steps, child
    assert not is_valid([999, 500, 500], 999) and not is_valid([999, 200, 500], 999)
    assert not is_valid([900, 500], 999) and not is_valid([999, -1], 999)


class FakeTrajectories:
    """A synthetic fitness: distance to a target schedule (so the optimum is known)."""

    mode, strength_timestep = "stream", 900
    target = (900, 600, 300, 100)
    prompts, setting = ["synthetic"], "fake"

    def __init__(self):
        self.calls = []

    def score(self, candidate, weights):
        self.calls.append(tuple(candidate))
        return float(sum((a - b) ** 2 for a, b in zip(candidate, self.target))), {}


def test_evolution_under_an_early_first_timestep_fills_no_more_than_there_is():
    fake = FakeTrajectories()
    fake.strength_timestep, fake.target = 5, (5, 3, 1)   # C(5, 2) = 10 sets of three, fewer than a population
    best, details = evolution_search(fake, 3, budget_minutes=1, seed=0, generations=2)
    assert best == [5, 3, 1] and details["evaluations"] <= 10 and all(is_valid(c, 5) for c in fake.calls)


def test_evolution_is_deterministic_for_a_seed_and_resumes(tmp_path):
    runs = []
    for _ in range(2):
        fake = FakeTrajectories()
        best, details = evolution_search(fake, 4, budget_minutes=1, seed=3, generations=4)
        runs.append((best, fake.calls))
        assert all(is_valid(c, 900) for c in fake.calls)
        assert details["evaluations"] == len(set(fake.calls)) and details["complete"]
    assert runs[0] == runs[1]
    best, _ = runs[0]
    first = FakeTrajectories()
    assert first.score(best, {})[0] < first.score(uniform_timesteps(900, 4), {})[0]   # it improved on uniform
    # stopped after two generations, then resumed: the same result as four in one go
    state = str(tmp_path / "state.json")
    evolution_search(FakeTrajectories(), 4, budget_minutes=1, seed=3, generations=2, state_path=state)
    resumed, details = evolution_search(FakeTrajectories(), 4, budget_minutes=1, seed=3, generations=4,
                                        state_path=state)
    assert resumed == best and details["generations"] == 4
    for other in ({"seed": 4}, {"state": "{bad"}):   # another search's state, or none: refused, left as it is
        path = state if "seed" in other else str(tmp_path / "garbage.json")
        if "state" in other:
            open(path, "w").write(other["state"])
        before = open(path).read()
        with pytest.raises(StaleArtefactError, match="resume"):
            evolution_search(FakeTrajectories(), 4, budget_minutes=1, seed=other.get("seed", 3), state_path=path)
        assert open(path).read() == before


def test_bad_search_arguments_are_named_before_any_work(pipe, tmp_path):
    bad = [({"prompts": None}, "prompts"), ({"prompts": []}, "prompts"), ({"prompts": ["a", 3]}, "prompts"),
           ({"eval_prompts": [""]}, "eval_prompts"), ({"populaton": 3}, "populaton"),
           ({"method": "dp", "population": 3}, "population"), ({"population": 0}, "population"),
           ({"mutation_probability": float("nan")}, "mutation_probability"), ({"teacher_steps": "4"}, "teacher_steps"),
           ({"teacher_steps": 1}, "teacher_steps"), ({"weights": {"latent": float("nan")}}, "weights"),
           ({"guidance_scale": "x"}, "guidance_scale"), ({"strength_timestep": float("nan")}, "strength_timestep"),
           ({"strength_timestep": 100.5}, "strength_timestep"), ({"frames": []}, "frames"),
           ({"resume": str(tmp_path)}, "resume"), ({"resume": str(tmp_path / "no" / "state.json")}, "resume"),
           ({"seed": 1.5}, "seed")]
    for arguments, named in bad:
        arguments = {"prompts": PROMPTS, "method": "evolution", **arguments}
        with pytest.raises((ValueError, TypeError), match=named):
            search_steps(pipe, arguments.pop("prompts"), 2, arguments.pop("method"), budget_minutes=1, **arguments)


def test_a_search_writes_a_schedule_that_round_trips_and_refuses_other_models(pipe, tmp_path):
    schedule = search_steps(pipe, PROMPTS, 3, "dp", teacher_steps=10, fine_steps=10, eval_prompts=["a green fox"])
    uniform = search_steps(pipe, PROMPTS, 3, "uniform", teacher_steps=10)
    assert is_valid([int(t) for t in schedule.timesteps], int(schedule.timesteps[0]))
    assert schedule.fitness["search"]["fitness"] <= uniform.fitness["search"]["fitness"] + 1e-9
    assert "eval" in schedule.fitness and schedule.details["eval_prompts"] != schedule.details["prompts"]
    path = schedule.save(str(tmp_path / "tiny-3.json"))
    loaded = Schedule.load(path, pipe)
    assert loaded.timesteps == schedule.timesteps and loaded.fields == schedule.fields
    other = tiny_sd_pipeline(seed=1, scheduler="ddim")   # other weights
    with pytest.raises(StaleArtefactError, match="model"):
        Schedule.load(path, other)
    euler = tiny_sd_pipeline(scheduler="euler")
    euler.unet = pipe.unet
    with pytest.raises(StaleArtefactError, match="scheduler"):
        Schedule.load(path, euler)
    data = json.load(open(path))
    data["manifest"]["format"] = 99
    json.dump(data, open(path, "w"))
    with pytest.raises(StaleArtefactError, match="format"):
        Schedule.load(path, pipe)
    with pytest.raises(ValueError, match="no schedule file"):
        Schedule.load(str(tmp_path / "missing.json"))
    data["manifest"]["format"] = 1
    edited = [999.0, 500.0, 1.0] if loaded.timesteps != [999.0, 500.0, 1.0] else [999.0, 400.0, 1.0]
    unsealed = {k: v for k, v in data.items() if k != "content_sha256"}
    json.dump(unsealed, open(path, "w"))
    with pytest.raises(StaleArtefactError, match="carries no digest of its own content"):
        Schedule.load(path, pipe)
    for damage, error, named in [({"timesteps": edited}, StaleArtefactError, "edited: its content does not match"),
                                 ({"timesteps": None}, StaleArtefactError, "does not match its own digest"),
                                 ({"content_sha256": None}, StaleArtefactError, "does not match its own digest"),
                                 ({"manifest": [1]}, ValueError, "not a fastdiff step schedule")]:
        json.dump({**data, **damage}, open(path, "w"))
        with pytest.raises(error, match=named):
            Schedule.load(path, pipe)
    with pytest.raises(ValueError, match="disjoint"):
        search_steps(pipe, PROMPTS, 3, "uniform", eval_prompts=PROMPTS[:1])


def test_accelerate_with_a_schedule_equals_the_same_timesteps_given_explicitly(pipe, tmp_path):
    schedule = search_steps(pipe, PROMPTS, 3, "dp", teacher_steps=10, fine_steps=10)
    path = schedule.save(str(tmp_path / "s.json"))
    args = dict(prompt=PROMPTS, num_inference_steps=3, guidance_scale=4.0, output_type="np")
    with_schedule = fastdiff.accelerate(pipe, schedule=path)(generator=torch.Generator().manual_seed(0), **args)
    explicit = fastdiff.accelerate(pipe)(generator=torch.Generator().manual_seed(0),
                                         **{**args, "timesteps": schedule.timesteps})
    plain = fastdiff.accelerate(pipe)(generator=torch.Generator().manual_seed(0), **args)
    np.testing.assert_array_equal(with_schedule.images, explicit.images)
    assert np.abs(with_schedule.images - plain.images).max() > 1e-4   # another step count would run uniform
    # a call asking another step count runs the scheduler's own schedule
    five = dict(args, num_inference_steps=5)
    np.testing.assert_array_equal(
        fastdiff.accelerate(pipe, schedule=path)(generator=torch.Generator().manual_seed(0), **five).images,
        fastdiff.accelerate(pipe)(generator=torch.Generator().manual_seed(0), **five).images)


def test_stream_with_a_schedule_equals_the_same_timesteps(tmp_path):
    pipe = tiny_sd_pipeline(scheduler="lcm")
    from fastdiff.shapes import moving_shapes_clip

    clip = moving_shapes_clip(num_frames=3, seed=0)
    pipe.scheduler.set_timesteps(50)
    strength = float(pipe.scheduler.timesteps[32])
    schedule = search_steps(pipe, ["a red circle"], 2, "evolution", budget_minutes=1, mode="stream",
                            teacher_steps=6, frames=clip, strength_timestep=strength, population=4, top_k=2,
                            mutants=2, crossovers=1, generations=1)
    assert schedule.mode == "stream" and schedule.timesteps[0] == strength and schedule.solver == "lcm"
    path = schedule.save(str(tmp_path / "stream.json"))
    outputs = []
    for steps, timesteps in ((path, None), (None, schedule.timesteps)):
        stream = fastdiff.Stream(pipe, steps, timesteps=timesteps, output_type="latent")
        stream.prepare("a red circle")
        outputs.append([stream(frame) for frame in clip] + stream.flush())
    for a, b in zip(*outputs):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    pipeline_schedule = search_steps(pipe, ["a red circle"], 2, "uniform", teacher_steps=6)
    with pytest.raises(ValueError, match="stream schedule"):
        fastdiff.Stream(pipe, pipeline_schedule)
    with pytest.raises(ValueError, match="needs a sample schedule"):   # nor the other way round
        fastdiff.Stream(pipe, path, mode="txt2img")


def test_a_stream_search_refuses_a_prompt_judge():
    from fastdiff.tuning import shapes_judge

    with pytest.raises(ValueError, match="judge"):
        search_steps(tiny_sd_pipeline(scheduler="lcm"), ["a red circle"], 2, mode="stream", judge=shapes_judge)


def test_tune_steps_searches_the_shapes_models_stream_from_the_command_line(tmp_path):
    out = tmp_path / "stream-2.json"
    result = CliRunner().invoke(main, ["tune", "steps", "--model", "shapes", "--mode", "stream", "--steps", "2",
                                       "--budget-minutes", "0.02", "--frames", "2", "--teacher-steps", "6",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    schedule = Schedule.load(str(out))
    assert schedule.mode == "stream" and schedule.steps == 2 and schedule.solver == "lcm"


def test_tuning_prompts_repeat_the_unstated_ones_so_coverage_can_be_measured():
    from fastdiff.shapes.render import tuning_prompts

    search = tuning_prompts("search", 8, repeats=3)
    assert len(search) == 6 + 2 * 3 and len(set(search)) == 8
    repeated = {p for p in search if search.count(p) > 1}
    assert len(repeated) == 2 and all(search.count(p) == 3 for p in repeated)
    assert tuning_prompts("search", 8) == list(dict.fromkeys(search))   # repeats=1: each once, same order
    assert not set(search) & set(tuning_prompts("eval", 8, repeats=3))
    with pytest.raises(ValueError, match="repeats"):
        tuning_prompts("search", 8, repeats=0)
    stated = tuning_prompts("search", 9, kinds=("one", "two", "three"))   # three of each, in that order
    assert [p.count(" and a ") for p in stated] == [0] * 3 + [1] * 3 + [2] * 3
    assert stated[:3] == search[:2] + [tuning_prompts("search", 12)[2]]   # the same draws as the default's
    for kinds in ("one", (), ("one", "four")):
        with pytest.raises(ValueError, match="kinds"):
            tuning_prompts("search", 8, kinds=kinds)


def test_the_shapes_judge_measures_coverage_and_the_fitness_weighs_its_shortfall():
    from fastdiff.shapes.render import parse_caption, realise, render_batch, tuning_prompts
    from fastdiff.tuning.fitness import DEFAULT_WEIGHTS, fitness_of, shapes_judge

    prompts = tuning_prompts("search", 4, repeats=6)   # one prompt of each kind, the unstated one 6 times
    rng = np.random.default_rng(1)
    pictures = render_batch([realise(parse_caption(p), rng) for p in prompts])
    spread = torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255
    collapsed = spread.clone()
    first = prompts.index(prompts[-1])
    collapsed[first:] = spread[first]   # every seed of the unstated prompt draws the same picture
    judge = shapes_judge(prompts)
    varied, same = {**judge(spread), "latent": 0.0}, {**judge(collapsed), "latent": 0.0}
    assert same["coverage"] == 0.0 < varied["coverage"]
    base = {**same, "coverage": varied["coverage"]}
    assert fitness_of(same, DEFAULT_WEIGHTS, varied) == pytest.approx(
        fitness_of(base, DEFAULT_WEIGHTS, varied) + DEFAULT_WEIGHTS["coverage"])
    # more spread than the teacher's earns nothing; without repeats there is no coverage term
    assert fitness_of({**base, "coverage": 2 * varied["coverage"]}, DEFAULT_WEIGHTS, varied) == pytest.approx(
        fitness_of(base, DEFAULT_WEIGHTS, varied))
    assert "coverage" not in shapes_judge(list(dict.fromkeys(prompts)))(spread[:4])


def test_ays_for_its_families_and_a_clear_error_elsewhere(pipe):
    assert ays_schedule(pipe, 10) == [999, 850, 736, 645, 545, 455, 343, 233, 124, 24]
    four = ays_schedule(pipe, 4)
    assert four[0] == 999 and len(four) == 4 and is_valid(four, 999)
    with pytest.raises(ValueError, match="Align Your Steps"):
        ays_schedule(tiny_sd3_pipeline(), 4)


@pytest.mark.parametrize("args,option", [
    (["--steps", "0"], "--steps"),
    (["--steps", "4", "--method", "annealing"], "--method"),
    (["--steps", "4", "--budget-minutes", "0"], "--budget-minutes"),
    (["--steps", "4", "--prompt-file", "/no/such/file"], "--prompt-file"),
    (["--steps", "4", "--repeats", "0"], "--repeats"),
])
def test_tune_steps_options_are_checked(args, option, tmp_path):
    result = CliRunner().invoke(main, ["tune", "steps", "--model", "tiny", *args, "--out", str(tmp_path / "s.json")])
    assert result.exit_code == 2 and option in result.output, result.output


def test_tune_steps_writes_a_schedule_generate_uses(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "tiny-2.json"
    result = CliRunner().invoke(main, ["tune", "steps", "--model", "tiny", "--steps", "2", "--method", "dp",
                                       "--prompt-file", str(prompts), "--teacher-steps", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "timesteps" in result.output and Schedule.load(str(out)).steps == 2
    result = CliRunner().invoke(main, ["generate", "--model", "tiny", "--steps", "2", "--schedule", str(out),
                                       "--out", str(tmp_path / "img"), "a red circle"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["generate", "--model", "tiny", "--schedule", str(tmp_path / "none.json"),
                                       "--out", str(tmp_path / "img"), "a red circle"])
    assert result.exit_code == 2 and "--schedule" in result.output
