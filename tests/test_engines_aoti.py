"""AOTInductor packages: build once, load in a fresh process without compiling, same outputs.

Tolerance: max |AOTInductor − PyTorch| ≤ 1e-4 × max(1, max |PyTorch|) (float32, CPU).
The AutoencoderTiny decoder is the component compiled: AOTInductor compiles C++ for every kernel,
and it is the tiniest graph of the tiny pipelines (the UNet takes ~40 s on a 2-core machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from fastdiff.engines import ShapeProfile, component, engine
from fastdiff.architectures import tiny_sd_pipeline

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="AOTInductor on the CPU needs a C++ compiler")

RELATIVE_TOLERANCE = 1e-4
PROFILE = ShapeProfile(batch=(1, 2, 4), height=(64, 64, 64), width=(64, 64, 64))

FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    from fastdiff.engines import ShapeProfile, component, engine
    from fastdiff.architectures import tiny_sd_pipeline
    part = component(tiny_sd_pipeline(vae="tiny"), "vae_decoder")   # same seed: same weights
    runner = engine(part, "aoti", profile=ShapeProfile((1, 2, 4), (64, 64, 64), (64, 64, 64)),
                    cache_dir=sys.argv[1])
    assert not runner.built_now, "the package was rebuilt instead of loaded"
    torch.save(runner({"latents": torch.load(sys.argv[2])})[0], sys.argv[3])
""")


def test_aoti_package_builds_reloads_in_a_fresh_process_and_matches(tmp_path):
    part = component(tiny_sd_pipeline(vae="tiny"), "vae_decoder")
    runner = engine(part, "aoti", profile=PROFILE, cache_dir=str(tmp_path / "cache"))
    assert runner.built_now and os.path.isfile(os.path.join(runner.folder, "model.pt2"))
    package_mtime = os.path.getmtime(os.path.join(runner.folder, "model.pt2"))

    latents = part.sample_inputs(3, 64, 64)[0]   # batch 3: the batch axis is dynamic
    with torch.no_grad():
        want = part.graph(latents)
    bound = RELATIVE_TOLERANCE * max(1.0, want.abs().max().item())
    assert (runner({"latents": latents})[0] - want).abs().max().item() <= bound

    torch.save(latents, tmp_path / "in.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "cache"), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    error = (got - want).abs().max().item()
    assert error <= bound, f"max |AOTInductor (fresh process) − PyTorch| = {error:.3g} > {bound:.3g}"
    assert os.path.getmtime(os.path.join(runner.folder, "model.pt2")) == package_mtime
