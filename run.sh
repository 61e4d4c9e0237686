#!/usr/bin/env bash
# Main job: speculative decoding on the embedded default MoE with the auto-tuning controller, measured
# side by side with plain decoding. Arguments go to `moetune run` (try --help); `--auto` is added unless
# they choose a policy or a static configuration themselves.
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
bash "$root/scripts/env.sh"
auto=--auto
for a in "$@"; do
  case "$a" in
    --auto|--policy*|--latency-target-ms*|--drafter*|--depth*|--topk*|--num-draft-tokens*|--budget*|-h|--help) auto= ;;
  esac
done
set -- $auto "$@"
exec "${MOETUNE_VENV:-$root/.venv}/bin/moetune" run "$@"
