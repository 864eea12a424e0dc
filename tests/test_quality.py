"""The quality table and `fastdiff bench quality` on the committed shapes model (few prompts, few steps)."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fastdiff.cli import main
from fastdiff.shapes import model as M
from fastdiff.quality import format_table, generate, held_out, measure, quality_row, quality_table


@pytest.fixture(scope="module")
def pipe():
    return M.load_pipeline()


def test_rows_are_paired_with_the_teacher_on_the_same_noise(pipe):
    rows = quality_table(pipe, steps_list=(3, 1), cfgs=("full", "none"), count=4, teacher_steps=3, unstated=2,
                         repeats=2)
    assert [(r.steps, r.cfg) for r in rows] == [(3, "full"), (3, "none"), (1, "full"), (1, "none")]
    # The teacher's own configuration reproduces it exactly: same prompts, seeds and initial noise.
    assert rows[0].psnr == math.inf
    assert all(math.isfinite(r.psnr) and r.psnr > 5 for r in rows[1:])
    for r in rows:
        shares = (r.accuracy_one, r.accuracy_two, r.accuracy_three, r.accuracy_unstated)
        assert all(0 <= a <= 1 for a in shares) and r.distance >= 0 and r.coverage >= 0
    table = format_table(rows)
    assert table.count("\n") == 5 and "| 3 | full | ddim |" in table and "∞" in table


def test_held_out_set_holds_every_kind_and_repeats_the_unstated_prompts():
    held = held_out(count=3, unstated=2, repeats=4)
    assert [held.kinds.count(k) for k in ("one", "two", "three", "unstated")] == [3, 3, 3, 8]
    unstated = held.texts[held.of("unstated")]
    assert len(set(unstated)) == 2 and unstated[:4] == [unstated[0]] * 4
    assert held.rendered.shape == (17, 64, 64, 3)


def test_generate_rejects_bad_arguments(pipe):
    for kwargs, name in ((dict(steps=0), "steps"), (dict(cfg="half"), "cfg"), (dict(solver="euler"), "solver"),
                         (dict(batch=0), "batch"), (dict(seed=1.5), "seed"), (dict(prompts=[]), "prompts")):
        args = dict(prompts=["red background"], steps=2, cfg="none", solver="ddim") | kwargs
        with pytest.raises(ValueError, match=name):
            generate(pipe, args.pop("prompts"), **args)
    held = held_out(count=1, unstated=1, repeats=2)
    for call, name in ((lambda: held_out(seed=-1), "seed"), (lambda: quality_row(pipe, held, None, 2, "none"), "teachers"),
                       (lambda: quality_table(pipe, [2], "none"), "cfgs"), (lambda: quality_table(pipe, [], ["none"]), "steps_list"),
                       (lambda: quality_table(pipe, [2], ["none"], count=1, unstated=1, repeats=2, teacher_steps=0),
                        "teacher_steps")):
        with pytest.raises(ValueError, match=name):
            call()
    with pytest.raises(ValueError, match="outside its range"):   # 0–255 values read as [0, 1]: refused, not clipped
        measure(torch.full((len(held.texts), 3, 64, 64), 200.0), held, None)


def test_bench_quality_prints_and_writes_the_table(tmp_path):
    out = tmp_path / "q.json"
    result = CliRunner().invoke(main, ["bench", "quality", "--steps", "2", "--cfg", "self,none", "--count", "2",
                                       "--unstated", "1", "--repeats", "2", "--teacher-steps", "2", "--draws", "2",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| 2 | self | ddim |" in result.output and "| 2 | none | ddim |" in result.output
    assert result.output.count("(2 draws)") == 2
    written = json.loads(out.read_text())
    assert written["config"]["count"] == 2 and len(written["rows"]) == 2
    assert written["config"]["draws"] == 2 and {r["draws"] for r in written["rows"]} == {2}
    assert {r["cfg"] for r in written["rows"]} == {"self", "none"}


def test_bench_quality_names_a_bad_option(tmp_path):
    result = CliRunner().invoke(main, ["bench", "quality", "--cfg", "full,half"])
    assert result.exit_code == 2 and "--cfg" in result.output
    for args, named in [(["--schedule", str(tmp_path / "missing.json")], "--schedule"), (["--out", str(tmp_path)], "--out"),
                        (["--out", str(tmp_path / "q.json" / "sub.json")], "--out")]:
        (tmp_path / "q.json").write_text("")
        result = CliRunner().invoke(main, ["bench", "quality", "--steps", "2", "--count", "1", "--unstated", "1",
                                           "--repeats", "2", "--teacher-steps", "2", *args])
        assert result.exit_code == 2 and named in result.output and "done" not in result.output, result.output


def test_a_row_with_an_adapter_leaves_the_pipeline_as_it_found_it(pipe):
    """An adapter loads into the pipeline's own denoiser; the rows measured after it (the base
    model's) must not run with it still attached."""
    from fastdiff.shapes import artefact_path

    prompts = ["a red circle", "a blue square and a green triangle"]
    before, _ = generate(pipe, prompts, 1, "none", "ddim", 1.0)
    adapted, _ = generate(pipe, prompts, 1, "none", None, 1.0, options={"adapter": artefact_path("onestep")})
    after, _ = generate(pipe, prompts, 1, "none", "ddim", 1.0)
    assert (adapted - before).abs().max() > 0.05
    assert torch.equal(after, before)


def test_a_row_over_draws_is_the_mean_of_its_draws_with_the_distance_spread(pipe):
    held = held_out(count=2, unstated=1, repeats=2)
    singles = [measure(generate(pipe, held.texts, 2, "none", "ddim", seed=seed)[0], held, None) for seed in (3, 4)]
    row = quality_row(pipe, held, [None, None], 2, "none", "ddim", seed=3)
    assert row.draws == 2 and math.isnan(row.psnr)   # no teachers given: no PSNR
    for key in ("accuracy_one", "accuracy_unstated", "coverage", "distance"):
        assert getattr(row, key) == pytest.approx(np.mean([v[key] for v in singles]))
    assert row.accuracy_by_draw == pytest.approx([np.mean([v[f"accuracy_{k}"] for k in ("one", "two", "three")])
                                                  for v in singles])
    distances = [v["distance"] for v in singles]
    assert distances[0] != distances[1] and row.distance_spread == pytest.approx(np.std(distances, ddof=1))
    assert f"{row.distance:.3f} ± {row.distance_spread:.3f} (2 draws)" in format_table([row])
    with pytest.raises(ValueError, match="teachers"):
        quality_row(pipe, held, [], 2, "none", "ddim")
    with pytest.raises(ValueError, match="draws"):
        quality_table(pipe, steps_list=(1,), cfgs=("none",), count=1, unstated=1, repeats=2, draws=0)
