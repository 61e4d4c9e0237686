"""Loading targets and drafts: supported families only, matching vocabularies, the MoE shape, and a
clear UserError naming the flag and path for every broken model folder or unreachable hub id."""
import json
import re
import shutil

import pytest
import torch
from cli_check import HUB_ID, offline  # noqa: F401  (a fixture)
from tiny import FAMILIES, VOCAB, tiny_dense, tiny_moe

from moetune.engine.loader import load_draft, load_target, moe_shape, resolve_device, resolve_dtype
from moetune.errors import UserError


def save_tiny_tokenizer(path, vocab_size: int = VOCAB) -> None:
    """A word-level tokenizer over ids 0..vocab_size-1 (id 0 = eos), so tiny models load like real ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"</s>": 0, "<pad>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(path)


def tiny_models(root):
    """A tiny MoE target and dense draft with tokenizers under root/target and root/draft."""
    tiny_moe("olmoe").save_pretrained(root / "target")
    tiny_dense().save_pretrained(root / "draft")
    for name in ("target", "draft"):
        save_tiny_tokenizer(root / name)
    return root / "target", root / "draft"


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _truncate(file):
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])


# name -> (how a copy of a good model folder is broken, words the error must contain)
BROKEN = {
    "missing": (lambda d: shutil.rmtree(d), "no such directory"),
    "a file": (lambda d: shutil.rmtree(d) or d.write_text("x"), "is a file, not a model folder"),
    "no config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "corrupt config": (lambda d: (d / "config.json").write_text("{not json"), "config.json: not valid JSON"),
    "no model_type": (lambda d: (d / "config.json").write_text("[1, 2]"), 'no "model_type"'),
    "unknown model_type": (lambda d: _edit_config(d, model_type="nonsense"), "cannot be loaded"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no weights"),
    "truncated weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors is damaged or truncated"),
    "config wider than weights": (lambda d: _edit_config(d, hidden_size=64), "config.json does not match"),
    "config deeper than weights": (lambda d: _edit_config(d, num_hidden_layers=3), "tensors the config needs"),
    "config shallower than weights": (lambda d: _edit_config(d, num_hidden_layers=1), "no place for"),
}


def broken_copy(good, root, case: str):
    """A copy of the model folder `good` under root, broken as BROKEN[case] says."""
    folder = root / case.replace(" ", "_")
    shutil.copytree(good, folder)
    BROKEN[case][0](folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("loader"))


@pytest.mark.parametrize("case", BROKEN)
def test_broken_target_folders_are_user_errors_naming_the_path(models, tmp_path, case):
    folder = broken_copy(models[0], tmp_path, case)
    with pytest.raises(UserError, match=f"^--target {re.escape(str(folder))}: .*{re.escape(BROKEN[case][1])}.*; "):
        load_target(folder, device="cpu")


@pytest.mark.parametrize("case", ["missing", "truncated weights", "config wider than weights"])
def test_broken_draft_folders_name_the_draft_flag(models, tmp_path, case):
    folder = broken_copy(models[1], tmp_path, case)
    with pytest.raises(UserError, match=f"^--draft {re.escape(str(folder))}: .*{re.escape(BROKEN[case][1])}"):
        load_draft(folder, VOCAB, device="cpu")


def test_hub_id_offline_is_a_user_error(offline):  # noqa: F811
    with pytest.raises(UserError, match=f"^--target {HUB_ID}: is not a local folder, and the hub cannot provide "
                                        f"it .*; pass a local model folder"):
        load_target(HUB_ID, device="cpu")


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
