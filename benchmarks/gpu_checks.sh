#!/usr/bin/env bash
# The GPU checks of the project, in one call (used on a lent H100/H200):
# gpu-marked tests, then the training-step benchmark (release baseline vs fast path)
# and the S4MC loss benchmark. Results land in $OUT (or ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
timeout 200 python -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 150 python benchmarks/train_step.py --release-baseline --iters 8 --warmup 3 2>&1 | tail -3 | tee "$OUT/step_baseline.jsonl"
timeout 150 python benchmarks/train_step.py --amp bf16 --channels-last on --iters 20 --warmup 5 2>&1 | tail -3 | tee "$OUT/step_fast.jsonl"
timeout 90 python benchmarks/method.py --device auto --runs 7 2>&1 | tail -4 | tee "$OUT/method.txt"
