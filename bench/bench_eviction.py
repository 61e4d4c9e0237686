"""Lossless expert budgets by node eviction (StepConfig budget_mode="evict") against the decoders around them:
what a budget saves in one verification, and what it does to whole greedy generations.

    .venv/bin/python bench/bench_eviction.py --target /tmp/widened1040 [--prompts 24] [--max-new-tokens 64]
        [--part verify|live|all] [--policy SPEC ...] [--threads 1] [--out bench/results]

(a) verify: along the greedy trajectories of a few held-out prompts, one draft tree per step (draft model,
    depth 5, topk 2, 16 nodes) is verified (engine.verify.verify, the cache cropped back after each pass)
    unbudgeted, under eviction budgets B in {top_k, 8, 12, 16, 24} (uniform per layer), and as the plain
    one-row step, the configurations' order rotated per step. Per B: median ms, experts computed per layer,
    drafted nodes kept, accepted tokens; a least-squares fit of ms against the experts computed summed over
    layers gives us per expert and, with bytes per expert = 3 * I * H * bytes/param, the implied bandwidth,
    shown beside the machine's own (a 512 MB fp32 copy and sum, best of 5). Every pass captures routing
    (budgeted passes always do), so the passes carry the same hooks. Checked on every step: the kept rows'
    argmax equals the unbudgeted pass's, and the tokens an evicted tree emits are a prefix of the unbudgeted
    tree's.
(b) live: whole greedy generations of held-out prompts (moetune/models/prompts.json, kinds in turn), methods
    interleaved per prompt (the order rotated per prompt), one policy instance per method across prompts:
    moetune plain, HF `generate` greedy, draft chains d2/d3/d4, the d5 k2 n16 draft tree unbudgeted and
    under eviction, the d4 chain under eviction, MoE-Spec (lossy, budget_mode="substitute") on the same
    tree, an n-gram chain d4, and policy specs (--policy, default auto). Tokens/s is generated tokens over the
    wall time of whole calls (prefill included, for HF and moetune alike, as bench_vs_hf.py); moetune methods
    also get decode-only tokens/s (GenerationResult.decode_time, prefill excluded). Every method's
    output is compared with moetune plain's on every prompt; a lossless method that differs is printed
    loudly and recorded under "failures". Lossy methods also get per-step exactness (steps whose emitted
    tokens equal plain's at that position, counted up to and including the first step that differs, after
    which the contexts differ) and position-wise token agreement. Experts computed per layer per step come
    from the budget's own report on budgeted steps; static methods without one are replayed untimed with
    routing capture (capture costs time, so timed runs skip it; the replay must reproduce the tokens); a
    plain step computes top_k per layer by construction.

Writes <out>/eviction.json, eviction.md (command, machine) and eviction.png. Running one --part keeps the
other part's results from an existing eviction.json (each part records its own command).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_live import pick_prompts  # noqa: E402  (held-out prompts, kinds in turn)
from bench_vs_hf import hf_methods, run_one  # noqa: E402  (HF's greedy generate; one method on one prompt)

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET, MODELS_DIR  # noqa: E402
from moetune.engine import kv  # noqa: E402
from moetune.engine.accept import accept_greedy  # noqa: E402
from moetune.engine.drafters import DraftModelDrafter  # noqa: E402
from moetune.engine.generate import generate, prefill  # noqa: E402
from moetune.engine.loader import load_draft, load_target, moe_shape  # noqa: E402
from moetune.engine.tree import DraftTree  # noqa: E402
from moetune.engine.verify import verify  # noqa: E402
from moetune.policies.registry import make_policy  # noqa: E402
from moetune.policies.static import Static  # noqa: E402
from moetune.step import PLAIN, StepConfig  # noqa: E402

HF_PLAIN = "HF generate (plain)"
PLAIN_NAME = "moetune plain"
TREE = dict(depth=5, topk=2, num_draft_tokens=16)
TREE_SPEC = ",".join(f"{k}={v}" for k, v in TREE.items())
TREE_LABEL = "tree d5 k2 n16"


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=str(DEFAULT_TARGET), help="MoE target (e.g. /tmp/widened1040, moetune widen)")
    p.add_argument("--draft", default=str(DEFAULT_DRAFT))
    p.add_argument("--part", default="all", choices=("verify", "live", "all"))
    p.add_argument("--prompts", type=int, default=24, help="live: held-out prompts, kinds in turn (24: all)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="live: tokens generated per prompt")
    p.add_argument("--policy", action="append", default=None, metavar="SPEC",
                   help="live: a policy spec for moetune.policies.registry.make_policy (repeatable; default: auto)")
    p.add_argument("--evict", type=ints, default=[8, 12, 16], help="live: eviction budgets on the tree")
    p.add_argument("--chain-evict", type=ints, default=[8, 12], help="live: eviction budgets on the d4 chain")
    p.add_argument("--lossy", type=ints, default=[12, 16], help="live: MoE-Spec (substitute) budgets on the tree")
    p.add_argument("--verify-budgets", type=ints, default=[8, 12, 16, 24],
                   help="verify: eviction budgets besides top_k")
    p.add_argument("--verify-prompts", type=int, default=4, help="verify: held-out prompts walked")
    p.add_argument("--verify-steps", type=int, default=16, help="verify: greedy steps per prompt")
    p.add_argument("--reps", type=int, default=3, help="verify: timed passes per configuration and step (median)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if min(args.prompts, args.max_new_tokens, args.verify_prompts, args.verify_steps, args.reps, args.threads) < 1:
        p.error("--prompts, --max-new-tokens, --verify-prompts, --verify-steps, --reps and --threads must be >= 1")
    args.policy = args.policy or ["auto"]
    return args


def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import transformers
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=threads, torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version())


def model_info(target, path: str) -> dict:
    shape = moe_shape(target)
    bpp = next(target.parameters()).element_size()
    return dict(path=str(path), layers=shape.num_layers, experts=shape.num_experts, top_k=shape.top_k,
                hidden=shape.hidden_size, expert_intermediate=shape.expert_intermediate_size,
                dtype=str(next(target.parameters()).dtype).removeprefix("torch."), bytes_per_param=bpp,
                bytes_per_expert=3 * shape.expert_intermediate_size * shape.hidden_size * bpp)


# ---------------------------------------------------------------------------------------------- bandwidth

def memory_bandwidth(mb: int = 512, reps: int = 5) -> dict:
    """Best-of-reps GB/s of a large fp32 copy (bytes read + written) and sum (bytes read), current threads."""
    n = mb * 2 ** 20 // 4
    src = torch.ones(n)
    dst = torch.empty_like(src)
    copy, read = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        src.sum()
        read.append(time.perf_counter() - t0)
    size = n * 4
    del src, dst
    return dict(mb=mb, reps=reps, copy_gb_s=round(2 * size / min(copy) / 1e9, 2),
                sum_gb_s=round(size / min(read) / 1e9, 2))


# ---------------------------------------------------------------------------------------------- (a) verify

def verify_configs(shape, budgets: list[int]) -> list[tuple[str, int | None, StepConfig]]:
    tree = StepConfig(**TREE)
    bs = sorted({shape.top_k, *(b for b in budgets)})
    bad = [b for b in bs if not shape.top_k <= b <= shape.num_experts]
    if bad:
        raise SystemExit(f"--verify-budgets {bad} outside [top_k={shape.top_k}, num_experts={shape.num_experts}]")
    return ([("plain (1 row)", None, PLAIN), ("tree, no budget", None, tree)]
            + [(f"tree, evict B={b}", b, replace(tree, budgets=(b,) * shape.num_layers, budget_mode="evict"))
               for b in bs])


def experts_of(ver) -> list[int]:
    """Experts computed per layer by one verification: the budget's count, else every routed one."""
    if ver.budget_report is not None:
        return list(ver.budget_report.unique_experts_kept)
    return ver.routing.unique_experts().tolist()


@torch.no_grad()
def verify_part(target, tok, draft, prompts, args, info) -> dict:
    shape = moe_shape(target)
    configs = verify_configs(shape, args.verify_budgets)
    drafter = DraftModelDrafter(draft)
    empty = DraftTree.empty(target.device)
    tree_cfg = configs[1][2]
    eos = target.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    samples = {name: [] for name, _, _ in configs}  # per step: ms, experts per layer, nodes kept, accepted
    failures: list[str] = []
    step_no = 0
    warm = True
    for pi, prompt in enumerate(prompts):
        ids = tok(prompt["text"], add_special_tokens=False)["input_ids"]
        cache = kv.new_cache(target)
        prefill(target, cache, ids)
        drafter.prefill(ids)
        ctx = list(ids)
        for _ in range(args.verify_steps):
            tree = drafter.draft(ctx, tree_cfg)
            past = kv.cache_len(cache)
            order = configs[step_no % len(configs):] + configs[:step_no % len(configs)]
            if warm:  # first-call costs (allocator, kernel choice, the budget's install) are not timed
                for _, _, cfg in configs:
                    verify(target, cache, ctx[-1], tree if cfg.speculate else empty, cfg, True)
                    kv.crop(cache, past)
                warm = False
            vers = {}
            for name, _, cfg in order:
                times = []
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    ver = verify(target, cache, ctx[-1], tree if cfg.speculate else empty, cfg, True)
                    ers = experts_of(ver)  # the pass's host transfer of its counts is part of its cost
                    times.append(time.perf_counter() - t0)
                    kv.crop(cache, past)
                vers[name] = (ver, ers, statistics.median(times))
            ref, _, _ = vers["tree, no budget"]
            ref_acc = accept_greedy(tree, ref.logits)
            ref_arg = ref.logits.argmax(-1)
            for name, b, cfg in configs:
                ver, ers, ms = vers[name]
                if not cfg.speculate:
                    acc, kept = accept_greedy(empty, ver.logits), 0
                    if acc.tokens[0] != ref_acc.tokens[0]:
                        failures.append(f"prompt {pi} step {step_no}: plain step emits {acc.tokens[0]}, the tree's "
                                        f"root {ref_acc.tokens[0]}")
                elif ver.alive is None:
                    acc, kept = ref_acc, len(tree)
                else:
                    acc, kept = accept_greedy(tree, ver.logits, ver.alive), int(ver.alive.sum()) - 1
                    if not torch.equal(ver.logits.argmax(-1)[ver.alive], ref_arg[ver.alive]):
                        failures.append(f"prompt {pi} step {step_no} {name}: kept rows' argmax differs from the "
                                        f"unbudgeted pass")
                    if tuple(acc.tokens) != tuple(ref_acc.tokens[:len(acc.tokens)]):
                        failures.append(f"prompt {pi} step {step_no} {name}: emits {acc.tokens}, not a prefix of the "
                                        f"unbudgeted {ref_acc.tokens}")
                samples[name].append(dict(ms=1e3 * ms, experts=ers, nodes=len(tree), kept=kept,
                                          accepted=acc.accepted, emitted=len(acc.tokens)))
            step_no += 1
            ver = verify(target, cache, ctx[-1], tree, tree_cfg, False)  # advance along the greedy trajectory
            acc = accept_greedy(tree, ver.logits)
            kv.commit(cache, ver.past_len, acc.rows)
            ctx.extend(acc.tokens)
            if eos & set(acc.tokens):
                break
        print(f"verify: prompt {pi + 1}/{len(prompts)} ({prompt['kind']}) done", file=sys.stderr, flush=True)
    for f in failures:
        print(f"!!! EVICTION CHECK FAILED: {f}", file=sys.stderr, flush=True)

    fit = linear_fit([(sum(s["experts"]), s["ms"]) for ss in samples.values() for s in ss], info["bytes_per_expert"])
    fit_evict = linear_fit([(sum(s["experts"]), s["ms"]) for (name, b, _) in configs if b is not None
                            for s in samples[name]], info["bytes_per_expert"])
    off = statistics.median(s["ms"] for s in samples["tree, no budget"])
    rows = []
    for name, b, cfg in configs:
        ss = samples[name]
        ms = statistics.median(s["ms"] for s in ss)
        per_layer = statistics.mean(statistics.mean(s["experts"]) for s in ss)
        rows.append(dict(config=name, budget=b, median_ms=round(ms, 3), vs_no_budget=round(off / ms, 3),
                         experts_per_layer=round(per_layer, 2),
                         experts_summed=round(statistics.mean(sum(s["experts"]) for s in ss), 1),
                         nodes_kept=round(statistics.mean(s["kept"] for s in ss), 2),
                         mean_accepted=round(statistics.mean(s["accepted"] for s in ss), 3),
                         mean_emitted=round(statistics.mean(s["emitted"] for s in ss), 3)))
    return dict(rows=rows, fit=fit, fit_evict=fit_evict, steps=step_no, prompts=len(prompts), reps=args.reps,
                failures=failures, samples=[dict(config=n, **s) for n, ss in samples.items() for s in ss])


def linear_fit(points: list[tuple[float, float]], bytes_per_expert: int) -> dict | None:
    """Least squares ms = intercept + slope * experts; slope as us per expert and the bandwidth it implies."""
    if len({x for x, _ in points}) < 2:
        return None
    xs, ys = [x for x, _ in points], [y for _, y in points]
    slope, intercept = statistics.linear_regression(xs, ys)
    r = statistics.correlation(xs, ys)
    return dict(us_per_expert=round(1e3 * slope, 2), intercept_ms=round(intercept, 3), r2=round(r * r, 4),
                points=len(points),
                implied_gb_s=round(bytes_per_expert / (slope * 1e-3) / 1e9, 2) if slope > 0 else None)


# ---------------------------------------------------------------------------------------------- (b) live

def live_methods(shape, args) -> list[tuple[str, str | None]]:
    """(name, policy spec) in table order; HF's generate has no spec."""
    per = lambda b: "/".join([str(b)] * shape.num_layers)  # noqa: E731  uniform budgets, one per MoE layer
    for flag, bs in (("--evict", args.evict), ("--chain-evict", args.chain_evict), ("--lossy", args.lossy)):
        bad = [b for b in bs if not shape.top_k <= b <= shape.num_experts]
        if bad:
            raise SystemExit(f"{flag} {bad} outside [top_k={shape.top_k}, num_experts={shape.num_experts}]")
    return ([(PLAIN_NAME, "plain"), (HF_PLAIN, None)]
            + [(f"draft chain d{d}", f"static:depth={d}") for d in (2, 3, 4)]
            + [(f"draft {TREE_LABEL}", f"static:{TREE_SPEC}")]
            + [(f"{TREE_LABEL}, evict B={b}", f"static:{TREE_SPEC},budgets={per(b)},budget_mode=evict")
               for b in args.evict]
            + [(f"chain d4, evict B={b}", f"static:depth=4,budgets={per(b)},budget_mode=evict")
               for b in args.chain_evict]
            + [(f"{TREE_LABEL}, MoE-Spec B={b} (lossy)", f"moespec:budget={b},{TREE_SPEC}") for b in args.lossy]
            + [("n-gram chain d4", "static:depth=4,drafter=ngram")]
            + [(f"policy {s}", s) for s in args.policy])


def step_exactness(steps, out: list[int], ref: list[int]) -> tuple[int, int]:
    """(exact steps, steps judged): steps in order while the context still equals plain's; the first step
    whose emitted tokens differ from plain's at that position is judged, and ends the comparison."""
    pos = exact = judged = 0
    for s in steps:
        judged += 1
        if out[pos:pos + s.emitted] != ref[pos:pos + s.emitted]:
            break
        exact += 1
        pos += s.emitted
    return exact, judged


def step_experts(steps, top_k: int) -> list[float] | None:
    """Experts computed per layer (mean over layers) of each step; None where a speculative step has no count."""
    out = []
    for s in steps:
        counts = s.unique_experts_kept or s.unique_experts
        if counts:
            out.append(statistics.mean(counts))
        elif not s.config.speculate:
            out.append(float(top_k))  # one row: its top_k experts per layer
        else:
            return None
    return out


def live_part(target, tok, draft, prompts, args) -> dict:
    shape = moe_shape(target)
    methods = live_methods(shape, args)
    specs = dict(methods)
    hf = {HF_PLAIN: hf_methods(draft)[HF_PLAIN]}
    policies = {m: make_policy(s) for m, s in methods if s is not None}  # one instance serves every prompt
    names = [m for m, _ in methods]
    n = args.max_new_tokens
    warm = tok(prompts[0]["text"], add_special_tokens=False)["input_ids"]
    for m in names:  # first-call costs (allocator, kernel choice, the budget's install) are not timed
        run_one(m, hf, {k: make_policy(v) for k, v in specs.items() if v is not None}, target, tok, draft, warm, 8)
    runs = {m: [] for m in names}  # per prompt: dict(kind, tokens, seconds, out, steps)
    for i, p in enumerate(prompts):
        ids = tok(p["text"], add_special_tokens=False)["input_ids"]
        for m in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            if m in hf:
                (out, steps), decode = run_one(m, hf, policies, target, tok, draft, ids, n), None
            else:  # run_one's moetune call, keeping the result's decode time (prefill excluded)
                res = generate(target, tok, [ids], drafter={"draft_model": DraftModelDrafter(draft)},
                               policy=policies[m], max_new_tokens=n)[0]
                out, steps, decode = res.token_ids, res.steps, res.decode_time
            runs[m].append(dict(kind=p["kind"], ids=ids, seconds=time.perf_counter() - t0, decode=decode, out=out,
                                steps=steps))
        print(f"live: prompt {i + 1}/{len(prompts)} ({p['kind']}) done", file=sys.stderr, flush=True)


    failures = []
    ref = [r["out"] for r in runs[PLAIN_NAME]]
    lossy = {m: any(s.config.budgets is not None and s.config.budget_mode == "substitute"
                    for r in runs[m] for s in r["steps"]) for m in names}
    for m in names:
        for i, r in enumerate(runs[m]):
            r["equal"] = r["out"] == ref[i]
            r["exact"], r["judged"] = step_exactness(r["steps"], r["out"], ref[i])
            r["agree"] = sum(a == b for a, b in zip(r["out"], ref[i]))
            if not r["equal"] and not lossy[m]:
                at = next((j for j, (a, b) in enumerate(zip(r["out"], ref[i])) if a != b),
                          min(len(r["out"]), len(ref[i])))
                msg = (f"{m} (no lossy step) differs from moetune plain on prompt {i} ({r['kind']}) from token {at} "
                       f"({len(r['out'])} vs {len(ref[i])} tokens)")
                failures.append(msg)
                print(f"!!! LOSSLESS CHECK FAILED: {msg}", file=sys.stderr, flush=True)

    notes = count_experts(target, tok, draft, runs, specs, shape.top_k, n)
    rows = {m: figures(runs[m], runs, shape.top_k, lossy[m], specs[m]) for m in names}
    kinds = sorted({r["kind"] for r in runs[PLAIN_NAME]})
    by_kind = {k: {m: figures([r for r in runs[m] if r["kind"] == k],
                              {x: [r for r in runs[x] if r["kind"] == k] for x in (PLAIN_NAME, HF_PLAIN)},
                              shape.top_k, lossy[m], specs[m]) for m in names} for k in kinds}
    per_prompt = {m: [dict(kind=r["kind"], tokens=len(r["out"]), seconds=round(r["seconds"], 4), steps=len(r["steps"]),
                           equal=r["equal"], exact_steps=r["exact"], judged_steps=r["judged"]) for r in runs[m]]
                  for m in names}
    return dict(rows=[dict(method=m, **rows[m]) for m in names], kinds=kinds,
                by_kind={k: [dict(method=m, **v[m]) for m in names] for k, v in by_kind.items()},
                failures=failures, notes=notes, per_prompt=per_prompt)


def count_experts(target, tok, draft, runs, specs, top_k: int, n: int) -> list[str]:
    """Give every run r["experts"] (per step, experts computed per layer) or None. Static methods whose timed
    steps lack counts are replayed untimed with routing capture; the replay must reproduce the run."""
    notes = []
    for m, rs in runs.items():
        for r in rs:
            r["experts"] = step_experts(r["steps"], top_k) if specs[m] is not None else None
        if specs[m] is None or all(r["experts"] is not None for r in rs):
            continue
        if not isinstance(make_policy(specs[m]), Static):
            notes.append(f"{m}: expert counts unknown (an adaptive policy without routing capture is not replayed)")
            continue
        policy = make_policy(specs[m])
        for i, r in enumerate(rs):
            if r["experts"] is not None:
                continue
            res = generate(target, tok, [r["ids"]], drafter={"draft_model": DraftModelDrafter(draft)}, policy=policy,
                           max_new_tokens=n, routing=True)[0]
            if res.token_ids != r["out"] or [s.emitted for s in res.steps] != [s.emitted for s in r["steps"]]:
                msg = f"{m}: the untimed replay with routing capture did not reproduce prompt {i}; counts left out"
                notes.append(msg)
                print(f"!!! {msg}", file=sys.stderr, flush=True)
                continue
            r["experts"] = step_experts(res.steps, top_k)
        if all(r["experts"] is not None for r in rs):
            print(f"live: {m}: experts counted by an untimed replay with routing capture", file=sys.stderr, flush=True)
    return notes


def figures(rs: list[dict], ref_runs: dict, top_k: int, lossy: bool, spec: str | None) -> dict:
    """One method's figures over the runs `rs` (one per prompt); speedups against ref_runs' plain and HF."""
    def tps(x):
        sec = sum(r["seconds"] for r in x)
        return sum(len(r["out"]) for r in x) / sec if sec > 0 else 0.0
    t = tps(rs)
    steps = [s for r in rs for s in r["steps"]]
    counts = [e for r in rs for e in (r["experts"] or [])] if all(r["experts"] is not None for r in rs) else None
    if spec is None:  # HF's greedy loop: one token per forward (prefill aside), its top_k experts per layer
        counts = [float(top_k)]
    kept = [s.nodes_kept for s in steps if s.nodes_kept is not None]
    judged = sum(r["judged"] for r in rs)
    ref_tokens = sum(len(r["out"]) for r in ref_runs[PLAIN_NAME])
    def decode_tps(x):
        sec = sum(r["decode"] for r in x) if all(r["decode"] is not None for r in x) else 0.0
        return sum(len(r["out"]) for r in x) / sec if sec > 0 else None
    d, d_plain = decode_tps(rs), decode_tps(ref_runs[PLAIN_NAME])
    return dict(spec=spec, tokens=sum(len(r["out"]) for r in rs), seconds=round(sum(r["seconds"] for r in rs), 3),
                tokens_per_s=round(t, 2), decode_tokens_per_s=None if d is None else round(d, 2),
                decode_vs_moetune_plain=round(d / d_plain, 3) if d and d_plain else None,
                vs_moetune_plain=round(t / tps(ref_runs[PLAIN_NAME]), 3),
                vs_hf_plain=round(t / tps(ref_runs[HF_PLAIN]), 3),
                mean_accepted=round(statistics.mean(s.accepted for s in steps), 3) if steps else None,
                experts_per_layer_per_step=round(statistics.mean(counts), 2) if counts else None,
                tree_nodes=round(statistics.mean(s.tree_size for s in steps), 2) if steps else None,
                nodes_kept=round(statistics.mean(kept), 2) if kept else None,
                lossy=lossy, equal_prompts=sum(r["equal"] for r in rs), prompts=len(rs),
                equals_plain=all(r["equal"] for r in rs),
                step_exactness=round(sum(r["exact"] for r in rs) / judged, 4) if judged else None,
                token_agreement=round(sum(r["agree"] for r in rs) / max(ref_tokens, 1), 4))


# ---------------------------------------------------------------------------------------------- output

def fmt(x, spec=".2f", none="-"):
    return none if x is None else format(x, spec)


def markdown(res: dict) -> str:
    lines = ["# Lossless expert budgets by node eviction", ""]
    if "verify" in res:
        lines += ["## (a) Verification time against experts computed", ""]
        lines += setup(res["verify"]) + verify_md(res["verify"])
    if "live" in res:
        lines += ["## (b) Live greedy generation", ""] + setup(res["live"]) + live_md(res["live"])
    return "\n".join(lines) + "\n"


def setup(r: dict) -> list[str]:
    m, mod = r["machine"], r["model"]
    return [f"Reproduce: `{r['command']}`", "",
            f"CPU, {m['torch_threads']} torch thread(s): {m['cpu']} ({m['cores']} cores), torch {m['torch']}, "
            f"transformers {m['transformers']}; 1-min load average {r['load_average'][0]} at start, "
            f"{r['load_average'][1]} at the end; {r['seconds']} s. Target `{mod['path']}`: {mod['layers']} MoE "
            f"layers x {mod['experts']} experts, top-{mod['top_k']}, hidden {mod['hidden']}, expert intermediate "
            f"{mod['expert_intermediate']}, {mod['dtype']} ({mod['bytes_per_expert'] / 1e6:.2f} MB per expert); "
            f"draft `{r['draft']}`.", ""]


def failed(what: str, failures: list[str], ok: str, shown: int = 20) -> list[str]:
    if not failures:
        return [ok, ""]
    more = f" (the first {shown}; all in the JSON)" if len(failures) > shown else ""
    return [f"**{what} FAILED ({len(failures)}){more}:**", ""] + [f"- {f}" for f in failures[:shown]] + [""]


def verify_md(r: dict) -> list[str]:
    bw, mod = r["bandwidth"], r["model"]
    lines = [f"{r['prompts']} held-out prompts, {r['steps']} greedy steps; per step one draft tree ({TREE_LABEL}) "
             f"verified by every configuration (order rotated per step), each {r['reps']} time(s), median; the cache "
             "cropped back after each pass. Every pass captures routing. 'accepted' is what the step would accept "
             "from that verification.", "",
             "| configuration | median ms | vs no budget | experts computed / layer | summed over layers | "
             "nodes kept (of drafted) | mean accepted |", "|---|---|---|---|---|---|---|"]
    drafted = next(x["nodes_kept"] for x in r["rows"] if x["config"] == "tree, no budget")
    for x in r["rows"]:
        kept = "-" if x["config"].startswith("plain") else f"{x['nodes_kept']:.2f} of {drafted:.2f}"
        lines.append(f"| {x['config']} | {x['median_ms']:.2f} | {x['vs_no_budget']:.2f}x | "
                     f"{x['experts_per_layer']:.2f} | {x['experts_summed']:.1f} | {kept} | {x['mean_accepted']:.2f} |")
    lines.append("")
    for f, what in ((r["fit"], "every configuration and step"),
                    (r.get("fit_evict"), "eviction passes only: one tree and one code path, only the experts "
                                         "computed vary")):
        if f:
            lines += [f"Least-squares fit over {f['points']} passes ({what}): verify ms = {f['intercept_ms']:.3f} + "
                      f"{f['us_per_expert'] / 1e3:.4f} x experts computed (summed over layers), r^2 = {f['r2']:.3f}: "
                      f"**{f['us_per_expert']:.1f} us per expert**, i.e. {mod['bytes_per_expert'] / 1e6:.2f} MB per "
                      f"expert at **{fmt(f['implied_gb_s'])} GB/s implied**.", ""]
    lines += [f"Machine memory bandwidth, same thread count (a {bw['mb']} MB fp32 tensor, best of {bw['reps']}): copy "
              f"{bw['copy_gb_s']} GB/s (bytes read + written), sum {bw['sum_gb_s']} GB/s (bytes read).", ""]
    return lines + failed("EVICTION CHECKS", r["failures"],
                          "Eviction checks: every step's kept rows had the unbudgeted argmax, and every evicted tree "
                          "emitted a prefix of the unbudgeted tree's tokens.")


def live_md(r: dict) -> list[str]:
    lines = [f"{r['prompts']} held-out prompts ({', '.join(r['kinds'])}), {r['max_new_tokens']} new tokens each, "
             "greedy; methods interleaved per prompt (order rotated), one policy instance per method. tokens/s = "
             "generated tokens / wall time of whole calls (prefill included, as for HF); decode-only: moetune's own "
             "decode time (GenerationResult.decode_time, prefill excluded). Experts / layer / step: experts computed "
             "per MoE layer per decode step (budget report; unbudgeted static methods counted by an untimed replay "
             "with routing capture; plain and HF: top_k by construction). Exactness: share of steps emitting plain's "
             "tokens, judged up to the first step that differs; agreement: position-wise share of plain's tokens.", ""]
    lines += table(r["rows"], full=True)
    for k in r["kinds"]:
        lines += [f"### {k}", ""] + table(r["by_kind"][k], full=False)
    lines += failed("LOSSLESS CHECK", r["failures"],
                    "Greedy equality: every method without lossy steps reproduced moetune plain on every prompt.")
    return lines + [f"Note: {x}" for x in r["notes"]] + ([""] if r["notes"] else [])


def table(rows: list[dict], full: bool) -> list[str]:
    head = ("| method | tokens/s | vs moetune plain | vs HF plain | decode-only tokens/s | mean accepted | "
            "experts / layer / step | nodes kept | equals plain | step exactness | token agreement |")
    out = [head if full else head.replace(" nodes kept |", ""), "|---" * (11 if full else 10) + "|"]
    for x in rows:
        eq = f"{'yes' if x['equals_plain'] else 'NO'} ({x['equal_prompts']}/{x['prompts']})"
        if x["lossy"]:
            eq = f"lossy ({x['equal_prompts']}/{x['prompts']})"
        cells = [x["method"], f"{x['tokens_per_s']:.1f}", f"{x['vs_moetune_plain']:.3f}x", f"{x['vs_hf_plain']:.3f}x",
                 fmt(x["decode_tokens_per_s"], ".1f"), fmt(x["mean_accepted"]), fmt(x["experts_per_layer_per_step"])]
        if full:
            cells.append("-" if x["nodes_kept"] is None else f"{x['nodes_kept']:.1f} of {x['tree_nodes']:.1f}")
        cells += [eq, fmt(x["step_exactness"], ".3f"), f"{x['token_agreement']:.3f}"]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def plot(res: dict, path: Path) -> None:
    """Live: tokens/s against experts computed per layer per step, one point per method (eviction points
    highlighted); beside it, when the verify part ran, verify ms against experts computed with its fit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [p for p in ("live", "verify") if p in res]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5), squeeze=False)
    for ax, part in zip(axes[0], panels):
        r = res[part]
        if part == "live":
            for x in r["rows"]:
                if x["experts_per_layer_per_step"] is None:
                    continue
                evict = "evict" in (x["spec"] or "")
                style = (dict(color="C3", s=60, marker="D", zorder=3) if evict else
                         dict(color="C1", s=40, marker="x") if x["lossy"] else
                         dict(color="C0" if x["spec"] else "k", s=30, marker="o"))
                ax.scatter(x["experts_per_layer_per_step"], x["tokens_per_s"], **style)
                ax.annotate(x["method"], (x["experts_per_layer_per_step"], x["tokens_per_s"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
            for label, kw in (("eviction (lossless)", dict(color="C3", marker="D")),
                              ("MoE-Spec (lossy)", dict(color="C1", marker="x")),
                              ("other moetune", dict(color="C0", marker="o")),
                              ("HF generate", dict(color="k", marker="o"))):
                ax.scatter([], [], label=label, **kw)
            ax.set(xlabel="experts computed per layer per step", ylabel="tokens/s (wall, prefill included)",
                   title=f"live greedy decoding, CPU {r['machine']['torch_threads']} thread(s)")
            ax.legend(fontsize=7)
        else:
            by = {}
            for s in r["samples"]:
                by.setdefault(s["config"], []).append((sum(s["experts"]), s["ms"]))
            for i, (name, pts) in enumerate(by.items()):
                ax.scatter([a for a, _ in pts], [b for _, b in pts], s=8, label=name, color=f"C{i}")
            xs = [min(a for pts in by.values() for a, _ in pts), max(a for pts in by.values() for a, _ in pts)]
            for key, ls, what in (("fit", "k--", "all passes"), ("fit_evict", "k:", "eviction passes")):
                f = r.get(key)
                if f:
                    ax.plot(xs, [f["intercept_ms"] + f["us_per_expert"] / 1e3 * x for x in xs], ls, lw=1,
                            label=f"fit, {what}: {f['us_per_expert']:.0f} us/expert "
                                  f"({fmt(f['implied_gb_s'], '.1f')} GB/s)")
            ax.set(xlabel="experts computed, summed over layers", ylabel="verify ms",
                   title=f"verification, CPU {r['machine']['torch_threads']} thread(s)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python bench/bench_eviction.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    target, tok = load_target(args.target, device="cpu", dtype="float32")
    draft, _ = load_draft(args.draft, tok, device="cpu", dtype="float32")
    info = model_info(target, args.target)
    held = json.loads((MODELS_DIR / "prompts.json").read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eviction.json"
    res = json.loads(path.read_text()) if args.part != "all" and path.exists() else {}
    parts = ("verify", "live") if args.part == "all" else (args.part,)
    for part in parts:
        t0, load0 = time.time(), os.getloadavg()[0]
        meta = dict(command=command.strip(), machine=machine(args.threads), model=info, draft=str(args.draft))
        if part == "verify":
            bandwidth = memory_bandwidth()
            body = verify_part(target, tok, draft, pick_prompts(MODELS_DIR / "prompts.json", args.verify_prompts),
                               args, info)
            body["bandwidth"] = bandwidth
        else:
            prompts = pick_prompts(MODELS_DIR / "prompts.json", min(args.prompts, len(held)))
            body = live_part(target, tok, draft, prompts, args)
            body.update(prompts=len(prompts), max_new_tokens=args.max_new_tokens)
        res[part] = dict(meta, **body, seconds=round(time.time() - t0, 1),
                         load_average=[round(load0, 2), round(os.getloadavg()[0], 2)])
    path.write_text(json.dumps(res, indent=1) + "\n")
    md = markdown(res)
    (out / "eviction.md").write_text(md)
    plot(res, out / "eviction.png")
    print(md)
    failed = [f for part in res.values() for f in part["failures"]]
    if failed:
        print(f"!!! {len(failed)} CHECK(S) FAILED: see 'failures' in {path}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
