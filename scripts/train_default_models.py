"""Train the embedded default models: a Qwen3-MoE target and a dense Qwen3 draft.

Three steps, each rerunnable:
  data    corpus split, byte-level BPE tokenizer, token files, held-out prompts
  train   one model (--model target|draft), seeded; resumes from its last checkpoint; the draft can be
          distilled from the target (--teacher) after ordinary training (--init)
  export  bf16 safetensors + tokenizer into moetune/models/<name>

    python scripts/train_default_models.py data --out data
    python scripts/train_default_models.py train --model target --data data --minutes 60
    python scripts/train_default_models.py export --model target --data data

On a GPU the train step uses bf16 autocast; on CPU fp32. Checkpoints (model, optimizer, RNG, step)
are written every --ckpt-every steps so a killed run resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "moetune" / "models"
EOS, PAD = "<|endoftext|>", "<|pad|>"
VOCAB_SIZE = 4096


def target_config(vocab_size: int):
    from transformers import Qwen3MoeConfig

    # Fine-grained MoE: 32 experts, top-4, every layer sparse (like Qwen3-30B-A3B's 128/top-8, scaled).
    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_experts=32, num_experts_per_tok=4,
        moe_intermediate_size=80, intermediate_size=512, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, max_position_embeddings=2048, rope_theta=10000.0,
        tie_word_embeddings=True, router_aux_loss_coef=0.01, output_router_logits=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


def draft_config(vocab_size: int):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, intermediate_size=384, max_position_embeddings=2048,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )


# ----------------------------------------------------------------------------- data
def cmd_data(args) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = corpus.split_sources(corpus.iter_sources(Path(args.root) if args.root else None))
    stats = {s: {"files": len(v), "chars": sum(len(f.text) for f in v)} for s, v in splits.items()}

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((f.text for f in splits["train"]), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    fast.model_max_length = 2048
    fast.save_pretrained(out / "tokenizer")

    eos_id = tok.token_to_id(EOS)
    for split in ("train", "val"):
        ids: list[int] = []
        for enc in tok.encode_batch([f.text for f in splits[split]]):
            ids.extend(enc.ids)
            ids.append(eos_id)
        np.asarray(ids, dtype=np.uint16).tofile(out / f"{split}.bin")
        stats[split]["tokens"] = len(ids)
    prompts = corpus.build_prompts(splits["test"])
    corpus.write_prompts(out / "prompts.json", prompts)
    stats["test"]["prompts"] = len(prompts)
    stats["stdlib"] = str(args.root or corpus.stdlib_root())
    (out / "data.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats, indent=1))


# ----------------------------------------------------------------------------- train
def build_model(name: str, vocab_size: int):
    from transformers import AutoModelForCausalLM

    cfg = target_config(vocab_size) if name == "target" else draft_config(vocab_size)
    return AutoModelForCausalLM.from_config(cfg)


def batch(data: np.ndarray, rng: np.random.Generator, bsz: int, seq: int, device) -> torch.Tensor:
    starts = rng.integers(0, len(data) - seq - 1, size=bsz)
    x = np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int64)
    return torch.from_numpy(x).to(device)


@torch.no_grad()
def evaluate(model, data: np.ndarray, seq: int, device, n_windows: int = 256, bsz: int = 32) -> float:
    """Mean next-token loss (nats) over fixed, evenly spaced validation windows."""
    model.eval()
    starts = np.linspace(0, len(data) - seq - 2, n_windows).astype(np.int64)
    total, count = 0.0, 0
    for i in range(0, n_windows, bsz):
        x = torch.from_numpy(np.stack([data[s:s + seq + 1] for s in starts[i:i + bsz]]).astype(np.int64)).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
        total += loss.item()
        count += x[:, 1:].numel()
    model.train()
    return total / count


def cmd_train(args) -> None:
    data_dir = Path(args.data)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    train = np.fromfile(data_dir / "train.bin", dtype=np.uint16)
    val = np.fromfile(data_dir / "val.bin", dtype=np.uint16)
    vocab = json.loads((data_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    if args.init:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32).to(device)
    else:
        model = build_model(args.model, len(vocab) + 2).to(device)
    teacher = None
    if args.teacher:
        from transformers import AutoModelForCausalLM
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.bfloat16 if device.type == "cuda"
                                                       else torch.float32).to(device).eval()
    if device.type == "cuda" and args.model == "target":
        try:
            model.set_experts_implementation("grouped_mm")
        except (AttributeError, ValueError) as e:
            print("grouped_mm unavailable, eager experts:", e)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    ckpt = data_dir / f"ckpt_{args.model}.pt"
    log_path = data_dir / f"log_{args.model}.jsonl"
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "best_val": math.inf, "total_steps": args.steps}
    rng = np.random.default_rng(args.seed)
    if ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        if args.steps is not None:  # a longer schedule asked for on resume
            state["total_steps"] = args.steps
        rng.bit_generator.state = saved["rng"]
        print(f"resumed {args.model} at step {state['step']}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.2f}M parameters on {device}")

    def save_ckpt():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state,
                    "rng": rng.bit_generator.state}, ckpt)

    deadline = time.time() + args.minutes * 60
    t_run = time.time()
    model.train()
    while state["step"] < (state["total_steps"] or 10**9):
        if state["total_steps"] is None and state["step"] == 50:
            # Time-boxed run: fix the schedule's length once the speed is known.
            rate = 50 / (time.time() - t_run)
            state["total_steps"] = int(50 + rate * (deadline - time.time()) * 0.97)
            print(f"schedule fixed at {state['total_steps']} steps ({rate:.1f} steps/s)")
        total = state["total_steps"] or 10**6
        lr = args.lr * min(1.0, (state["step"] + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, state["step"] / total))))
        for g in opt.param_groups:
            g["lr"] = lr
        x = batch(train, rng, args.batch, args.seq, device)
        t0 = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(input_ids=x[:, :-1], labels=x[:, 1:].contiguous(), output_router_logits=args.model == "target") \
                if args.model == "target" else model(input_ids=x[:, :-1])
            logits = out.logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
            aux = getattr(out, "aux_loss", None)
            total_loss = loss + (model.config.router_aux_loss_coef * aux if aux is not None else 0.0)
            if teacher is not None:
                # Distillation: match the target's next-token distribution, which is what acceptance rewards.
                with torch.no_grad():
                    t_logp = torch.log_softmax(teacher(input_ids=x[:, :-1]).logits.float(), dim=-1)
                kl = torch.nn.functional.kl_div(torch.log_softmax(logits, dim=-1), t_logp, log_target=True,
                                                reduction="none").sum(-1).mean()
                total_loss = (1 - args.distill_weight) * total_loss + args.distill_weight * kl
        opt.zero_grad(set_to_none=True)
        total_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["tokens"] += x[:, 1:].numel()
        state["seconds"] += time.time() - t0
        if state["step"] % args.eval_every == 0 or time.time() > deadline:
            v = evaluate(model, val, args.seq, device)
            rec = {"step": state["step"], "tokens": state["tokens"], "seconds": round(state["seconds"], 1),
                   "train_loss": round(loss.item(), 4), "val_loss": round(v, 4), "lr": lr}
            print(json.dumps(rec), flush=True)
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            if v < state["best_val"]:
                state["best_val"] = v
                model.save_pretrained(data_dir / f"best_{args.model}", safe_serialization=True)
            save_ckpt()
        if time.time() > deadline:
            break
    save_ckpt()
    print(f"done {args.model}: step {state['step']}, best val {state['best_val']:.4f}")


# ----------------------------------------------------------------------------- export
def cmd_export(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_dir = Path(args.data)
    src = Path(args.src) if args.src else data_dir / f"best_{args.model}"
    dst = Path(args.dst) if args.dst else MODELS_DIR / args.model
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(dst, safe_serialization=True, max_shard_size="12MB")
    AutoTokenizer.from_pretrained(data_dir / "tokenizer").save_pretrained(dst)
    for name in ("prompts.json", f"log_{args.model}.jsonl", "data.json"):
        if (data_dir / name).exists():
            (dst.parent / name).write_text((data_dir / name).read_text())
    print(f"exported {src} -> {dst}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", default="data")
    d.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    d.add_argument("--root", default=None, help="source tree to use instead of the stdlib (tests)")
    t = sub.add_parser("train")
    t.add_argument("--model", choices=["target", "draft"], required=True)
    t.add_argument("--data", default="data")
    t.add_argument("--device", default="auto")
    t.add_argument("--minutes", type=float, default=60.0)
    t.add_argument("--steps", type=int, default=None, help="schedule length; default: fitted to --minutes")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seq", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--eval-every", type=int, default=250)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", default=None, help="warm-start from a save_pretrained folder")
    t.add_argument("--teacher", default=None, help="distil from this model (the target) as well as the data")
    t.add_argument("--distill-weight", type=float, default=0.8, help="weight of KL(teacher || model) in the loss")
    e = sub.add_parser("export")
    e.add_argument("--model", choices=["target", "draft"], required=True)
    e.add_argument("--data", default="data")
    e.add_argument("--src", default=None, help="a save_pretrained folder; default data/best_<model>")
    e.add_argument("--dst", default=None, help="output folder; default moetune/models/<model>")
    args = p.parse_args(argv)
    {"data": cmd_data, "train": cmd_train, "export": cmd_export}[args.cmd](args)


if __name__ == "__main__":
    main()
