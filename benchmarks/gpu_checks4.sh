#!/usr/bin/env bash
# Fourth GPU pass (issue 9): the S4MC loss after the top-2/sort change, the compiled and the
# eager step (loss share of each), and the CUDA tests of the method. Self-limits to ~400 s.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
cd "$(dirname "$0")/.."
left() { echo $(( 400 - SECONDS )); }
timeout 60 $PY benchmarks/method.py --runs 9 | tee "$OUT/method.txt"
timeout 60 $PY -m pytest -q -p no:cacheprovider tests/test_method.py -k "cuda" 2>&1 | tail -2 | tee "$OUT/method_tests.txt"
timeout 260 $PY benchmarks/train_step.py --compile --iters 30 --warmup 5 | tee "$OUT/step.jsonl"
[ "$(left)" -gt 45 ] && timeout $(( $(left) - 5 )) $PY benchmarks/train_step.py --iters 20 --warmup 5 | tee -a "$OUT/step.jsonl"
echo "elapsed ${SECONDS}s"
