"""Decoding with experts offloaded to a slow tier (engine/offload.py), with and without prefetch from
speculation, at several fast-tier sizes: tokens/s, bytes moved per token, hit rate, prefetch precision and
recall, stall time. Every run's output is checked against plain greedy decoding with all experts resident.

    python bench/bench_offload.py [--target /tmp/widened1040] [--prompts 8] [--max-new-tokens 48]
        [--fractions 0.25,0.5,0.75] [--slow paced --slow-gbps 1] [--depth 3] [--threads 1] [--tag T]

The target defaults to the expert-bound stand-in `moetune widen --intermediate 1040 --out /tmp/widened1040`
(6 layers x 32 experts x 3.2 MB float32). Methods per capacity: plain decoding loading on demand, plain
with prefetch ("both": pre-gating + token routing history), a draft-model chain of --depth without and
with prefetch, and auto (the adaptive policy, `moetune run --policy auto`, with prefetch: it learns what a
transfer costs and prices each option's expected misses, adaptive/transfers.py); plus plain, chain and auto
with every expert resident (no offload) as the ceiling. One auto policy per capacity serves its prompts in
turn, learning across them as a server would. The methods run interleaved per prompt (their order rotated
each prompt). Each request starts from an empty fast tier and history; its prefill is excluded from the
times (as generate's tokens/s does) and from the offload counters. Writes
bench/results/offload{_TAG}.{json,md} (--out: another folder, e.g. for a smoke run).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET
from moetune.engine.drafters import DraftModelDrafter
from moetune.engine.generate import generate
from moetune.engine.loader import load_draft, load_target, moe_shape
from moetune.engine.offload import enable_offload
from moetune.policies.adaptive import Adaptive
from moetune.policies.base import Policy
from moetune.policies.registry import make_policy
from moetune.policies.static import Static
from moetune.step import PLAIN, StepConfig

AIM = 2.0  # the aim: speculation with prefetch >= 2x plain on-demand decoding at 25% resident


class DecodeCounters:
    """The offload report of each request's decode alone: the counters after its first forward (the
    prefill) are the baseline, subtracted when the request ends."""

    def __init__(self, target, handle):
        self.handle, self.first, self.total = handle, False, None
        self.hook = target.model.register_forward_hook(self._after)

    def begin(self) -> None:
        self.first, self.start = True, self.handle.report()

    def _after(self, module, args, output) -> None:
        if self.first:
            self.first, self.start = False, self.handle.report()

    def end(self) -> None:
        delta = self.handle.report() - self.start
        self.total = delta if self.total is None else self.total + delta


class MethodRun:
    """One method decoding prompt after prompt (a fixed config, or a policy that serves them all in turn, as a
    server's would): tokens/s over decode time, and the decode-only offload report."""

    def __init__(self, target, draft, method: StepConfig | Policy, handle=None, prefetch="none"):
        self.target, self.draft, self.handle, self.prefetch = target, draft, handle, prefetch
        self.policy = Static(method) if isinstance(method, StepConfig) else method
        self.speculates = not isinstance(method, StepConfig) or method.speculate
        self.counters = None if handle is None else DecodeCounters(target, handle)
        self.tokens, self.seconds, self.steps, self.accepted, self.spec_steps = 0, 0.0, 0, 0, 0
        self.outputs: dict[int, list[int]] = {}

    def decode(self, tok, index: int, ids: list[int], n: int) -> None:
        """Prompt `index` from an empty fast tier and history."""
        if self.handle is not None:
            self.handle.set_prefetch(self.prefetch)
            self.handle.clear()
            self.counters.begin()
        drafter = DraftModelDrafter(self.draft) if self.speculates else None
        res = generate(self.target, tok, [ids], drafter=drafter, policy=self.policy, max_new_tokens=n)[0]
        if self.counters is not None:
            self.counters.end()
        self.tokens, self.seconds = self.tokens + len(res.token_ids), self.seconds + res.decode_time
        self.steps, self.accepted = self.steps + len(res.steps), self.accepted + sum(s.accepted for s in res.steps)
        self.spec_steps += sum(s.config.speculate for s in res.steps)
        self.outputs[index] = res.token_ids

    def close(self) -> None:
        if self.counters is not None:
            self.counters.hook.remove()

    def row(self) -> dict:
        row = dict(tokens=self.tokens, decode_s=round(self.seconds, 4),
                   tokens_per_s=round(self.tokens / self.seconds, 2),
                   mean_accepted=round(self.accepted / self.steps, 3) if self.speculates else None,
                   outputs=[self.outputs[i] for i in sorted(self.outputs)])
        if isinstance(self.policy, Adaptive):
            row["auto"] = auto_summary(self.policy, self.spec_steps)
        if self.counters is not None:
            report = self.counters.total
            total = report.total()
            row.update(offload=total, per_layer=report.per_layer(), bytes_per_token=round(total["bytes"] / self.tokens),
                       stall_s_per_token=round(total["stall_s"] / self.tokens, 6),
                       stall_share=round(total["stall_s"] / self.seconds, 4))
        return row


def run_interleaved(target, tok, draft, prompts, n, methods: list, handle=None) -> dict:
    """Every (name, config or policy, prefetch) method on every prompt, the methods interleaved per prompt (their
    order rotated each prompt), so a drift in the machine's speed falls on all of them; name -> row."""
    runs = {name: MethodRun(target, draft, method, handle, prefetch) for name, method, prefetch in methods}
    names = list(runs)
    try:
        for i, ids in enumerate(prompts):
            for name in names[i % len(names):] + names[:i % len(names)]:
                runs[name].decode(tok, i, ids, n)
    finally:
        for run in runs.values():
            run.close()
    return {name: run.row() for name, run in runs.items()}


def auto_summary(policy: Adaptive, spec_steps: int) -> dict:
    """What auto chose and learned: its speculative steps, and the transfer price it ended with."""
    transfers = policy.controller.learn().transfers
    return dict(speculative_steps=spec_steps, seconds_per_miss=transfers.seconds_per_miss,
                miss_rate=round(transfers.miss_rate, 4), seconds_per_expert=transfers.seconds_per_expert)


def methods(depth: int) -> list[tuple[str, StepConfig | Policy, str]]:
    """(name, config or policy, prefetch) of each offloaded method; a fresh auto policy each call."""
    chain = StepConfig(depth=depth)
    return [("plain, on demand", PLAIN, "none"), ("plain, prefetch", PLAIN, "both"),
            (f"chain d{depth}, on demand", chain, "none"), (f"chain d{depth}, prefetch", chain, "both"),
            ("auto, prefetch", make_policy("auto"), "both")]


def bench(args, target, tok, draft, prompts) -> dict:
    n, E = args.max_new_tokens, moe_shape(target).num_experts
    generate(target, tok, [prompts[0]], max_new_tokens=4)  # first-call costs, untimed
    resident = run_interleaved(target, tok, draft, prompts, n, [
        ("plain, all resident", PLAIN, "none"), (f"chain d{args.depth}, all resident", StepConfig(depth=args.depth), "none"),
        ("auto, all resident", make_policy("auto"), "none")])
    reference = resident["plain, all resident"]["outputs"]
    capacities = []
    for fraction in args.fractions:
        capacity = max(1, round(fraction * E))
        t0 = time.perf_counter()
        handle = enable_offload(target, capacity=capacity, slow=args.slow, slow_gbps=args.slow_gbps,
                                workdir=args.workdir, prefetch_min_prob=args.prefetch_min_prob)
        setup_s = time.perf_counter() - t0
        try:
            rows = run_interleaved(target, tok, draft, prompts, n, methods(args.depth), handle)
            slow_tier, resident_bytes = handle.report().slow_tier, handle.report().resident_bytes
        finally:
            handle.remove()
        capacities.append(dict(fraction=fraction, capacity=capacity, setup_s=round(setup_s, 2), slow_tier=slow_tier,
                               resident_mb=round(resident_bytes / 1e6, 1), rows=rows))
        print(f"capacity {capacity}/{E} done", file=sys.stderr, flush=True)
    for table in [resident] + [c["rows"] for c in capacities]:
        for row in table.values():
            row["lossless"] = row.pop("outputs") == reference
    return dict(resident=resident, capacities=capacities)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="/tmp/widened1040")
    ap.add_argument("--prompts", type=int, default=8, help="embedded held-out prompts")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5, 0.75],
                    help="fast-tier sizes as fractions of the experts per layer")
    ap.add_argument("--slow", default="paced", choices=("auto", "direct", "fadvise", "paced"))
    ap.add_argument("--slow-gbps", type=float, default=1.0, help="pace of slow-tier reads, GB/s (0: unpaced)")
    ap.add_argument("--prefetch-min-prob", type=float, default=0.1, help="see OffloadConfig.prefetch_min_prob")
    ap.add_argument("--depth", type=int, default=3, help="draft-model chain depth")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default=None, help="folder for the slow tier's file (default: a temp folder)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    args.slow_gbps = args.slow_gbps or None
    torch.set_num_threads(args.threads)
    target, tok = load_target(args.target, device="cpu")
    draft, _ = load_draft(DEFAULT_DRAFT, tok, device="cpu")
    held = json.loads((Path(DEFAULT_TARGET).parent / "prompts.json").read_text())[:args.prompts]
    prompts = [tok(p["text"], add_special_tokens=False)["input_ids"] for p in held]
    t0 = time.perf_counter()
    result = dict(command="python bench/bench_offload.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  target=args.target, shape=moe_shape(target).__dict__, device=platform.processor() or "cpu",
                  torch_threads=args.threads, prompts=len(prompts), max_new_tokens=args.max_new_tokens,
                  slow=args.slow, slow_gbps=args.slow_gbps, depth=args.depth, prefetch_min_prob=args.prefetch_min_prob,
                  load_average_1min=round(os.getloadavg()[0], 2), **bench(args, target, tok, draft, prompts))
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"offload{'_' + args.tag if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(r: dict) -> str:
    """The results as markdown: one row per method and capacity, then the aim and per-layer prefetch quality."""
    E = r["shape"]["num_experts"]
    lines = [f"Target {r['target']} ({r['shape']['num_layers']} MoE layers x {E} experts, top-{r['shape']['top_k']}); "
             f"{r['prompts']} held-out prompts x {r['max_new_tokens']} new tokens, greedy; {r['device']} CPU, "
             f"{r['torch_threads']} torch thread(s); load average {r['load_average_1min']}; {r['wall_s']} s.", "",
             f"Slow tier: {r['capacities'][0]['slow_tier'] if r['capacities'] else r['slow']}.", "",
             f"Reproduce: `{r['command'].strip()}`", "",
             "| fast tier | method | tokens/s | vs plain on demand | accepted | MB/token | hit rate | late | "
             "precision | recall | stall ms/token | stall share | read GB/s | lossless |", "|---" * 14 + "|"]
    for name, row in r["resident"].items():
        lines.append(f"| all {E} | {name} | {row['tokens_per_s']:.2f} | - | {_fmt(row['mean_accepted'])} | - | - | - | "
                     f"- | - | - | - | - | {'yes' if row['lossless'] else 'NO'} |")
    for c in r["capacities"]:
        base = c["rows"]["plain, on demand"]["tokens_per_s"]
        for name, row in c["rows"].items():
            o = row["offload"]
            lines.append(f"| {c['capacity']}/{E} ({c['resident_mb']} MB) | {name} | {row['tokens_per_s']:.2f} | "
                         f"{row['tokens_per_s'] / base:.2f}x | {_fmt(row['mean_accepted'])} | "
                         f"{row['bytes_per_token'] / 1e6:.2f} | {_fmt(o['hit_rate'])} | {o['late']} | "
                         f"{_fmt(o['precision'])} | {_fmt(o['recall'])} | {1e3 * row['stall_s_per_token']:.2f} | "
                         f"{row['stall_share']:.2f} | {_fmt(o['read_gbps'])} | {'yes' if row['lossless'] else 'NO'} |")
    lines += ["", "hit rate: needed experts already in the fast tier; late: needed experts still in flight "
              "(prefetched, not arrived); precision/recall: experts the prefetcher asked for vs those the layer "
              "then needed; stall: compute time spent waiting on the slow tier; read GB/s: bytes over the reader "
              "thread's time in reads (pacing included), the slow tier's measured rate.", ""]
    for c in r["capacities"][:1]:
        ratio = c["rows"]["auto, prefetch"]["tokens_per_s"] / c["rows"]["plain, on demand"]["tokens_per_s"]
        lines += [f"Aim (>= {AIM:g}x plain on demand at the smallest fast tier, {c['capacity']}/{E}): auto, prefetch "
                  f"reaches {ratio:.2f}x: {'met' if ratio >= AIM else 'NOT met'}.", ""]
    for c in r["capacities"]:
        a = c["rows"]["auto, prefetch"]["auto"]
        lines.append(f"auto at {c['capacity']}/{E}: {a['speculative_steps']} speculative steps; learned "
                     f"{1e3 * a['seconds_per_miss']:.3f} ms per miss x {a['miss_rate']:.2f} misses per expert = "
                     f"{1e3 * a['seconds_per_expert']:.3f} ms per unique expert computed.")
    lines.append("")
    for c in r["capacities"]:
        for name, row in c["rows"].items():
            if name.endswith("prefetch"):
                cells = " | ".join(f"{_fmt(l['precision'])}/{_fmt(l['recall'])}" for l in row["per_layer"])
                lines.append(f"Per-layer precision/recall, {name}, {c['capacity']}/{E}: {cells}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
