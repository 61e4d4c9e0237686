"""Loading targets and drafts: supported families only, matching vocabularies, the MoE shape."""
import pytest
import torch
from tiny import FAMILIES, VOCAB, tiny_dense, tiny_moe

from moetune.engine.loader import load_draft, load_target, moe_shape, resolve_device, resolve_dtype


def save_tiny_tokenizer(path, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer over ids 0..vocab_size-1 (id 0 = eos), so tiny models load like real ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"</s>": 0, "<pad>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_target_and_shape(tmp_path, family):
    tiny_moe(family).save_pretrained(tmp_path)
    save_tiny_tokenizer(tmp_path)
    model, tokenizer = load_target(tmp_path, device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("w5 w9", add_special_tokens=False)["input_ids"] == [5, 9]
    shape = moe_shape(model)
    assert (shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size) == (2, 8, 2, 32)
    assert shape.shared_expert == (family == "qwen2_moe")


def test_dense_target_and_bad_draft_are_refused(tmp_path):
    dense, moe, other = tmp_path / "dense", tmp_path / "moe", tmp_path / "other"
    tiny_dense().save_pretrained(dense)
    save_tiny_tokenizer(dense)
    with pytest.raises(ValueError, match="supports the MoE families"):
        load_target(dense, device="cpu")
    tiny_moe().save_pretrained(moe)
    save_tiny_tokenizer(moe)
    _, tok = load_target(moe, device="cpu")
    draft, _ = load_draft(dense, tok, device="cpu")
    assert draft.dtype == torch.float32
    with pytest.raises(ValueError, match="vocabulary of 128 ids but the target has 64"):
        load_draft(dense, 64, device="cpu")
    tiny_dense().save_pretrained(other)
    save_tiny_tokenizer(other, vocab_size=100)
    with pytest.raises(ValueError, match="different tokenizer"):
        load_draft(other, tok, device="cpu")


def test_device_and_dtype_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
