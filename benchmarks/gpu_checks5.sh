#!/usr/bin/env bash
# Fifth GPU pass (issue 9): the S4MC loss as a training step runs it (diagnostics with ground
# truth, forward + backward) after the op-count cuts, its kernel table, the method's CUDA
# tests (no host sync), then the eager step if time is left. Self-limits to ~120 s.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
cd "$(dirname "$0")/.."
left() { echo $(( 120 - SECONDS )); }
timeout 50 $PY benchmarks/method.py --runs 9 --warmup 2 --ground-truth --backward --profile "$OUT/loss_profile.txt" | tee "$OUT/method.txt"
timeout 40 $PY -m pytest -q -p no:cacheprovider tests/test_method.py -k "cuda or margin" 2>&1 | tail -2 | tee "$OUT/method_tests.txt"
[ "$(left)" -gt 40 ] && timeout $(( $(left) - 3 )) $PY benchmarks/train_step.py --iters 12 --warmup 3 | tee "$OUT/step.jsonl"
head -30 "$OUT/loss_profile.txt" | cut -c1-200
echo "elapsed ${SECONDS}s"
