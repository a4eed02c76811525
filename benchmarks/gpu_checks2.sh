#!/usr/bin/env bash
# Second GPU pass: the fp16 training test, then the fast step without and with torch.compile.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
timeout 60 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4 | tee "$OUT/gpu_tests.txt"
timeout 60 python benchmarks/train_step.py --amp bf16 --channels-last on --iters 20 --warmup 5 2>&1 | tail -1 | tee "$OUT/step_fast.jsonl"
timeout 170 python benchmarks/train_step.py --amp bf16 --channels-last on --compile --iters 20 --warmup 5 2>&1 | tail -2 | tee "$OUT/step_compile.jsonl"
