#!/usr/bin/env bash
# The project's GPU checks in one call (on a lent H100/H200), ~6 min with a cold inductor cache:
#   bash benchmarks/gpu_checks.sh          (run tool: timeout_s 560)
# The compiled and the eager training step (images/s, peak memory, S4MC loss share), the
# gpu-marked tests, and the S4MC loss as a step runs it. Earlier passes' scripts are in git
# history (see benchmarks/RESULTS.md); `train_step.py --release-baseline` gives the baseline.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
cd "$(dirname "$0")/.."
left() { echo $(( 520 - SECONDS )); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/gpu.txt"
# Issue 16's targets, side by side in one call: release-style baseline, default path at 8+8 and at 4+4
# (peak memory with cudnn.benchmark off), then the compiled path (the longest: cold inductor cache).
V=experiments/pascal/366/config.yaml
timeout 90 $PY benchmarks/train_step.py --config $V --batch 8 --size 513 --release-baseline --iters 15 --warmup 3 | tee "$OUT/step.jsonl"
timeout 60 $PY benchmarks/train_step.py --config $V --batch 8 --size 513 --amp bf16 --channels-last on --iters 20 --warmup 5 | tee -a "$OUT/step.jsonl"
timeout 60 $PY benchmarks/train_step.py --config $V --batch 4 --size 513 --amp bf16 --channels-last on --iters 20 --warmup 5 --opts trainer.cudnn_benchmark=false | tee -a "$OUT/step.jsonl"
[ "$(left)" -gt 200 ] && timeout $(( $(left) - 120 )) $PY benchmarks/train_step.py --config $V --batch 8 --size 513 --amp bf16 --channels-last on --compile --iters 30 --warmup 5 --profile "$OUT/profile_compile.txt" | tee -a "$OUT/step.jsonl"
[ "$(left)" -gt 70 ] && timeout $(( $(left) - 5 )) $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_pseudo_label.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
[ "$(left)" -gt 30 ] && timeout $(( $(left) - 5 )) $PY benchmarks/method.py --runs 9 --warmup 2 --ground-truth --backward | tail -2 | tee "$OUT/method.txt"
$PY - "$OUT/step.jsonl" <<'PYEOF'
import json, sys
for line in open(sys.argv[1]):
    if line.startswith("{"):
        d = json.loads(line)
        print(f"batch {d.get('batch')} compile={d.get('compile')!s:5} first {d['first_step_s']:7.1f} s  step {1e3 * d['median_step_s']:6.1f} ms  "
              f"{d['images_per_s']:6.1f} img/s  peak {d['peak_mem_gib']} GiB  loss {1e3 * d['s4mc_loss_s']:.2f} ms "
              f"= {100 * d['s4mc_loss_share']:.2f}% of the step")
PYEOF
echo "elapsed ${SECONDS}s"
