"""Measure the embedded default models and write moetune/models/MODEL_CARD.md (+ model_card.json).

    python scripts/model_card.py [--data data] [--tokens 64]

Every figure in the card comes from this script: shapes from the configs, training tokens and time
from the training logs, validation losses recomputed on the held-out validation split (rebuilt with
`train_default_models.py data` if missing), greedy chain acceptance and routing statistics measured on
the held-out test prompts (moetune/models/prompts.json).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "moetune" / "models"
WINDOWS = (1, 4, 8, 16, 32)
MAX_K = 6


def val_loss(model, data: np.ndarray, seq: int = 256, n_windows: int = 64) -> float:
    starts = np.linspace(0, len(data) - seq - 2, n_windows).astype(np.int64)
    x = torch.from_numpy(np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int64))
    total = 0.0
    with torch.inference_mode():
        for i in range(0, n_windows, 16):
            xb = x[i:i + 16]
            logits = model(input_ids=xb[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), xb[:, 1:].reshape(-1),
                                                       reduction="sum").item()
    return total / (n_windows * seq)


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def active_params(model) -> int:
    """Parameters one token touches: everything but the experts it is not routed to."""
    cfg = model.config
    total = params(model)
    if not hasattr(cfg, "num_experts"):
        return total
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return total - cfg.num_hidden_layers * (cfg.num_experts - cfg.num_experts_per_tok) * per_expert


def chain_acceptance(target, draft, prompt_ids: list[torch.Tensor], n_tokens: int) -> dict:
    """Mean accepted length per step of greedy chain speculation with k = 1..MAX_K drafted tokens.

    Greedy speculative output equals the target's greedy output, so for each position p along it the
    draft's k-token greedy rollout is a prefix of its MAX_K-token rollout and the accepted length is
    min(run of matches, k) exactly; stepping p by accepted + 1 replays real chain decoding.
    """
    per_k = {k: [] for k in range(1, MAX_K + 1)}
    for ids in prompt_ids:
        with torch.inference_mode():
            out = target.generate(ids, max_new_tokens=n_tokens, do_sample=False, pad_token_id=1)
        gen = out[0, ids.shape[1]:]
        runs = []
        for p in range(len(gen)):
            ctx = torch.cat([ids[0], gen[:p]]).unsqueeze(0)
            with torch.inference_mode():
                d = draft.generate(ctx, max_new_tokens=MAX_K, do_sample=False, pad_token_id=1)[0, ctx.shape[1]:]
            ref = gen[p:p + MAX_K]
            n = min(len(d), len(ref))  # the draft may stop early at EOS
            m = (d[:n] == ref[:n]).int()
            runs.append(int(m.cumprod(0).sum()))
        for k in per_k:
            p = 0
            while p < len(runs):
                a = min(runs[p], k)
                per_k[k].append(a)
                p += a + 1
    return {k: float(np.mean(v)) for k, v in per_k.items()}


def routing(target, texts: list[torch.Tensor]) -> list[np.ndarray]:
    """Top-k expert ids per layer for every token of every text: a list (per text) of [L, T, K]."""
    from moetune.engine.routing import capture_routing

    out = []
    for ids in texts:
        with torch.inference_mode(), capture_routing(target) as r:
            target(input_ids=ids)
        out.append(torch.stack([lr.top_k_index for lr in r.layers]).cpu().numpy())
    return out


def expert_stats(routes: list[np.ndarray], num_experts: int, top_k: int) -> dict:
    L = routes[0].shape[0]
    load = np.zeros((L, num_experts))
    for r in routes:
        for layer in range(L):
            load[layer] += np.bincount(r[layer].ravel(), minlength=num_experts)
    share = load / load.sum(axis=1, keepdims=True)
    srt = -np.sort(-share, axis=1)
    entropy = -(share * np.log(np.clip(share, 1e-12, None))).sum(axis=1) / np.log(num_experts)
    unique = {}
    for w in WINDOWS:
        vals = np.zeros(L)
        n = 0
        for r in routes:
            T = r.shape[1]
            for s in range(0, T - w + 1, max(1, w // 2)):
                vals += [len(np.unique(r[layer, s:s + w])) for layer in range(L)]
                n += 1
        unique[w] = {"per_layer": (vals / n).round(2).tolist(), "mean": round(float(vals.mean() / n), 2),
                     "iid": round(num_experts * (1 - (1 - top_k / num_experts) ** w), 2)}
    return {"top1_share": srt[:, 0].round(3).tolist(), "top4_share": srt[:, :4].sum(1).round(3).tolist(),
            "top8_share": srt[:, :8].sum(1).round(3).tolist(), "min_share": srt[:, -1].round(4).tolist(),
            "norm_entropy": entropy.round(3).tolist(), "unique": unique}


def training_summary(log_name: str) -> dict:
    path = MODELS / log_name
    if not path.exists():
        return {}
    log = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    best = min(log, key=lambda r: r["val_loss"])
    return {"steps": log[-1]["step"], "tokens": log[-1]["tokens"], "train_seconds": log[-1]["seconds"],
            "best_step": best["step"], "best_val_loss_bf16_autocast": best["val_loss"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO / "data"))
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens generated per prompt")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    data = Path(args.data)
    if not (data / "val.bin").exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "train_default_models.py"), "data", "--out", str(data)],
                       check=True)
    target = AutoModelForCausalLM.from_pretrained(MODELS / "target", dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(MODELS / "draft", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(MODELS / "target")
    val = np.fromfile(data / "val.bin", dtype=np.uint16)
    prompts = json.loads((MODELS / "prompts.json").read_text())
    ids = [tok(p["text"], return_tensors="pt").input_ids for p in prompts]
    cfg = target.config
    card = {
        "target": {"class": type(target).__name__, "params": params(target), "active_params": active_params(target),
                   "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "experts": cfg.num_experts,
                   "top_k": cfg.num_experts_per_tok, "expert_intermediate": cfg.moe_intermediate_size,
                   "vocab": cfg.vocab_size, "val_loss": round(val_loss(target, val), 4),
                   "training": training_summary("log_target.jsonl")},
        "draft": {"class": type(draft).__name__, "params": params(draft), "active_params": params(draft),
                  "layers": draft.config.num_hidden_layers, "hidden": draft.config.hidden_size,
                  "vocab": draft.config.vocab_size, "val_loss": round(val_loss(draft, val), 4),
                  "training": training_summary("log_draft.jsonl"),
                  "distillation": training_summary("log_draft_distill.jsonl")},
        "data": json.loads((MODELS / "data.json").read_text()),
        "prompts": {k: sum(p["kind"] == k for p in prompts) for k in ("repetitive", "code", "docstring")},
    }
    card["chain_acceptance"] = chain_acceptance(target, draft, ids, args.tokens)
    texts = [torch.cat([i[0], target.generate(i, max_new_tokens=args.tokens, do_sample=False, pad_token_id=1)[0, i.shape[1]:]]).unsqueeze(0)
             for i in ids]
    card["experts"] = expert_stats(routing(target, texts), cfg.num_experts, cfg.num_experts_per_tok)
    (MODELS / "model_card.json").write_text(json.dumps(card, indent=1) + "\n")
    (MODELS / "MODEL_CARD.md").write_text(render(card))
    print(render(card))


def render(c: dict) -> str:
    t, d, e = c["target"], c["draft"], c["experts"]
    lines = [
        "# Embedded default models", "",
        "Made by `scripts/train_default_models.py` (trained on an NVIDIA H100 with `bash scripts/gpu_train.sh 8 4`) "
        "and measured by `python scripts/model_card.py`. Corpus: the local Python standard-library sources "
        f"(`{c['data']['stdlib']}`), split by a hash of each file's path into train / validation / test "
        f"({c['data']['train']['files']} / {c['data']['val']['files']} / {c['data']['test']['files']} files); "
        "test files are held out as benchmark prompts and never trained on. Tokenizer: byte-level BPE, "
        f"{t['vocab']} ids, shared by both models.", "",
        "| | target | draft |", "|---|---|---|",
        f"| class | `{t['class']}` | `{d['class']}` |",
        f"| layers x hidden | {t['layers']} x {t['hidden']} | {d['layers']} x {d['hidden']} |",
        f"| experts | {t['experts']} per layer, top-{t['top_k']}, intermediate {t['expert_intermediate']} | dense |",
        f"| parameters (total / active per token) | {t['params'] / 1e6:.2f}M / {t['active_params'] / 1e6:.2f}M | "
        f"{d['params'] / 1e6:.2f}M / {d['active_params'] / 1e6:.2f}M |",
        f"| training tokens (steps) | {t['training']['tokens'] / 1e6:.1f}M ({t['training']['steps']}) | "
        f"{d['training']['tokens'] / 1e6:.1f}M ({d['training']['steps']}) |",
        f"| training time | {t['training']['train_seconds']:.0f} s | {d['training']['train_seconds']:.0f} s |",
        f"| checkpoint kept (best validation) | step {t['training']['best_step']} | step {d['training']['best_step']} |",
        *([f"| distillation from the target (KL 0.8 + CE 0.2, `scripts/gpu_distill.sh`) | - | "
           f"{d['distillation']['tokens'] / 1e6:.1f}M tokens, {d['distillation']['steps']} steps, "
           f"{d['distillation']['train_seconds']:.0f} s |"] if d.get("distillation") else []),
        f"| validation loss, nats/token (shipped bf16 weights, fp32 CPU) | **{t['val_loss']:.3f}** | **{d['val_loss']:.3f}** |",
        "", f"The target is {d['val_loss'] - t['val_loss']:.2f} nats better than the draft on validation. "
        "Both overfit the 8M-token corpus late in training, so the best-validation checkpoint is shipped.", "",
        "## Greedy chain acceptance of the draft (held-out prompts)",
        f"Mean accepted draft tokens per step with a chain of k drafted tokens, over {sum(c['prompts'].values())} "
        "held-out prompts (" + ", ".join(f"{v} {k}" for k, v in c["prompts"].items()) + "), greedy decoding:", "",
        "| k | " + " | ".join(str(k) for k in c["chain_acceptance"]) + " |",
        "|---|" + "---|" * len(c["chain_acceptance"]),
        "| accepted / step | " + " | ".join(f"{v:.2f}" for v in c["chain_acceptance"].values()) + " |", "",
        "## Expert load per layer (top-k assignments on held-out prompts and continuations)", "",
        "| layer | top-1 expert share | top-4 share | top-8 share | least-used share | normalised entropy |",
        "|---|---|---|---|---|---|",
    ]
    for i in range(len(e["top1_share"])):
        lines.append(f"| {i} | {e['top1_share'][i]:.3f} | {e['top4_share'][i]:.3f} | {e['top8_share'][i]:.3f} | "
                     f"{e['min_share'][i]:.4f} | {e['norm_entropy'][i]:.3f} |")
    lines += ["", f"Uniform load would give each expert {1 / t['experts']:.3f} and entropy 1.0.", "",
              "## Unique experts per layer touched by a window of consecutive tokens", "",
              "| window (tokens) | " + " | ".join(str(w) for w in e["unique"]) + " |",
              "|---|" + "---|" * len(e["unique"]),
              "| observed, mean over layers | " + " | ".join(f"{v['mean']:.1f}" for v in e["unique"].values()) + " |",
              "| i.i.d. prediction E(1-(1-K/E)^t) | " + " | ".join(f"{v['iid']:.1f}" for v in e["unique"].values()) + " |"]
    for i in range(len(e["top1_share"])):
        lines.append(f"| layer {i} | " + " | ".join(f"{v['per_layer'][i]:.1f}" for v in e["unique"].values()) + " |")
    lines += ["", "Load with `AutoModelForCausalLM.from_pretrained(moetune.DEFAULT_TARGET)` (or `DEFAULT_DRAFT`), offline.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
