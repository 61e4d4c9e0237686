"""Budgeted-MoE kernel on a GPU: Triton kernel vs PyTorch reference vs HF's expert paths, real MoE shapes.

For each shape (OLMoE-1B-7B, Qwen3-30B-A3B), tokens T and budget B it draws skewed random routing (a
popularity bias per expert, like trained routers), applies the budget (prob_sum selection, reselect
substitution, so every slot lands on a kept expert and HF's modules can run the same routing), and
times, in bf16, one expert layer computing it:
  kernel      moetune.engine.kernels.budgeted_moe (Triton, selected experts only)
  reference   moetune.engine.kernels.reference (PyTorch, one matmul pair per selected expert)
  hf_eager    a real transformers Qwen3MoeExperts module, experts_implementation="eager"
  hf_grouped  the same module with experts_implementation="grouped_mm" (when this transformers has it)
  selection   the budget's selection + substitution overhead (scores, top-B, re-routing)
Eager times (CUDA events around one Python call) include the host's launch overhead, which dominates at
small T; kernel and selection never sync with the host, so they are also timed as CUDA-graph replays
(kernel_graph_ms, selection_graph_ms: device time, what a graph-captured verification step pays).
B = E is "no budget" (every expert the tokens hit is computed). It also checks kernel == reference and
kernel == HF eager on CUDA (max relative error, printed and recorded). Writes gpu_kernel.json and
gpu_kernel.md into --out and prints a one-line summary (kernel vs HF grouped_mm at T = 1, 8, 32, B = E);
finishes in about a minute on an H100.

Reproduce: .venv/bin/python bench/gpu_kernel.py --out bench/results
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # name: (H hidden, I expert intermediate, E experts, K top-k)
    "OLMoE-1B-7B": (2048, 1024, 64, 8),
    "Qwen3-30B-A3B": (2048, 768, 128, 8),
}
TOKENS = (1, 2, 4, 8, 16, 32, 64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu_kernel.json and gpu_kernel.md")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    return p.parse_args(argv)


def time_ms(fn, reps: int, warmup: int) -> float:
    """Median milliseconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, reps: int, warmup: int) -> float | None:
    """Median milliseconds of one replay of fn() captured in a CUDA graph; None (with a warning) when fn
    cannot be captured, e.g. because it syncs with the host."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:
        print(f"warning: CUDA graph capture failed: {exc}", file=sys.stderr)
        return None
    return time_ms(graph.replay, reps, warmup)


def hf_experts(H, I, E, K, gate_up, down):
    """A real transformers experts module sharing our weights (Qwen3-MoE's; OLMoE's computes the same)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    module = Qwen3MoeExperts(cfg).to(device=gate_up.device, dtype=gate_up.dtype)
    module.gate_up_proj.data = gate_up
    module.down_proj.data = down
    return module, cfg


def set_impl(cfg, impl: str) -> str | None:
    """Switch the HF experts implementation; the reason when this transformers cannot."""
    try:
        cfg._experts_implementation = impl
    except (AttributeError, KeyError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def routing(T, E, K, gen, device):
    """Skewed random routing: probs [T, E], top-k weights [T, K] (normalised), top-k ids [T, K]."""
    bias = torch.randn(E, generator=gen) * 1.5
    logits = (torch.randn(T, E, generator=gen) + bias).to(device)
    probs = torch.softmax(logits, -1)
    w, idx = torch.topk(probs, K, dim=-1)
    return probs, w / w.sum(-1, keepdim=True), idx


def rel_error(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


def run(args, device: torch.device = torch.device("cuda")) -> dict:
    from moetune.engine import selection
    from moetune.engine.kernels.budgeted_moe import budgeted_moe
    from moetune.engine.kernels.reference import budgeted_moe_reference
    dtype = torch.bfloat16
    tokens = [int(t) for t in args.tokens.split(",")]
    rows, checks = [], []
    for name, (H, I, E, K) in SHAPES.items():
        gen = torch.Generator().manual_seed(0)
        gate_up = (torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5).to(device, dtype)
        down = (torch.randn(E, H, I, generator=gen) / I ** 0.5).to(device, dtype)
        module, cfg = hf_experts(H, I, E, K, gate_up, down)
        budgets = sorted({K, E // 4, E // 2, 3 * E // 4, E})
        for T in tokens:
            x = (torch.randn(T, H, generator=gen)).to(device, dtype)
            probs, w, idx = routing(T, E, K, gen, device)
            for B in budgets:
                def select():
                    scores = selection.selection_scores(probs, idx, "prob_sum")
                    return selection.substitute(probs, idx, w, scores, B, "reselect", normalized=True)

                r = select()
                ids, rw = r.expert_ids, r.weights.to(dtype)
                unique = int(selection.hit_mask(idx, E).any(0).sum())
                kept = int(selection.hit_mask(ids, E).any(0).sum())
                row = {"shape": name, "H": H, "I": I, "E": E, "K": K, "tokens": T, "budget": B,
                       "unique_experts": unique, "computed_experts": kept,
                       "selection_ms": time_ms(select, args.reps, args.warmup),
                       "kernel_ms": time_ms(lambda: budgeted_moe(x, ids, rw, gate_up, down, r.selected),
                                            args.reps, args.warmup),
                       "selection_graph_ms": graph_ms(select, args.reps, args.warmup),
                       "kernel_graph_ms": graph_ms(lambda: budgeted_moe(x, ids, rw, gate_up, down, r.selected),
                                                   args.reps, args.warmup),
                       "reference_ms": time_ms(lambda: budgeted_moe_reference(x, ids, rw, gate_up, down, r.selected),
                                               args.reps, args.warmup)}
                for impl in ("eager", "grouped_mm"):
                    why = set_impl(cfg, impl)
                    key = "hf_eager_ms" if impl == "eager" else "hf_grouped_ms"
                    row[key] = None if why else time_ms(lambda: module(x, ids, rw), args.reps, args.warmup)
                    if why:
                        row[key + "_unavailable"] = why
                weight_bytes = kept * 3 * I * H * gate_up.element_size()
                row["kernel_weight_GBps"] = weight_bytes / (row["kernel_ms"] * 1e-3) / 1e9
                row["kernel_graph_weight_GBps"] = (weight_bytes / (row["kernel_graph_ms"] * 1e-3) / 1e9
                                                   if row["kernel_graph_ms"] else None)
                rows.append(row)
                if B in (K, E) and T in (tokens[0], tokens[-1]):
                    out = budgeted_moe(x, ids, rw, gate_up, down, r.selected)
                    set_impl(cfg, "eager")
                    checks.append({"shape": name, "tokens": T, "budget": B,
                                   "kernel_vs_reference": rel_error(out, budgeted_moe_reference(
                                       x, ids, rw, gate_up, down, r.selected)),
                                   "kernel_vs_hf_eager": rel_error(out, module(x, ids, rw))})
        del gate_up, down, module
        torch.cuda.empty_cache()
    return {"rows": rows, "checks": checks}


def markdown(meta, res) -> str:
    def ms(v):
        return "n/a" if v is None else f"{v:.3f}"

    def gbps(v):
        return "n/a" if v is None else f"{v:.0f}"
    lines = [f"# Budgeted MoE kernel ({meta['device']}, bf16, torch {meta['torch']}, triton {meta['triton']}, "
             f"transformers {meta['transformers']})", "", f"Reproduce: `{meta['command']}`", "",
             "Correctness on CUDA (max |a - b| / max |b|; documented bf16 tolerance 2e-2):", "",
             "| shape | T | B | kernel vs reference | kernel vs HF eager |", "|---|---|---|---|---|"]
    lines += [f"| {c['shape']} | {c['tokens']} | {c['budget']} | {c['kernel_vs_reference']:.2e} | "
              f"{c['kernel_vs_hf_eager']:.2e} |" for c in res["checks"]]
    lines += ["", "Times in ms (median of CUDA-event timings); B = E computes every expert hit.", "",
              "| shape | T | B | unique hit | computed | selection | selection graph | kernel | kernel graph "
              "| reference | HF eager | HF grouped_mm | kernel GB/s | kernel graph GB/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['budget']} | {r['unique_experts']} | "
                     f"{r['computed_experts']} | {ms(r['selection_ms'])} | {ms(r['selection_graph_ms'])} | "
                     f"{ms(r['kernel_ms'])} | {ms(r['kernel_graph_ms'])} | {ms(r['reference_ms'])} | "
                     f"{ms(r['hf_eager_ms'])} | {ms(r['hf_grouped_ms'])} | {r['kernel_weight_GBps']:.0f} | "
                     f"{gbps(r['kernel_graph_weight_GBps'])} |")
    return "\n".join(lines)


def summary(res, tokens=(1, 8, 32)) -> str:
    """One line: per shape, at B = E and T in `tokens`, kernel eager / graph against HF grouped_mm (ms)."""
    def ms(v):
        return "n/a" if v is None else f"{v:.3f}"
    parts = []
    for name in SHAPES:
        rows = {r["tokens"]: r for r in res["rows"] if r["shape"] == name and r["budget"] == r["E"]}
        parts.append(f"{name} " + ", ".join(
            f"T={t} {ms(rows[t]['kernel_ms'])}/{ms(rows[t]['kernel_graph_ms'])} vs {ms(rows[t]['hf_grouped_ms'])}"
            for t in tokens if t in rows))
    return "summary (B=E, ms, kernel eager/graph vs HF grouped_mm eager): " + " | ".join(parts)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernel.py needs a CUDA GPU")
        return 1
    import transformers
    import triton
    t0 = time.perf_counter()
    res = run(args)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "seconds": round(time.perf_counter() - t0, 1),
            "command": " ".join(shlex.quote(a) for a in ["python", "bench/gpu_kernel.py", *(argv or sys.argv[1:])])}
    for c in res["checks"]:
        print(f"check {c['shape']} T={c['tokens']} B={c['budget']}: kernel vs reference max rel err "
              f"{c['kernel_vs_reference']:.2e}, vs HF eager {c['kernel_vs_hf_eager']:.2e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_kernel.json").write_text(json.dumps({"meta": meta, **res}, indent=1))
    text = markdown(meta, res)
    (out / "gpu_kernel.md").write_text(text + "\n")
    print(text)
    print(summary(res))
    worst = max(c["kernel_vs_reference"] for c in res["checks"])
    return 0 if worst <= 2e-2 else 2


if __name__ == "__main__":
    sys.exit(main())
