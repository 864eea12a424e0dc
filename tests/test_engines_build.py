"""The engine build script: `fastdiff build` / engines/build.py, its profiles, and streams using what it built."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

pytest.importorskip("onnxruntime", reason="the build tests use the onnxruntime backend")

import fastdiff  # noqa: E402
from fastdiff.cli import main  # noqa: E402
from fastdiff.engines.profiles import family_profile_names, load_family_profile  # noqa: E402
from fastdiff.architectures import tiny_sd_pipeline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_family_has_a_valid_profile_file():
    assert {"shapes", "tiny", "sd15", "sd-turbo", "sdxl", "sd3"} <= set(family_profile_names())
    for family in family_profile_names():
        data = load_family_profile(family)
        assert data["components"][0] == "denoiser" and data["description"]
    with pytest.raises(ValueError, match="profile must be one of"):
        load_family_profile("sd9")


def test_build_builds_then_skips_and_a_stream_uses_what_it_built(tmp_path):
    out = str(tmp_path / "engines")
    args = ["build", "--model", "tiny", "--components", "vae_decoder,text_encoder", "--backend", "onnxruntime",
            "--batch", "1,1,4", "--out", out]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    lines = [line.split() for line in first.stdout.splitlines() if line.startswith(("vae_decoder ", "text_encoder "))]
    assert [line[:4] for line in lines] == [["vae_decoder", "onnxruntime", "fp32", "built"],
                                            ["text_encoder", "onnxruntime", "fp32", "built"]]
    folders = sorted(f for f in os.listdir(out) if os.path.isdir(os.path.join(out, f)))
    for folder in folders:
        manifest = json.load(open(os.path.join(out, folder, "manifest.json")))
        assert manifest["fields"]["profile"] == {"batch": [1, 1, 4], "height": [64, 64, 64], "width": [64, 64, 64]}

    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    assert second.stdout.count("up to date  ") == 2 and " built " not in second.stdout

    # a stream of 1 frame per call finds the decoder built for 1..4 images instead of building its own
    stream = fastdiff.Stream(tiny_sd_pipeline(), [32, 45], backend="onnxruntime",
                             engine_options={"cache_dir": out, "components": ["vae_decoder"], "threads": 1})
    stream.prepare("a red circle")
    assert stream.engines.folders["vae_decoder"] in [os.path.join(out, f) for f in folders]
    assert sorted(f for f in os.listdir(out) if os.path.isdir(os.path.join(out, f))) == folders


def test_build_rejects_bad_options_naming_them(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(main, ["build", "--model", "tiny", "--components", "unet", "--backend", "onnxruntime",
                               "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--components" in bad.output and "denoiser" in bad.output
    bad = runner.invoke(main, ["build", "--model", "tiny", "--batch", "4,2,1", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--batch" in bad.output
    bad = runner.invoke(main, ["build", "--model", "tiny", "--resolution", "64by64", "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "HEIGHTxWIDTH" in bad.output
    bad = runner.invoke(main, ["build", "--model", str(tmp_path / "no-such-folder"), "--out", str(tmp_path)])
    assert bad.exit_code == 2 and "--model" in bad.output
    assert os.listdir(tmp_path) == []
    bad = runner.invoke(main, ["build", "--model", "tiny", "--resolution", "60x64", "--out", str(tmp_path / "odd")])
    assert bad.exit_code == 2 and "--resolution" in bad.output
    (tmp_path / "a-file").write_text("")
    bad = runner.invoke(main, ["build", "--model", "tiny", "--out", str(tmp_path / "a-file" / "engines")])
    assert bad.exit_code == 2 and "--out" in bad.output and "Traceback" not in bad.output


def test_the_script_is_the_same_command():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "engines", "build.py"), "--help"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert "--backend" in done.stdout and "--resolution" in done.stdout and "--rebuild" in done.stdout
