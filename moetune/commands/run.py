"""`moetune run`: speculative decoding on held-out prompts, measured against plain decoding in the same run.

Plain decoding runs first on the same prompts and settings, so the speedup compares like with like on
this machine right now. Flags only build a StepConfig (or name a policy); the config validates itself.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET, MODELS_DIR
from moetune.step import DRAFTERS, PLAIN, StepConfig


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=str(DEFAULT_TARGET), help="target path or hub id (default: embedded)")
    p.add_argument("--draft", default=str(DEFAULT_DRAFT), help="draft model path or hub id (default: embedded)")
    p.add_argument("--prompts", type=_positive, default=8, help="how many built-in held-out prompts (default 8)")
    p.add_argument("--prompts-file", default=str(MODELS_DIR / "prompts.json"),
                   help="JSON list of {kind, source, text} (default: the embedded held-out prompts)")
    p.add_argument("--max-new-tokens", type=_positive, default=64)
    p.add_argument("--drafter", choices=DRAFTERS, default="draft_model")
    p.add_argument("--depth", type=int, default=4, help="draft steps per tree (num speculative tokens)")
    p.add_argument("--topk", type=int, default=1, help="tree width: children per expanded node (1 = chain)")
    p.add_argument("--num-draft-tokens", type=int, default=None, help="node budget of a dynamic tree")
    p.add_argument("--policy", default=None,
                   help="a policy spec for moetune.policies.registry (e.g. 'adaptive'); overrides the static flags")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads for torch (default: torch's)")


def _config(args) -> StepConfig:
    return StepConfig(drafter=args.drafter, depth=args.depth, topk=args.topk,
                      num_draft_tokens=args.num_draft_tokens)


def _policy(args):
    """The seam for adaptive policies: a --policy spec is resolved by the policies registry."""
    if args.policy is None:
        return None
    try:
        from moetune.policies.registry import make_policy
    except ImportError as e:
        raise ValueError(f"--policy needs moetune.policies.registry, which is not importable ({e}); "
                         "use the static flags --drafter/--depth/--topk instead") from e
    return make_policy(args.policy)


def _prompts(path: str, n: int) -> list[str]:
    file = Path(path)
    if not file.exists():
        raise ValueError(f"prompts file {file} not found; pass --prompts-file")
    texts = [p["text"] for p in json.loads(file.read_text())]
    if not texts:
        raise ValueError(f"prompts file {file} has no prompts")
    return [texts[i % len(texts)] for i in range(n)]


def main(args: argparse.Namespace) -> int:
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    config, policy = _config(args), _policy(args)
    prompts = _prompts(args.prompts_file, args.prompts)
    import torch
    from tqdm import tqdm

    from moetune.engine.drafters import DraftModelDrafter
    from moetune.engine.generate import generate
    from moetune.engine.loader import load_draft, load_target

    if args.threads:
        torch.set_num_threads(args.threads)
    target, tokenizer = load_target(args.target, device=args.device, dtype=args.dtype)
    drafters = {}
    if policy is not None or config.drafter == "draft_model":
        draft, _ = load_draft(args.draft, tokenizer, device=args.device, dtype=args.dtype)
        drafters["draft_model"] = DraftModelDrafter(draft)
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  seed=args.seed)
    generate(target, tokenizer, prompts[:1], config=PLAIN, max_new_tokens=4)  # warm-up, not timed
    runs = {}
    with tqdm(total=2 * len(prompts), desc="moetune run", unit="prompt") as bar:
        for name, kw in (("plain", dict(config=PLAIN)),
                         (args.policy or "speculative", dict(drafter=drafters, policy=policy,
                                                             config=None if policy else config))):
            runs[name] = []
            for prompt in prompts:
                runs[name] += generate(target, tokenizer, [prompt], **kw, **common)
                bar.update(1)
    print(summary(runs, config if policy is None else None))
    return 0


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
        per_layer = [sum(s.unique_experts) / len(s.unique_experts) for s in steps if s.unique_experts]
        experts = sum(per_layer) / len(per_layer) if per_layer else 0.0
        rows.append(f"| {name} | {tokens} | {tps:.1f} | {tps / base if base else 0:.2f}x | {acc:.2f} | {experts:.1f} |")
    head = ["| run | tokens | tokens/s | speedup | mean accepted | unique experts/layer |",
            "|---|---|---|---|---|---|"]
    note = f"\nconfig: {config}" if config is not None else ""
    return "\n".join(head + rows) + note
