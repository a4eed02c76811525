#!/usr/bin/env bash
# Third GPU pass (issue 9): the fast step eager and with torch.compile on the same card,
# a per-kernel profile of each, then the gpu-marked tests. Self-limits to ~520 s.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
cd "$(dirname "$0")/.."
left() { echo $(( 520 - SECONDS )); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
timeout 100 $PY benchmarks/train_step.py --iters 20 --warmup 5 --profile "$OUT/profile_eager.txt" | tee "$OUT/step.jsonl"
timeout 330 $PY benchmarks/train_step.py --compile --iters 20 --warmup 5 --profile "$OUT/profile_compile.txt" | tee -a "$OUT/step.jsonl"
[ "$(left)" -gt 70 ] && timeout $(( $(left) - 5 )) $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -4 | tee "$OUT/gpu_tests.txt"
# Repeats while time is left: the compiled step again (warm compile cache), the eager step again.
[ "$(left)" -gt 80 ] && timeout $(( $(left) - 5 )) $PY benchmarks/train_step.py --compile --iters 20 --warmup 5 | tee -a "$OUT/step.jsonl"
[ "$(left)" -gt 45 ] && timeout $(( $(left) - 5 )) $PY benchmarks/train_step.py --iters 20 --warmup 5 | tee -a "$OUT/step.jsonl"
head -45 "$OUT/profile_eager.txt" | cut -c1-160
echo "elapsed ${SECONDS}s"
