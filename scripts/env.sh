#!/usr/bin/env bash
# Creates or reuses the virtual environment and installs moetune into it (editable).
# On machines without an NVIDIA GPU torch is pinned to the local CPU wheel torch==2.13.0, because an
# unpinned torch pulls gigabytes of CUDA packages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MOETUNE_VENV:-$root/.venv}"
py="$venv/bin/python"
[ -x "$py" ] || python3 -m venv "$venv"
if ! "$py" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$py" -m pip install -q torch
  else
    "$py" -m pip install -q "torch==2.13.0"
  fi
fi
stamp="$venv/.moetune-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$py" -m pip install -q -e "$root[dev]"
  touch "$stamp"
fi
