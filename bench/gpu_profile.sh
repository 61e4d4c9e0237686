#!/usr/bin/env bash
# Profile verification latency of the shipped MoE shapes (random weights, truncated depth, fit scaled
# back to full depth) plus the embedded target, on one CUDA GPU. About 4 minutes on an H100.
# Usage: bench/gpu_profile.sh OUT_DIR      (writes OUT_DIR/<name>.json and OUT_DIR/summary.md)
set -euo pipefail
out="${1:?usage: bench/gpu_profile.sh OUT_DIR}"
mkdir -p "$out"
py="${PYTHON:-python}"
common=(--device cuda --dtype bfloat16 --tokens 1,2,4,8,16,32,64 --unique 0,0.25,0.5,1 --contexts 128,1024 --repeats 5 --quiet --force)
"$py" -m moetune.cli profile "${common[@]}" --out "$out/embedded.json"
"$py" -m moetune.cli profile "${common[@]}" --config traces/configs/olmoe-1b-7b.json --layers 8 --out "$out/olmoe-1b-7b.json"
"$py" -m moetune.cli profile "${common[@]}" --config traces/configs/qwen3-30b-a3b.json --layers 8 --out "$out/qwen3-30b-a3b.json"
"$py" -m moetune.cli profile "${common[@]}" --config traces/configs/mixtral-8x7b.json --layers 4 --out "$out/mixtral-8x7b.json"
"$py" - "$out" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
lines = ["| profile | layers measured | points | fit MAPE | CV MAPE | overhead ms | per token us | per expert-layer us |",
         "|---|---|---|---|---|---|---|---|"]
for f in sorted(out.glob("*.json")):
    d = json.loads(f.read_text()); m = d["model"]; e = m["error"]
    lines.append(f"| {d['name']} | {d['layers_measured']} | {e['n']} | {100*e['mape']:.1f}% | {100*e.get('cv_mape', float('nan')):.1f}% "
                 f"| {1e3*m['verify'][0]:.3f} | {1e6*m['verify'][1]:.2f} | {1e6*m['verify'][2]:.2f} |")
lines.append("\nReproduce: bench/gpu_profile.sh OUT_DIR")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
