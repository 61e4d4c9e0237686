"""`moetune record`: record counterfactual traces (every position's largest draft trees, target verdicts,
per-node routing, budget-grid outcomes, and one live policy run with measured step times)."""
from __future__ import annotations

from pathlib import Path

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET, MODELS_DIR, __version__
from moetune.ngram import MAX_N, MIN_N


def add_arguments(p) -> None:
    p.add_argument("--target", default=str(DEFAULT_TARGET))
    p.add_argument("--draft", default=str(DEFAULT_DRAFT))
    p.add_argument("--prompts", default=str(MODELS_DIR / "prompts.json"),
                   help="JSON list of {kind, source, text} (default: the embedded held-out prompts)")
    p.add_argument("--kinds", default="repetitive,code,docstring", help="prompt kinds to record (comma list)")
    p.add_argument("--per-kind", type=int, default=1, help="prompts recorded per kind")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--policy", default="static:depth=4", help="the policy that runs live while recording")
    p.add_argument("--drafters", default="draft_model,ngram", help="drafters whose trees are recorded")
    p.add_argument("--depth", type=int, default=6, help="largest tree depth recorded")
    p.add_argument("--topk", type=int, default=4, help="largest branching recorded (drafters that draft trees)")
    p.add_argument("--ngram-max-n", type=int, default=MAX_N, help="longest n-gram the n-gram drafter matches")
    p.add_argument("--ngram-min-n", type=int, default=MIN_N, help="shortest n-gram the n-gram drafter matches")
    p.add_argument("--grid", default="", help="uniform expert budgets whose outcomes are recorded "
                                              "(comma list; default: E/4, E/2, 3E/4)")
    p.add_argument("--router-top", type=int, help="router entries kept per token and layer (default: top-k)")
    p.add_argument("--batch-size", type=int, default=1, help="the live run decodes this many of a file's requests "
                   "together (continuous batching, greedy; replay_batch at this size is its self-check)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="trace file to write, or a folder (one file per kind); written "
                                                "as NAME.partial.trace and renamed when complete")
    p.add_argument("--force", action="store_true", help="overwrite existing trace files")


def main(args) -> int:
    from moetune.outputs import output_lock

    groups, limits, grid, files = _plan(args)
    with output_lock(files.values(), args.force):
        return _record(args, groups, limits, grid, files)


def _plan(args) -> tuple[dict, dict, tuple, dict]:
    """Everything checkable without models, so a bad command line fails before any output is touched:
    prompts per kind, tree limits per drafter, the budget grid (empty: E/4, E/2, 3E/4 once E is known)
    and the output file per kind (key None: one file for all kinds)."""
    from moetune.step import DRAFTER_TRAITS, DRAFTERS, StepConfig
    from moetune.traces.replay import make_policy
    from moetune.traces.schema import MAX_NGRAM_ORDER, TreeLimits

    make_policy(args.policy)
    for flag, value in (("--per-kind", args.per_kind), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size),
                        ("--router-top", 1 if args.router_top is None else args.router_top)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    names = [d for d in args.drafters.split(",") if d]
    for name in names or [args.drafters]:
        if name not in DRAFTERS:
            raise ValueError(f"--drafters: unknown drafter {name!r}; use {', '.join(DRAFTERS)}")
    if not 1 <= args.ngram_min_n <= args.ngram_max_n <= MAX_NGRAM_ORDER:
        raise ValueError(f"--ngram-min-n and --ngram-max-n need 1 <= min <= max <= {MAX_NGRAM_ORDER}, got "
                         f"{args.ngram_min_n} and {args.ngram_max_n}")
    limits = {name: TreeLimits(depth=args.depth, topk=1 if DRAFTER_TRAITS[name].chain_only else args.topk)
              for name in names}
    for name, lim in limits.items():  # the largest tree recorded must be one a step can afford
        StepConfig(drafter=name, depth=lim.depth, topk=lim.topk)
    try:
        grid = tuple(int(b) for b in args.grid.split(",")) if args.grid else ()
    except ValueError:
        raise ValueError(f"--grid must be a comma list of expert budgets, got {args.grid!r}") from None
    if any(b < 1 for b in grid) or list(grid) != sorted(set(grid)):
        raise ValueError(f"--grid budgets must be >= 1 and strictly increasing, got {args.grid!r}")
    groups = _prompt_groups(args)
    out = Path(args.out)
    files = {k: out / f"{k}.trace" for k in groups} if out.suffix != ".trace" else {None: out}
    return groups, limits, grid, files


def _prompt_groups(args) -> dict[str, list]:
    """kind -> its first --per-kind prompts; every kind asked for must have some."""
    from moetune.prompts import read_prompts

    prompts = read_prompts(args.prompts, "--prompts")
    kinds = [k for k in args.kinds.split(",") if k]
    if not kinds:
        raise ValueError(f"--kinds must name at least one prompt kind, got {args.kinds!r}")
    groups = {k: [p for p in prompts if p.get("kind") == k][:args.per_kind] for k in kinds}
    missing = [k for k, items in groups.items() if not items]
    if missing:
        found = sorted({str(p.get("kind")) for p in prompts})
        raise ValueError(f"--kinds: no prompts of kind {missing[0]!r} in {args.prompts}; found {', '.join(found)}")
    return groups


def _record(args, groups: dict, limits: dict, grid: tuple, files: dict) -> int:
    import torch

    from moetune.engine.drafters import make_drafter
    from moetune.engine.loader import load_draft, load_target, moe_shape
    from moetune.outputs import atomic_output
    from moetune.traces.profile import hardware
    from moetune.traces.schema import TraceMeta
    from moetune.traces.writer import TraceWriter

    torch.manual_seed(args.seed)
    target, tokenizer = load_target(args.target, args.device, args.dtype)
    shape = moe_shape(target)
    draft = load_draft(args.draft, tokenizer, args.device, args.dtype)[0] if "draft_model" in limits else None
    pool = {name: make_drafter(name, target, draft, args.ngram_max_n, args.ngram_min_n) for name in limits}
    e = shape.num_experts
    grid = grid or tuple(sorted({e // 4, e // 2, 3 * e // 4}))
    meta = TraceMeta(shape=shape, drafters=limits, router_top=args.router_top or shape.top_k, budget_grid=grid,
                     target=str(args.target), draft=str(args.draft), hardware=hardware(target.device),
                     moetune_version=__version__, seed=args.seed, ngram_max_n=args.ngram_max_n,
                     ngram_min_n=args.ngram_min_n, live_batch_size=args.batch_size)
    rid = 0
    for key, path in files.items():
        items = [(kind, item) for kind, its in groups.items() if key in (None, kind) for item in its]
        with atomic_output(path, keep_partial=True, label="moetune record") as tmp, TraceWriter(tmp, meta) as w:
            print(f"{path}: writing {tmp} until the recording completes")
            requests = [(rid + i, tokenizer(item["text"], add_special_tokens=False)["input_ids"], kind, item["text"])
                        for i, (kind, item) in enumerate(items)]
            for (r, _, kind, _), res in zip(requests, _live(w, target, pool, limits, grid, args, requests)):
                print(f"{path}: request {r} ({kind}): {res.positions} positions, live "
                      f"{res.live_goodput:.1f} tok/s, {res.mismatches} root mismatches, {res.seconds:.1f}s")
            rid += len(requests)
        print(f"wrote {path}: {path.stat().st_size} bytes")
    return 0


def _live(writer, target, pool: dict, limits: dict, grid: tuple, args, requests: list):
    """Each request's RecordedRequest as it is written: one at a time, or (--batch-size > 1) after their
    batched live run."""
    from moetune.traces.record import record_batch, record_request
    from moetune.traces.replay import make_policy

    if args.batch_size > 1:
        yield from record_batch(writer, target, pool, limits, make_policy(args.policy), requests, args.batch_size,
                                args.max_new_tokens, grid, args.router_top)
        return
    for rid, ids, kind, text in requests:
        yield record_request(writer, target, pool, limits, make_policy(args.policy), rid, ids, kind, text,
                             args.max_new_tokens, grid, args.router_top)
