#!/usr/bin/env bash
# Trains both default models on one GPU at once (run through the device tool with `data` carried):
#   bash scripts/gpu_train.sh TARGET_MINUTES DRAFT_MINUTES
# Results are packed into $OUT as a tar split into 15 MB parts (the tool returns files up to 16 MB).
set -euo pipefail
tm=${1:-8}; dm=${2:-4}
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
python3 scripts/train_default_models.py train --model draft --data data --minutes "$dm" \
  --batch 64 --seq 512 --lr 2e-3 --eval-every 200 > data/train_draft.out 2>&1 &
python3 scripts/train_default_models.py train --model target --data data --minutes "$tm" \
  --batch 64 --seq 512 --lr 1.5e-3 --eval-every 200 2>&1 | tee data/train_target.out | grep -v Writing
wait
grep -v Writing data/train_draft.out | tail -5
mkdir -p gpu_out
for m in target draft; do python3 scripts/train_default_models.py export --model $m --data data --dst gpu_out/$m; done
cp data/train_*.out gpu_out/
tar cf - gpu_out | split -b 15M - "$OUT/models.tar.part-"
ls -la "$OUT"
