"""Replay benchmark: adaptive vs every static config, MoE-Spec at its best B, Cascade, MoESD, and the
per-request oracle, on synthetic traces with phase changes and mixed request kinds (and on
traces/samples/*.trace when present: every recorded drafter is a static option and the adaptive
controller's choice, and step times come from the trace's own CPU timings, traces.latency.fit_trace).
Writes bench/results/policies.json and policies.md.

    .venv/bin/python bench/bench_policies.py --requests 8 --tokens 200

Why these numbers: "best static in hindsight" is the single config a person would have picked after
sweeping on this very workload; the per-request oracle picks the best static config per request
(unreachable online). "lossless" is what `auto` runs (no expert budgets); "profile-seeded" starts from a
hardware latency profile (here the replay's own latency model) instead of calibration steps. Recovery = steps after a phase change until adaptive's rolling goodput (8 steps)
reaches 90% of the best static's goodput in the new phase. Overhead = measured decide + observe wall time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path


from moetune.adaptive.controller import ControllerConfig
from moetune.policies.adaptive import Adaptive
from moetune.policies.registry import make_policy
from moetune.step import ModelShape
from moetune.traces.latency import LatencyModel, fit_trace
from moetune.traces.reader import read_trace
from moetune.traces.replay import replay
from moetune.traces.synthetic import Phase, synthetic_trace

SHAPE = ModelShape(num_layers=6, num_experts=32, top_k=4, hidden_size=2048, expert_intermediate_size=768)
GRID = (4, 8, 12, 16, 24)


def kinds(tokens: int) -> list[list[Phase]]:
    """Mixed request kinds; the last two change phase half way."""
    h = tokens // 2
    return [[Phase(tokens, (0.9,), kind="code")], [Phase(tokens, (0.6, 0.5), kind="chat")],
            [Phase(tokens, (0.05,), alt=0.02, kind="hopeless")],
            [Phase(h, (0.9,), kind="code->chat"), Phase(tokens - h, (0.15,), alt=0.05, topic=1)],
            [Phase(h, (0.2,), alt=0.1, kind="chat->code"), Phase(tokens - h, (0.9,), topic=1)]]


def statics(limits: dict) -> list[str]:
    """Plain, then per recorded drafter every chain and (where it recorded trees) every top-2 tree."""
    out = ["plain"]
    for drafter, lim in limits.items():
        tag = "" if drafter == "draft_model" else f",drafter={drafter}"
        out += [f"static:depth={d}{tag}" for d in range(1, lim.depth + 1)]
        if lim.topk >= 2:
            out += [f"static:depth={d},topk=2,num_draft_tokens={2 * d}{tag}" for d in range(2, lim.depth + 1)]
    return out


def recovery(adaptive, best, change: int, window: int = 8) -> list:
    """Per request with a phase change: steps after position `change` until adaptive's rolling goodput
    (over `window` steps) reaches 90% of `best`'s goodput on that request after the change (None: never)."""
    out = []
    for req in adaptive.requests:
        if "->" not in req.kind:
            continue
        b = best.log[(best.log[:, 0] == req.request_id) & (best.log[:, 2] >= change)]
        a = adaptive.log[(adaptive.log[:, 0] == req.request_id) & (adaptive.log[:, 2] >= change)]
        target = 0.9 * b[:, 5].sum() / b[:, 7].sum()
        hit = next((k for k in range(max(len(a) - window, 0))
                    if a[k:k + window, 5].sum() / a[k:k + window, 7].sum() >= target), None)
        out.append(hit)
    return out


def bench(name: str, traces, latency: LatencyModel, change: int | None) -> dict:
    rows, results = [], {}
    limits = (traces[0] if isinstance(traces, list) else traces).meta.drafters
    max_depth = max(lim.depth for lim in limits.values())
    static_names = statics(limits)
    specs = static_names + [f"moespec:budget={b},depth=4" for b in GRID] + ["cascade", "moesd"]
    for spec in specs:
        results[spec] = replay(traces, make_policy(spec), latency)
    config = ControllerConfig(max_depth=max_depth, drafters=tuple(limits))
    results["adaptive"] = replay(traces, Adaptive(config), latency)
    results["adaptive+profile"] = replay(traces, Adaptive(config, profile=latency), latency)
    lossless = replace(config, max_agreement_loss=0.0)  # what `auto` runs: no expert budgets
    results["lossless"] = replay(traces, Adaptive(lossless), latency)
    results["lossless+profile"] = replay(traces, Adaptive(lossless, profile=latency), latency)
    best_static = max(static_names, key=lambda s: results[s].summary()["goodput_tok_s"])
    best_moespec = max((s for s in specs if s.startswith("moespec")), key=lambda s: results[s].summary()["goodput_tok_s"])
    n_req = len(results["plain"].requests)
    oracle_time = sum(min(results[s].requests[i].time_s for s in static_names) for i in range(n_req))
    tokens = results["plain"].total().tokens
    oracle = tokens / oracle_time
    for label, spec in [("plain", "plain"), (f"best static in hindsight ({best_static})", best_static),
                        (f"MoE-Spec best B ({best_moespec})", best_moespec), ("Cascade-style", "cascade"),
                        ("MoESD-style", "moesd"), ("adaptive, budgets allowed (no profile)", "adaptive"),
                        ("adaptive, budgets allowed (profile-seeded)", "adaptive+profile"),
                        ("adaptive, lossless (no profile)", "lossless"),
                        ("adaptive, lossless (profile-seeded)", "lossless+profile")]:
        s = results[spec].summary()
        rows.append(dict(policy=label, goodput_tok_s=round(s["goodput_tok_s"], 1), speedup=round(s["speedup"], 3),
                         vs_oracle=round(s["goodput_tok_s"] / oracle, 3), fidelity=round(s["fidelity"], 4),
                         mean_accepted=round(s["mean_accepted"], 2),
                         control_us_per_step=round(s["control_us_per_step"], 1)))
    rows.append(dict(policy="per-request oracle (best static per request)", goodput_tok_s=round(oracle, 1),
                     speedup=round(oracle / (tokens / results["plain"].total().time_s), 3), vs_oracle=1.0,
                     fidelity=1.0, mean_accepted=None, control_us_per_step=None))
    out = dict(name=name, rows=rows, all_statics={s: round(results[s].summary()["speedup"], 3) for s in specs})
    if change is not None:
        # against the best static config for the new phase of each changing request
        after = {sp: sum(r[5] / r[7] for r in results[sp].log if r[2] >= change) for sp in static_names}
        ref = results[max(static_names, key=lambda sp: after[sp])]
        out["recovery_steps"] = {k: recovery(results[k], ref, change)
                                 for k in ("adaptive", "adaptive+profile", "lossless", "lossless+profile", "cascade",
                                           "moesd")}
    return out


def markdown(reports: list[dict], command: str) -> str:
    lines = ["# Policy replay benchmark", "", f"Reproduce: `{command}`", ""]
    for rep in reports:
        lines += [f"## {rep['name']}", "", "| policy | goodput tok/s | speedup vs plain | vs per-request oracle | "
                  "fidelity | mean accepted | decide+observe us/step |", "|---|---|---|---|---|---|---|"]
        for r in rep["rows"]:
            lines.append(f"| {r['policy']} | {r['goodput_tok_s']} | {r['speedup']} | {r['vs_oracle']} | {r['fidelity']} | "
                         f"{r['mean_accepted'] if r['mean_accepted'] is not None else '-'} | "
                         f"{r['control_us_per_step'] if r['control_us_per_step'] is not None else '-'} |")
        if "recovery_steps" in rep:
            lines += ["", f"Steps to recover after the phase change: {rep['recovery_steps']}"]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10)
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    t0 = time.time()
    trace = synthetic_trace(SHAPE, n_requests=args.requests, n_tokens=args.tokens, phases=kinds(args.tokens),
                            seed=args.seed, budget_grid=GRID)
    reports = []
    for lname, lat in [("bandwidth-bound (analytic, 2000 GB/s)", LatencyModel.analytic(SHAPE)),
                       ("expert-heavy (analytic, 300 GB/s)", LatencyModel.analytic(SHAPE, bandwidth_gbs=300.0))]:
        reports.append(bench(f"synthetic mixed kinds, {lname}", trace, lat, change=args.tokens // 2))
    samples = [read_trace(path) for path in sorted(Path("traces/samples").glob("*.trace"))]
    for path, t in zip(sorted(Path("traces/samples").glob("*.trace")), samples):
        reports.append(bench(f"sample {path.name} (drafters {', '.join(t.meta.drafters)}; latency fitted from "
                             f"its own timings)", t, fit_trace(t), change=None))
    if len(samples) > 1:  # one policy instance over every sample request in turn, as a server sees them
        reports.append(bench(f"samples combined ({sum(len(t.requests) for t in samples)} requests in turn; latency "
                             f"fitted from the first sample's timings)", samples, fit_trace(samples[0]), change=None))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/bench_policies.py " + " ".join(argv if argv is not None else sys.argv[1:])
    (out / "policies.json").write_text(json.dumps(dict(command=command, seconds=round(time.time() - t0, 1),
                                                       reports=reports), indent=1))
    (out / "policies.md").write_text(markdown(reports, command.strip()))
    print(markdown(reports, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
