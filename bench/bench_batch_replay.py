"""Batched replay benchmark: speculative speedup over batched plain decoding against batch size, model-free
(moetune.traces.batch.replay_batch), beside MoESD's predicted curve (arXiv 2505.19645).

Reproduce: .venv/bin/python bench/bench_batch_replay.py [--batch-sizes 1,2,4,8,16,32,64] [--pool 192]
    [--config traces/configs/qwen3-30b-a3b.json] [--requests 24 --tokens 48] [--seeds 3]
Writes bench/results/batch_replay.{json,md,png}.

Two scenarios:
- samples: traces/samples/*.trace (the embedded target, L=6 E=32 K=4, 6 requests) tiled to --pool requests
  (traces.batch.tile_requests), latency fitted from all their timings (traces.latency.fit_trace: this
  CPU), drafting per request in turn (engine/batch.py);
- a real MoE shape (--config): a synthetic trace of that shape (traces.synthetic: Zipf expert popularity,
  topic co-activation), each drafter's acceptance per depth measured on the sample traces, and a roofline
  latency model of that shape on an H200-class GPU (`roofline`: the assumptions are its arguments; no
  measured profile of these shapes reaches the memory-bound regime, see bench/results/h100/profiles: those
  are launch-bound HF eager forwards), drafting per request in turn and batched (one draft pass per
  drafter for the whole batch, as vLLM/SGLang). The synthetic n-gram drafter always proposes a full chain
  (the recorded one proposes nothing without a match), and records no self-speculation, so `auto` there
  chooses among the draft model and n-grams.
Per scenario and batch size: every static config of the grid (draft-model and n-gram chains d1..d6, one
draft-model tree), the best static config per batch size chosen in hindsight (what a per-batch-size table
in vLLM/SGLang/TensorRT-LLM can express), `auto` and `adaptive` (one policy object for all requests; its
substitution budgets are dropped in a batch, as engine/batch.py drops them), and MoESD's predicted
speedup (traces.moesd.moesd_speedup: N(t) i.i.d. and from the recorded routing, with the latency model)
for the best static config and the best draft-model config (every static config's is in the JSON).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

from moetune.step import ModelShape, StepConfig
from moetune.traces.batch import replay_batch, tile_requests
from moetune.traces.moesd import StepMeans, moesd_speedup, recorded_unique
from moetune.traces.latency import LatencyModel, fit_trace
from moetune.traces.outcome import config_subtree
from moetune.traces.reader import read_trace
from moetune.traces.replay import make_policy
from moetune.traces.schema import Trace, TreeLimits
from moetune.traces.synthetic import Phase, synthetic_trace

ROOT = Path(__file__).resolve().parent.parent
TREE = "static:depth=4,topk=2,num_draft_tokens=8"
STATICS = ([f"static:depth={d}" for d in range(1, 7)] + [f"static:drafter=ngram,depth={d}" for d in range(1, 7)]
           + [TREE])
DRAFTERS = ("draft_model", "ngram")


def merged(traces: list[Trace]) -> Trace:
    """One Trace of every request (the samples share meta), so one latency fit sees all timings."""
    return Trace(traces[0].meta, [r for t in traces for r in t.requests], path="traces/samples/*.trace")


def acceptance(trace: Trace, drafter: str, depth: int = 6) -> tuple[float, ...]:
    """P(depth j accepted | depth j-1 accepted), j = 1..depth, of the drafter's chains in the trace."""
    config = StepConfig(drafter=drafter, depth=depth)
    acc = np.array([config_subtree(pos.trees[drafter], config).accepted
                    for r in trace.requests for pos in r.positions if drafter in pos.trees])  # [P]
    reached = np.array([np.count_nonzero(acc >= j) for j in range(depth + 1)], dtype=float)  # [depth+1]
    return tuple(float(x) for x in np.clip(reached[1:] / np.maximum(reached[:-1], 1), 0.01, 0.99))


def shape_of(config: dict) -> ModelShape:
    return ModelShape(num_layers=config["num_hidden_layers"],
                      num_experts=config.get("num_experts") or config["num_local_experts"],
                      top_k=config["num_experts_per_tok"], hidden_size=config["hidden_size"],
                      expert_intermediate_size=config.get("moe_intermediate_size") or config["intermediate_size"])


def roofline(config: dict, bandwidth_gbs: float = 3300.0, tflops: float = 350.0, launch_s: float = 5e-4,
             draft_params: float = 0.5e9, per_request_s: float = 2e-5) -> LatencyModel:
    """A LatencyModel of the config's shape on an H200-class GPU (defaults: ~70% of 4.8 TB/s and ~35% of
    989 bf16 TFLOPS, what small grouped GEMMs reach): each unique expert's weights are read once per
    forward, the dense weights (attention, LM head) once per forward, each request's KV cache once;
    every token costs 2 FLOPs per active parameter. The draft model is a dense model of draft_params
    (MoESD paired Qwen2-57B-A14B with Qwen2-0.5B), its weights read once per draft step; n-gram lookups
    cost 20 us per request. Assumptions, not measurements."""
    s = shape_of(config)
    h, layers, bw, fl = s.hidden_size, s.num_layers, bandwidth_gbs * 1e9, tflops * 1e12
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = config.get("num_key_value_heads", heads)
    attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim  # q, o and k, v projections per layer
    expert = 3 * h * s.expert_intermediate_size
    active = layers * (attention + s.top_k * expert) + config["vocab_size"] * h
    dense_bytes = 2 * (layers * attention + config["vocab_size"] * h)
    verify = (launch_s + dense_bytes / bw, 2 * active / fl, 2 * expert / bw, layers * 2 * kv * head_dim * 2 / bw,
              layers * 4 * heads * head_dim / fl)
    draft = {"draft_model": (5e-5, 2 * draft_params / bw, 2 * draft_params / fl), "ngram": (2e-5, 0.0, 0.0)}
    return LatencyModel(verify=verify, draft=draft, step_overhead=per_request_s, num_layers=layers,
                        source=f"roofline {config.get('_source', '').split(' ')[0]} {bandwidth_gbs:.0f} GB/s "
                               f"{tflops:.0f} TFLOPS")


def seeded(spec: str, seed: int) -> str:
    """The policy spec with its controller's seed set (seed 0: the spec as it is)."""
    return spec if seed == 0 else f"{spec}{',' if ':' in spec else ':'}seed={seed}"


def sweep(pool: Trace, latency: LatencyModel, batch_sizes: list[int], policies: dict[str, str], draft: str,
          seeds: int = 1) -> tuple[dict, dict]:
    """label -> one summary per batch size (speedup: throughput over plain's at that batch size; for the
    learning policies the mean over `seeds` controller seeds, each in `speedup_seeds`, the rest seed 0's),
    and the static configs' results at the smallest batch size (MoESD's step means come from them)."""
    rows: dict[str, list] = {label: [] for label in ["plain", *policies]}
    first = {}
    for b in batch_sizes:
        plain = replay_batch(pool, make_policy("plain"), latency, b, draft=draft)
        for label, spec in [("plain", "plain"), *policies.items()]:
            runs = 1 if label == "plain" or spec.startswith("static") else seeds
            results = [plain] if label == "plain" else [
                replay_batch(pool, make_policy(seeded(spec, k)), latency, b, draft=draft) for k in range(runs)]
            r, speeds = results[0], [x.throughput / plain.throughput for x in results]
            s = r.summary()
            rows[label].append(dict(batch_size=b, speedup=float(np.mean(speeds)),
                                    **(dict(speedup_seeds=speeds) if runs > 1 else {}), **{
                k: s[k] for k in ("throughput_tok_s", "mean_accepted", "tpot_ms", "experts_per_layer", "mean_active",
                                  "request_steps", "budgets_dropped")}))
            if b == min(batch_sizes) and spec.startswith("static"):
                first[label] = r
    return rows, first


def analyse(name: str, pool: Trace, roots: Trace | list[Trace], latency: LatencyModel, batch_sizes: list[int],
            policies: dict[str, str], draft: str, seeds: int = 1) -> dict:
    """One scenario: the sweep, the best static config per batch size, and MoESD's prediction for every
    static config (from its step means at the smallest batch size); `best_static` has the best
    geometric-mean speedup over batch sizes, `best_draft_model` the same among draft-model configs (the
    paper's setting)."""
    t0 = time.perf_counter()
    rows, first = sweep(pool, latency, batch_sizes, policies, draft, seeds)
    statics = [label for label in policies if policies[label].startswith("static")]
    speed = {label: np.array([x["speedup"] for x in rows[label]]) for label in rows}  # [len(batch_sizes)]
    table = [max(statics, key=lambda label: speed[label][i]) for i in range(len(batch_sizes))]
    overall = {label: float(np.exp(np.mean(np.log(speed[label])))) for label in statics}
    means = {label: StepMeans.of(first[label], make_policy(policies[label]).config) for label in statics}
    top = max(means[label].tree_size for label in statics) + 1
    grid = np.unique(np.geomspace(1, max(batch_sizes) * top, 48).round().astype(int))  # [<=48] tokens
    curve = recorded_unique(roots, grid)  # [len(grid)] N(t) per layer from the recorded routing
    recorded = partial(np.interp, xp=grid, fp=curve)
    shape = pool.shape
    predicted = {label: {kind: moesd_speedup(latency, shape, m, batch_sizes, unique=n_of, draft=draft).tolist()
                         for kind, n_of in (("iid", None), ("recorded", recorded))} for label, m in means.items()}
    return dict(
        name=name, draft=draft, latency=dict(source=latency.source, verify=latency.verify, draft=latency.draft,
                                             step_overhead=latency.step_overhead),
        shape=dict(num_layers=shape.num_layers, num_experts=shape.num_experts, top_k=shape.top_k),
        requests=len(pool.requests), tokens=pool.num_tokens, batch_sizes=batch_sizes, policies=policies, rows=rows,
        table=[dict(batch_size=b, config=c, speedup=float(speed[c][i]))
               for i, (b, c) in enumerate(zip(batch_sizes, table))],
        geomean_speedup=overall, best_static=max(statics, key=overall.get),
        best_draft_model=max((label for label in statics if means[label].drafter == "draft_model"), key=overall.get),
        step_means={label: m.__dict__ for label, m in means.items()}, moesd=predicted,
        recorded_unique=dict(tokens=grid.tolist(), unique_per_layer=curve.round(2).tolist()),
        seconds=time.perf_counter() - t0)


def real_shape_pool(config_path: Path, samples: Trace, requests: int, tokens: int, pool: int) -> tuple[Trace, Trace]:
    """A synthetic trace of the config's shape (acceptance per depth and drafter measured on the samples),
    and the pool of `pool` requests tiled from it."""
    shape = shape_of(json.loads(config_path.read_text()))
    accept = {d: acceptance(samples, d) for d in DRAFTERS}
    trace = synthetic_trace(shape, n_requests=requests, n_tokens=tokens, seed=0, budget_grid=(),
                            phases=[Phase(tokens, accept=accept)],
                            drafters={"draft_model": TreeLimits(depth=6, topk=2), "ngram": TreeLimits(depth=6, topk=1)})
    return trace, tile_requests(trace, pool)


def cells(values, fmt: str = "{:.2f}") -> str:
    return " | ".join(fmt.format(v) for v in values)


def markdown(result: dict) -> list[str]:
    """Speedup over batched plain decoding per batch size, one table per scenario."""
    md = []
    for sc in result["scenarios"]:
        bs, rows = sc["batch_sizes"], sc["rows"]
        md += [f"\n## {sc['name']}, drafting {sc['draft']}\n",
               f"{sc['requests']} requests ({sc['tokens']} tokens), L={sc['shape']['num_layers']} "
               f"E={sc['shape']['num_experts']} K={sc['shape']['top_k']}; latency: {sc['latency']['source']}. "
               f"Cells: throughput over plain throughput at the same batch size (auto and adaptive: the mean over "
               f"{result.get('seeds', 1)} controller seed(s)).\n",
               "| config | " + " | ".join(f"b={b}" for b in bs) + " |", "|---" * (len(bs) + 1) + "|",
               f"| plain tok/s | {cells([x['throughput_tok_s'] for x in rows['plain']], '{:.0f}')} |",
               f"| plain: experts per layer | {cells([x['experts_per_layer'] for x in rows['plain']], '{:.1f}')} |",
               f"| plain: mean active requests | {cells([x['mean_active'] for x in rows['plain']], '{:.1f}')} |"]
        md += [f"| {label} | {cells([x['speedup'] for x in rows[label]])} |" for label in sc["policies"]]
        md.append("| **best static per batch size (hindsight)** | " + " | ".join(
            f"**{t['speedup']:.2f}** {t['config'].removeprefix('static:')}" for t in sc["table"]) + " |")
        for label in ("auto", "adaptive"):
            md.append(f"| {label} / best per batch size | "
                      f"{cells([x['speedup'] / t['speedup'] for x, t in zip(rows[label], sc['table'])])} |")
        md.append(f"| adaptive: substitution budgets dropped (share of steps) | "
                  f"{cells([x['budgets_dropped'] / max(x['request_steps'], 1) for x in rows['adaptive']])} |")
        for label in dict.fromkeys((sc["best_static"], sc["best_draft_model"])):
            for kind in ("iid", "recorded"):
                md.append(f"| MoESD predicted, {'i.i.d.' if kind == 'iid' else 'recorded'} N(t): {label} | "
                          f"{cells(sc['moesd'][label][kind])} |")
        for label in dict.fromkeys((sc["best_static"], sc["best_draft_model"])):
            m = sc["step_means"][label]
            md.append(f"\n`{label}`: geometric-mean speedup {sc['geomean_speedup'][label]:.2f}; at batch 1 "
                      f"{m['tree_size']:.2f} drafted and {m['accepted']:.2f} accepted per step, context "
                      f"{m['context']:.0f}.")
        md.append(f"Replayed in {sc['seconds']:.0f} s.")
    return md


def plot(result: dict, path: Path) -> None:
    """Speedup vs batch size per scenario: static configs (grey), the per-batch-size table, auto, adaptive,
    and the best static and best draft-model configs beside their MoESD predictions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    scenarios = result["scenarios"]
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.2 * len(scenarios), 4.6), squeeze=False)
    for ax, sc in zip(axes[0], scenarios):
        bs, rows = sc["batch_sizes"], sc["rows"]
        for label in sc["policies"]:
            if label.startswith("static"):
                ax.plot(bs, [x["speedup"] for x in rows[label]], color="0.85", lw=0.8)
        ax.plot(bs, [t["speedup"] for t in sc["table"]], "k-", lw=2.5, label="best static per batch size")
        for color, label in zip(("C0", "C1"), dict.fromkeys((sc["best_static"], sc["best_draft_model"]))):
            ax.plot(bs, [x["speedup"] for x in rows[label]], f"{color}-o", ms=3, label=label.removeprefix("static:"))
            ax.plot(bs, sc["moesd"][label]["iid"], f"{color}--", lw=1, label="  MoESD, i.i.d. N(t)")
            ax.plot(bs, sc["moesd"][label]["recorded"], f"{color}:", lw=1.2, label="  MoESD, recorded N(t)")
        ax.plot(bs, [x["speedup"] for x in rows["auto"]], "C3-s", ms=3, label="auto")
        ax.plot(bs, [x["speedup"] for x in rows["adaptive"]], "C2-^", ms=3, label="adaptive")
        ax.axhline(1.0, color="0.5", lw=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(f"{sc['name']}\ndrafting {sc['draft']}", fontsize=9)
        ax.legend(fontsize=6.5)
    axes[0][0].set_ylabel("speedup over batched plain decoding")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    ap.add_argument("--pool", type=int, default=192, help="requests per run (the samples tiled to this many)")
    ap.add_argument("--config", default="traces/configs/qwen3-30b-a3b.json", help="real MoE shape")
    ap.add_argument("--requests", type=int, default=24, help="distinct synthetic requests of the real shape")
    ap.add_argument("--tokens", type=int, default=48, help="tokens per synthetic request")
    ap.add_argument("--seeds", type=int, default=3,
                    help="controller seeds of auto and adaptive, their speedup the mean (Thompson draws vary)")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    samples = [read_trace(p) for p in sorted((ROOT / "traces" / "samples").glob("*.trace"))]
    everything = merged(samples)
    statics = {spec: spec for spec in STATICS}
    scenarios = [analyse("samples (embedded target, CPU fit)", tile_requests(samples, args.pool), samples,
                         fit_trace(everything), batch_sizes, {**statics, "auto": "auto", "adaptive": "adaptive"},
                         "engine", args.seeds)]
    config = ROOT / args.config if not Path(args.config).is_absolute() else Path(args.config)
    distinct, real = real_shape_pool(config, everything, args.requests, args.tokens, args.pool)
    latency = roofline(json.loads(config.read_text()))
    policies = {**statics, "auto": "auto:drafters=draft_model/ngram", "adaptive": "adaptive"}
    for draft in ("serial", "batched"):
        scenarios.append(analyse(f"{config.stem} shape (synthetic trace, roofline latency)", real, distinct, latency,
                                 batch_sizes, policies, draft, args.seeds))
    command = "python bench/bench_batch_replay.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = dict(command=command.strip(), seeds=args.seeds, scenarios=scenarios)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_replay.json").write_text(json.dumps(result, indent=1, default=float))
    md = [f"# Batched replay: speedup over batched plain decoding vs batch size\n\nReproduce: `{result['command']}` "
          "(model-free: moetune.traces.batch.replay_batch; scenarios in the script's docstring)", *markdown(result)]
    (out / "batch_replay.md").write_text("\n".join(md) + "\n")
    plot(result, out / "batch_replay.png")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
