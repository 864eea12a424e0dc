"""The engine cache: keys, manifests, stale artefacts refused, atomic writes, one builder per slot."""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time
from dataclasses import replace

import pytest
import torch

from fastdiff.engines import ShapeProfile, StaleEngineError, component, engine
from fastdiff.engines import cache
from fastdiff.engines.backends import engine_fields, load_runner
from fastdiff.architectures import tiny_sd_pipeline

PROFILE = ShapeProfile(batch=(1, 2, 2), height=(64, 64, 64), width=(64, 64, 64))


@pytest.fixture(scope="module")
def decoder():
    """The AutoencoderTiny decoder of the tiny pipeline: the quickest component to export."""
    return component(tiny_sd_pipeline(vae="tiny"), "vae_decoder")


def slot(fields):
    return cache.slot_name(fields)


class FakeLoraLayer(torch.nn.Module):
    """Holds LoRA scales the way PEFT's LoraLayer does (``scaling``: adapter → scale)."""

    def __init__(self, scale):
        super().__init__()
        self.scaling = {"default": scale}


def test_key_follows_weights_lora_scale_resolution_precision_and_backend(decoder):
    base = engine_fields(decoder, "onnxruntime", "fp32", PROFILE)
    assert base == engine_fields(decoder, "onnxruntime", "fp32", PROFILE)   # deterministic
    variants = {
        "precision": engine_fields(decoder, "onnxruntime", "fp16", PROFILE),
        "backend": engine_fields(decoder, "aoti", "fp32", PROFILE),
        "resolution": engine_fields(decoder, "onnxruntime", "fp32",
                                    ShapeProfile((1, 2, 2), (64, 64, 64), (128, 128, 128))),
        "batch": engine_fields(decoder, "onnxruntime", "fp32", ShapeProfile((1, 4, 4), (64, 64, 64), (64, 64, 64))),
    }
    changed = copy.deepcopy(decoder.module)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1e-3
    variants["weights"] = engine_fields(replace(decoder, module=changed), "onnxruntime", "fp32", PROFILE)
    lora = copy.deepcopy(decoder.module)
    lora.decoder.add_module("lora_probe", FakeLoraLayer(1.0))
    with_lora = replace(decoder, module=lora)
    variants["lora"] = engine_fields(with_lora, "onnxruntime", "fp32", PROFILE)
    lora.decoder.lora_probe.scaling["default"] = 0.5
    variants["lora scale"] = engine_fields(with_lora, "onnxruntime", "fp32", PROFILE)
    keys = {name: cache.engine_key(f) for name, f in variants.items()}
    keys["base"] = cache.engine_key(base)
    assert len(set(keys.values())) == len(keys), keys
    slots = {name: slot(f) for name, f in variants.items()} | {"base": slot(base)}
    assert len(set(slots.values())) == len(slots), slots   # asked-for changes pick another slot


def test_manifest_records_the_key_and_a_stale_artefact_is_refused_then_rebuilt(decoder, tmp_path):
    runner = engine(decoder, "onnxruntime", profile=PROFILE, cache_dir=str(tmp_path), threads=1)
    assert runner.built_now
    manifest = json.load(open(os.path.join(runner.folder, cache.MANIFEST)))
    fields = manifest["fields"]
    assert manifest["key"] == cache.engine_key(fields)
    assert fields["weights"] == cache.weights_hash(decoder.module)
    assert fields["profile"] == PROFILE.to_dict() and fields["precision"] == "fp32" and fields["opset"] >= 18
    assert "onnxruntime" in fields["versions"] and "torch" in fields["versions"]
    assert manifest["files"]["model.onnx"]["bytes"] > 0 and len(manifest["files"]["model.onnx"]["sha256"]) == 64

    again = engine(decoder, "onnxruntime", profile=PROFILE, cache_dir=str(tmp_path), threads=1)
    assert not again.built_now and again.folder == runner.folder

    # a manifest edited by hand (its file digests, say) is refused, not used
    path = os.path.join(runner.folder, cache.MANIFEST)
    edited = copy.deepcopy(manifest)
    edited["files"]["model.onnx"]["sha256"] = "0" * 64
    json.dump(edited, open(path, "w"))
    with pytest.raises(StaleEngineError, match="does not match its own digest"):
        engine(decoder, "onnxruntime", profile=PROFILE, cache_dir=str(tmp_path))

    # as if onnxruntime had been upgraded since the build
    manifest["fields"]["versions"]["onnxruntime"] = "0.0.1"
    json.dump(manifest, open(os.path.join(runner.folder, cache.MANIFEST), "w"))
    with pytest.raises(StaleEngineError, match="versions"):
        engine(decoder, "onnxruntime", profile=PROFILE, cache_dir=str(tmp_path))
    rebuilt = engine(decoder, "onnxruntime", profile=PROFILE, cache_dir=str(tmp_path), rebuild=True, threads=1)
    assert rebuilt.built_now
    x = decoder.sample_inputs(1, 64, 64)[0]
    with torch.no_grad():
        assert torch.allclose(rebuilt({"latents": x})[0], decoder.graph(x), atol=1e-4)


def test_artefact_of_other_weights_is_refused(decoder, tmp_path):
    runner = engine(decoder, "onnxruntime", profile=PROFILE, cache_dir=str(tmp_path), threads=1)
    changed = copy.deepcopy(decoder.module)
    with torch.no_grad():
        next(changed.parameters()).mul_(2)
    other = replace(decoder, module=changed)
    with pytest.raises(StaleEngineError, match="weights"):
        load_runner(other, runner.folder, engine_fields(other, "onnxruntime", "fp32", PROFILE))


def test_damaged_or_manifestless_artefact_is_refused(decoder, tmp_path):
    runner = engine(decoder, "onnxruntime", profile=PROFILE, cache_dir=str(tmp_path), threads=1)
    fields = runner.manifest["fields"]
    path = os.path.join(runner.folder, "model.onnx")
    whole = open(path, "rb").read()
    with open(path, "r+b") as f:   # same size, one byte changed: only the digest can tell
        f.seek(len(whole) // 2)
        f.write(bytes([whole[len(whole) // 2] ^ 0xFF]))
    with pytest.raises(StaleEngineError, match="digest"):
        load_runner(decoder, runner.folder, fields)
    with open(path, "wb") as f:
        f.write(whole)
    assert load_runner(decoder, runner.folder, fields) is not None
    with open(os.path.join(runner.folder, "model.onnx"), "ab") as f:
        f.write(b"junk")
    with pytest.raises(StaleEngineError, match="damaged"):
        load_runner(decoder, runner.folder, fields)
    os.remove(os.path.join(runner.folder, cache.MANIFEST))
    with pytest.raises(StaleEngineError, match="no manifest.json"):
        load_runner(decoder, runner.folder, fields)


def test_interrupted_build_leaves_no_loadable_artefact(tmp_path):
    folder = str(tmp_path / "slot")
    fields = {"component": "x", "backend": "onnxruntime", "precision": "fp32", "weights": "0" * 64}

    def crashing_build(partial):
        with open(os.path.join(partial, "model.onnx"), "wb") as f:
            f.write(b"half an engine")
        raise KeyboardInterrupt   # as if the user pressed Ctrl-C mid-build

    with pytest.raises(KeyboardInterrupt):
        cache.build_or_load(folder, fields, crashing_build)
    assert not os.path.exists(folder)
    assert [p for p in os.listdir(tmp_path) if not p.endswith(".lock")] == []   # no partial folder left behind
    # a build killed outright leaves its partial folder; it is never read
    os.makedirs(folder + ".partial-999-deadbeef")
    open(os.path.join(folder + ".partial-999-deadbeef", "model.onnx"), "wb").close()
    manifest, built = cache.build_or_load(folder, fields, lambda partial: open(
        os.path.join(partial, "model.onnx"), "wb").write(b"whole") and {"ok": True})
    assert built and {k: v["bytes"] for k, v in manifest["files"].items()} == {"model.onnx": 5}
    assert cache.check_artefact(folder, fields)["key"] == cache.engine_key(fields)
    # and the leftover of the killed build (its process, pid 999, is gone) was cleaned up
    assert not os.path.exists(folder + ".partial-999-deadbeef")


def _build_in_process(folder, log):
    def slow_build(partial):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        with open(os.path.join(partial, "model.onnx"), "wb") as f:
            f.write(b"x" * 100)
    fields = {"component": "x", "backend": "onnxruntime", "precision": "fp32", "weights": "1" * 64}
    return cache.build_or_load(folder, fields, slow_build)[1]


def test_two_builders_of_one_slot_build_it_once(tmp_path):
    folder, log = str(tmp_path / "slot"), str(tmp_path / "builds.log")
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        built = pool.starmap(_build_in_process, [(folder, log), (folder, log)])
    assert sorted(built) == [False, True]   # one built, the other waited and found it up to date
    assert len(open(log).read().split()) == 1
    assert os.path.getsize(os.path.join(folder, "model.onnx")) == 100
