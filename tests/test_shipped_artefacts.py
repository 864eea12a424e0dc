"""The tuning artefacts shipped with the shapes model match the committed weights: a retrained model
without re-searched schedules, a retrained adapter or a retrained router fails here, not in a user's hands."""

import glob
import os

import pytest
import torch

from fastdiff.shapes import artefact_path
from fastdiff.shapes.model import load_pipeline
from fastdiff.tuning.adapters import attach_adapter, detach_adapter, load_adapter
from fastdiff.tuning.schedules import Schedule

SCHEDULES = sorted(glob.glob(os.path.join(artefact_path("schedule"), "*.json")))


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


def test_the_front_doors_schedules_ship():
    names = {os.path.basename(p) for p in SCHEDULES}
    # `--schedule auto` picks shapes-K.json at K steps; the stream's searched schedule beside them.
    assert {"shapes-4.json", "shapes-2.json", "shapes-stream-2.json"} <= names, names


@pytest.mark.parametrize("path", SCHEDULES, ids=os.path.basename)
def test_each_shipped_schedule_is_valid_for_the_committed_model(path, pipe):
    schedule = Schedule.load(path, pipe)
    assert list(schedule.timesteps) == sorted(schedule.timesteps, reverse=True)
    assert len(set(schedule.timesteps)) == len(schedule.timesteps)


@pytest.fixture(scope="module")
def noisy_and_context(pipe):
    """A noisy latent and the text context of one prompt, for a single denoiser call."""
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return latents, pipe.text_encoder(ids)[0]


def test_the_shipped_one_step_adapter_matches_the_committed_model(pipe, noisy_and_context):
    adapter = load_adapter(artefact_path("onestep"), pipe)
    latents, context = noisy_and_context
    with torch.no_grad():
        base = pipe.unet(latents, 999, context).sample
        attach_adapter(pipe, adapter)
        try:
            adapted = pipe.unet(latents, 999, context).sample
        finally:
            detach_adapter(pipe)
        again = pipe.unet(latents, 999, context).sample
    assert not torch.allclose(adapted, base, atol=1e-4)  # it changes the model...
    torch.testing.assert_close(again, base)  # ...and detaching gives the base model back


def test_the_shipped_router_matches_the_committed_model(pipe, noisy_and_context):
    from fastdiff.tuning.routers import load_router

    router = load_router(artefact_path("router"), pipe)   # refused if made for other weights
    shares = router.details["macs_ratio_per_code"]
    assert router.codes == 3 and shares == sorted(shares) and shares[-1] < 1   # graded, all pruned
    # nested: every gate a smaller code keeps, each larger code keeps too
    assert router.head.nested and all((router.gates[k] <= router.gates[k + 1]).all() for k in range(2))
    full = sum(p.numel() for p in pipe.unet.parameters())
    latents, context = noisy_and_context
    with torch.no_grad():
        base = pipe.unet(latents, 500, context).sample
        for code, subnet in router.subnets.items():
            assert sum(p.numel() for p in subnet.parameters()) < full
            out = subnet(latents, 500, context).sample
            assert out.shape == base.shape and torch.isfinite(out).all()
            # a pruned network that still does the full model's job: close to it, not equal
            assert 0 < (out - base).pow(2).mean() < base.pow(2).mean() * 0.5


def test_the_shipped_router_gives_harder_prompts_bigger_codes(pipe):
    from fastdiff.quality import held_out
    from fastdiff.tuning.routers import load_router

    router = load_router(artefact_path("router"), pipe)
    held = held_out(64, 1, 2)   # the held-out prompts BENCHMARKS reads the router on
    per_code = router.details["macs_ratio_per_code"]
    share = {kind: sum(per_code[int(c)] for c in router.route(pipe, held.texts[held.of(kind)])) / 64
             for kind in ("one", "two", "three")}
    assert share["one"] < share["two"] < share["three"], share
    assert sum(share.values()) / 3 <= 0.6, share   # at least 40% fewer MACs over the mix
