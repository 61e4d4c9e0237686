#!/usr/bin/env bash
# Second GPU session (device tool): kernel tests and benchmark, hardware profiles of real MoE shapes,
# and the side-by-side engine benchmark on CUDA. Everything lands in $OUT/final.tar.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null 2>&1 || echo "editable install failed"
r=gpu_final; mkdir -p $r/profiles
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $r/device.txt
python3 -m pytest tests/test_kernel.py tests/test_moe_budget.py tests/test_lossless.py -q 2>&1 | tail -4 | tee $r/gpu_tests.log
python3 bench/gpu_kernel.py --out $r 2>&1 | tail -6
PYTHON=python3 timeout 210 bash bench/gpu_profile.sh $r/profiles 2>&1 | tail -8
timeout 130 python3 bench/bench_engine.py --device cuda --prompts 8 --max-new-tokens 64 --out $r 2>&1 | tail -16
tar cf "$OUT/final.tar" $r
