#!/usr/bin/env bash
# Main job: speculative decoding on the embedded default MoE with the auto-tuning controller, measured
# side by side with plain decoding. Arguments replace the default `--auto` and go to `moetune run`
# (try --help).
set -euo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
bash "$root/scripts/env.sh"
[ $# -gt 0 ] || set -- --auto
exec "${MOETUNE_VENV:-$root/.venv}/bin/moetune" run "$@"
