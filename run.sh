#!/usr/bin/env bash
# Main job: speculative decoding on the embedded default MoE with the auto-tuning controller.
# Extra arguments go to `moetune run` (try --help).
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
bash "$root/scripts/env.sh"
exec "${MOETUNE_VENV:-$root/.venv}/bin/moetune" run "$@"
