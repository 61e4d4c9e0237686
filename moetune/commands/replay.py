"""`moetune replay`: replay recorded traces offline against policies (one request at a time, with experts
offloaded, or in batches); a table, JSON and PNG plots."""
from __future__ import annotations

import json
import sys
from pathlib import Path

PLOTS = ("goodput_vs_fidelity.png", "budgets_over_time.png", "acceptance_over_time.png")


def add_arguments(p) -> None:
    p.add_argument("traces", nargs="+", help="trace files (moetune record)")
    p.add_argument("--policy", action="append", required=True,
                   help="policy spec, repeatable (e.g. plain, static:depth=4,topk=2, moespec:budget=16, adaptive)")
    p.add_argument("--profile", help="hardware latency profile JSON (moetune profile); default: fitted from "
                                     "the first trace's own timings")
    p.add_argument("--latency-target-ms", type=float, help="report the share of tokens meeting this time per token")
    p.add_argument("--out", help="folder for replay.json and PNG plots")
    p.add_argument("--force", action="store_true", help="overwrite replay.json and plots already in --out")
    p.add_argument("--workers", type=int, default=1, help="worker processes (one job per policy and trace)")
    p.add_argument("--per-request", action="store_true", help="also print one row per request")
    p.add_argument("--offload", type=int, default=None, metavar="CAPACITY",
                   help="model experts offloaded to a slow tier: CAPACITY experts per layer resident (traces.offload)")
    p.add_argument("--offload-gbps", type=float, default=None, help="with --offload: the slow tier's read rate, GB/s")
    p.add_argument("--offload-latency-us", type=float, default=0.0, help="with --offload: per-read latency, us")
    p.add_argument("--offload-eviction", choices=("lru", "lfu"), default="lru", help="with --offload (default lru)")
    p.add_argument("--offload-bytes-per-param", type=int, default=2,
                   help="with --offload: bytes per expert weight on the link (default 2: bf16)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="replay every trace's requests together, at most B at once (continuous batching, "
                        "traces.batch.replay_batch); speedup is over batched plain decoding at B")
    p.add_argument("--draft-mode", choices=("engine", "serial", "batched"), default="engine",
                   help="with --batch-size: how drafting is charged (engine: as engine/batch.py drafts; default)")
    p.add_argument("--strict", action="store_true",
                   help="fail (exit 2) on a trace that stops early (a killed run) instead of replaying what it holds")


def latency_for(args, first):
    """The profile given, with draft terms from the trace for drafters it lacks; else the trace's own fit."""
    from moetune.traces.latency import LatencyModel, fit_trace
    if not args.profile:
        return fit_trace(first)
    prof = LatencyModel.from_json(args.profile)
    missing = [d for d in first.meta.drafters if d not in prof.draft]
    if not missing:
        return prof
    own = fit_trace(first)
    draft = dict(prof.draft, **{d: own.draft[d] for d in missing if d in own.draft})
    return LatencyModel(verify=prof.verify, draft=draft, step_overhead=prof.step_overhead or own.step_overhead,
                        num_layers=prof.num_layers, error=prof.error, source=prof.source)


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        if isinstance(v, list):
            return "/".join(f"{x:.1f}" for x in v)
        return "-" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def report_traces(args, first) -> None:
    """Read every trace before replaying any, so damage (and with --strict, a killed run's file) fails
    first; a trace that stops early, or holds nothing to replay, is reported once on stderr."""
    from moetune.traces.reader import read_trace

    for i, path in enumerate(args.traces):
        trace = first if i == 0 else read_trace(path, strict=args.strict)
        if trace.shape != first.shape:  # per-layer figures of different models cannot be added up
            raise ValueError(f"{path} was recorded on another model shape than {args.traces[0]} ({trace.shape} vs "
                             f"{first.shape}); replay traces of different models separately")
        if trace.truncated:
            print(f"moetune replay: warning: {path}: stopped early: {trace.truncated}; replaying what was read "
                  "(--strict fails instead)", file=sys.stderr)
        if not trace.num_tokens:
            print(f"moetune replay: warning: {path}: no recorded positions to replay", file=sys.stderr)


def main(args) -> int:
    from moetune.adaptive.config import check_latency_target
    from moetune.outputs import output_lock
    from moetune.traces.replay import make_policy

    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if (args.offload is None) != (args.offload_gbps is None):
        raise ValueError("--offload CAPACITY and --offload-gbps G go together (experts resident per layer, and the "
                         "slow tier's read rate)")
    if args.batch_size is not None and (args.batch_size < 1 or args.offload is not None
                                        or args.latency_target_ms is not None):
        raise ValueError(f"--batch-size must be >= 1 and replays without --offload and --latency-target-ms "
                         f"(batched replay models neither), got --batch-size {args.batch_size}")
    check_latency_target(args.latency_target_ms, "--latency-target-ms")  # the rule `moetune run` applies
    for spec in args.policy:
        make_policy(spec)  # fail early on a bad spec
    outputs = [Path(args.out) / name for name in PLOTS + ("replay.json",)] if args.out else []
    with output_lock(outputs, args.force):
        return _replay(args)


def _save(path: Path, draw) -> Path | None:
    """Draw one plot into a temporary file renamed into place; a plot this run does not make (None) also
    removes an older one, so the folder never mixes two runs."""
    from moetune.outputs import atomic_output

    with atomic_output(path) as tmp:
        made = draw(tmp) is not None
    if not made:
        path.unlink(missing_ok=True)
    return path if made else None


def _replay(args) -> int:
    from moetune.outputs import atomic_output
    from moetune.traces import plots
    from moetune.traces.reader import read_trace
    from moetune.traces.replay import replay_many

    first = read_trace(args.traces[0], strict=args.strict)
    report_traces(args, first)
    latency = latency_for(args, first)
    cols = ["policy", "requests", "tokens", "goodput_tok_s", "speedup", "mean_accepted", "fidelity", "attainment",
            "unique_kept", "control_us_per_step", "inexact_steps"]
    if args.batch_size is not None:
        results, summaries = _replay_batched(args, first, latency)
        cols = ["policy", "batch_size", "requests", "tokens", "throughput_tok_s", "speedup", "mean_accepted",
                "tpot_ms", "mean_active", "experts_per_layer", "budgets_dropped"]
    elif args.offload is None:
        results = replay_many(args.traces, args.policy, latency, args.latency_target_ms, args.workers)
        summaries = [r.summary() for r in results]
    else:
        offloaded = _replay_offloaded(args, first, latency)
        results, summaries = [o.replay for o in offloaded], [o.summary() for o in offloaded]
        cols += ["hit_rate", "misses_per_step", "stall_s"]
    print(f"latency model: {latency.source} (error {latency.error})")
    print(table(summaries, cols))
    per_request = [dict(policy=r.policy, request=q.request_id, kind=q.kind, tokens=q.tokens, goodput_tok_s=q.goodput,
                        speedup=q.speedup, mean_accepted=q.mean_accepted, fidelity=q.fidelity,
                        attainment=q.attainment if args.latency_target_ms else None)
                   for r in results for q in r.requests]
    if args.per_request and per_request:
        print(table(per_request, list(per_request[0])))
    if args.out:
        out = Path(args.out)
        made = [_save(out / PLOTS[0], lambda p: plots.goodput_vs_fidelity(results, p)),
                _save(out / PLOTS[1], lambda p: plots.budgets_over_time(results, p, first.shape.num_layers)),
                _save(out / PLOTS[2], lambda p: plots.acceptance_over_time(results, p))]
        with atomic_output(out / "replay.json") as tmp:
            tmp.write_text(json.dumps(dict(latency=json.loads(latency.to_json()), overall=summaries,
                                           per_request=per_request, traces=args.traces), indent=1))
        print(f"wrote {out / 'replay.json'} and {', '.join(str(m) for m in made if m)}")
    return 0


def _replay_offloaded(args, first, latency) -> list:
    """Every policy over all traces with the model's experts behind a fast tier (traces.offload): the step
    times include the stalls a cache of --offload experts per layer would have had, the plain baseline's too."""
    from moetune.traces.offload import LinkProfile, OffloadSpec, replay_offload
    from moetune.traces.reader import read_trace
    from moetune.traces.replay import make_policy

    traces = [first] + [read_trace(p, strict=args.strict) for p in args.traces[1:]]
    try:
        link = LinkProfile.for_shape(first.shape, args.offload_gbps, args.offload_latency_us * 1e-6,
                                     args.offload_bytes_per_param)
        spec = OffloadSpec(args.offload, link, args.offload_eviction)
        return [replay_offload(traces, make_policy(p), latency, spec, args.latency_target_ms) for p in args.policy]
    except ValueError as e:
        raise ValueError(f"--offload {args.offload} --offload-gbps {args.offload_gbps}: {e}") from None


def _replay_batched(args, first, latency) -> tuple[list, list[dict]]:
    """Every policy over all traces' requests in continuous batches of --batch-size (traces.batch), beside
    batched plain decoding at the same size: speedup is throughput over plain's."""
    from moetune.traces.batch import replay_batch
    from moetune.traces.reader import read_trace
    from moetune.traces.replay import make_policy

    traces = [first] + [read_trace(p, strict=args.strict) for p in args.traces[1:]]
    plain = replay_batch(traces, make_policy("plain"), latency, args.batch_size, draft=args.draft_mode)
    runs = [replay_batch(traces, make_policy(p), latency, args.batch_size, draft=args.draft_mode)
            for p in args.policy]
    summaries = [dict(r.summary(), speedup=r.throughput / plain.throughput if plain.throughput else 0.0)
                 for r in runs]
    return [r.replay for r in runs], summaries
