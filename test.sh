#!/usr/bin/env bash
# The test suite. pytest's exit code 5 (no tests collected) is turned into a failure.
set -uo pipefail
root="$(cd "$(dirname "$0")" && pwd)"
bash "$root/scripts/env.sh" || exit 1
cd "$root"
"${MOETUNE_VENV:-$root/.venv}/bin/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
