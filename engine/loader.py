"""Load a Hugging Face MoE target and a draft that shares its vocabulary, and read the target's MoE shape.

The engine supports exactly the families whose sparse blocks expose `.gate` (a top-k router) and
`.experts` in the transformers 5.x layout; anything else is refused here, early, with a clear message,
rather than failing deep inside verification.
"""
from __future__ import annotations

from pathlib import Path

import torch

from moetune.step import ModelShape

SUPPORTED = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """auto: CUDA when present, else CPU."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on CUDA, float32 on CPU (CPU half-precision matmuls are slow and inexact)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def _config(path_or_id):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(str(path_or_id))


def _load(path_or_id, device: str, dtype: str):
    from transformers import AutoModelForCausalLM
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=resolve_dtype(dtype, dev))
    return model.to(dev).eval()


def _tokenizer(path_or_id):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path_or_id))


def load_target(path_or_id: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) for a supported MoE causal LM, on `device` in `dtype`, in eval mode."""
    model_type = getattr(_config(path_or_id), "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"target {path_or_id} has model_type {model_type!r}; moetune supports the MoE "
                         f"families {SUPPORTED} (a dense model can only be a draft)")
    model = _load(path_or_id, device, dtype)
    moe_shape(model)
    return model, _tokenizer(path_or_id)


def load_draft(path_or_id: str | Path, target_tokenizer_or_vocab_size, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) for a draft whose token ids mean the same as the target's.

    A draft with another vocabulary would propose ids the target reads as different tokens, so a
    mismatch is an error rather than a silent loss of acceptance.
    """
    model = _load(path_or_id, device, dtype)
    tokenizer = _tokenizer(path_or_id) if (Path(str(path_or_id)) / "tokenizer_config.json").exists() else None
    ref = target_tokenizer_or_vocab_size
    n = model.get_output_embeddings().weight.shape[0]
    if isinstance(ref, int):
        if n != ref:
            raise ValueError(f"draft {path_or_id} has a vocabulary of {n} ids but the target has {ref}; "
                             "the draft must share the target's tokenizer")
    elif tokenizer is not None and tokenizer.get_vocab() != ref.get_vocab():
        raise ValueError(f"draft {path_or_id} uses a different tokenizer than the target; "
                         "speculative decoding needs identical token ids")
    elif n < len(ref):
        raise ValueError(f"draft {path_or_id} has {n} output ids but the target tokenizer has {len(ref)}")
    return model, tokenizer


def moe_blocks(model) -> list:
    """The sparse MoE blocks of `model` in layer order (dense layers, e.g. Qwen mlp_only_layers, skipped).

    A block counts when it has a `.gate` router and `.experts` in the transformers 5.x fused layout
    (gate_up_proj [E, 2I, H], down_proj [E, H, I]), the layout routing capture and budgeting rely on.
    """
    blocks = [layer.mlp for layer in getattr(getattr(model, "model", None), "layers", ())
              if hasattr(getattr(layer, "mlp", None), "gate")
              and hasattr(getattr(layer.mlp, "experts", None), "gate_up_proj")
              and hasattr(layer.mlp.experts, "down_proj")]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE layers with .gate/.experts.gate_up_proj (a dense "
                         f"model: expert budgets and routing need an MoE target, use budgets=None); "
                         f"supported families: {SUPPORTED}")
    return blocks


def moe_shape(model) -> ModelShape:
    """The target's MoE shape (L MoE layers, E experts, top-K, H, I) for policies, replay and budgets.

    Every MoE layer must share one shape: budgets, policies and the expert kernel assume it.
    """
    blocks = moe_blocks(model)
    shapes = {(int(b.experts.gate_up_proj.shape[0]), int(b.gate.top_k), int(b.experts.gate_up_proj.shape[2]),
               int(b.experts.down_proj.shape[2]), hasattr(b, "shared_expert")) for b in blocks}
    if len(shapes) != 1:
        raise ValueError(f"MoE layers differ in shape (E, K, H, I, shared) {sorted(shapes)}; moetune needs one "
                         f"shape for all MoE layers")
    (E, K, H, I, shared), = shapes
    return ModelShape(num_layers=len(blocks), num_experts=E, top_k=K, hidden_size=H, expert_intermediate_size=I,
                      shared_expert=shared)
