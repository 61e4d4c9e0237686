"""Tiny random-initialised models of every supported family, built from config (no weights needed)."""
from __future__ import annotations

import torch
from transformers import (MixtralConfig, OlmoeConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig,
                          AutoModelForCausalLM)

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
VOCAB = 128


def tiny_moe_config(family: str, vocab_size: int = VOCAB, num_experts: int = 8, top_k: int = 2,
                    layers: int = 2, hidden: int = 32):
    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=top_k,
                  eos_token_id=0, pad_token_id=1, bos_token_id=0, tie_word_embeddings=False)
    if family == "mixtral":
        return MixtralConfig(**common, num_local_experts=num_experts, intermediate_size=48)
    if family == "olmoe":
        return OlmoeConfig(**common, num_experts=num_experts, intermediate_size=48)
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**common, num_experts=num_experts, moe_intermediate_size=48,
                              shared_expert_intermediate_size=64, intermediate_size=64, decoder_sparse_step=1)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**common, num_experts=num_experts, moe_intermediate_size=48, intermediate_size=64,
                              head_dim=8, decoder_sparse_step=1, norm_topk_prob=True)
    raise ValueError(family)


def tiny_moe(family: str = "qwen3_moe", seed: int = 0, **kw):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(family, **kw), dtype=torch.float32)
    # Random init leaves routers near uniform; widen them so routing is decisive like a trained model's.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") and "shared" not in name:
                p.normal_(0.0, 1.0)
    return model.eval()


def tiny_dense(seed: int = 1, vocab_size: int = VOCAB, hidden: int = 32, layers: int = 1):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=256,
                      eos_token_id=0, pad_token_id=1, bos_token_id=0, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
