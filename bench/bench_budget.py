"""Expert-budget benchmarks on the embedded target: what a budget saves, and what it costs in fidelity.

(a) latency: one verification-shaped forward (T new tokens after a C-token KV cache) against a uniform
    per-layer budget B, beside the unbudgeted HF path ("off").
(b) frontier: whole greedy generations with the draft model and a fixed draft tree, for B in a grid and
    every selection x substitution policy: goodput against fidelity (position-wise token agreement with
    the unbudgeted output, exact-match rate; and, teacher-forced along the unbudgeted output in windows
    of tree size, argmax agreement of budgeted vs unbudgeted verification, which does not compound
    after a first divergence) and mean accepted length. "kept" is the share of the
    unbudgeted tree's unique experts that the budget computed, so kept ~ 0.75 is MoE-Spec's
    "25% fewer experts".

Writes <out>/budget.json, budget.md, budget_latency.png, budget_frontier.png; prints the markdown.
Without moetune/models/target it falls back to a tiny random Qwen3-MoE (numbers then only smoke-test).

Reproduce (small, CPU):  .venv/bin/python bench/bench_budget.py --device cpu --prompts 2 --max-new 24
Full (GPU):              .venv/bin/python bench/bench_budget.py --device cuda --prompts 8 --max-new 64
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET
from moetune.engine import kv, moe_budget
from moetune.step import SELECTIONS, SUBSTITUTIONS, StepConfig

ROOT = Path(__file__).resolve().parent.parent


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=str(DEFAULT_TARGET))
    p.add_argument("--draft", default=str(DEFAULT_DRAFT))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--part", default="all", choices=("all", "latency", "frontier"))
    p.add_argument("--tokens", type=ints, default=[1, 4, 8, 16, 32, 64], help="tokens verified T (latency)")
    p.add_argument("--budgets", type=ints, default=None, help="budget grid (default: K and E/8 steps up to E)")
    p.add_argument("--context", type=int, default=64, help="cached tokens C before the verified ones")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts for the frontier")
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--draft-tokens", type=int, default=16, help="tree nodes verified per step (frontier)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    return p.parse_args(argv)


def load(args):
    """(target, draft, tokenizer, prompts, name); a tiny random pair when the embedded models are missing."""
    if Path(args.target, "config.json").exists():
        from moetune.engine.loader import load_draft, load_target
        target, tok = load_target(args.target, args.device, args.dtype)
        draft, _ = load_draft(args.draft, tok, args.device, args.dtype)
        prompts = [p["text"] for p in json.loads((Path(args.target).parent / "prompts.json").read_text())]
        prompts = [prompts[i * len(prompts) // args.prompts] for i in range(args.prompts)]  # spread over kinds
        return target, draft, tok, prompts, Path(args.target).name
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_dense, tiny_moe
    print(f"{args.target} not found: falling back to tiny random models (smoke test only)")
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 128, (24,), generator=gen).tolist() for _ in range(args.prompts)]
    return tiny_moe("qwen3_moe", num_experts=32, top_k=4), tiny_dense(), None, prompts, "tiny-qwen3-moe"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def budget_grid(args, E: int, K: int) -> list[int]:
    return args.budgets or sorted({K, *range(E // 8, E + 1, E // 8)} - {0})


@torch.no_grad()
def latency(model, args, budgets) -> list[dict]:
    """Median ms of a T-token forward after a C-token cache, for each budget (None = off)."""
    device = model.device
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    cache = kv.new_cache(model)
    model(input_ids=torch.randint(2, vocab, (1, args.context), generator=gen).to(device), cache=cache)
    rows = []
    for T in args.tokens:
        ids = torch.randint(2, vocab, (1, T), generator=gen).to(device)
        for B in [None] + budgets:
            report = None

            def run():
                nonlocal report
                if B is None:
                    model(input_ids=ids, cache=cache, use_cache=True)
                else:
                    with moe_budget.apply_budget(model, moe_budget.BudgetPlan(B)) as report:
                        model(input_ids=ids, cache=cache, use_cache=True)
                kv.crop(cache, args.context)

            times = []
            for i in range(args.reps + 2):
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            row = {"tokens": T, "budget": B, "ms": 1e3 * statistics.median(times)}
            if report is not None:
                row["unique_experts"] = statistics.mean(report.unique_experts)
                row["unique_kept"] = statistics.mean(report.unique_experts_kept)
                row["router_mass_kept"] = statistics.mean(report.router_mass_kept)
            rows.append(row)
    for row in rows:
        off = next(r["ms"] for r in rows if r["tokens"] == row["tokens"] and r["budget"] is None)
        row["speedup_vs_off"] = off / row["ms"]
    return rows


def agreement(out: list[int], ref: list[int]) -> float:
    """Position-wise agreement over the reference's length (a shorter output counts as mismatches)."""
    return sum(a == b for a, b in zip(out, ref)) / max(len(ref), 1)


@torch.no_grad()
def window_agreement(target, sequences, plan, width: int) -> float:
    """Argmax agreement of budgeted vs unbudgeted verification, teacher-forced along the reference output.

    Each sequence is (context ids, reference output ids); the output is verified in chain windows of
    `width` tokens after the cached context, so every budget is judged on the same inputs (no drift).
    """
    scores = []
    for context, output in sequences:
        cache = kv.new_cache(target)
        target(input_ids=torch.tensor([context], device=target.device), cache=cache)
        past = len(context)
        for start in range(0, len(output) - width + 1, width):
            window = torch.tensor([output[start:start + width]], device=target.device)

            def run():
                logits = target(input_ids=window, cache=cache, use_cache=True).logits[0]
                kv.crop(cache, past)
                return logits

            scores.append(moe_budget.evaluate_agreement(target, plan, run)[2])
            target(input_ids=window, cache=cache, use_cache=True)
            past += width
    return statistics.mean(scores) if scores else float("nan")


def frontier(target, draft, tok, prompts, args, budgets) -> list[dict]:
    """Goodput and fidelity of whole greedy generations for every budget x selection x substitution."""
    from moetune.engine.generate import generate
    base = StepConfig(depth=args.depth, topk=args.topk, num_draft_tokens=args.draft_tokens)
    generate(target, tok, prompts[:1], drafter=draft, config=base, max_new_tokens=4)  # warm up

    def run(cfg):
        results = generate(target, tok, prompts, drafter=draft, config=cfg, max_new_tokens=args.max_new)
        steps = [s for r in results for s in r.steps]
        return results, {
            "goodput": sum(len(r.token_ids) for r in results) / sum(r.decode_time for r in results),
            "accepted": statistics.mean(s.accepted for s in steps),
            "unique_experts": statistics.mean(statistics.mean(s.unique_experts) for s in steps),
            "unique_kept": statistics.mean(statistics.mean(s.unique_experts_kept) for s in steps),
            "router_mass_kept": statistics.mean(statistics.mean(s.router_mass_kept) for s in steps),
        }

    ref, row = run(base)
    sequences = [(r.prompt_ids, r.token_ids) for r in ref]
    width = args.draft_tokens + 1
    rows = [dict(budget=None, selection="-", substitution="-", agreement=1.0, exact=1.0, verify_agreement=1.0,
                 kept=1.0, **row)]
    for sel in SELECTIONS:
        for sub in SUBSTITUTIONS:
            for B in budgets:
                res, row = run(replace(base, budgets=(B,), selection=sel, substitution=sub))
                rows.append(dict(budget=B, selection=sel, substitution=sub,
                                 agreement=statistics.mean(agreement(r.token_ids, q.token_ids)
                                                           for r, q in zip(res, ref)),
                                 exact=statistics.mean(float(r.token_ids == q.token_ids) for r, q in zip(res, ref)),
                                 verify_agreement=window_agreement(target, sequences, moe_budget.BudgetPlan(
                                     B, selection=sel, substitution=sub), width),
                                 kept=row["unique_kept"] / row["unique_experts"], **row))
    for r in rows:
        r["goodput_vs_off"] = r["goodput"] / rows[0]["goodput"]
    return rows


def markdown(meta, lat, front) -> str:
    lines = [f"# Expert budget benchmark ({meta['model']}, {meta['device']}, {meta['dtype']})", "",
             f"Reproduce: `{meta['command']}`", ""]
    if meta["device"].startswith("cpu"):
        lines += ["On CPU a tiny model's forward is bound by per-op overhead (and, on a shared machine, by "
                  "contention): read the fidelity columns, and take timings from a GPU run.", ""]
    if lat:
        lines += [f"## (a) Forward latency after a {meta['context']}-token cache, uniform budget B", "",
                  "| T | B | ms | speedup vs off | unique experts/layer | kept | router mass kept |",
                  "|---|---|---|---|---|---|---|"]
        for r in lat:
            b = "off" if r["budget"] is None else r["budget"]
            lines.append(f"| {r['tokens']} | {b} | {r['ms']:.2f} | {r['speedup_vs_off']:.2f} | "
                         f"{r.get('unique_experts', float('nan')):.1f} | {r.get('unique_kept', float('nan')):.1f} | "
                         f"{r.get('router_mass_kept', 1.0):.3f} |")
        lines.append("")
    if front:
        lines += [f"## (b) Quality-speed frontier ({meta['frontier']})", "",
                  "| B | selection | substitution | kept share | token agreement | exact | verify argmax agreement "
                  "| accepted | goodput tok/s | vs off |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in front:
            b = "off" if r["budget"] is None else r["budget"]
            lines.append(f"| {b} | {r['selection']} | {r['substitution']} | {r['kept']:.2f} | {r['agreement']:.3f} | "
                         f"{r['exact']:.2f} | {r['verify_agreement']:.3f} | {r['accepted']:.2f} | {r['goodput']:.1f} | "
                         f"{r['goodput_vs_off']:.2f} |")
        lines += ["", summary(front), ""]
    return "\n".join(lines)


def summary(front) -> str:
    """Answer MoE-Spec's claim: does ~25% fewer experts (kept share <= 0.8) keep fidelity near 100%?"""
    cut = [r for r in front if r["budget"] is not None and round(r["kept"], 2) <= 0.8]
    if not cut:
        return "No budget in the grid removed 20% or more of the experts the tree touched."
    best = max(cut, key=lambda r: (r["verify_agreement"], r["agreement"]))
    return (f"Best with >= 20% fewer experts: B={best['budget']} {best['selection']}/{best['substitution']} keeps "
            f"{best['kept']:.0%} of the unique experts: verification argmax agreement {best['verify_agreement']:.1%}, "
            f"whole-generation token agreement {best['agreement']:.1%} (exact {best['exact']:.0%}), goodput "
            f"x{best['goodput_vs_off']:.2f} vs unbudgeted.")


def plots(out: Path, lat, front) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if lat:
        fig, ax = plt.subplots(figsize=(6, 4))
        for T in sorted({r["tokens"] for r in lat}):
            pts = [(r["budget"], r["ms"]) for r in lat if r["tokens"] == T and r["budget"] is not None]
            line, = ax.plot(*zip(*pts), marker="o", label=f"T={T}")
            off = next(r["ms"] for r in lat if r["tokens"] == T and r["budget"] is None)
            ax.axhline(off, color=line.get_color(), ls=":", lw=1)
        ax.set(xlabel="budget B (experts per layer)", ylabel="forward ms", title="latency vs budget (dotted: off)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "budget_latency.png", dpi=120)
        plt.close(fig)
    if front:
        fig, ax = plt.subplots(figsize=(6, 4))
        for sel in SELECTIONS:
            for sub in SUBSTITUTIONS:
                pts = [r for r in front if r["selection"] == sel and r["substitution"] == sub]
                ax.plot([r["agreement"] for r in pts], [r["goodput"] for r in pts], marker="o", label=f"{sel}/{sub}")
                for r in pts:
                    ax.annotate(str(r["budget"]), (r["agreement"], r["goodput"]), fontsize=6)
        ax.scatter([1.0], [front[0]["goodput"]], marker="*", s=120, color="k", label="off")
        ax.set(xlabel="token agreement with unbudgeted greedy", ylabel="goodput (tok/s)", title="quality-speed frontier")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / "budget_frontier.png", dpi=120)
        plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    target, draft, tok, prompts, name = load(args)
    if args.device != "auto":
        target, draft = target.to(args.device), draft.to(args.device)
    shape = moe_budget.moe_shape(target)
    budgets = budget_grid(args, shape.num_experts, shape.top_k)
    device = target.device
    meta = {"model": name, "shape": vars(shape), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "dtype": str(target.dtype).replace("torch.", ""), "context": args.context, "budgets": budgets,
            "command": " ".join(shlex.quote(a) for a in ["python", "bench/bench_budget.py", *(argv or sys.argv[1:])]),
            "frontier": f"{len(prompts)} prompts x {args.max_new} tokens, tree depth {args.depth} topk {args.topk} "
                        f"nodes {args.draft_tokens}, greedy"}
    lat = latency(target, args, budgets) if args.part in ("all", "latency") else []
    front = frontier(target, draft, tok, prompts, args, budgets) if args.part in ("all", "frontier") else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.json").write_text(json.dumps({"meta": meta, "latency": lat, "frontier": front}, indent=1))
    text = markdown(meta, lat, front)
    (out / "budget.md").write_text(text + "\n")
    plots(out, lat, front)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
