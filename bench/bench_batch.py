"""Batched decoding (engine/batch.py): tokens/s against batch size, plain, static speculative and `auto`,
beside HF's own batched `generate`, with per-request ms/token and time to first token.

    python bench/bench_batch.py [--held-out 24] [--unseen 8] [--max-new-tokens 64] [--batch-sizes 1,2,4,8,16,32]
                                [--target DIR (default: the embedded target; e.g. a `moetune widen` stand-in)]

Prompts: the embedded held-out prompts and prompts cut from installed packages' sources, as
bench/bench_vs_hf.py picks them, a group's all arriving at once; `batch_size` of them decode together and a
finished one is replaced by the next of its group (continuous batching). Methods: plain decoding, a
draft-model chain of depth 3, a draft-model tree and an n-gram chain of depth 4 (static configs), `auto`
(one adaptive policy per round, per-request decisions priced in the batch), and HF `generate` on
left-padded batches of the same size (static batching: a batch ends when its longest request does), each
at every batch size, plus moetune's
single-request engine (engine.generate, plain) as the reference outside batching. At each batch size b the
prompts are split into groups of max(4 b, 8), each decoded as its own batch run, and every method runs on
every group, their order rotated from group to group, --rounds times (run_rounds): methods interleaved
per group, as bench_vs_hf interleaves them per prompt; each method's tokens and seconds summed over all.
Compared at each batch size: `auto` against plain, the best static config there (the per-batch-size table
vLLM, SGLang and TensorRT-LLM can express, chosen in hindsight) and the best single static config overall. tokens/s: total generated tokens over
the wall time of the batch runs; decode tokens/s: the same without the prefill forwards (prefill
costs per prompt token whatever the batch, on a CPU). Every output is checked against the single-request
plain output (lossless). The issue's aim: plain at batch 8 >= 4x plain at batch 1, judged on groups of 8
prompts run at both batch sizes side by side (aim_pairs), `--rounds` times. Writes
bench/results/batch.{json,md,png} (or --tag'ed names).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench_vs_hf import unseen_prompts
from moetune import DEFAULT_DRAFT, DEFAULT_TARGET
from moetune.engine.batch import generate_batch, throughput
from moetune.engine.drafters import DraftModelDrafter
from moetune.engine.generate import generate
from moetune.engine.loader import load_draft, load_target
from moetune.policies.registry import make_policy
from moetune.step import PLAIN, StepConfig

STATICS = {"plain": PLAIN, "draft model chain k=3": StepConfig(depth=3),
           "draft model tree d3 k2 n6": StepConfig(depth=3, topk=2, num_draft_tokens=6),
           "n-gram chain k=4": StepConfig(drafter="ngram", depth=4)}
HF = "HF generate (padded batch)"
METHODS = [*STATICS, "auto", HF]
AIM = 4.0  # plain tokens/s at batch 8 over batch 1


def run_single(target, prompts: list[list[int]], n: int) -> tuple[dict, list[list[int]]]:
    """The single-request engine, plain, prompt after prompt: the reference outputs and its tokens/s."""
    t0 = time.perf_counter()
    res = [generate(target, None, [p], max_new_tokens=n)[0] for p in prompts]
    seconds = time.perf_counter() - t0
    tokens = sum(len(r.token_ids) for r in res)
    return dict(method="single-request engine (plain)", batch_size=1, tokens=tokens, seconds=round(seconds, 3),
                tokens_per_s=round(tokens / seconds, 1),
                decode_tokens_per_s=round(tokens / sum(r.decode_time for r in res), 1)), [r.token_ids for r in res]


GROUP = 8  # prompts per interleaving group, at least; four batches' worth at larger batch sizes (run_rounds)


def run_batch(target, draft, prompts: list[list[int]], method: str, batch_size: int, n: int,
              reference: list[list[int]], policy=None) -> dict:
    """One batched run of `prompts` (all arriving at once): its raw counts, merged over groups by merge_rows.
    policy: the `auto` policy this round shares across its groups (it keeps learning from one to the next)."""
    t0 = time.perf_counter()
    drafter = None if method == "plain" else DraftModelDrafter(draft)  # plain prefills no draft model
    res = generate_batch(target, None, prompts, drafter=drafter, config=STATICS.get(method),
                         policy=policy, batch_size=batch_size, max_new_tokens=n)
    seconds = time.perf_counter() - t0
    steps = [s for r in res for s in r.steps]
    return dict(tokens=sum(len(r.token_ids) for r in res), seconds=seconds,
                prefill_seconds=sum(r.prefill_time for r in res),  # prefill forwards (shared) and drafter prefills
                steps=len(steps), accepted=sum(s.accepted for s in steps),
                lossless=[r.token_ids for r in res] == reference,
                per_request=[dict(ms_per_token=round(1e3 * r.time_per_output_token, 2),
                                  ttft_ms=round(1e3 * r.time_to_first_token, 1), tokens=len(r.token_ids)) for r in res])


def run_hf(target, prompts: list[list[int]], batch_size: int, n: int, reference: list[list[int]]) -> dict:
    """HF `generate`, greedy, on consecutive left-padded batches of `batch_size` prompts (static batching)."""
    pad = target.generation_config.pad_token_id
    pad = 1 if pad is None else pad
    eos = target.generation_config.eos_token_id
    outputs, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        group = prompts[i:i + batch_size]
        width = max(len(p) for p in group)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        out = target.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad)
        for row in out[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t == eos), None)
            outputs.append(row if cut is None else row[:cut + 1])
    return dict(tokens=sum(len(o) for o in outputs), seconds=time.perf_counter() - t0, requests=len(prompts),
                agreeing_requests=sum(o == r for o, r in zip(outputs, reference)))


def run_rounds(target, draft, prompts, methods: list[str], b: int, n: int, reference, rounds: int) -> list[dict]:
    """Every method on every group of max(4 b, GROUP) prompts, the methods' order rotated from group to group
    and round to round, so a drift in a shared machine's speed (single runs moved by +-20%, over tens of
    seconds) reaches every method alike, as bench_vs_hf's per-prompt interleaving does; `rounds` times. A
    group decodes as its own batch run (continuous batching inside it). Why four batches' worth: a group
    ends in a tail where speculating requests finish at different steps and the batch thins (plain ones
    finish together); four batches' worth keeps that tail a small share (in groups of 8 at batch 8 `auto`
    ran 0.85-0.92x what it ran over all 32 prompts in one call). One `auto` policy per round, shared by its
    groups. Per method its runs merged (merge_rows), with each round's tokens/s."""
    size = max(4 * b, GROUP)
    groups = [range(g, min(g + size, len(prompts))) for g in range(0, len(prompts), size)]
    runs: dict[str, list[list[dict]]] = {m: [[] for _ in range(rounds)] for m in methods}
    for i in range(rounds):
        policy = make_policy("auto") if "auto" in methods else None
        for j, group in enumerate(groups):
            shift = (i * len(groups) + j) % len(methods)
            for m in methods[shift:] + methods[:shift]:
                ps, ref = [prompts[k] for k in group], [reference[k] for k in group]
                runs[m][i].append(run_hf(target, ps, b, n, ref) if m == HF else
                                  run_batch(target, draft, ps, m, b, n, ref, policy if m == "auto" else None))
        print(f"batch {b} round {i + 1}: " + ", ".join(
            f"{m} {_rate(runs[m][i]):.1f}" for m in methods), file=sys.stderr, flush=True)
    return [merge_rows(m, b, runs[m]) for m in methods]


def _rate(parts: list[dict]) -> float:
    return sum(p["tokens"] for p in parts) / sum(p["seconds"] for p in parts)


def merge_rows(method: str, b: int, rounds: list[list[dict]]) -> dict:
    """One method's row at batch size b: tokens over seconds summed over every group of every round."""
    parts = [p for r in rounds for p in r]
    tokens, seconds = sum(p["tokens"] for p in parts), sum(p["seconds"] for p in parts)
    row = dict(method=method, batch_size=b, tokens=tokens, seconds=round(seconds, 3),
               tokens_per_s=round(tokens / seconds, 1), rounds_tokens_per_s=[round(_rate(r), 1) for r in rounds])
    if method == HF:
        return dict(row, lossless=all(p["agreeing_requests"] == p["requests"] for p in parts),
                    agreeing_requests=min(sum(p["agreeing_requests"] for p in r) for r in rounds))  # the worst round
    prefill, steps = sum(p["prefill_seconds"] for p in parts), sum(p["steps"] for p in parts)
    per = [q for p in parts for q in p["per_request"]]
    ms, ttft = [q["ms_per_token"] for q in per], [q["ttft_ms"] for q in per]
    return dict(row, prefill_seconds=round(prefill, 3), decode_tokens_per_s=round(tokens / (seconds - prefill), 1),
                mean_accepted=round(sum(p["accepted"] for p in parts) / steps, 2),
                ms_per_token_mean=round(statistics.mean(ms), 2), ms_per_token_p90=round(_p90(ms), 2),
                ttft_ms_mean=round(statistics.mean(ttft), 1), ttft_ms_p90=round(_p90(ttft), 1),
                lossless=all(p["lossless"] for p in parts),
                per_request=[q for p in rounds[-1] for q in p["per_request"]])


def _p90(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.9 * len(xs)))]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--held-out", type=int, default=24, help="embedded held-out prompts")
    ap.add_argument("--unseen", type=int, default=8, help="prompts from installed packages' sources")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    ap.add_argument("--target", default=str(DEFAULT_TARGET), help="target model folder (default: embedded)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of every method on every group of prompts, per batch size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="", help="suffix of the output files")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown --methods {unknown}; choose from {METHODS}")
    torch.set_num_threads(args.threads)
    target, tok = load_target(args.target, device="cpu", dtype="float32")
    draft, _ = load_draft(DEFAULT_DRAFT, tok, device="cpu", dtype="float32")
    held = json.loads((Path(DEFAULT_TARGET).parent / "prompts.json").read_text())[:args.held_out]
    texts = held + (unseen_prompts(args.unseen) if args.unseen else [])
    prompts = [tok(p["text"], add_special_tokens=False)["input_ids"] for p in texts]
    n = args.max_new_tokens
    for m in STATICS:  # first-call costs (allocator, kernel choice) are not timed
        generate_batch(target, None, prompts[:2], drafter=DraftModelDrafter(draft), config=STATICS[m],
                       batch_size=2, max_new_tokens=4)
    single, reference = run_single(target, prompts, n)
    rows = [single]
    for b in sizes:
        rows += run_rounds(target, draft, prompts, methods, b, n, reference, args.rounds)
    paired = aim_pairs(target, prompts, n, args.rounds) if {1, 8} <= set(sizes) and "plain" in methods else None
    result = dict(device=platform.processor() or "cpu", torch_threads=args.threads, prompts=len(prompts),
                  target=args.target, held_out=len(held), unseen=len(prompts) - len(held), max_new_tokens=n,
                  rounds=args.rounds,
                  command="python bench/bench_batch.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  load_average_1min=round(os.getloadavg()[0], 2), rows=rows, aim=_aim(rows, paired),
                  comparison=compare(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"batch{'_' + args.tag if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table(result))
    plot(rows, out / f"{stem}.png")
    print(table(result))
    return result


def _aim(rows: list[dict], paired: dict | None) -> dict | None:
    """Plain tokens/s at batch 8 over batch 1, end to end and over decode steps only (prefill excluded):
    judged on the interleaved pairs (aim_pairs) when they ran, with the table's rows (each batch size run in
    its turn) beside them; None when either batch size was not run."""
    plain = {r["batch_size"]: r for r in rows if r["method"] == "plain" and "prefill_seconds" in r}
    if 1 not in plain or 8 not in plain:
        return None
    rows_ratio = {k: round(plain[8][k] / plain[1][k], 2) for k in ("tokens_per_s", "decode_tokens_per_s")}
    ratio = rows_ratio if paired is None else paired
    return dict(speedup=ratio["tokens_per_s"], decode_speedup=ratio["decode_tokens_per_s"], target=AIM,
                met=ratio["tokens_per_s"] >= AIM, decode_met=ratio["decode_tokens_per_s"] >= AIM,
                table_rows=rows_ratio, paired=paired)


def aim_pairs(target, prompts: list[list[int]], n: int, rounds: int) -> dict:
    """The aim's two runs side by side: for each group of 8 prompts, plain at batch 1 then at batch 8 (the
    order swapped every group and round), so both see the same stretch of a shared machine's speed, as
    the per-prompt interleaving of bench_vs_hf does. Ratios of the summed tokens over the summed seconds,
    with every group's ratio for the spread."""
    total = {b: [0, 0.0, 0.0] for b in (1, 8)}  # tokens, seconds, prefill seconds
    groups = []
    for i in range(rounds):
        for g in range(0, len(prompts) - 7, 8):
            seconds = {}
            for b in (1, 8) if (i + g // 8) % 2 == 0 else (8, 1):
                t0 = time.perf_counter()
                res = generate_batch(target, None, prompts[g:g + 8], config=PLAIN, batch_size=b, max_new_tokens=n)
                seconds[b] = time.perf_counter() - t0
                tokens = sum(len(r.token_ids) for r in res)
                for j, x in enumerate((tokens, seconds[b], sum(r.prefill_time for r in res))):
                    total[b][j] += x
            groups.append(round(seconds[1] / seconds[8], 2))
    rate = {b: (t / s, t / (s - p)) for b, (t, s, p) in total.items()}
    return dict(tokens_per_s=round(rate[8][0] / rate[1][0], 2), decode_tokens_per_s=round(rate[8][1] / rate[1][1], 2),
                groups=groups)


def compare(rows: list[dict]) -> list[dict]:
    """Per batch size: plain, `auto`, HF and the best static config there (the per-batch-size table chosen in
    hindsight) in tokens/s, the best single static config over all batch sizes (by the geometric mean of
    its speedup over plain), and `auto`'s ratios to each."""
    at = {(r["method"], r["batch_size"]): r["tokens_per_s"] for r in rows if r["method"] in METHODS}
    sizes = sorted({b for m, b in at if m == "plain"})
    statics = [m for m in STATICS if all((m, b) in at for b in sizes)]
    if "plain" not in statics:
        return []
    overall = max(statics, key=lambda m: sum(math.log(at[m, b] / at["plain", b]) for b in sizes))
    out = []
    for b in sizes:
        best = max(statics, key=lambda m: at[m, b])
        row = dict(batch_size=b, plain=at["plain", b], best_static=best, best_static_tok_s=at[best, b],
                   best_overall=overall, best_overall_tok_s=at[overall, b], auto=at.get(("auto", b)),
                   hf=at.get((HF, b)))
        if row["auto"] is not None:
            row.update(auto_vs_plain=round(row["auto"] / row["plain"], 3),
                       auto_vs_table=round(row["auto"] / row["best_static_tok_s"], 3),
                       auto_vs_single=round(row["auto"] / row["best_overall_tok_s"], 3))
        if row["hf"] is not None:
            row.update(plain_vs_hf=round(row["plain"] / row["hf"], 3))
        out.append(row)
    return out


def table(result: dict) -> str:
    lines = [f"Device: {result['device']} CPU, {result['torch_threads']} torch thread(s); {result['prompts']} prompts "
             f"({result['held_out']} held-out, {result['unseen']} from other unseen text) x "
             f"{result['max_new_tokens']} new tokens, greedy, a group's all arriving at once; load average "
             f"{result['load_average_1min']}; methods interleaved per group of max(4 x batch, {GROUP}) prompts, "
             f"{result.get('rounds', 1)} round(s), tokens and seconds summed.", "",
             f"Reproduce: `{result['command'].strip()}`", ""]
    aim = result["aim"]
    if aim is not None:
        lines += [f"Plain at batch 8 vs batch 1: {aim['speedup']:.2f}x end to end, {aim['decode_speedup']:.2f}x over "
                  f"decode steps (prefill excluded); aim {aim['target']:.0f}x: "
                  f"{'met' if aim['met'] else 'not met'} end to end, {'met' if aim['decode_met'] else 'not met'} "
                  "over decode steps."]
        if aim.get("paired"):
            rows_ratio, groups = aim["table_rows"], aim["paired"]["groups"]
            lines += [f"Judged on {len(groups)} groups of 8 prompts, each run at batch 1 and at batch 8 side by "
                      f"side (per group {min(groups):.2f}x to {max(groups):.2f}x end to end); the table's rows (each "
                      f"batch size in its turn) give {rows_ratio['tokens_per_s']:.2f}x / "
                      f"{rows_ratio['decode_tokens_per_s']:.2f}x."]
        lines += [""]
    lines += _comparison(result.get("comparison") or [])
    lines += ["| method | batch | tokens/s | decode tokens/s | ms/token mean (p90) | TTFT ms mean (p90) "
              "| mean accepted | lossless |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if r["method"] == HF:
            lines.append(f"| {r['method']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | - | - | - | - | "
                         f"{'yes' if r['lossless'] else 'NO'} ({r['agreeing_requests']}/{result['prompts']}) |")
        elif "prefill_seconds" not in r:
            lines.append(f"| {r['method']} | 1 | {r['tokens_per_s']:.1f} | {r['decode_tokens_per_s']:.1f} | - | - | - "
                         "| reference |")
        else:
            lines.append(f"| {r['method']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | "
                         f"{r['decode_tokens_per_s']:.1f} | {r['ms_per_token_mean']:.2f} "
                         f"({r['ms_per_token_p90']:.2f}) | {r['ttft_ms_mean']:.1f} ({r['ttft_ms_p90']:.1f}) | "
                         f"{r['mean_accepted']:.2f} | {'yes' if r['lossless'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def _comparison(rows: list[dict]) -> list[str]:
    """The per-batch-size comparison as markdown lines (none without a comparison)."""
    if not rows:
        return []
    lines = ["| batch | plain tok/s | HF generate tok/s | plain / HF | best static there (tok/s) | "
             f"best single static: {rows[0]['best_overall']} | auto tok/s | auto / plain | auto / best there | "
             "auto / best single |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        hf = "- | -" if c["hf"] is None else f"{c['hf']:.1f} | {c['plain_vs_hf']:.2f}x"
        auto = "- | - | - | -" if c["auto"] is None else (
            f"{c['auto']:.1f} | {c['auto_vs_plain']:.2f}x | {c['auto_vs_table']:.2f}x | {c['auto_vs_single']:.2f}x")
        lines.append(f"| {c['batch_size']} | {c['plain']:.1f} | {hf} | "
                     f"{c['best_static']} ({c['best_static_tok_s']:.1f}) | {c['best_overall_tok_s']:.1f} | {auto} |")
    met = all(c["auto"] is not None and c["auto_vs_table"] >= 1 for c in rows)
    return lines + ["", f"Aim (auto >= the best per-batch-size table at every batch size): {'met' if met else 'NOT met'}.",
                    ""]


def plot(rows: list[dict], path: Path) -> None:
    """tokens/s against batch size, one line per method, end to end and over decode steps (the
    single-request engine as a dashed level)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    single = next(r for r in rows if "prefill_seconds" not in r)
    sizes = sorted({r["batch_size"] for r in rows if "prefill_seconds" in r})
    for ax, key, title in zip(axes, ("tokens_per_s", "decode_tokens_per_s"), ("end to end", "decode steps only")):
        for m in dict.fromkeys(r["method"] for r in rows if "prefill_seconds" in r or r["method"] == HF):
            pts = [(r["batch_size"], r[key]) for r in rows if r["method"] == m and key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=m, linestyle=":" if m == HF else "-")
        ax.axhline(single[key], linestyle="--", color="grey", label=single["method"])
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.set_xlabel("batch size (requests per target forward)")
        ax.set_title(f"tokens/s, {title}")
    axes[0].set_ylabel("tokens/s (all requests)")
    axes[0].legend(fontsize=8)
    fig.suptitle("Batched greedy decoding (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
