"""Side-by-side decoding speed on held-out prompts, in one process: plain decoding, HF assisted
generation (draft model, constant and heuristic schedules; prompt lookup), and moetune's chain and
tree configurations with each drafter.

    python bench/bench_engine.py [--prompts 12] [--max-new-tokens 96] [--device cpu] [--out bench/results]

Writes bench/results/engine_<device>.json and .md. Every method decodes the same prompts greedily;
each method's output is checked against plain greedy decoding (lossless), and speed is total generated
tokens over total decode wall time. Methods run in an interleaved order per prompt, so slow drifts of
the machine (other load, clocks) spread over all methods instead of biasing one.
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
from moetune.engine.generate import generate
from moetune.engine.loader import load_draft, load_target
from moetune.step import PLAIN, StepConfig

MOETUNE = {
    "moetune plain": ("none", PLAIN),
    "moetune chain k=4 (draft)": ("draft_model", StepConfig(depth=4)),
    "moetune chain k=6 (draft)": ("draft_model", StepConfig(depth=6)),
    "moetune tree d=5 topk=2 n=12 (draft)": ("draft_model", StepConfig(depth=5, topk=2, num_draft_tokens=12)),
    "moetune tree d=6 topk=3 n=24 (draft)": ("draft_model", StepConfig(depth=6, topk=3, num_draft_tokens=24)),
    "moetune chain k=6 (ngram)": ("ngram", StepConfig(drafter="ngram", depth=6)),
    "moetune chain k=3 (self)": ("self", StepConfig(drafter="self", depth=3)),
}


def hf_methods(draft):
    def assisted(schedule: str, k: int):
        def run(target, ids, n):
            draft.generation_config.num_assistant_tokens = k
            draft.generation_config.num_assistant_tokens_schedule = schedule
            draft.generation_config.assistant_confidence_threshold = 0.0
            return target.generate(ids, assistant_model=draft, max_new_tokens=n, do_sample=False, pad_token_id=1)
        return run

    def lookup(target, ids, n):
        return target.generate(ids, prompt_lookup_num_tokens=6, max_new_tokens=n, do_sample=False, pad_token_id=1)

    def plain(target, ids, n):
        return target.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=1)

    return {"HF generate (plain)": plain, "HF assisted, constant k=4": assisted("constant", 4),
            "HF assisted, heuristic": assisted("heuristic", 5), "HF prompt lookup k=6": lookup}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: least noise on a shared box)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    target, tok = load_target(DEFAULT_TARGET, device=args.device)
    draft, _ = load_draft(DEFAULT_DRAFT, tok, device=args.device)
    device = next(target.parameters()).device
    prompts = json.loads((Path(DEFAULT_TARGET).parent / "prompts.json").read_text())
    step = max(1, len(prompts) // args.prompts)
    prompts = prompts[::step][:args.prompts]
    hf = hf_methods(draft)
    names = list(hf) + list(MOETUNE)
    tokens = {m: 0 for m in names}
    seconds = {m: 0.0 for m in names}
    accepted = {m: [] for m in MOETUNE}
    lossless = {m: True for m in names}
    warm = tok(prompts[0]["text"], return_tensors="pt", add_special_tokens=False).input_ids.to(device)
    for m in names:  # every path once, so first-call costs (kernel selection, JIT) are not timed
        if m in hf:
            with torch.inference_mode():
                hf[m](target, warm, 8)
        else:
            generate(target, tok, [warm[0].tolist()], drafter=draft if MOETUNE[m][0] == "draft_model" else None,
                     config=MOETUNE[m][1], max_new_tokens=8)
    for i, p in enumerate(prompts):
        ids = tok(p["text"], return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        outs = {}
        order = names[i % len(names):] + names[:i % len(names)]
        for m in order:
            sync(device)
            t0 = time.perf_counter()
            if m in hf:
                with torch.inference_mode():
                    out = hf[m](target, ids, args.max_new_tokens)[0, ids.shape[1]:].tolist()
            else:
                drafter, cfg = MOETUNE[m]
                res = generate(target, tok, [ids[0].tolist()], drafter=draft if drafter == "draft_model" else None,
                               config=cfg, max_new_tokens=args.max_new_tokens)[0]
                out = res.token_ids
                accepted[m].extend(s.accepted for s in res.steps)
            sync(device)
            seconds[m] += time.perf_counter() - t0
            tokens[m] += len(out)
            outs[m] = out
        for m, out in outs.items():
            lossless[m] &= out == outs["HF generate (plain)"]
        print(f"prompt {i + 1}/{len(prompts)} done", flush=True)
    base = tokens["moetune plain"] / seconds["moetune plain"]
    hf_best = max(tokens[m] / seconds[m] for m in hf if "assisted" in m)
    rows = []
    for m in names:
        tps = tokens[m] / seconds[m]
        rows.append({"method": m, "tokens_per_s": round(tps, 1), "speedup_vs_plain": round(tps / base, 3),
                     "vs_best_hf_assisted": round(tps / hf_best, 3),
                     "mean_accepted": round(sum(accepted[m]) / len(accepted[m]), 3) if accepted.get(m) else None,
                     "lossless": lossless[m], "tokens": tokens[m]})
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
              "torch_threads": torch.get_num_threads(), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
              "command": "python bench/bench_engine.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "load_average_1min": round(os.getloadavg()[0], 2), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"engine_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = table(result)
    (out / f"{stem}.md").write_text(md)
    print(md)
    return result


def table(result: dict) -> str:
    lines = [f"Device: {result['device']}; {result['prompts']} held-out prompts x {result['max_new_tokens']} "
             f"new tokens, greedy, {result['torch_threads']} torch thread(s).", "",
             f"Reproduce: `{result['command'].strip()}`", "",
             "| method | tokens/s | vs plain | vs best HF assisted | mean accepted | lossless |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        acc = f"{r['mean_accepted']:.2f}" if r["mean_accepted"] is not None else "-"
        lines.append(f"| {r['method']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_plain']:.2f}x | "
                     f"{r['vs_best_hf_assisted']:.2f}x | {acc} | {'yes' if r['lossless'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
