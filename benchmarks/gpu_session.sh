#!/usr/bin/env bash
# One short GPU session, prepared on the CPU: the GPU tests, then the GPU benchmark, results in $1.
#
# The GPU machine has PyTorch with CUDA, Triton, onnx and onnxruntime, but no network and neither
# diffusers nor fastdiff: they travel as wheels in .whl/ (see benchmarks/README.md), installed here
# without their dependencies beside the machine's own torch.
set -euo pipefail
out=${1:-out/gpu}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -m gpu tests/test_gpu.py tests/test_engines_tensorrt.py 2>&1 | tee "$out/tests.log" || true
python3 benchmarks/gpu.py --out "$out" --bf16 2>&1 | tee "$out/bench.log"
