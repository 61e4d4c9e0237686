"""`moetune widen`: write a function-preserving widening of a MoE target's experts, an expert-bound stand-in.

Same routing, logits and acceptance as the target, but every expert reads `--intermediate` neurons of
weights, so the time per unique expert is real memory traffic (see moetune/widen.py for what it does not
model).
"""
from __future__ import annotations

import argparse
import json

from moetune import DEFAULT_TARGET


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--intermediate", type=int, required=True,
                   help="new expert intermediate size: >= the current one and a multiple of 8 "
                        "(not necessarily a multiple of the current one)")
    p.add_argument("--out", required=True, help="folder to write the widened model to (written as OUT.partial "
                                                "and renamed when complete)")
    p.add_argument("--target", default=str(DEFAULT_TARGET), help="MoE model path or hub id (default: embedded target)")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of which neurons are copied")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the saved weights (float32 keeps the split exact to rounding)")
    p.add_argument("--force", action="store_true", help="replace an existing model folder at --out")


def main(args: argparse.Namespace) -> int:
    from moetune.widen import DTYPES, widen

    out = widen(args.target, args.out, args.intermediate, seed=args.seed, dtype=args.dtype, force=args.force)
    hidden = json.loads((out / "config.json").read_text())["hidden_size"]
    itemsize = DTYPES[args.dtype].itemsize
    per_expert = 3 * hidden * args.intermediate * itemsize  # gate [I, H], up [I, H], down [H, I]
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out}: experts widened to intermediate {args.intermediate}, {per_expert / 1e6:.2f} MB per "
          f"expert ({args.dtype}), {total / 1e6:.1f} MB in all")
    return 0
