"""Live policy benchmark on the embedded model: the replay benchmark's comparison, measured in one process.

Plain decoding, static chains and trees (draft model and n-gram), MoE-Spec at a few budgets, Cascade-style,
MoESD-style and the adaptive controller (auto: every drafter) decode the same held-out prompts (the kinds
taken in turn), methods interleaved per prompt in a rotating order, so drift of a shared machine spreads
evenly over them. Each policy instance serves all prompts in turn, as a server would. Then latency-target
mode: the adaptive controller with targets from 0.5x to 2x plain's measured ms/token, interleaved the same
way. Writes bench/results/live.{json,md} and latency_targets.{json,md}.

    .venv/bin/python bench/bench_live.py --prompts 24 --max-new-tokens 64 --threads 1

Why these numbers: speedup is tokens/s over plain's tokens/s in this run; fidelity is token agreement with
plain greedy output (position by position; 1.0 = lossless); control share = decide + observe wall time
(StepStats.t_control) over step time, the controller's overhead budget (aim: at most 2%).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

METHODS = [("plain", "plain"),
           ("draft chain d2", "static:depth=2"), ("draft chain d4", "static:depth=4"),
           ("draft tree d4 k2 n8", "static:depth=4,topk=2,num_draft_tokens=8"),
           ("n-gram chain d4", "static:depth=4,drafter=ngram"), ("n-gram chain d8", "static:depth=8,drafter=ngram"),
           ("MoE-Spec B=8", "moespec:budget=8,depth=4"), ("MoE-Spec B=16", "moespec:budget=16,depth=4"),
           ("MoE-Spec B=24", "moespec:budget=24,depth=4"), ("Cascade-style", "cascade"), ("MoESD-style", "moesd"),
           ("adaptive (draft model, budgets allowed)", "adaptive"), ("adaptive (auto: every drafter, lossless)", "auto")]
TARGETS = (0.5, 0.75, 1.0, 1.5, 2.0)  # multiples of plain's measured ms/token


def pick_prompts(path: Path, n: int) -> list[dict]:
    """n prompts, the kinds taken in turn (the file lists them kind by kind)."""
    items = json.loads(path.read_text())
    kinds: dict[str, list] = {}
    for p in items:
        kinds.setdefault(p["kind"], []).append(p)
    queues = list(kinds.values())
    out = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    return out[:n]


def interleaved(target, tokenizer, prompts, methods: dict, common: dict, generate) -> dict:
    """name -> (results, events): every method on every prompt, the order rotated per prompt."""
    names = list(methods)
    out = {name: ([], []) for name in names}
    for i, prompt in enumerate(prompts):
        for name in names[i % len(names):] + names[:i % len(names)]:
            policy, drafters = methods[name]
            seen = len(policy.decision_log())
            results, events = out[name]
            results += generate(target, tokenizer, [prompt["text"]], drafter=drafters, policy=policy, **common,
                                request_ids=[i])
            events += policy.decision_log()[seen:]  # rows name request i
        print(f"prompt {i + 1}/{len(prompts)} ({prompt['kind']}) done", file=sys.stderr, flush=True)
    return out


def agreement(results, reference) -> float:
    """Share of reference tokens the results reproduce at the same position."""
    same = sum(sum(a == b for a, b in zip(r.token_ids, p.token_ids)) for r, p in zip(results, reference))
    return same / max(sum(len(p.token_ids) for p in reference), 1)


def figures(results, plain_tps: float | None, reference) -> dict:
    steps = [s for r in results for s in r.steps]
    tokens = sum(len(r.token_ids) for r in results)
    seconds = sum(r.decode_time for r in results)
    step_s = sum(s.step_time for s in steps)
    control = sum(s.t_control for s in steps)
    tps = tokens / seconds if seconds > 0 else 0.0
    return dict(tokens=tokens, steps=len(steps), tokens_per_s=round(tps, 1),
                speedup=round(tps / plain_tps, 3) if plain_tps else 1.0,
                ms_per_token=round(1e3 * seconds / max(tokens, 1), 3),
                step_ms_per_token=round(1e3 * step_s / max(tokens, 1), 3),
                mean_accepted=round(sum(s.accepted for s in steps) / max(len(steps), 1), 2),
                fidelity=round(agreement(results, reference), 4),
                control_us_per_step=round(1e6 * control / max(len(steps), 1), 1),
                control_share=round(control / step_s, 4) if step_s > 0 else 0.0,
                step_ms=round(1e3 * step_s / max(len(steps), 1), 3))


def drafter_mix(results) -> dict:
    """Share of steps per drafter (plain = no speculation): which drafters a policy actually used."""
    steps = [s for r in results for s in r.steps]
    mix: dict[str, int] = {}
    for s in steps:
        key = s.config.drafter if s.config.speculate else "plain"
        mix[key] = mix.get(key, 0) + 1
    return {k: round(v / max(len(steps), 1), 3) for k, v in sorted(mix.items())}


def markdown(live: dict, targets: dict, command: str) -> tuple[str, str]:
    a = ["# Live policy benchmark (embedded model)", "", f"Reproduce: `{command}`", "",
         f"{live['setup']}", "",
         "| method | spec | tokens/s | speedup vs plain | ms/token | mean accepted | fidelity | "
         "decide+observe us/step | control share of step | drafters used |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in live["rows"]:
        mix = ", ".join(f"{k} {v:.0%}" for k, v in r["drafters"].items())
        a.append(f"| {r['method']} | `{r['spec']}` | {r['tokens_per_s']} | {r['speedup']} | {r['ms_per_token']} | "
                 f"{r['mean_accepted']} | {r['fidelity']} | {r['control_us_per_step']} | {r['control_share']:.2%} | "
                 f"{mix} |")
    b = ["# Latency targets (embedded model, adaptive controller)", "", f"Reproduce: `{command}`", "",
         f"Plain decoding measured {targets['plain_ms_per_token']} ms/token (summed step times, what the controller "
         "targets) in the same run; targets are multiples of it. Attainment = share of tokens emitted by steps whose "
         "time per output token met the target; achieved = summed step times / tokens.", "",
         "| target x plain | target ms/token | attainment | achieved ms/token | overall met | fidelity | "
         "requests judged infeasible | control share |", "|---|---|---|---|---|---|---|---|"]
    for r in targets["rows"]:
        b.append(f"| {r['multiple']} | {r['target_ms']} | {r['attainment']:.1%} | {r['ms_per_token']} | "
                 f"{'yes' if r['overall_met'] else 'no'} | {r['fidelity']} | {r['infeasible_requests']} of "
                 f"{r['requests']} | {r['control_share']:.2%} |")
    return "\n".join(a) + "\n", "\n".join(b) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=24, help="held-out prompts (kinds in turn); default 24, all of them")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--targets", default="/".join(map(str, TARGETS)), help="multiples of plain's ms/token, a/b/c")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    multiples = [float(x) for x in args.targets.split("/") if x]
    if args.prompts < 1 or args.max_new_tokens < 1 or args.threads < 1 or not multiples or min(multiples) <= 0:
        raise SystemExit("need --prompts, --max-new-tokens, --threads >= 1 and positive --targets (e.g. 0.5/1/2)")
    import torch

    from moetune import DEFAULT_DRAFT, DEFAULT_TARGET, MODELS_DIR
    from moetune.commands.run import target_stats
    from moetune.engine.drafters import DraftModelDrafter
    from moetune.engine.generate import generate
    from moetune.engine.loader import load_draft, load_target
    from moetune.policies.registry import make_policy
    from moetune.step import PLAIN

    t0, load0 = time.time(), os.getloadavg()[0]
    torch.set_num_threads(args.threads)
    target, tokenizer = load_target(str(DEFAULT_TARGET), device="cpu")
    draft, _ = load_draft(str(DEFAULT_DRAFT), tokenizer, device="cpu")
    drafters = {"draft_model": DraftModelDrafter(draft)}
    prompts = pick_prompts(MODELS_DIR / "prompts.json", args.prompts)
    common = dict(max_new_tokens=args.max_new_tokens, seed=args.seed)
    generate(target, tokenizer, [prompts[0]["text"]], config=PLAIN, max_new_tokens=8)  # warm-up, not timed

    methods = {name: (make_policy(spec), drafters) for name, spec in METHODS}
    runs = interleaved(target, tokenizer, prompts, methods, common, generate)
    reference = runs["plain"][0]
    plain = figures(reference, None, reference)
    rows = [dict(method=name, spec=spec, **figures(runs[name][0], plain["tokens_per_s"], reference),
                 drafters=drafter_mix(runs[name][0])) for name, spec in METHODS]
    load = os.getloadavg()[0]
    setup = (f"{len(prompts)} held-out prompts ({', '.join(sorted({p['kind'] for p in prompts}))}), "
             f"{args.max_new_tokens} new tokens each, greedy, CPU, {args.threads} thread(s); "
             f"methods interleaved per prompt; one policy instance per method across prompts; 1-min load average "
             f"{load0:.2f} at start, {load:.2f} after the comparison (a shared 2-core machine).")
    live = dict(setup=setup, rows=rows)

    plain_ms = plain["step_ms_per_token"]  # what the controller measures and targets: summed step times
    specs = {f"{m:g}x": (make_policy(f"auto:latency_target_ms={m * plain_ms:.4g}"), drafters) for m in multiples}
    tgt_runs = interleaved(target, tokenizer, prompts, specs, common, generate)
    trows = []
    for m in multiples:
        results, events = tgt_runs[f"{m:g}x"]
        ms = m * plain_ms
        t = target_stats(results, events, ms)
        f = figures(results, plain["tokens_per_s"], reference)
        trows.append(dict(multiple=m, target_ms=round(ms, 3), attainment=round(t["attainment"], 4),
                          ms_per_token=round(t["ms_per_token"], 3), overall_met=t["ms_per_token"] <= ms,
                          fidelity=f["fidelity"], infeasible_requests=len(t["infeasible"]), requests=len(results),
                          control_share=f["control_share"], messages=sorted({e[3] for e in events if e[3]})[:3]))
    targets = dict(plain_ms_per_token=plain_ms, rows=trows)

    command = "python bench/bench_live.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seconds = round(time.time() - t0, 1)
    (out / "live.json").write_text(json.dumps(dict(command=command, seconds=seconds, **live), indent=1))
    (out / "latency_targets.json").write_text(json.dumps(dict(command=command, seconds=seconds, **targets), indent=1))
    md_live, md_targets = markdown(live, targets, command.strip())
    (out / "live.md").write_text(md_live)
    (out / "latency_targets.md").write_text(md_targets)
    print(md_live + "\n" + md_targets + f"\n{seconds} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
