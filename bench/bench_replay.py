"""Replay benchmark: decisions per second per core for static policies, the self-check (the policy that
ran while recording replays to its measured goodput) on recorded traces, and trace bytes per token.

Reproduce: .venv/bin/python bench/bench_replay.py [--requests 8 --tokens 256] [TRACE ...]
(default traces: traces/samples/*.trace). Writes bench/results/bench_replay.{json,md}.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

from moetune.step import ModelShape
from moetune.traces.batch import replay_batch
from moetune.traces.latency import LatencyModel, fit_trace
from moetune.traces.reader import read_trace
from moetune.traces.replay import make_policy, replay
from moetune.traces.synthetic import Phase, synthetic_trace
from moetune.traces.writer import write_trace

STATICS = ["plain", "static:depth=1", "static:depth=3", "static:depth=4,topk=2,num_draft_tokens=8",
           "static:depth=5,topk=4,num_draft_tokens=32", "static:drafter=ngram,depth=4"]
ROOT = Path(__file__).resolve().parent.parent


def decisions_per_second(path: Path, shape: ModelShape) -> list[dict]:
    """Cold: a freshly read trace (per-tree arrays derived inside the timed replay, traces.derive).
    Warm: the same trace objects after one other policy ran (derived arrays cached, this config's
    subtree selection not). Reading (decompressing and validating) is timed separately, per position.

    A full garbage collection runs before each timed replay: reading a trace leaves ~10^4 new container
    objects, and the full collection they eventually trigger (~20 ms) otherwise landed in whichever
    config's replay happened to be running, halving that row's figure by chance."""
    latency = LatencyModel.analytic(shape)
    rows = []
    for spec in STATICS:
        t0 = time.perf_counter()
        trace = read_trace(path)
        t_read = time.perf_counter() - t0
        gc.collect()
        t0 = time.perf_counter()
        cold = replay(trace, make_policy(spec), latency)
        t_cold = time.perf_counter() - t0
        replay(trace, make_policy("static:depth=2,topk=3"), latency)  # warms derived arrays only
        for tree in (t for r in trace.requests for pos in r.positions for t in pos.trees.values()):
            tree.subtrees.clear()
            if tree.batch is not None:
                tree.batch[0].selections.clear()
        gc.collect()
        t0 = time.perf_counter()
        warm = replay(trace, make_policy(spec), latency)
        t_warm = time.perf_counter() - t0
        steps = cold.total().steps
        rows.append(dict(policy=spec, steps=steps, cold_decisions_per_s=steps / t_cold,
                         warm_decisions_per_s=warm.total().steps / t_warm,
                         read_us_per_position=1e6 * t_read / max(trace.num_tokens, 1)))
    return rows


def self_check(path: Path) -> dict:
    trace = read_trace(path)
    live = [r.live for r in trace.requests if r.live is not None]
    if not live:
        return dict(trace=str(path), note="no live run recorded")
    measured = sum(l.emitted.sum() for l in live) / sum(l.times.sum() for l in live)
    policy = live[0].policy
    out = dict(trace=str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), live_policy=policy,
               measured_goodput=float(measured), bytes_per_token=path.stat().st_size / max(trace.num_tokens, 1))
    config = live[0].configs[0]
    from moetune.policies.static import Static
    batch = trace.meta.live_batch_size
    out["live_batch_size"] = batch
    for label, include in (("live_steps_fit", False), ("live_and_tree_fit", True)):
        lat = fit_trace(trace, include_trees=include)
        result = replay(trace, Static(config), lat) if batch == 1 else replay_batch(trace, Static(config), lat, batch).replay
        pred = result.total().goodput
        out[f"{label}_goodput"] = pred
        out[f"{label}_error"] = pred / measured - 1
        out[f"{label}_fit_mape"] = lat.error["mape"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("traces", nargs="*")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args(argv)
    shape = ModelShape(num_layers=6, num_experts=32, top_k=4, hidden_size=256, expert_intermediate_size=80)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.trace"
        trace = synthetic_trace(shape, n_requests=args.requests, n_tokens=args.tokens, seed=0,
                                drafters=("draft_model", "ngram"),
                                phases=[Phase(args.tokens // 2, (0.85,)), Phase(args.tokens // 2, (0.4,))])
        size = write_trace(trace, path)
        speed = decisions_per_second(path, shape)
    samples = [Path(p) for p in args.traces] or sorted((ROOT / "traces" / "samples").glob("*.trace"))
    checks = [self_check(p) for p in samples]
    result = dict(command="python bench/bench_replay.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  synthetic=dict(requests=args.requests, tokens=args.tokens, bytes_per_token=size / trace.num_tokens),
                  decisions=speed, self_check=checks)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_replay.json").write_text(json.dumps(result, indent=1))
    md = [f"# Replay benchmark\n\nReproduce: `{result['command']}` (1 process, this machine's shared CPU)\n",
          f"Synthetic trace ({args.requests} requests x {args.tokens} tokens, draft_model 6x4 + ngram chain, "
          f"L=6 E=32 K=4): {result['synthetic']['bytes_per_token']:.0f} bytes per generated token.\n",
          "Cold: replay of a freshly read trace (deriving its per-tree arrays included); warm: derived arrays "
          "cached. Reading the file (zlib + validation) is separate: last column.\n",
          "| policy | steps | decisions/s cold | decisions/s warm | read µs/position |", "|---|---|---|---|---|"]
    md += [f"| {r['policy']} | {r['steps']} | {r['cold_decisions_per_s']:.0f} | {r['warm_decisions_per_s']:.0f} | "
           f"{r['read_us_per_position']:.0f} |" for r in speed]
    md += ["", "Self-check (live policy replayed on its own trace):", "",
           "| trace | live batch | live policy | bytes/token | measured tok/s | replay (live-step fit) | error | "
           "replay (live+tree fit) | error |", "|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {c['trace']} | {c.get('live_batch_size', 1)} | {c.get('live_policy', '-')} | "
           f"{c.get('bytes_per_token', 0):.0f} | {c.get('measured_goodput', 0):.1f} | "
           f"{_fit(c, 'live_steps_fit')} | {_fit(c, 'live_and_tree_fit')} |" for c in checks]
    (out / "bench_replay.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


def _fit(check: dict, label: str) -> str:
    """A replayed goodput and its error as two table cells ("-" where that fit was not made)."""
    if f"{label}_goodput" not in check:
        return "- | -"
    return f"{check[label + '_goodput']:.1f} | {100 * check[label + '_error']:+.1f}%"


if __name__ == "__main__":
    sys.exit(main())
