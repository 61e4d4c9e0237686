#!/usr/bin/env bash
# One GPU session's work, run through the device tool with `data` carried:
#   bash scripts/gpu_suite.sh DISTILL_MINUTES
# kernel benchmark and tests, draft distillation, budget benchmark; everything lands in $OUT/all.tar.
set -uo pipefail
export PYTHONUNBUFFERED=1
m=${1:-3.5}
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
r=gpu_results; mkdir -p $r
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $r/device.txt
python3 bench/gpu_kernel.py --out $r 2>&1 | tail -25
bash scripts/gpu_distill.sh "$m" > $r/distill.log 2>&1 &
python3 -m pytest tests/test_kernel.py tests/test_moe_budget.py -q 2>&1 | tail -5 | tee $r/gpu_tests.log
wait
tail -4 $r/distill.log
tar xf "$OUT/draft.tar" && rm "$OUT/draft.tar" && cp gpu_out/draft/* moetune/models/draft/ && cp -r gpu_out $r/
python3 bench/bench_budget.py --device cuda --prompts 4 --max-new 48 --out $r 2>&1 | tail -30
tar cf "$OUT/all.tar" $r
