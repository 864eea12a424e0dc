"""Prompt-routed pruning on the tiny pipeline: units and gates, physical pruning, the MACs counter,
Sinkhorn, the router artefact, and routed accelerate / Stream."""

import copy
import json

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.architectures import tiny_sd_pipeline
from fastdiff.artefacts import StaleArtefactError
from fastdiff.macs import call_macs, module_macs
from fastdiff.tuning.pruning import attach_gates, gate_size, keep_one, macs_of, prunable_units, prune, unit_macs
from fastdiff.tuning.routers import load_router, pooled_prompts
from fastdiff.tuning.routing import (_plan_by_need, calibrate_router, code_targets, join_routers, shares_for, sinkhorn,
                                     sized_gates, train_router)

PROMPTS = ["a red circle", "a blue square", "a red fox and a dog", "a green tree and a house and a car"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd_pipeline(scheduler="ddim")


@pytest.fixture(scope="module")
def inputs(pipe):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0, 100.0])
    with torch.no_grad():
        c = pipe.encode_prompt(PROMPTS[:2], "cpu", 1, False)[0]
    return x, t, c


@pytest.fixture(scope="module")
def trained(pipe, tmp_path_factory):
    images = torch.rand(len(PROMPTS), 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    router = train_router(pipe, PROMPTS, images, codes=2, target=0.5, minutes=2, iterations=12, batch=8)
    folder = str(tmp_path_factory.mktemp("routers") / "tiny-router")
    return router, router.save(folder)


def assert_same_subnets(pipe, a, b):
    """Each code's sub-network of routers `a` and `b` gives the same output, bit for bit."""
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        c = pipe.encode_prompt(PROMPTS[:1], "cpu", 1, False)[0]
        for code in range(a.codes):
            torch.testing.assert_close(a.subnets[code](x, torch.tensor([300.0]), c).sample,
                                       b.subnets[code](x, torch.tensor([300.0]), c).sample, rtol=0, atol=0)


def test_units_cover_every_family_of_unit(pipe):
    units = prunable_units(pipe.unet)
    assert {u.kind for u in units} == {"resnet", "heads", "ff", "depth"}
    assert all(u.size >= 1 for u in units) and gate_size(units) == sum(u.size for u in units)
    assert all(u.inside is None or any(d.module == u.inside and d.kind == "depth" for d in units) for u in units)


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_width_units_come_in_at_most_the_groups_asked_for(pipe, groups):
    resnets = {n: m for n, m in pipe.unet.named_modules() if type(m).__name__ == "ResnetBlock2D"}
    units = prunable_units(pipe.unet, groups)
    for unit in units:
        if unit.kind == "resnet":   # whole GroupNorm groups, as many as allowed
            norm_groups = resnets[unit.module].norm2.num_groups
            assert unit.size <= groups and norm_groups % unit.size == 0
            assert unit.size == max(g for g in range(1, groups + 1) if norm_groups % g == 0)
        elif unit.kind == "ff":
            assert unit.size == groups
    assert [u.kind for u in units] == [u.kind for u in prunable_units(pipe.unet)]   # the same units, other widths


def test_open_gates_and_an_unpruned_copy_equal_the_full_network(pipe, inputs):
    unet = copy.deepcopy(pipe.unet)
    units = prunable_units(unet)
    with torch.no_grad():
        full = unet(*inputs).sample
        gates = attach_gates(unet, units)
        gates.set(torch.ones(gate_size(units)))
        opened = unet(*inputs).sample
        gates.remove()
        unpruned = prune(unet, units, torch.ones(gate_size(units)))(*inputs).sample
    torch.testing.assert_close(opened, full, rtol=0, atol=0)
    torch.testing.assert_close(unpruned, full, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_pruned_network_equals_the_gated_one_and_its_macs_model(pipe, inputs, seed):
    unet = copy.deepcopy(pipe.unet)
    units = prunable_units(unet)
    g = keep_one((torch.rand(gate_size(units), generator=torch.Generator().manual_seed(seed)) > 0.5).float(), units)
    with torch.no_grad():
        gates = attach_gates(unet, units)
        gates.set(g)
        gated = unet(*inputs).sample
        gates.set(torch.stack([g, torch.ones_like(g)]))   # per row: row 0 pruned, row 1 full
        mixed = unet(*inputs).sample
        gates.remove()
        pruned = prune(unet, units, g)
        out = pruned(*inputs).sample
        full = unet(*inputs).sample
    torch.testing.assert_close(out, gated, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1], full[1], rtol=1e-4, atol=1e-5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in unet.parameters())
    total, per_entry, blocks = unit_macs(unet, units, inputs)
    assert macs_of(g, units, total, per_entry, blocks).item() == pytest.approx(module_macs(pruned, *inputs)[0], rel=1e-6)


def test_a_code_is_held_to_its_size_keeping_its_highest_logits(pipe, inputs):
    units = prunable_units(pipe.unet)
    total, per_entry, blocks = unit_macs(copy.deepcopy(pipe.unet), units, inputs)
    logits = torch.randn(gate_size(units), generator=torch.Generator().manual_seed(3))
    for size in (0.3, 0.6, 0.9):
        gates = sized_gates(logits, size, units, total, per_entry, blocks)
        share = macs_of(gates, units, total, per_entry, blocks).item() / total
        assert share <= size
        # maximal: the next lower threshold (one more gate open) passes the size
        lower = logits[gates == 0].max()
        wider = keep_one((logits >= lower).float(), units, logits)
        assert macs_of(wider, units, total, per_entry, blocks).item() / total > size
        assert torch.equal(gates, keep_one((logits >= logits[logits > lower].min()).float(), units, logits))


def test_the_plan_by_need_gives_the_full_code_to_the_rows_that_lose_most_without_it(pipe):
    unet = copy.deepcopy(pipe.unet)
    units = prunable_units(unet)
    g = gate_size(units)
    logits = torch.stack([torch.full((g,), -1.0), torch.full((g,), 1.0)])   # code 0: almost nothing, code 1: full
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([900.0, 50.0, 500.0, 10.0, 700.0, 300.0])
    with torch.no_grad():
        c = pipe.encode_prompt(PROMPTS[:3] * 2, "cpu", 1, False)[0]
        full = unet(x, t, c).sample
        gates = attach_gates(unet, units)
        gates.set(keep_one(torch.zeros(g), units, logits[0]))
        loss = (unet(x, t, c).sample - full).pow(2).flatten(1).mean(-1)   # each row's loss in the small code
        plan = _plan_by_need(unet, gates, logits, x, t, c, full, epsilon=0.01)
        gates.remove()
    torch.testing.assert_close(plan.sum(0), torch.full((2,), 3.0), rtol=0, atol=0.05)   # balanced
    assert torch.equal(plan[:, 1].argsort(), loss.argsort())   # the more a row loses, the more of the full code
    # rows in runs of two per prompt: one code a prompt, by its rows' mean loss
    with torch.no_grad():
        gates = attach_gates(unet, units)
        paired = _plan_by_need(unet, gates, logits, x, t, c, full, epsilon=0.01, prompt_rows=2)
        gates.remove()
    torch.testing.assert_close(paired[0::2], paired[1::2], rtol=0, atol=0)
    torch.testing.assert_close(paired.sum(0), torch.full((2,), 3.0), rtol=0, atol=0.05)
    assert torch.equal(paired[0::2, 1].argsort(), loss.view(3, 2).mean(1).argsort())


def test_the_macs_counter_matches_a_hand_count():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 16 * 16, 10))
    x = torch.randn(2, 3, 16, 16)
    hand = 2 * (16 * 16 * 8 * 3 * 3 * 3) + 2 * (8 * 16 * 16 * 10)   # per output value: in·k² MACs; then the matmul
    total, per_module = module_macs(net, x)
    assert total == hand == call_macs(net, x)
    assert per_module["0"] == 2 * 16 * 16 * 8 * 27 and per_module["2"] == 2 * 8 * 16 * 16 * 10


def test_sinkhorn_balances_a_skewed_assignment():
    scores = torch.zeros(12, 3)
    scores[:, 0] = 1.0   # every row prefers code 0
    scores[:4, 1] += 0.2
    balanced = sinkhorn(scores, epsilon=0.5, iterations=50)
    torch.testing.assert_close(balanced.sum(1), torch.ones(12), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(balanced.sum(0), torch.full((3,), 4.0), rtol=1e-3, atol=1e-3)
    assert torch.softmax(scores, -1).sum(0)[0] > 6   # unbalanced, code 0 would take most rows
    uneven = sinkhorn(scores, epsilon=0.5, iterations=200, shares=torch.tensor([0.5, 0.25, 0.25]))
    torch.testing.assert_close(uneven.sum(0), torch.tensor([6.0, 3.0, 3.0]), rtol=1e-3, atol=1e-3)


def test_shares_for_a_target_are_the_most_even_with_that_mean():
    ratios = torch.tensor([0.4, 0.6, 0.8])
    torch.testing.assert_close(shares_for(ratios, 0.6), torch.full((3,), 1 / 3), rtol=1e-4, atol=1e-4)
    shares = shares_for(ratios, 0.5)
    assert float(shares @ ratios) == pytest.approx(0.5, abs=1e-5) and float(shares.sum()) == pytest.approx(1.0)
    assert shares[0] > shares[1] > shares[2] > 0   # tilted toward the small codes, none left out
    with pytest.raises(ValueError, match="target"):
        shares_for(ratios, 0.9)


def test_routing_is_deterministic_and_the_artefact_round_trips(pipe, trained):
    router, folder = trained
    first = router.route(pipe, PROMPTS)
    assert torch.equal(first, router.route(pipe, PROMPTS))
    loaded = load_router(folder, pipe)
    assert torch.equal(loaded.route(pipe, PROMPTS), first)
    assert torch.equal(loaded.gates, router.gates)
    assert_same_subnets(pipe, loaded, router)
    assert len(router.details["macs_per_code"]) == 2


def test_the_artefact_holds_low_rank_adapters_and_full_weights_round_trip_too(pipe, trained, tmp_path):
    router, folder = trained
    assert router.rank == 8 and set(router.adapters) == {0, 1}
    import os

    sizes = [os.path.getsize(os.path.join(folder, f"subnet-{k}.safetensors")) for k in range(2)]
    weights = [sum(p.numel() * 4 for p in router.subnets[k].parameters()) for k in range(2)]
    assert all(s < w / 2 for s, w in zip(sizes, weights))   # adapters only: far less than the sub-network
    images = torch.rand(len(PROMPTS), 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    # full weights, and units of another width grouping: the loader takes them from the manifest
    full = train_router(pipe, PROMPTS, images, codes=2, target=0.5, minutes=2, iterations=4, batch=8, finetune_rank=0,
                        groups=2)
    loaded = load_router(full.save(str(tmp_path / "full")), pipe)
    assert loaded.rank == 0 and not loaded.adapters
    assert loaded.units == prunable_units(pipe.unet, 2) != prunable_units(pipe.unet)
    assert_same_subnets(pipe, loaded, full)


def test_a_shared_adapter_trains_every_code_through_its_gates_and_round_trips(pipe, tmp_path):
    import os

    images = torch.rand(len(PROMPTS), 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    router = train_router(pipe, PROMPTS, images, codes=2, target=0.5, minutes=2, iterations=6, batch=8,
                          finetune="shared")
    assert router.finetune == "shared" and set(router.adapters) == {"shared"}
    tuned = [e for e in router.details["history"] if e["stage"] == "finetune"]
    assert len(tuned) == 6
    folder = router.save(str(tmp_path / "shared"))
    assert os.path.exists(os.path.join(folder, "shared.safetensors"))
    assert not any(f.startswith("subnet-") for f in os.listdir(folder))   # one adapter serves every code
    loaded = load_router(folder, pipe)
    assert loaded.finetune == "shared"
    assert_same_subnets(pipe, loaded, router)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():   # the adapter changed each code: not the base network pruned
        c = pipe.encode_prompt(PROMPTS[:1], "cpu", 1, False)[0]
        for code in range(2):
            plain = prune(pipe.unet, router.units, router.gates[code])
            assert not torch.allclose(plain(x, torch.tensor([300.0]), c).sample,
                                      router.subnets[code](x, torch.tensor([300.0]), c).sample)


def test_nested_codes_lie_inside_each_other_and_round_trip(pipe, tmp_path):
    images = torch.rand(len(PROMPTS), 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    router = train_router(pipe, PROMPTS, images, codes=3, target=0.5, spread=0.5, minutes=2, iterations=4, batch=8,
                          finetune="shared", nested=True)
    logits = router.head.code_logits()
    assert router.head.nested and logits.shape == (3, gate_size(router.units))
    sizes = router.details["macs_per_code"]
    assert sizes[0] < sizes[1] < sizes[2]
    for small, large in zip(router.gates[:-1], router.gates[1:]):   # every gate a smaller code keeps, a larger keeps too
        assert bool((small <= large).all())
    loaded = load_router(router.save(str(tmp_path / "nested")), pipe)
    assert loaded.head.nested and torch.equal(loaded.gates, router.gates)
    assert torch.equal(loaded.route(pipe, PROMPTS), router.route(pipe, PROMPTS))
    assert_same_subnets(pipe, loaded, router)


def test_a_router_loads_where_an_adapter_was_attached(trained):
    from peft import LoraConfig

    router, folder = trained
    other = tiny_sd_pipeline(scheduler="ddim")   # the same weights, its own modules
    other.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "conv1"]), adapter_name="user")
    other.unet.delete_adapters("user")   # PEFT leaves its wrappers behind
    loaded = load_router(folder, other)
    assert_same_subnets(other, loaded, router)


def test_a_router_and_an_adapter_are_refused_together(pipe, trained, tmp_path):
    from fastdiff.tuning.onestep import train_onestep

    _, folder = trained
    adapter = train_onestep(pipe, PROMPTS[:2], rank=2, minutes=1, iterations=1, teachers=2, teacher_steps=2,
                            batch=2).save(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="adapter: a router is set"):
        fastdiff.accelerate(pipe, router=folder, adapter=adapter.path)
    with pytest.raises(ValueError, match="adapter: a router is set"):
        fastdiff.Stream(pipe, [20, 40], output_type="latent", router=folder, adapter=adapter.path)
    fast = fastdiff.accelerate(pipe, adapter=adapter.path)
    try:
        with pytest.raises(ValueError, match="router: an adapter is attached"):
            fast._set_router(folder)
    finally:
        fast._set_adapter(None)   # the module's pipeline goes on without it


def test_graded_code_sizes_keep_the_mean_target():
    sizes = code_targets(0.55, 4, 0.4)
    torch.testing.assert_close(sizes, torch.tensor([0.33, 0.55 * (1 - 0.4 / 3), 0.55 * (1 + 0.4 / 3), 0.77]))
    assert torch.all(sizes[1:] > sizes[:-1])
    near_full = code_targets(0.9, 4, 0.4)   # the spread narrows so that no code passes the full model
    assert near_full.max() == pytest.approx(1.0) and near_full.mean() == pytest.approx(0.9)
    assert torch.equal(code_targets(0.55, 4, 0.0), torch.full((4,), 0.55))
    assert torch.equal(code_targets(0.55, 1, 0.4), torch.tensor([0.55]))


def test_a_router_with_a_damaged_manifest_is_refused(pipe, trained, tmp_path):
    import shutil

    copy = shutil.copytree(trained[1], tmp_path / "damaged")
    manifest = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text("[1, 2")
    with pytest.raises(StaleArtefactError, match="manifest.json is damaged"):
        load_router(str(copy), pipe)
    edited = json.loads(manifest)
    gates = edited["gates"][0]
    closed, open_ = gates.index(0), gates.index(1)   # one gate closed for another: every weight still fits
    gates[closed], gates[open_] = 1, 0
    (copy / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(StaleArtefactError, match="edited: its content does not match its own digest"):
        load_router(str(copy), pipe)
    edited = json.loads(manifest)
    edited["details"]["minutes"] = 999   # any field of it
    (copy / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(StaleArtefactError, match="does not match its own digest"):
        load_router(str(copy), pipe)
    (copy / "manifest.json").write_text(manifest)
    assert load_router(str(copy), pipe).codes == len(edited["gates"])   # the copy, put back, loads


def test_a_router_for_another_model_is_refused(trained):
    _, folder = trained
    with pytest.raises(StaleArtefactError, match="base"):
        load_router(folder, tiny_sd_pipeline(seed=1))
    with pytest.raises(ValueError, match="router: no router folder"):
        load_router("/no/such/router", tiny_sd_pipeline())


def test_routed_accelerate_equals_each_prompt_on_its_sub_network(pipe, trained):
    router, folder = trained
    fast = fastdiff.accelerate(pipe, router=folder)
    args = dict(num_inference_steps=2, guidance_scale=3.0, output_type="np")
    codes = fast.router.route(pipe, PROMPTS)
    noise = torch.randn((len(PROMPTS), 4, 8, 8), generator=torch.Generator().manual_seed(5))
    together = fast(PROMPTS, latents=noise, **args).images
    routed_macs = fast.last_call_macs
    for i, prompt in enumerate(PROMPTS):   # one prompt at a time: one group, one sub-network
        alone = fast([prompt], latents=noise[i:i + 1], **args).images[0]
        np.testing.assert_allclose(together[i], alone, atol=2e-5)
    plain = fastdiff.accelerate(pipe)
    plain(PROMPTS, latents=noise, **args)
    expected = sum(2 * router.details["macs_per_code"][int(c)] for c in codes)   # CFG: two rows a prompt
    assert routed_macs == pytest.approx(expected, rel=1e-6)
    assert routed_macs <= plain.last_call_macs
    with pytest.raises(ValueError, match="a router routes each prompt by its text"):
        fast(prompt_embeds=pipe.encode_prompt(PROMPTS[:1], "cpu", 1, False)[0], **args)


def test_a_routed_stream_reports_its_macs(pipe, trained):
    _, folder = trained
    stream = fastdiff.Stream(pipe, [20, 40], cfg="full", guidance_scale=2.0, output_type="latent", router=folder)
    stream.prepare("a red circle")
    plain = fastdiff.Stream(pipe, [20, 40], cfg="full", guidance_scale=2.0, output_type="latent")
    plain.prepare("a red circle")
    assert 0 < stream.macs_per_call <= plain.macs_per_call
    frame = torch.rand(3, 64, 64)
    outs = [stream(frame) for _ in range(3)]
    assert outs[0] is None and outs[-1] is not None


def test_bad_router_arguments_are_named(pipe):
    images = torch.zeros(4, 3, 64, 64)
    with pytest.raises(ValueError, match="images"):
        train_router(pipe, PROMPTS, images[:2], iterations=1)
    for prompts, pictures, named in [(PROMPTS, images * float("nan"), "images must be finite"),
                                     (PROMPTS, images + 255, "in \\[-1, 1\\]"), (PROMPTS, list(images), "images must be a tensor"),
                                     ([], images[:0], "prompts"), ([1, 2, 3, 4], images, "prompts")]:
        with pytest.raises(ValueError, match=named):
            train_router(pipe, prompts, pictures, iterations=1)
    bad = [({"codes": 0}, "codes"), ({"target": 1.5}, "target"), ({"target": 0.0}, "target"),
           ({"spread": 1.0}, "spread"), ({"finetune_rank": -1}, "finetune_rank"), ({"iterations": 0}, "iterations"),
           ({"batch": -2}, "batch"), ({"finetune_lr": 0.0}, "finetune_lr"), ({"uncond_share": 1.0}, "uncond_share"),
           ({"contrastive_weight": -1.0}, "contrastive_weight"), ({"groups": 0}, "groups"),
           ({"finetune": "both"}, "finetune"), ({"finetune": "shared", "finetune_rank": 0}, "finetune"),
           ({"finetune": "per-code", "nested": True}, "finetune"), ({"batch": 8, "prompt_rows": 3}, "prompt_rows"),
           ({"minutes": 1, "finetune_minutes": 1}, "finetune_minutes")]
    for arguments, named in bad:
        with pytest.raises(ValueError, match=named):
            train_router(pipe, PROMPTS, images, **arguments)


@pytest.mark.parametrize("model", ["tiny", "tiny, legacy end token", "shapes"])
def test_routing_reads_the_pooled_prompts_from_the_embeddings_already_made(pipe, model):
    from fastdiff.denoiser import denoiser_for
    from fastdiff.shapes.model import load_pipeline
    from fastdiff.tuning.routers import pooled_prompts

    chosen = load_pipeline() if model == "shapes" else tiny_sd_pipeline(scheduler="ddim")
    if model == "tiny, legacy end token":   # configs made before transformers fixed eos_token_id: the largest id pools
        chosen.text_encoder.config.eos_token_id = 2
        for module in chosen.text_encoder.modules():   # where this transformers version keeps it
            if hasattr(module, "eos_token_id"):
                module.eos_token_id = 2
    prompts = ["a red circle", "two blue squares on the left, a green background", "a"]
    with torch.inference_mode():
        cond, _ = denoiser_for(chosen).encode_prompt(prompts, None, 64, 64)
        second_pass = pooled_prompts(chosen, prompts)
        read = pooled_prompts(chosen, prompts, cond.embeds)
    torch.testing.assert_close(read, second_pass, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(read[0], read[1])   # each prompt's own


def test_the_routing_bench_pairs_router_and_single_model_draw_by_draw(pipe, trained):
    import os
    import sys

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    sys.path.insert(0, folder)
    try:
        from tuning import forced, paired_difference
    finally:
        sys.path.remove(folder)
    out = paired_difference([0.80, 0.84, 0.79], [0.78, 0.85, 0.76])
    assert out["per_draw"] == pytest.approx([0.02, -0.01, 0.03])
    assert out["mean"] == pytest.approx(0.04 / 3) and out["wins"] == 2 and out["draws"] == 3
    assert out["standard_error"] == pytest.approx(np.std([0.02, -0.01, 0.03], ddof=1) / 3 ** 0.5)
    # --each-code: every prompt on one code, whatever the router would pick
    for code in (0, 1):
        assert forced(trained[1], pipe, code).route(pipe, PROMPTS).tolist() == [code] * len(PROMPTS)


def test_routers_trained_apart_join_under_one_head_trained_by_need(pipe, tmp_path):
    images = torch.rand(len(PROMPTS), 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    small, large = (train_router(pipe, PROMPTS, images, codes=1, target=size, minutes=2, iterations=3, batch=8)
                    for size in (0.4, 0.8))
    joined = join_routers(pipe, [small, large.save(str(tmp_path / "large"))], PROMPTS, images, iterations=25,
                          batch=8, prompt_rows=2)
    assert joined.codes == 2 and torch.equal(joined.gates, torch.cat([small.gates, large.gates]))
    assert joined.details["macs_per_code"] == small.details["macs_per_code"] + large.details["macs_per_code"]
    assert joined.fields["target"] == pytest.approx(sum(joined.details["macs_ratio_per_code"]) / 2, abs=1e-4)
    low, high = joined.details["macs_ratio_per_code"]
    aimed = join_routers(pipe, [small, large], PROMPTS, images, target=low + (high - low) / 4, iterations=2, batch=8,
                         prompt_rows=2)
    assert aimed.fields["target"] == pytest.approx(low + (high - low) / 4, abs=1e-4)
    with pytest.raises(ValueError, match="target"):
        join_routers(pipe, [small, large], PROMPTS, images, target=high + 0.01)
    losses = [e["loss"] for e in joined.details["history"]]
    assert sum(losses[-5:]) < sum(losses[:5])   # the head learns the plans
    loaded = load_router(joined.save(str(tmp_path / "joined")), pipe)
    assert torch.equal(loaded.route(pipe, PROMPTS), joined.route(pipe, PROMPTS))
    for code, member in enumerate([small, large]):   # each code is its member's sub-network, as loaded
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([300.0])
        with torch.no_grad():
            c = pipe.encode_prompt(PROMPTS[:1], "cpu", 1, False)[0]
            torch.testing.assert_close(loaded.subnets[code](x, t, c).sample, member.subnets[0](x, t, c).sample)
    with pytest.raises(ValueError, match="routers"):
        join_routers(pipe, [small], PROMPTS, images)
    shared = train_router(pipe, PROMPTS, images, codes=2, target=0.5, minutes=2, iterations=2, batch=8, nested=True)
    with pytest.raises(ValueError, match="routers"):
        join_routers(pipe, [small, shared], PROMPTS, images)
    with pytest.raises(ValueError, match="minutes"):
        join_routers(pipe, [small, large], PROMPTS, images, minutes=0)
    with pytest.raises(ValueError, match="batch"):
        join_routers(pipe, [small, large], PROMPTS, images, batch=0)
    with pytest.raises(ValueError, match="lr"):
        join_routers(pipe, [small, large], PROMPTS, images, lr=float("nan"))
    with pytest.raises(StaleArtefactError, match="routers: .*base"):   # made for another model
        join_routers(tiny_sd_pipeline(seed=1), [small, large], PROMPTS, images)


def test_a_calibrated_router_serves_its_prompts_at_the_target_keeping_their_order(pipe, trained, tmp_path):
    router, folder = trained
    served = [f"a {c} {s} and a {d} {t}" for c in ("red", "blue", "green", "pink") for s in ("circle", "fox", "tree")
              for d in ("gray", "gold") for t in ("house", "car")]   # 48 prompts
    ratios = torch.tensor(router.details["macs_ratio_per_code"])
    low, high = ratios.tolist()
    with torch.no_grad():   # the means any shift can reach: the prompts most drawn to the bigger code on it
        scores = router.head.scores(pooled_prompts(pipe, served))
    pull = scores[:, int(high > low)] - scores[:, int(high <= low)]
    reachable = [min(low, high)] + [float(min(low, high) + (pull >= p).float().mean() * abs(high - low))
                                    for p in pull.unique()]
    on_big, previous = [], None
    for share in (0.1, 0.5, 0.9):
        target = min(low, high) + share * abs(high - low)
        calibrated = calibrate_router(pipe, folder, served, target)
        codes = calibrated.route(pipe, served)
        landed = float(torch.tensor(calibrated.details["macs_ratio_per_code"])[codes].mean())
        assert abs(landed - target) <= min(abs(r - target) for r in reachable) + 1e-6
        assert calibrated.details["calibration"]["landed"] == pytest.approx(landed, abs=1e-4)
        assert calibrated.fields["target"] == pytest.approx(target, abs=1e-4)
        big = set(torch.nonzero(codes == int(high > low)).flatten().tolist())
        assert previous is None or previous <= big   # a higher target only moves prompts to the bigger code
        previous = big
        on_big.append(len(big))
    assert on_big[0] < on_big[1] < on_big[2]
    loaded = load_router(calibrated.save(str(tmp_path / "calibrated")), pipe)
    assert torch.equal(loaded.route(pipe, served), codes)
    assert loaded.details["calibration"]["count"] == len(served)
    assert_same_subnets(pipe, loaded, router)
    assert torch.equal(load_router(folder, pipe).route(pipe, PROMPTS), router.route(pipe, PROMPTS))   # left as it was
    for arguments, named in [((served, high + 0.01), "target"), ((served, float("nan")), "target"),
                             (([], 0.5), "prompts"), (("a red circle", 0.5), "prompts")]:
        with pytest.raises(ValueError, match=named):
            calibrate_router(pipe, folder, *arguments)
    single = train_router(pipe, PROMPTS, torch.zeros(4, 3, 64, 64), codes=1, target=0.5, minutes=2, iterations=1, batch=8)
    with pytest.raises(ValueError, match="router"):
        calibrate_router(pipe, single, served, 0.5)
    with pytest.raises(StaleArtefactError, match="base"):
        calibrate_router(tiny_sd_pipeline(seed=1), folder, served, 0.5)
