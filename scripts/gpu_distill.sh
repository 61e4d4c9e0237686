#!/usr/bin/env bash
# Distils the embedded draft from the embedded target on one GPU (run through the device tool with
# `data` carried): bash scripts/gpu_distill.sh MINUTES. Output: $OUT/draft.tar (the exported draft + log).
set -euo pipefail
m=${1:-5}
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 scripts/train_default_models.py train --model draft --data data --minutes "$m" --batch 64 --seq 512 \
  --lr 1e-3 --warmup 100 --eval-every 200 --init moetune/models/draft --teacher moetune/models/target \
  2>&1 | grep -v Writing | tee data/train_draft_distill.out
mkdir -p gpu_out
python3 scripts/train_default_models.py export --model draft --data data --dst gpu_out/draft
cp data/train_draft_distill.out data/log_draft.jsonl gpu_out/
tar cf "$OUT/draft.tar" gpu_out
