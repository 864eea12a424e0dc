#!/usr/bin/env bash
# One short GPU session, prepared on the CPU: the GPU tests, then the GPU benchmark, results in $1.
#
# The GPU machine has PyTorch with CUDA, Triton, transformers, onnx and onnxruntime, but no network
# and neither diffusers nor streamdiffusion: they travel as wheels in .whl/ (see benchmarks/README.md),
# installed here without their dependencies beside the machine's own torch; fastdiff runs from this
# checkout. BENCH_BUDGET (seconds, default 330) bounds the benchmark: it starts no compilation that
# would not finish inside it, and writes its table after every row.
set -uo pipefail
out=${1:-out/gpu}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" \
    | tee -a "$out/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_engines_tensorrt.py 2>&1 \
    | tee "$out/tests.log"
timeout $(( ${BENCH_BUDGET:-330} + 90 )) python3 benchmarks/gpu.py --out "$out" --bf16 \
    --budget-seconds "${BENCH_BUDGET:-330}" --compile-seconds "${COMPILE_SECONDS:-150}" 2>&1 | tee "$out/bench.log"
