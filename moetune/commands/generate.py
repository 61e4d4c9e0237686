"""`moetune generate`: plain greedy or sampled decoding with a target model (no speculation).

The baseline every speedup is measured against, and a quick check that a model loads and talks.
"""
from __future__ import annotations

import argparse
import time

from moetune import DEFAULT_TARGET
from moetune.errors import UserError
from moetune.step import Sampling


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default="def fibonacci(n):\n",
                   help="prompt text (default: a small Python function header)")
    p.add_argument("--target", default=str(DEFAULT_TARGET), help="model path or hub id (default: embedded target)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")


def main(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt.strip():
        raise UserError("the prompt is empty; pass some text to continue, e.g. moetune generate 'def f(x):'")
    Sampling(args.temperature, args.top_p)
    import torch

    from moetune.engine.loader import load_target

    model, tokenizer = load_target(args.target, device=args.device, dtype=args.dtype)
    device = next(model.parameters()).device
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=sample,
                             temperature=args.temperature if sample else None, top_p=args.top_p if sample else None,
                             top_k=None, pad_token_id=tokenizer.pad_token_id)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    print(f"\n[{len(new)} tokens in {seconds:.2f} s: {len(new) / seconds:.1f} tokens/s, "
          f"{'sampled' if sample else 'greedy'}, {device.type}]")
    return 0
