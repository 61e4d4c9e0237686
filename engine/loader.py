"""Load a Hugging Face MoE target and a draft that shares its vocabulary, and read the target's MoE shape.

The engine supports exactly the families whose sparse blocks expose `.gate` (a top-k router) and
`.experts` in the transformers 5.x layout; anything else is refused here, early, with a clear message,
rather than failing deep inside verification. A local folder is checked before transformers reads it
(config.json, weights present and not truncated, weights matching the config), and whatever transformers
or the hub raise for a model they cannot provide becomes a UserError naming the flag and path.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch
from huggingface_hub.errors import EntryNotFoundError, StrictDataclassError
from safetensors import SafetensorError, safe_open

from moetune.errors import UserError, read_json
from moetune.step import ModelShape

SUPPORTED = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # the form of a hub repo id ("org/name" or "name")
WEIGHTS = ("*.safetensors", "pytorch_model*.bin")
FIX = "pass a local model folder with config.json and *.safetensors, or a hub id when online"
# what transformers and the hub raise for a model they cannot read or fetch (OSError covers the hub's
# connection and not-found errors, ValueError an unknown model_type)
LOAD_ERRORS = (OSError, ValueError, EntryNotFoundError, StrictDataclassError, SafetensorError)


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


def check_model_path(path_or_id: str | Path, flag: str) -> bool:
    """True for a local model folder that looks loadable, False for a hub id; else a UserError naming
    `flag` and the path. Checks what transformers would otherwise report as a traceback or a garbled
    message: a missing path, a file, no or unreadable config.json, no weights, a truncated safetensors."""
    text, path = str(path_or_id), Path(str(path_or_id)).expanduser()
    what = f"{flag} {text}"
    if not path.exists():
        if HUB_ID.fullmatch(text) and "--" not in text and ".." not in text:
            return False
        raise UserError(f"{what}: no such directory; {FIX}")
    if not path.is_dir():
        raise UserError(f"{what}: is a file, not a model folder; {FIX}")
    if not (path / "config.json").is_file():
        raise UserError(f"{what}: no config.json in this folder; {FIX}")
    config = read_json(path / "config.json", f"{what}: config.json", "pass the config.json saved with the model")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise UserError(f"{what}: config.json has no \"model_type\"; pass the config.json saved with the model")
    weights = sorted(f for pattern in WEIGHTS for f in path.glob(pattern))
    if not weights:
        raise UserError(f"{what}: no weights (*.safetensors or pytorch_model*.bin) in this folder; {FIX}")
    for file in weights:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise UserError(f"{what}: {file.name} is damaged or truncated ({e}); save or download the "
                                f"weights again") from None
    return True


@contextmanager
def _reading(path_or_id, flag: str, local: bool):
    """Turn what transformers or the hub raise for a model they cannot provide into a UserError."""
    try:
        yield
    except LOAD_ERRORS as e:
        cause = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if local:
            raise UserError(f"{flag} {path_or_id}: cannot be loaded ({cause}); pass a folder holding a complete "
                            f"model saved by transformers (save_pretrained)") from None
        raise UserError(f"{flag} {path_or_id}: is not a local folder, and the hub cannot provide it ({cause}); "
                        f"{FIX}") from None


@contextmanager
def _quiet_transformers():
    """transformers logs a weight report before it fails on a mismatch; _load reports it as one error."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _config(path_or_id, flag: str, local: bool):
    from transformers import AutoConfig
    with _reading(path_or_id, flag, local):
        return AutoConfig.from_pretrained(str(path_or_id))


def _load(path_or_id, device: str, dtype: str, flag: str, local: bool):
    """The model in eval mode on `device`; a UserError when its weights do not fit its config.json."""
    from transformers import AutoModelForCausalLM
    dev = resolve_device(device)
    with _reading(path_or_id, flag, local), _quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(str(path_or_id), dtype=resolve_dtype(dtype, dev),
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    problems = [f"{len(info['mismatched_keys'])} tensors with other shapes than the config's "
                f"(e.g. {k}: {list(a)} in the weights, {list(b)} by the config)"
                for k, a, b in sorted(info["mismatched_keys"])[:1]]
    problems += [f"{len(keys)} {what} (e.g. {sorted(keys)[0]})" for what, keys in
                 (("tensors the config needs are missing", info["missing_keys"]),
                  ("tensors the config has no place for", info["unexpected_keys"])) if keys]
    if problems:
        raise UserError(f"{flag} {path_or_id}: config.json does not match the weights: {'; '.join(problems)}; "
                        f"pass the config.json saved with these weights")
    return model.to(dev).eval()


def _tokenizer(path_or_id, flag: str, local: bool):
    from transformers import AutoTokenizer
    with _reading(path_or_id, flag, local):
        return AutoTokenizer.from_pretrained(str(path_or_id))


def load_target(path_or_id: str | Path, device: str = "auto", dtype: str = "auto", flag: str = "--target"):
    """(model, tokenizer) for a supported MoE causal LM, on `device` in `dtype`, in eval mode. `flag`
    names the path in error messages."""
    local = check_model_path(path_or_id, flag)
    model_type = getattr(_config(path_or_id, flag, local), "model_type", None)
    if model_type not in SUPPORTED:
        raise UserError(f"{flag} {path_or_id}: model_type {model_type!r}, but moetune supports the MoE families "
                        f"{SUPPORTED}; pass a model of one of those (a dense model can only be a draft)")
    model = _load(path_or_id, device, dtype, flag, local)
    moe_shape(model)
    return model, _tokenizer(path_or_id, flag, local)


def load_draft(path_or_id: str | Path, target_tokenizer_or_vocab_size, device: str = "auto", dtype: str = "auto",
               flag: str = "--draft"):
    """(model, tokenizer) for a draft whose token ids mean the same as the target's.

    A draft with another vocabulary would propose ids the target reads as different tokens, so a
    mismatch is an error rather than a silent loss of acceptance.
    """
    local = check_model_path(path_or_id, flag)
    model = _load(path_or_id, device, dtype, flag, local)
    tokenizer = (_tokenizer(path_or_id, flag, local) if (Path(str(path_or_id)) / "tokenizer_config.json").exists()
                 else None)
    ref = target_tokenizer_or_vocab_size
    n = model.get_output_embeddings().weight.shape[0]
    if isinstance(ref, int):
        if n != ref:
            raise UserError(f"{flag} {path_or_id}: has a vocabulary of {n} ids but the target has {ref}; "
                            "pass a draft that shares the target's tokenizer")
    elif tokenizer is not None and tokenizer.get_vocab() != ref.get_vocab():
        raise UserError(f"{flag} {path_or_id}: uses a different tokenizer than the target; pass a draft with the "
                        "target's tokenizer (speculative decoding needs identical token ids)")
    elif n < len(ref):
        raise UserError(f"{flag} {path_or_id}: has {n} output ids but the target tokenizer has {len(ref)}; pass a "
                        "draft that shares the target's tokenizer")
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
