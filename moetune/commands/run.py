"""`moetune run`: speculative decoding on held-out prompts, measured against plain decoding in the same run.

Plain decoding runs first on the same prompts and settings, so the speedup compares like with like on this
machine right now. The speculative run is either one static config (--drafter/--depth/--topk/
--num-draft-tokens, and an expert budget with --budget/--budget-mode), a policy by name (--policy
NAME[:k=v,...]), auto-tuning (--auto: the adaptive controller over every drafter) or auto-tuning to a latency
target (--latency-target-ms). --batch-size decodes the prompts together (continuous batching) and --offload
keeps only some experts in memory. Flags only build a StepConfig or a policy spec; those validate themselves.
For policy runs the summary also shows which configurations ran over time, the policy's switches, and how
often a latency target was met.
"""
from __future__ import annotations

import argparse
import math
import os
import random
from dataclasses import replace

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET, MODELS_DIR
from moetune.adaptive.config import check_latency_target
from moetune.prompts import read_prompts
from moetune.step import BUDGET_MODES, DRAFTERS, PLAIN, Sampling, StepConfig

STATIC_FLAGS = {"drafter": ("--drafter", "draft_model"), "depth": ("--depth", 4), "topk": ("--topk", 1),
                "num_draft_tokens": ("--num-draft-tokens", None), "budgets": ("--budget", None),
                "budget_mode": ("--budget-mode", "evict")}
SHOWN_CONFIGS = 4  # most-used configs listed per request
FIRST_STEPS = 12  # steps of each request shown in order
MAX_THREADS = 4 * (os.cpu_count() or 1)  # far more threads than cores only slows torch; thousands exhaust memory


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _budgets(text: str) -> tuple[int, ...]:
    """`--budget 12` (every MoE layer) or `--budget 16,12,12,8,8,8` (one per MoE layer)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an expert count or a comma list of them, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expert budgets must be positive, got {text!r}")
    return values


def _threads(text: str) -> int:
    value = _positive(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_THREADS} (4 per CPU core here), got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=str(DEFAULT_TARGET), help="target path or hub id (default: embedded)")
    p.add_argument("--draft", default=str(DEFAULT_DRAFT), help="draft model path or hub id (default: embedded)")
    p.add_argument("--prompts", type=_positive, default=8, help="how many built-in held-out prompts (default 8)")
    p.add_argument("--prompts-file", default=str(MODELS_DIR / "prompts.json"),
                   help="JSON list of {kind, source, text} (default: the embedded held-out prompts)")
    p.add_argument("--max-new-tokens", type=_positive, default=64)
    p.add_argument("--drafter", choices=DRAFTERS, default=None, help="static run: drafter (default draft_model)")
    p.add_argument("--depth", type=int, default=None, help="static run: draft steps per tree (default 4)")
    p.add_argument("--topk", type=int, default=None, help="static run: children per expanded node (default 1 = chain)")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="static run: node budget of a dynamic tree")
    p.add_argument("--budget", dest="budgets", type=_budgets, default=None,
                   help="static run: experts each MoE layer may compute per verification, one count or one per "
                        "layer (comma list)")
    p.add_argument("--budget-mode", choices=BUDGET_MODES, default=None,
                   help="static run: evict (default; lossless, drops tree nodes) or substitute (lossy, MoE-Spec)")
    p.add_argument("--policy", default=None,
                   help="a policy spec NAME[:key=value,...] (plain, static, moespec, cascade, moesd, adaptive, auto)")
    p.add_argument("--auto", action="store_true",
                   help="auto-tuning: the adaptive controller over every drafter (same as --policy auto)")
    p.add_argument("--latency-target-ms", type=float, default=None,
                   help="auto-tune to this time per output token (ms); alone it implies --auto")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--threads", type=_threads, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--offload", type=_positive, default=None, metavar="CAPACITY",
                   help="keep only CAPACITY experts per MoE layer in memory; the rest in a file read on demand and "
                        "prefetched from the draft (CPU; engine/offload.py)")
    p.add_argument("--offload-slow", choices=("auto", "direct", "fadvise", "paced"), default="auto",
                   help="with --offload: how the slow tier is read (auto: page cache bypassed where possible; paced: "
                        "a copy rate-limited to --offload-gbps)")
    p.add_argument("--offload-gbps", type=float, default=None, help="with --offload-slow paced: the rate in GB/s")
    p.add_argument("--offload-prefetch", choices=("both", "pregate", "history", "none"), default="both",
                   help="with --offload: which predictors prefetch experts (default both)")
    p.add_argument("--batch-size", type=_positive, default=1,
                   help="decode this many requests together (continuous batching; default 1)")
    p.add_argument("--arrival-rate", type=float, default=None,
                   help="with --batch-size: requests arrive at this rate per second (Poisson, seeded by --seed); "
                        "default: all at once")


def _config(args) -> StepConfig:
    values = {k: default if getattr(args, k) is None else getattr(args, k) for k, (_, default) in STATIC_FLAGS.items()}
    if args.budget_mode is not None and args.budgets is None:
        raise ValueError("--budget-mode needs --budget (the experts each MoE layer may compute)")
    return StepConfig(**values)


def _layer_budgets(config: StepConfig, shape) -> StepConfig:
    """--budget for this model: one count repeated over its MoE layers, each in [top_k, num_experts]."""
    if config.budgets is None:
        return config
    budgets = config.budgets * shape.num_layers if len(config.budgets) == 1 else config.budgets
    if len(budgets) != shape.num_layers:
        raise ValueError(f"--budget has {len(budgets)} entries but the target has {shape.num_layers} MoE layers; "
                         f"give one count or {shape.num_layers}")
    shape.check_budgets(budgets, "--budget")
    return replace(config, budgets=budgets)


def policy_spec(args) -> str | None:
    """The policy spec the flags ask for (None: a static run); ValueError for combinations that conflict."""
    static = [flag for k, (flag, _) in STATIC_FLAGS.items() if getattr(args, k) is not None]
    target = args.latency_target_ms
    if args.auto and args.policy is not None:
        raise ValueError("--auto and --policy are alternatives (--auto is --policy auto); pass one of them")
    check_latency_target(target, "--latency-target-ms")
    spec = "auto" if args.auto or (target is not None and args.policy is None) else args.policy
    if spec is None:
        return None
    if static:
        raise ValueError(f"{', '.join(static)} set a static config; they cannot be combined with a policy "
                         f"(--policy/--auto/--latency-target-ms): pass static parameters in the spec instead, "
                         f"e.g. --policy static:depth=4,topk=2")
    if target is not None:
        name = spec.partition(":")[0].strip().lower()
        if name not in ("adaptive", "auto"):
            raise ValueError(f"--latency-target-ms needs the adaptive policy (--auto or --policy adaptive[:...]); "
                             f"policy {name!r} has no latency target")
        if "latency_target_ms" in spec:
            raise ValueError("the latency target is given twice (--latency-target-ms and latency_target_ms= in "
                             "--policy); pass it once")
        spec += ("," if ":" in spec else ":") + f"latency_target_ms={target:g}"
    return spec


def _policy(spec: str | None):
    if spec is None:
        return None
    from moetune.policies.registry import make_policy
    return make_policy(spec)


def _prompts(path: str, n: int) -> list[str]:
    texts = [p["text"] for p in read_prompts(path, "--prompts-file")]
    return [texts[i % len(texts)] for i in range(n)]


def arrivals(args) -> list[float] | None:
    """Arrival times of the prompts (seconds after the start) for --arrival-rate, or None (all at once)."""
    rate = args.arrival_rate
    if rate is None:
        return None
    if args.batch_size < 2 or not 0 < rate < math.inf:
        raise ValueError(f"--arrival-rate needs --batch-size >= 2 and a finite rate > 0 requests per second, got "
                         f"--batch-size {args.batch_size} --arrival-rate {rate}")
    gaps = random.Random(args.seed)
    times, t = [], 0.0
    for _ in range(args.prompts):
        times.append(t)
        t += gaps.expovariate(rate)
    return times


def _check_batching(args, config: StepConfig) -> None:
    if args.batch_size > 1 and config.budgets is not None and config.budget_mode != "evict":
        raise ValueError("--batch-size > 1 applies eviction budgets only: use --budget-mode evict or --batch-size 1")


def main(args: argparse.Namespace) -> int:
    Sampling(args.temperature, args.top_p)
    spec = policy_spec(args)
    config, policy = _config(args), _policy(spec)
    _check_batching(args, config)
    times = arrivals(args)
    prompts = _prompts(args.prompts_file, args.prompts)
    import torch

    from moetune.engine.loader import load_target, moe_shape

    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = load_target(args.target, device=args.device, dtype=args.dtype)
    if policy is not None:
        policy.setup(moe_shape(target))  # a latency target a profile proves infeasible fails here, before any run
    config = _layer_budgets(config, moe_shape(target))
    offload = _offload(target, args)
    try:
        return _run(args, target, tokenizer, spec, config, policy, prompts, times, offload)
    finally:
        if offload is not None:
            offload.remove()


def _offload(target, args):
    """--offload: the model's experts behind a fast tier of CAPACITY per layer (None without the flag)."""
    if args.offload is None:
        if args.offload_gbps is not None:
            raise ValueError("--offload-gbps needs --offload CAPACITY")
        return None
    from moetune.engine.offload import enable_offload
    if target.device.type != "cpu":
        raise ValueError("--offload keeps experts in a file behind a CPU fast tier: run with --device cpu")
    if args.offload_slow == "paced" and args.offload_gbps is None:
        raise ValueError("--offload-slow paced is a rate-limited copy: give its rate with --offload-gbps (e.g. 4)")
    try:
        return enable_offload(target, capacity=args.offload, slow=args.offload_slow, slow_gbps=args.offload_gbps,
                              prefetch=args.offload_prefetch)
    except ValueError as e:
        raise ValueError(f"--offload {args.offload}: {e}") from None


def _run(args, target, tokenizer, spec, config, policy, prompts, times, offload) -> int:
    """Plain, then the speculative run, on the same prompts; the summary tables."""
    from tqdm import tqdm

    from moetune.engine.drafters import DraftModelDrafter
    from moetune.engine.generate import generate
    from moetune.engine.loader import load_draft
    drafters = {}
    if policy is not None or config.drafter == "draft_model":
        draft, _ = load_draft(args.draft, tokenizer, device=args.device, dtype=args.dtype)
        drafters["draft_model"] = DraftModelDrafter(draft)
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  seed=args.seed)
    generate(target, tokenizer, prompts[:1], config=PLAIN, max_new_tokens=4)  # warm-up, not timed
    runs = {}
    name = spec or "speculative"
    methods = (("plain", dict(config=PLAIN)),
               (name, dict(drafter=drafters, policy=policy, config=None if policy else config)))
    moved = {}  # run -> its offload report (what the fast tier and the slow tier did during it)
    with tqdm(total=2 * len(prompts), desc="moetune run", unit="prompt") as bar:
        for run, kw in methods:
            before = None if offload is None else offload.report()
            if args.batch_size > 1:
                runs[run] = _batched(target, tokenizer, prompts, run, kw, args, times)
                bar.update(len(prompts))
            else:
                runs[run] = []
                for i, prompt in enumerate(prompts):  # request id i: the policy's decision log names prompt i
                    runs[run] += generate(target, tokenizer, [prompt], **kw, **common, request_ids=[i])
                    bar.update(1)
            if offload is not None:
                moved[run] = offload.report() - before
    print(summary(runs, config if policy is None else None))
    for run, report in moved.items():
        print(f"\nExpert offload during {run} (engine/offload.py):\n" + report.markdown())
    if policy is not None:
        print(over_time(runs[name], policy.decision_log(),
                        getattr(getattr(policy, "config", None), "latency_target_ms", None)))
    return 0


def _batched(target, tokenizer, prompts, run: str, kw: dict, args, times) -> list:
    """One method over all prompts at once through engine.batch (continuous batching); prints the batch's
    throughput and per-request latency (time to first token, time per output token). The summary table's
    tokens/s is then per request (its tokens over its own decode time)."""
    from moetune.engine.batch import generate_batch, throughput
    results = generate_batch(target, tokenizer, prompts, **kw, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, arrivals=times, temperature=args.temperature,
                             top_p=args.top_p, seed=args.seed)
    ttft = sorted(r.time_to_first_token for r in results)
    tpot = sorted(r.time_per_output_token for r in results)
    print(f"{run}: batch {args.batch_size}, {throughput(results):.1f} tokens/s overall; time to first token "
          f"median {1e3 * ttft[len(ttft) // 2]:.1f} ms; time per output token median "
          f"{1e3 * tpot[len(tpot) // 2]:.2f} ms")
    return results


def summary(runs: dict, config: StepConfig | None) -> str:
    """A markdown table: tokens/s, speedup over the first (plain) run, accepted length, experts per layer."""
    rows = []
    base = None
    for name, results in runs.items():
        tokens = sum(len(r.token_ids) for r in results)
        seconds = sum(r.decode_time for r in results)
        steps = [s for r in results for s in r.steps]
        tps = tokens / seconds if seconds > 0 else 0.0
        base = base or tps
        acc = sum(s.accepted for s in steps) / len(steps) if steps else 0.0
        per_layer = [sum(s.unique_experts_kept) / len(s.unique_experts_kept) for s in steps if s.unique_experts_kept]
        # "-": the run captured no routing (plain and static policies skip it; see Policy.wants_routing)
        experts = f"{sum(per_layer) / len(per_layer):.1f}" if per_layer else "-"
        rows.append(f"| {name} | {tokens} | {tps:.1f} | {tps / base if base else 0:.2f}x | {acc:.2f} | {experts} |")
    head = ["| run | tokens | tokens/s | speedup | mean accepted | experts computed/layer |",
            "|---|---|---|---|---|---|"]
    note = f"\nconfig: {config}" if config is not None else ""
    return "\n".join(head + rows) + note


def _runs(labels: list[str]) -> str:
    """`a a a b a` -> `a x3, b, a`: a request's step sequence, compressed."""
    out: list[list] = []
    for lab in labels:
        if out and out[-1][0] == lab:
            out[-1][1] += 1
        else:
            out.append([lab, 1])
    return ", ".join(lab if n == 1 else f"{lab} x{n}" for lab, n in out)


def short_label(config: StepConfig) -> str:
    """A config's label with its per-layer budgets summarised by their mean, so budgeted steps group."""
    from moetune.adaptive.candidates import label

    if config.budgets is None:
        return label(config)
    mean = sum(config.budgets) / len(config.budgets)
    return f"{label(replace(config, budgets=None))} B~{mean:.0f}"


def over_time(results, events: list[tuple], target_ms: float | None) -> str:
    """Which configurations a policy ran, per request: the most used (config: steps), the first steps in
    order, the config changes and the switches the policy reported (policy.decision_log(): request, step, config,
    message), and with a target, how often it was met and whether it was judged infeasible."""
    lines = ["", "Configurations over time (config: steps; B~n = budgeted, n experts per layer on average), "
             "first steps in order:", "",
             "| request | steps | tokens | config changes | configs used | first steps |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(results):
        labels = [short_label(s.config) for s in r.steps]
        counts: dict[str, int] = {}
        for lab in labels:
            counts[lab] = counts.get(lab, 0) + 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])
        used = ", ".join(f"{lab}: {n}" for lab, n in top[:SHOWN_CONFIGS])
        used += f", +{len(top) - SHOWN_CONFIGS} more" if len(top) > SHOWN_CONFIGS else ""
        changes = sum(a != b for a, b in zip(labels, labels[1:]))
        lines.append(f"| {i} | {len(r.steps)} | {len(r.token_ids)} | {changes} | {used} | "
                     f"{_runs(labels[:FIRST_STEPS])} |")
    switches = [e for e in events if not e[3]]
    if switches:
        lines += ["", f"Policy switches: {len(switches)}" + (f", the first {FIRST_STEPS}:" if len(switches) > FIRST_STEPS
                                                              else ":")]
        lines += [f"- request {e[0]} step {e[1]}: -> {e[2]}" for e in switches[:FIRST_STEPS]]
    if target_ms is not None:
        lines += ["", attainment(results, events, target_ms)]
    return "\n".join(lines)


def target_stats(results, events: list[tuple], target_ms: float) -> dict:
    """Latency-target figures of a run: `attainment`, the share of tokens emitted by steps whose time per
    output token met the target; `ms_per_token` overall; `infeasible`, the requests (indices) the policy
    judged infeasible (events whose message says so)."""
    steps = [s for r in results for s in r.steps]
    tokens = sum(s.emitted for s in steps)
    met = sum(s.emitted for s in steps if s.step_time * 1e3 <= target_ms * s.emitted)
    return dict(attainment=met / max(tokens, 1), ms_per_token=sum(s.step_time for s in steps) * 1e3 / max(tokens, 1),
                infeasible=sorted({e[0] for e in events if "infeasible" in e[3]}))


def attainment(results, events: list[tuple], target_ms: float) -> str:
    """The target_stats of a run as lines, with the policy's messages (why a target was judged infeasible)."""
    t = target_stats(results, events, target_ms)
    bad = t["infeasible"]
    lines = [f"Latency target {target_ms:g} ms/token: met by steps emitting {t['attainment']:.0%} of tokens; "
             f"overall {t['ms_per_token']:.3g} ms/token; judged infeasible in {len(bad)} of {len(results)} requests"
             + (f" ({', '.join(map(str, bad))})." if bad else ".")]
    lines += [f"- request {e[0]} step {e[1]}: {e[3]}" for e in events if e[3]]
    return "\n".join(lines)
