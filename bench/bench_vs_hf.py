"""moetune against the decoders users already have: HF `generate` plain, assisted generation and prompt
lookup, side by side in one process, methods interleaved per prompt (the order rotated per prompt), plus
a per-phase breakdown of one decode step (us/step) next to HF's own loop.

    python bench/bench_vs_hf.py [--held-out 24] [--unseen 16] [--max-new-tokens 64] [--threads 1]

Prompts: the embedded held-out prompts (stdlib files the models never trained on) and prompts cut from
other real text the models never saw (Python sources of installed packages: numpy, torch, transformers,
sklearn; the models trained on the stdlib only). Writes bench/results/vs_hf.{json,md} (or --tag'ed names).
Speeds are total generated tokens over total decode wall time; every method's output is checked against
HF greedy decoding (lossless). The breakdown runs separately, instrumented, after the timed runs.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET
from moetune.engine import generate as engine_generate
from moetune.engine import kv, verify as engine_verify
from moetune.engine.drafters import DraftModelDrafter, NgramDrafter
from moetune.engine.generate import generate
from moetune.engine.loader import load_draft, load_target
from moetune.policies.registry import make_policy

MOETUNE = {"moetune plain": "plain", "moetune n-gram chain k=6": "static:depth=6,drafter=ngram",
           "moetune n-gram chain k=4": "static:depth=4,drafter=ngram", "moetune auto": "auto"}
PACKAGES = ("numpy", "torch", "transformers", "sklearn")


def unseen_prompts(n: int, chars: int = 400) -> list[dict]:
    """n prompts cut at `def ` lines from installed packages' sources, chosen by a hash of the path."""
    files = []
    for name in PACKAGES:
        mod = __import__(name)
        files += sorted(Path(mod.__file__).parent.rglob("*.py"))
    files.sort(key=lambda p: hashlib.sha1(p.name.encode() + str(p.stat().st_size).encode()).hexdigest())
    out = []
    for path in files:
        text = path.read_text(errors="replace")
        at = text.find("\ndef ", len(text) // 3)
        if at < 0 or len(text) - at < chars:
            continue
        out.append(dict(kind="unseen", source=f"{path.parent.name}/{path.name}", text=text[at + 1:at + 1 + chars]))
        if len(out) == n:
            break
    return out


def hf_methods(draft):
    def plain(target, ids, n):
        return target.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=1)

    def lookup(k):
        def run(target, ids, n):
            return target.generate(ids, prompt_lookup_num_tokens=k, max_new_tokens=n, do_sample=False, pad_token_id=1)
        return run

    def assisted(target, ids, n):
        draft.generation_config.num_assistant_tokens = 5
        draft.generation_config.num_assistant_tokens_schedule = "heuristic"
        draft.generation_config.assistant_confidence_threshold = 0.0
        return target.generate(ids, assistant_model=draft, max_new_tokens=n, do_sample=False, pad_token_id=1)

    return {"HF generate (plain)": plain, "HF assisted, heuristic": assisted,
            "HF prompt lookup k=6": lookup(6), "HF prompt lookup k=4": lookup(4)}


def run_one(name, hf, policies, target, tok, draft, ids, n):
    """Generated token ids of one method on one prompt (HF under inference_mode, as users run it)."""
    if name in hf:
        with torch.inference_mode():
            return hf[name](target, torch.tensor([ids]), n)[0, len(ids):].tolist(), []
    res = generate(target, tok, [ids], drafter={"draft_model": DraftModelDrafter(draft)}, policy=policies[name],
                   max_new_tokens=n)[0]
    return res.token_ids, res.steps


def timed_runs(target, tok, draft, prompts, n) -> dict:
    hf = hf_methods(draft)
    policies = {m: make_policy(spec) for m, spec in MOETUNE.items()}  # one instance serves every prompt
    names = list(hf) + list(MOETUNE)
    stats = {m: dict(lossless=True, steps=0, accepted=0, per_prompt=[]) for m in names}
    warm = tok(prompts[0]["text"], add_special_tokens=False)["input_ids"]
    for m in names:  # first-call costs (allocator, kernel choice) are not timed
        run_one(m, hf, {k: make_policy(v) for k, v in MOETUNE.items()}, target, tok, draft, warm, 8)
    for i, p in enumerate(prompts):
        ids = tok(p["text"], add_special_tokens=False)["input_ids"]
        outs = {}
        for m in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            outs[m], steps = run_one(m, hf, policies, target, tok, draft, ids, n)
            s = stats[m]
            s["per_prompt"].append((len(outs[m]), time.perf_counter() - t0))  # (tokens, seconds)
            s["steps"] += len(steps)
            s["accepted"] += sum(x.accepted for x in steps)
        for m, out in outs.items():
            stats[m]["lossless"] &= out == outs["HF generate (plain)"]
        print(f"prompt {i + 1}/{len(prompts)} ({p['kind']}) done", file=sys.stderr, flush=True)
    return stats


class PhaseClock:
    """Wraps functions and methods to sum their wall time per phase, exclusive of wrapped calls nested in
    them (a forward inside a drafter counts once, as the inner phase); `restore` undoes every wrap."""

    def __init__(self):
        self.total = defaultdict(float)
        self._nested = [0.0]  # per active wrapped call: time spent in wrapped calls below it
        self._undo = []

    def wrap(self, owner, attr: str, phase: str) -> None:
        """Time owner.attr as `phase`. A missing attribute is an error: skipped, its phase's time fell into
        'loop (other)' unseen (the lookahead, after engine/generate renamed it)."""
        inner = getattr(owner, attr)

        def timed(*a, **k):
            self._nested.append(0.0)
            t0 = time.perf_counter()
            try:
                return inner(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                self.total[phase] += dt - self._nested.pop()
                self._nested[-1] += dt
        self._undo.append((owner, attr, inner if attr in vars(owner) else None))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, inner in reversed(self._undo):
            if inner is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, inner)
        self._undo.clear()


def breakdown_moetune(target, tok, draft, prompts, n, spec: str, routing: bool | None) -> dict:
    """us/step per phase of moetune's loop for one policy spec (instrumented; not a speed figure)."""
    clock = PhaseClock()
    policy = make_policy(spec)
    g, v = engine_generate, engine_verify
    for owner, attr, phase in [(g, "passive_lookahead", "lookahead"), (policy, "decide", "decide"),
                               (NgramDrafter, "draft", "draft"), (DraftModelDrafter, "draft", "draft"),
                               (g, "verify", "verify (other)"), (v, "forward_args", "mask, positions, inputs"),
                               (target, "forward", "verify forward"), (g, "accept_tree", "accept"),
                               (kv, "commit", "KV commit"), (g, "_stats", "stats"), (policy, "observe", "observe"),
                               (g, "gpu_snapshot", "telemetry")]:
        clock.wrap(owner, attr, phase)
    steps = 0
    t0 = time.perf_counter()
    try:
        for p in prompts:
            ids = tok(p["text"], add_special_tokens=False)["input_ids"]
            res = generate(target, tok, [ids], drafter={"draft_model": DraftModelDrafter(draft)}, policy=policy,
                           max_new_tokens=n, **({} if routing is None else dict(routing=routing)))[0]
            clock.total["prefill (excluded)"] += res.prefill_time
            steps += len(res.steps)
    finally:
        clock.restore()
    return per_step(clock.total, time.perf_counter() - t0, steps)


def breakdown_hf(target, tok, prompts, n) -> dict:
    """us/step of HF's plain loop: its model forward and everything else generate does per token (the
    prefill, each generate's first forward, excluded as in moetune's figures)."""
    calls: list[float] = []
    inner = target.forward

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            calls.append(time.perf_counter() - t0)
    target.forward = timed
    total = defaultdict(float)
    steps = 0
    wall = 0.0
    try:
        for p in prompts:
            ids = tok(p["text"], add_special_tokens=False)["input_ids"]
            calls.clear()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = target.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=1)
            wall += time.perf_counter() - t0 - calls[0]
            total["verify forward"] += sum(calls[1:])
            steps += out.shape[1] - len(ids) - 1  # the prefill forward also yields the first token
    finally:
        del target.forward
    return per_step(total, wall, steps)


def breakdowns(target, tok, draft, prompts, n) -> dict:
    """The breakdown of HF's plain loop and of moetune's plain (with and without routing capture, where this
    version can skip it), n-gram chain and auto loops."""
    out = {"HF generate (plain)": breakdown_hf(target, tok, prompts, n),
           "moetune plain": breakdown_moetune(target, tok, draft, prompts, n, "plain", None)}
    if "routing" in inspect.signature(generate).parameters:
        out["moetune plain, routing captured"] = breakdown_moetune(target, tok, draft, prompts, n, "plain", True)
    for name in ("moetune n-gram chain k=6", "moetune auto"):
        out[name] = breakdown_moetune(target, tok, draft, prompts, n, MOETUNE[name], None)
    return out


PHASES = ("lookahead", "decide", "draft", "mask, positions, inputs", "verify forward", "verify (other)", "accept",
          "KV commit", "stats", "observe", "telemetry", "loop (other)", "total", "steps")


def per_step(total: dict, wall: float, steps: int) -> dict:
    """Exclusive phase times in us/step; 'loop (other)' is the wall time no wrapped phase accounts for."""
    us = {k: 1e6 * t / max(steps, 1) for k, t in total.items()}
    prefill = us.pop("prefill (excluded)", 0.0)
    out = {k: round(x, 1) for k, x in us.items()}
    out["loop (other)"] = round(1e6 * wall / max(steps, 1) - prefill - sum(us.values()), 1)
    out["total"] = round(1e6 * wall / max(steps, 1) - prefill, 1)
    out["steps"] = steps
    return out

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--held-out", type=int, default=24, help="embedded held-out prompts")
    ap.add_argument("--unseen", type=int, default=16, help="prompts from installed packages' sources")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--breakdown-prompts", type=int, default=8)
    ap.add_argument("--breakdown-only", action="store_true", help="skip the timed comparison")
    ap.add_argument("--before", help="an earlier run's JSON whose breakdown is shown beside this one")
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, tok = load_target(DEFAULT_TARGET, device="cpu")
    draft, _ = load_draft(DEFAULT_DRAFT, tok, device="cpu")
    held = json.loads((Path(DEFAULT_TARGET).parent / "prompts.json").read_text())[:args.held_out]
    prompts = held + unseen_prompts(args.unseen)
    result = dict(device=platform.processor() or "cpu", torch_threads=args.threads, prompts=len(prompts),
                  held_out=len(held), unseen=len(prompts) - len(held), max_new_tokens=args.max_new_tokens,
                  command="python bench/bench_vs_hf.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  load_average_1min=round(os.getloadavg()[0], 2))
    if not args.breakdown_only:
        stats = timed_runs(target, tok, draft, prompts, args.max_new_tokens)
        result["rows"] = rows(stats)
    few = prompts[::max(1, len(prompts) // args.breakdown_prompts)][:args.breakdown_prompts]
    result["breakdown"] = breakdowns(target, tok, draft, few, args.max_new_tokens)
    if args.before:
        result["breakdown_before"] = json.loads(Path(args.before).read_text())["breakdown"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"vs_hf{'_' + args.tag if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table(result))
    print(table(result))
    return result


def interval(method: dict, reference: dict, draws: int = 2000) -> list[float]:
    """90% bootstrap interval of method's tokens/s over the reference's, prompts resampled (each draw sums
    the same prompts for both): how far the ratio moves with which prompts ran, and with the machine's
    drift between them."""
    a, b = (np.array(s["per_prompt"], dtype=float) for s in (method, reference))  # [P, 2] tokens, seconds
    picks = np.random.default_rng(0).integers(0, len(a), size=(draws, len(a)))  # [draws, P]
    ratio = (a[picks, 0].sum(1) / a[picks, 1].sum(1)) / (b[picks, 0].sum(1) / b[picks, 1].sum(1))
    return [round(float(x), 3) for x in np.percentile(ratio, [5, 95])]


def rows(stats: dict) -> list[dict]:
    total = {m: np.sum(s["per_prompt"], axis=0) for m, s in stats.items()}  # [tokens, seconds]
    tps = {m: tokens / seconds for m, (tokens, seconds) in total.items()}
    hf_plain, mt_plain = tps["HF generate (plain)"], tps["moetune plain"]
    best_hf = max(v for m, v in tps.items() if m.startswith("HF"))
    return [dict(method=m, tokens_per_s=round(tps[m], 1), vs_hf_plain=round(tps[m] / hf_plain, 3),
                 vs_hf_plain_90=interval(s, stats["HF generate (plain)"]),
                 vs_best_hf=round(tps[m] / best_hf, 3), vs_moetune_plain=round(tps[m] / mt_plain, 3),
                 mean_accepted=round(s["accepted"] / s["steps"], 2) if s["steps"] else None,
                 lossless=s["lossless"], tokens=int(total[m][0]), per_prompt=s["per_prompt"]) for m, s in stats.items()]


def table(result: dict) -> str:
    lines = [f"Device: {result['device']} CPU, {result['torch_threads']} torch thread(s); {result['prompts']} prompts "
             f"({result['held_out']} held-out, {result['unseen']} from other unseen text) x "
             f"{result['max_new_tokens']} new tokens, greedy; load average {result['load_average_1min']}.", "",
             f"Reproduce: `{result['command'].strip()}`", ""]
    if "rows" in result:
        lines += ["| method | tokens/s | vs HF plain | (90% interval) | vs best HF | vs moetune plain | mean accepted "
                  "| lossless |", "|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            acc = "-" if r["mean_accepted"] is None else f"{r['mean_accepted']:.2f}"
            low, high = r["vs_hf_plain_90"]
            lines.append(f"| {r['method']} | {r['tokens_per_s']:.1f} | {r['vs_hf_plain']:.3f}x | {low:.3f}-{high:.3f} | "
                         f"{r['vs_best_hf']:.3f}x | {r['vs_moetune_plain']:.3f}x | {acc} | "
                         f"{'yes' if r['lossless'] else 'NO'} |")
        lines += ["", "90% interval: of the ratio to HF plain, over 2,000 resamplings of the prompts (both methods' "
                  "times summed over the same prompts).", ""]
    for label, key in (("Per-phase cost, us/step (instrumented run)", "breakdown"),
                       ("Before this change, us/step", "breakdown_before")):
        if key not in result:
            continue
        runs = result[key]
        phases = [ph for ph in PHASES if any(ph in b for b in runs.values())]
        lines += [f"{label}:", "", "| phase | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
        lines += [f"| {ph} | " + " | ".join(str(b.get(ph, "-")) for b in runs.values()) + " |" for ph in phases]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
