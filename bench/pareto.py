"""Speed against fidelity for every budget on the widened (expert-bound) target: one Pareto plot.

Speed is tokens/s relative to moetune's plain decoding, from bench/bench_eviction.py's live run on the
widened target. Loss increase (nats/token on held-out text, teacher forced, over all rows) is 0 for
every lossless method and, for MoE-Spec's lossy budgets, bench/bench_budget.py's measurement on the
embedded target at the same B with the same selection and substitution: widening preserves every
expert's function, so a budget drops the same experts and changes the logits the same way on both.

    .venv/bin/python bench/pareto.py [--results bench/results]   # writes pareto.png and pareto.md there
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_budget import pareto_front, pareto_plot  # noqa: E402


def lossy_loss(budget_rows: list[dict], budget: int) -> float | None:
    """The default lossy policy's (prob_sum, reselect, root protected) loss increase at `budget`."""
    return next((r["all_loss_increase"] for r in budget_rows if r["budget"] == budget and r["protect"]
                 and r["selection"] == "prob_sum" and r["substitution"] == "reselect"), None)


def points(eviction: dict, budget: dict) -> list[tuple[str, float, float]]:
    out = []
    for row in eviction["live"]["rows"]:
        method = row["method"]
        if row["lossy"]:
            b = int(method.rsplit("B=", 1)[1].split()[0])
            loss = lossy_loss(budget["frontier"]["rows"], b)
            if loss is None:
                continue
        else:
            loss = 0.0
        out.append((method, row["vs_moetune_plain"], loss))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    res = Path(args.results)
    pts = points(json.loads((res / "eviction.json").read_text()), json.loads((res / "budget.json").read_text()))
    pareto_plot(pts, res / "pareto.png", title="budgets on the widened target: speed vs loss increase")
    front = pareto_front(pts)
    lines = ["# Speed vs fidelity on the widened target", "",
             f"Made by `python bench/pareto.py` from eviction.json ({json.loads((res / 'eviction.json').read_text())['live']['command']}) "
             "and budget.json (loss increase of the lossy rows).", "",
             "| method | tokens/s vs moetune plain | loss increase (nats/token) | on the Pareto front |", "|---|---|---|---|"]
    lines += [f"| {m} | {s:.3f}x | {l:+.4f} | {'yes' if m in front else ''} |" for m, s, l in pts]
    (res / "pareto.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
