"""Lossy expert budgets ("substitute" mode) on the embedded target: what they save, and what they cost users.

(a) latency: one verification-shaped forward (T new tokens after a C-token KV cache) against a uniform
    per-layer budget B, beside the unbudgeted HF path ("off").
(b) frontier: every budget B x selection x substitution, with the root row's experts protected
    (engine/selection.py) and without (HEAD's rule before protection, for comparison), ranked by:
    - exact steps: along greedy trajectories (draft model, fixed tree shape), the share of steps whose
      budgeted verification emits exactly the tokens the unbudgeted one emits, on the same context and
      tree (each step starts from the unbudgeted trajectory's cache, so steps are judged independently).
    - loss increase: on the held-out prompts' own text, teacher forced: the text is verified in windows
      of tree size, each the root + nodes of a chain along the true text (node weights from the draft's
      probability of each true token, as the engine computes them); mean next-token NLL under the
      budget minus unbudgeted, nats/token, over all rows and over the root row alone (the token every
      step emits).
    - secondary: whole greedy generations' position-wise token agreement with the unbudgeted output,
      mean accepted length and goodput. Agreement is dominated by the first divergence (the contexts
      differ after it), so it ranks policies poorly; goodput on a CPU is bound by per-op overhead.
    "kept" is the share of the tree's unique experts the budget computed.

Writes <out>/budget.json, budget.md, budget.png (Pareto: speed vs loss increase; `pareto_plot` takes any
labelled points), budget_latency.png; prints the markdown.

Reproduce (CPU, one thread, ~6 min):  python bench/bench_budget.py --device cpu --budgets 10,12,14,16
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET
from moetune.engine import kv, moe_budget, selection
from moetune.engine.accept import accept_greedy
from moetune.engine.drafters import make_drafter
from moetune.engine.tree import DraftTree, chain, path_weights
from moetune.engine.verify import forward_args
from moetune.step import SELECTIONS, SUBSTITUTIONS, StepConfig

ROOT = Path(__file__).resolve().parent.parent
MASKS = ("all", "root", "reached")  # row sets a loss is averaged over (row_masks)
AIM = 0.01  # the aim: loss increase <= 0.01 nats/token at ~2/3 of the touched experts, root protected


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=str(DEFAULT_TARGET))
    p.add_argument("--draft", default=str(DEFAULT_DRAFT))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--part", default="all", choices=("all", "latency", "frontier"))
    p.add_argument("--tokens", type=ints, default=[1, 17, 64], help="tokens verified T (latency)")
    p.add_argument("--budgets", type=ints, default=[10, 12, 14], help="uniform per-layer budgets B")
    p.add_argument("--protect", default="both", choices=("both", "on", "off"),
                   help="root protection: on (the engine's rule), off (HEAD's rule before it), or both")
    p.add_argument("--context", type=int, default=64, help="cached tokens C before the verified ones (latency)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts whose greedy steps are checked")
    p.add_argument("--gen-prompts", type=int, default=4, help="held-out prompts generated whole (secondary columns)")
    p.add_argument("--loss-prompts", type=int, default=24, help="held-out prompts whose text scores the loss")
    p.add_argument("--first", type=int, default=16, help="tokens of a prompt's text cached before its first window")
    p.add_argument("--max-new", type=int, default=48)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--draft-tokens", type=int, default=16, help="tree nodes verified per step")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if not args.budgets or min(args.budgets) < 1:
        p.error("--budgets needs positive expert counts, e.g. --budgets 10,12,14")
    return args


def load(args):
    """(target, draft, tokenizer, held-out prompts as token ids, name)."""
    from moetune.engine.loader import load_draft, load_target
    target, tok = load_target(args.target, args.device, args.dtype)
    draft, _ = load_draft(args.draft, tok, args.device, args.dtype)
    texts = [p["text"] for p in json.loads((Path(args.target).parent / "prompts.json").read_text())]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return target, draft, tok, ids, Path(args.target).name


def spread(items: list, n: int) -> list:
    """n of `items`, evenly spaced (the prompts file is grouped by kind)."""
    return [items[i * len(items) // n] for i in range(min(n, len(items)))]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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


@dataclass(frozen=True)
class Policy:
    """One lossy budget: B experts per layer, ranked by `selection`, tokens re-routed by `substitution`."""

    budget: int
    selection: str
    substitution: str
    protect: bool  # the root's top-k kept first (the engine's rule); False: HEAD's rule, for comparison

    @property
    def label(self) -> str:
        return f"B={self.budget} {self.selection}/{self.substitution}{'' if self.protect else ' unprotected'}"

    def plan(self, node_weights: torch.Tensor) -> moe_budget.BudgetPlan:
        return moe_budget.BudgetPlan(self.budget, selection=self.selection, substitution=self.substitution,
                                     node_weights=node_weights)

    def step_config(self, base: StepConfig) -> StepConfig:
        return StepConfig(depth=base.depth, topk=base.topk, num_draft_tokens=base.num_draft_tokens,
                          budgets=(self.budget,), selection=self.selection, substitution=self.substitution,
                          budget_mode="substitute")

    def scope(self):
        return nullcontext() if self.protect else unprotected()


@contextmanager
def unprotected():
    """HEAD's rule before root protection (every row, the root included, competes on score), for the
    comparison only: moe_budget calls selection.substitute, so the with-block rebinds it with no root row."""
    original = selection.substitute

    def substitute(probs, *args, **kwargs):  # probs [T, E]
        kwargs["roots"] = torch.zeros(probs.shape[0], dtype=torch.bool, device=probs.device)
        return original(probs, *args, **kwargs)

    with mock.patch.object(selection, "substitute", substitute):
        yield


def policies(args) -> list[Policy]:
    protects = {"both": (True, False), "on": (True,), "off": (False,)}[args.protect]
    return [Policy(b, sel, sub, prot) for b in args.budgets for prot in protects
            for sel in SELECTIONS for sub in SUBSTITUTIONS]


def budgeted(target, cache, root: int, tree: DraftTree, policy: Policy):
    """[N+1, V] logits of the tree verified under `policy`, and its BudgetReport; the cache is left as found."""
    past = kv.cache_len(cache)
    with policy.scope(), moe_budget.apply_budget(target, policy.plan(path_weights(tree))) as report:
        logits = target(**forward_args(target, cache, root, tree)).logits[0]
    kv.crop(cache, past)
    return logits, report


def unbudgeted(target, cache, root: int, tree: DraftTree) -> torch.Tensor:
    """[N+1, V] logits of the tree verified without a budget; the cache grows by its N+1 rows."""
    return target(**forward_args(target, cache, root, tree)).logits[0]


def prefill(target, ids: list[int]):
    """A cache of `ids` (the caller's root follows them)."""
    cache = kv.new_cache(target)
    target(input_ids=torch.tensor([ids], device=target.device), cache=cache, use_cache=True)
    return cache


@torch.no_grad()
def exact_steps(target, draft, prompts: list[list[int]], base: StepConfig, max_new: int, pols: list[Policy]) -> dict:
    """Per policy: steps whose budgeted verification emits the unbudgeted step's tokens, over steps; and the
    kept share of unique experts. Every step runs on the unbudgeted greedy trajectory (same context, same tree)."""
    drafter = make_drafter("draft_model", target, draft)
    tally = {p: {"exact": 0, "steps": 0, "unique": 0, "kept": 0} for p in pols}
    touched = []
    for ids in prompts:
        ids = list(ids)
        cache = prefill(target, ids[:-1])
        drafter.prefill(ids)
        generated = 0
        while generated < max_new:
            tree = drafter.draft(ids, base)
            emitted = {}
            for p in pols:
                logits, report = budgeted(target, cache, ids[-1], tree, p)
                emitted[p] = accept_greedy(tree, logits).tokens
                tally[p]["unique"] += sum(report.unique_experts)
                tally[p]["kept"] += sum(report.unique_experts_kept)
                touched.append(report.unique_experts)
            past = kv.cache_len(cache)
            ref = accept_greedy(tree, unbudgeted(target, cache, ids[-1], tree))
            kv.commit(cache, past, ref.rows)
            for p in pols:
                tally[p]["exact"] += emitted[p] == ref.tokens
                tally[p]["steps"] += 1
            ids += ref.tokens
            drafter.commit(list(ref.tokens))
            generated += len(ref.tokens)
    layers = list(zip(*touched))
    return {"policies": {p: {"exact_steps": t["exact"] / t["steps"], "steps": t["steps"],
                             "kept": t["kept"] / t["unique"]} for p, t in tally.items()},
            "touched_per_layer": [statistics.mean(x) for x in layers]}


def chain_windows(n: int, first: int, width: int) -> range:
    """Starts s of the teacher-forced windows over an n-token text: rows s .. s+width-1 (root ids[s], then
    width-1 nodes) predict ids[s+1 .. s+width]; the next window's root is ids[s+width]."""
    return range(first, n - width, width)


def draft_probs(draft, ids: list[int]) -> torch.Tensor:  # [n-1]
    """The draft's probability of each true next token, q[i] = P(ids[i+1] | ids[:i+1])."""
    logits = draft(input_ids=torch.tensor([ids], device=draft.device)).logits[0, :-1]  # [n-1, V]
    target = torch.tensor(ids[1:], device=draft.device)
    return torch.softmax(logits.float(), -1).gather(1, target[:, None])[:, 0]


def row_masks(off_logits: torch.Tensor, truth: torch.Tensor) -> dict[str, torch.Tensor]:  # [W, V], [W] -> [W]
    """Which rows of a window each loss averages: all; the root (emitted every step); the rows the unbudgeted
    target would reach if the draft proposed the true text (its argmax matched every true token before)."""
    hit = (off_logits.argmax(-1) == truth).long()  # [W]
    reached = torch.cat([hit.new_ones(1), hit[:-1].cumprod(0)]).bool()
    root = torch.zeros_like(reached)
    root[0] = True
    return {"all": torch.ones_like(reached), "root": root, "reached": reached}


@torch.no_grad()
def loss_increase(target, draft, texts: list[list[int]], first: int, width: int, pols: list[Policy]) -> dict:
    """Mean next-token NLL (nats/token) of the held-out text verified in chain windows of `width` rows, off and
    per policy, over each of row_masks' row sets; every window sees the unbudgeted cache of the text."""
    total = {key: dict.fromkeys(MASKS, 0.0) for key in ["off", *pols]}
    count = dict.fromkeys(MASKS, 0)
    for ids in texts:
        q = draft_probs(draft, ids)
        cache = prefill(target, ids[:first])
        for s in chain_windows(len(ids), first, width):
            tree = DraftTree(chain(width - 1), torch.tensor(ids[s + 1:s + width], device=target.device),
                             q[s:s + width - 1])
            truth = torch.tensor(ids[s + 1:s + width + 1], device=target.device)  # [W]
            nll = {p: F.cross_entropy(budgeted(target, cache, ids[s], tree, p)[0].float(), truth, reduction="none")
                   for p in pols}  # [W] each
            off = unbudgeted(target, cache, ids[s], tree).float()  # [W, V]; the cache now ends at ids[s + width - 1]
            nll["off"] = F.cross_entropy(off, truth, reduction="none")
            for m, mask in row_masks(off, truth).items():
                count[m] += int(mask.sum())
                for key, loss in nll.items():
                    total[key][m] += float(loss[mask].sum())
    mean = {key: {m: v / count[m] for m, v in t.items()} for key, t in total.items()}
    return {"rows": count, "nll_off": mean["off"],
            "policies": {p: {f"{m}_loss_increase": mean[p][m] - mean["off"][m] for m in MASKS} for p in pols}}


def agreement(out: list[int], ref: list[int]) -> float:
    """Position-wise agreement over the reference's length (a shorter output counts as mismatches)."""
    return sum(a == b for a, b in zip(out, ref)) / max(len(ref), 1)


def generations(target, draft, prompts: list[list[int]], base: StepConfig, max_new: int, pols: list[Policy]) -> dict:
    """Whole greedy generations: goodput and accepted length off and per policy, token agreement with off."""
    from moetune.engine.generate import generate
    generate(target, None, prompts[:1], drafter=draft, config=base, max_new_tokens=4)  # warm up

    def run(cfg, scope):
        with scope:
            results = generate(target, None, prompts, drafter=draft, config=cfg, max_new_tokens=max_new)
        return results, {"goodput": sum(len(r.token_ids) for r in results) / sum(r.decode_time for r in results),
                         "accepted": statistics.mean(s.accepted for r in results for s in r.steps)}

    ref, off = run(base, nullcontext())
    out = {}
    for p in pols:
        res, row = run(p.step_config(base), p.scope())
        row["agreement"] = statistics.mean(agreement(r.token_ids, q.token_ids) for r, q in zip(res, ref))
        row["goodput_vs_off"] = row["goodput"] / off["goodput"]
        out[p] = row
    return {"off": off, "policies": out}


def frontier(target, draft, prompt_ids, args) -> dict:
    """Every policy's exact steps, loss increase and whole-generation numbers, and the unbudgeted reference."""
    pols = policies(args)
    base = StepConfig(depth=args.depth, topk=args.topk, num_draft_tokens=args.draft_tokens)
    t0 = time.perf_counter()
    steps = exact_steps(target, draft, spread(prompt_ids, args.prompts), base, args.max_new, pols)
    t1 = time.perf_counter()
    loss = loss_increase(target, draft, spread(prompt_ids, args.loss_prompts), args.first, args.draft_tokens + 1, pols)
    t2 = time.perf_counter()
    gens = generations(target, draft, spread(prompt_ids, args.gen_prompts), base, args.max_new, pols)
    t3 = time.perf_counter()
    rows = [{"budget": p.budget, "selection": p.selection, "substitution": p.substitution, "protect": p.protect,
             **steps["policies"][p], **loss["policies"][p], **gens["policies"][p]} for p in pols]
    return {"rows": rows, "off": gens["off"], "touched_per_layer": steps["touched_per_layer"],
            "nll_off": loss["nll_off"], "loss_rows": loss["rows"],
            "seconds": {"exact_steps": t1 - t0, "loss": t2 - t1, "generations": t3 - t2}}


def label(r: dict) -> str:
    return Policy(r["budget"], r["selection"], r["substitution"], r["protect"]).label


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Labels of the (label, speed, loss increase) points no other point beats on both (faster and no
    lossier, or as fast and less lossy), by loss increase."""
    front = [(lbl, s, l) for lbl, s, l in points
             if not any(s2 >= s and l2 <= l and (s2, l2) != (s, l) for _, s2, l2 in points)]
    return [lbl for lbl, _, _ in sorted(front, key=lambda x: (x[2], -x[1]))]


def pareto_plot(points: list[tuple[str, float, float]], path: Path, title: str = "lossy expert budgets") -> None:
    """Scatter of (label, speed, loss increase) points with their Pareto front labelled; other callers
    (eviction budgets) add their own points."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([l for _, _, l in points], [s for _, s, _ in points], s=14, color="0.6", label="all points")
    best = [next(p for p in points if p[0] == lbl) for lbl in front]
    ax.plot([l for _, _, l in best], [s for _, s, _ in best], marker="o", color="C3", label="Pareto front")
    for lbl, s, l in best:
        ax.annotate(lbl, (l, s), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="loss increase on held-out text (nats/token)", ylabel="speed (goodput vs unbudgeted)", title=title)
    ax.axvline(AIM, color="k", ls=":", lw=1, label=f"aim: {AIM} nats/token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(meta, lat, front) -> str:
    lines = [f"# Lossy expert budget benchmark ({meta['model']}, {meta['device']}, {meta['dtype']})", "",
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
        touched = front["touched_per_layer"]
        rows_text = ", ".join(f"{m} rows ({front['loss_rows'][m]}): {front['nll_off'][m]:.4f}" for m in MASKS)
        lines += [f"## (b) Fidelity frontier ({meta['frontier']})", "",
                  f"Unique experts the tree routes to per layer before a budget cuts (mean over steps and policies): "
                  f"{', '.join(f'{t:.1f}' for t in touched)} (mean {statistics.mean(touched):.1f}). "
                  f"Unbudgeted NLL (nats/token) over {rows_text}. Off: accepted "
                  f"{front['off']['accepted']:.2f}, goodput {front['off']['goodput']:.1f} tok/s.", "",
                  f"Ranked within each budget by loss increase. exact steps: share of {front['rows'][0]['steps']} "
                  "greedy steps emitting exactly the unbudgeted step's tokens. Loss increase, nats/token, over all "
                  "window rows; over the rows the "
                  "unbudgeted target reaches when the draft proposes the true text (reached); over root rows.", "",
                  "| B | kept | selection | substitution | root protected | exact steps | loss increase "
                  "| reached loss increase | root loss increase | token agreement (whole gen) | accepted "
                  "| goodput vs off |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for b in sorted({r["budget"] for r in front["rows"]}):
            for r in sorted((r for r in front["rows"] if r["budget"] == b), key=lambda r: r["all_loss_increase"]):
                lines.append(f"| {b} | {r['kept']:.2f} | {r['selection']} | {r['substitution']} | "
                             f"{'yes' if r['protect'] else 'no'} | {r['exact_steps']:.3f} | "
                             f"{r['all_loss_increase']:+.4f} | {r['reached_loss_increase']:+.4f} | "
                             f"{r['root_loss_increase']:+.4f} | {r['agreement']:.3f} | {r['accepted']:.2f} | "
                             f"{r['goodput_vs_off']:.2f} |")
        lines += ["", *summary(front), ""]
    return "\n".join(lines)


def method(r: dict) -> tuple[str, str]:
    return r["selection"], r["substitution"]


def numbers(r: dict) -> str:
    return (f"loss increase {r['all_loss_increase']:+.4f} (reached rows {r['reached_loss_increase']:+.4f}) "
            f"nats/token, exact steps {r['exact_steps']:.1%}")


def summary(front) -> list[str]:
    """Per budget: the best root-protected policy against the issue's aim, the same policy unprotected,
    accept_weighted/reselect (the issue's candidate default), and what protection buys on average."""
    out = []
    for b in sorted({r["budget"] for r in front["rows"]}):
        rows = [r for r in front["rows"] if r["budget"] == b]
        on = [r for r in rows if r["protect"]]
        if not on:
            continue
        best = min(on, key=lambda r: (r["all_loss_increase"], -r["exact_steps"]))
        line = (f"- B={b} (kept {statistics.mean(r['kept'] for r in rows):.0%} of the touched experts): best "
                f"{best['selection']}/{best['substitution']}: {numbers(best)}; "
                f"{'meets' if best['all_loss_increase'] <= AIM else 'misses'} the aim <= {AIM}")
        twin = {method(r): r for r in rows if not r["protect"]}
        if method(best) in twin:
            line += f". Unprotected: {numbers(twin[method(best)])}"
        candidate = next((r for r in on if method(r) == ("accept_weighted", "reselect")), None)
        if candidate is not None and candidate is not best:
            line += f". accept_weighted/reselect: {numbers(candidate)}"
        pairs = [(r, twin[method(r)]) for r in on if method(r) in twin]
        if pairs:
            line += (f". Protection, mean over the {len(pairs)} policies: exact steps "
                     f"{statistics.mean(r['exact_steps'] - t['exact_steps'] for r, t in pairs):+.1%}, loss increase "
                     f"{statistics.mean(r['all_loss_increase'] - t['all_loss_increase'] for r, t in pairs):+.4f}")
        out.append(line + ".")
    return out


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
        points = [("off", 1.0, 0.0)] + [(label(r), r["goodput_vs_off"], r["all_loss_increase"]) for r in front["rows"]]
        pareto_plot(points, out / "budget.png")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    target, draft, tok, prompt_ids, name = load(args)
    shape = moe_budget.moe_shape(target)
    for b in args.budgets:
        shape.check_budgets((b,), "--budgets")
    device = target.device
    meta = {"model": name, "shape": vars(shape), "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "dtype": str(target.dtype).replace("torch.", ""), "context": args.context, "budgets": args.budgets,
            "command": " ".join(shlex.quote(a) for a in ["python", "bench/bench_budget.py", *(argv or sys.argv[1:])]),
            "frontier": f"exact steps: {min(args.prompts, len(prompt_ids))} held-out prompts x {args.max_new} tokens; "
                        f"whole generations: {min(args.gen_prompts, len(prompt_ids))} of them; "
                        f"loss: {min(args.loss_prompts, len(prompt_ids))} held-out prompts' "
                        f"text after {args.first} tokens, windows of {args.draft_tokens + 1}; tree depth {args.depth} "
                        f"topk {args.topk} nodes {args.draft_tokens}, greedy"}
    lat = latency(target, args, args.budgets) if args.part in ("all", "latency") else []
    front = frontier(target, draft, prompt_ids, args) if args.part in ("all", "frontier") else {}
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
