"""benchmarks/gpu.py --quick: the GPU benchmark's own code on the tiny pipeline on the CPU, so that the
script a lent GPU runs cannot rot between loans."""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_gpu_benchmark_runs_quick_and_writes_its_table(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))
    assert gpu.main(["--quick", "--out", str(tmp_path), "--frames", "2", "--setups", "sd-turbo",
                     "--skip-compiled"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    rows = {(r["mode"], r["method"]): r for r in report["results"]}
    for mode in ("img2img", "txt2img"):
        for method in ("fastdiff eager", "floor", "diffusers tuned", "diffusers default"):
            assert rows[(mode, method)].get("fps", 0) > 0, rows[(mode, method)]
    assert rows[("img2img", "fastdiff eager")]["flops"] > 0 and report["peak_tflops"] > 0
    markdown = (tmp_path / "results.md").read_text()
    assert "| sd-turbo | img2img | 1 | fastdiff eager |" in markdown and "MFU" in markdown
