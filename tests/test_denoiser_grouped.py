"""Per-row routes: the grouped denoiser, and engines built from bare sub-network modules."""

import copy

import pytest
import torch

from fastdiff.denoiser import Conditioning, GroupedDenoiser, denoiser_for
from fastdiff.engines import engine
from fastdiff.engines.attach import attach_engines
from fastdiff.engines.components import denoiser_component
from fastdiff.engines.profiles import stream_profile
from fastdiff.architectures import tiny_sd_pipeline
from fastdiff.vae import LatentCodec


@pytest.fixture(scope="module")
def parts():
    pipe = tiny_sd_pipeline()
    base = denoiser_for(pipe)
    other = copy.deepcopy(pipe.unet)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)
    with torch.inference_mode():
        cond, _ = base.encode_prompt(["a red circle", "a blue square", "a red fox", "a dog", "a cat"], None, 64, 64)
    x = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 700.0, 500.0, 300.0, 10.0])
    return pipe, base, other, cond, x, t


def test_grouped_denoiser_with_one_route_equals_the_plain_call(parts):
    pipe, base, _, cond, x, t = parts
    grouped = GroupedDenoiser(base, {0: pipe.unet})
    with torch.inference_mode():
        torch.testing.assert_close(grouped(x, t, cond.with_route(0)), base(x, t, cond), rtol=0, atol=0)


def test_rows_are_grouped_by_route_and_come_back_in_order(parts):
    pipe, base, other, cond, x, t = parts
    grouped = GroupedDenoiser(base, {0: pipe.unet, 3: other})
    routes = torch.tensor([3, 0, 3, 3, 0])
    calls = []
    real_run = base.run

    def counting_run(module, latents, tt, c):
        calls.append(latents.shape[0])
        assert c.route is not None and (c.route == c.route[0]).all()   # one route per call
        return real_run(module, latents, tt, c)

    base.run = counting_run
    try:
        with torch.inference_mode():
            out = grouped(x, t, cond.with_route(routes))
    finally:
        del base.run
    assert sorted(calls) == [2, 3]   # one call per group
    with torch.inference_mode():
        for route, module in ((0, pipe.unet), (3, other)):
            rows = (routes == route).nonzero().squeeze(1)
            alone = base.run(module, x[rows], t[rows], cond.rows(rows))
            torch.testing.assert_close(out[rows], alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(out[0], base(x[:1], t[:1], cond.rows(1))[0])   # row 0 really ran on `other`


def test_routes_are_checked_and_never_reach_the_model(parts):
    pipe, base, _, cond, x, t = parts
    grouped = GroupedDenoiser(base, {0: pipe.unet})
    with pytest.raises(ValueError, match="route"):
        grouped(x, t, cond)
    with pytest.raises(ValueError, match=r"routes \[2\]"):
        grouped(x, t, cond.with_route(2))
    with pytest.raises(ValueError, match="route must be"):
        cond.with_route([0, 1])
    with pytest.raises(ValueError, match="modules"):
        GroupedDenoiser(base, {})
    routed = cond.with_route(torch.arange(5))
    assert torch.equal(Conditioning.cat([routed, routed]).route, torch.cat([torch.arange(5)] * 2))
    assert torch.equal(routed.tile(2).route, torch.arange(5).repeat(2))
    assert "route" not in routed.extras


def test_an_engine_is_built_from_a_bare_module(parts, tmp_path):
    pipe, base, other, cond, x, t = parts
    component = denoiser_component(base, other)   # a module that no pipeline holds
    assert component.module is other
    runner = engine(component, "onnxruntime", profile=stream_profile(5, [(64, 64)]), cache_dir=str(tmp_path),
                    threads=1)
    feeds = {"sample": x, "timestep": t, "encoder_hidden_states": cond.embeds}
    with torch.inference_mode():
        want = base.run(other, x, t, cond)
    torch.testing.assert_close(runner(feeds)[0], want, rtol=1e-4, atol=1e-4)


def test_a_grouped_denoiser_gets_one_engine_per_sub_network(parts, tmp_path):
    pipe, base, other, cond, x, t = parts
    grouped = GroupedDenoiser(denoiser_for(pipe), {0: pipe.unet, 1: other})
    with torch.inference_mode():
        want = grouped(x, t, cond.with_route(torch.tensor([0, 1, 1, 0, 1])))
    attached = attach_engines(grouped, LatentCodec(pipe.vae), "onnxruntime", rows=5, frames=1,
                              resolutions=[(64, 64)],
                              options={"components": ["denoiser"], "cache_dir": str(tmp_path), "threads": 1})
    assert set(attached.folders) == {"denoiser/0", "denoiser/1"}
    assert attached.folders["denoiser/0"] != attached.folders["denoiser/1"]   # each under its own key
    with torch.inference_mode():
        got = grouped(x, t, cond.with_route(torch.tensor([0, 1, 1, 0, 1])))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # the same engines (from the cache) side by side: one-thread sessions, the same outputs; the VAE's
    # calls stay one at a time, its session on ONNX Runtime's default threads (0: every core)
    options = {"components": ["denoiser", "vae_decoder"], "cache_dir": str(tmp_path), "workers": 2}
    codec = LatentCodec(pipe.vae)
    attach_engines(grouped, codec, "onnxruntime", rows=5, frames=1, resolutions=[(64, 64)], options=options)
    assert grouped.workers == 2
    assert all(m.runner.session.get_session_options().intra_op_num_threads == max(1, torch.get_num_threads() // 2)
               for m in grouped.modules.values())
    assert codec.vae.decoder.runner.session.get_session_options().intra_op_num_threads == 0
    with torch.inference_mode():
        side_by_side = grouped(x, t, cond.with_route(torch.tensor([0, 1, 1, 0, 1])))
    torch.testing.assert_close(side_by_side, want, rtol=1e-4, atol=1e-4)
    for bad in (0, "2"):
        with pytest.raises(ValueError, match=r"engine_options\['workers'\] must be"):
            attach_engines(grouped, LatentCodec(pipe.vae), "onnxruntime", rows=5, frames=1,
                           resolutions=[(64, 64)], options={**options, "workers": bad})
    with pytest.raises(ValueError, match=r"engine_options\['workers'\] runs ONNX Runtime"):
        attach_engines(grouped, LatentCodec(pipe.vae), "inductor", rows=5, frames=1, resolutions=[(64, 64)],
                       options=options)


def _side_by_side(denoiser, base, workers, *inputs):
    """`denoiser`'s output on `inputs` with `workers`, and the (rows, thread) of each call of `base.run`."""
    import threading

    calls, real_run = [], base.run

    def recording_run(module, latents, tt, c):
        calls.append((latents.shape[0], threading.current_thread().name))
        return real_run(module, latents, tt, c)

    base.run = recording_run
    denoiser.set_workers(workers)
    try:
        with torch.inference_mode():
            return denoiser(*inputs), calls
    finally:
        del base.run
        denoiser.set_workers(1)


def test_workers_split_the_rows_into_calls_side_by_side_and_keep_their_order(parts):
    pipe, base, other, cond, x, t = parts
    with torch.inference_mode():
        want = base(x, t, cond)
    got, calls = _side_by_side(base, base, 2, x, t, cond)
    assert sorted(n for n, _ in calls) == [2, 3]   # the rows halved
    assert all(name.startswith("fastdiff-denoiser") for _, name in calls)   # on the pool's threads
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():   # each half is the plain call on those rows
        torch.testing.assert_close(got[:3], base(x[:3], t[:3], cond.rows(3)), rtol=0, atol=0)


@pytest.mark.parametrize("workers, sizes", [(2, [2, 3]), (3, [1, 2, 2])])
def test_grouped_calls_run_side_by_side_and_equal_the_sequential_ones(parts, workers, sizes):
    pipe, base, other, cond, x, t = parts
    grouped = GroupedDenoiser(base, {0: pipe.unet, 3: other})
    routed = cond.with_route(torch.tensor([3, 0, 3, 3, 0]))
    with torch.inference_mode():
        want = grouped(x, t, routed)
    got, calls = _side_by_side(grouped, base, workers, x, t, routed)
    # two routes: one call each; three workers: the larger group halved as well
    assert sorted(n for n, _ in calls) == sizes
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
