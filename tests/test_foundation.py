"""Packaging, corpus split, the training script (seeded, resumable) and the embedded default models."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import corpus  # noqa: E402

from moetune import DEFAULT_DRAFT, DEFAULT_TARGET, MODELS_DIR  # noqa: E402


def test_split_is_a_deterministic_function_of_the_path():
    names = [f"pkg{i}/mod{j}.py" for i in range(40) for j in range(25)]
    first = [corpus.split_of(n) for n in names]
    assert first == [corpus.split_of(n) for n in names]
    share = {s: first.count(s) / len(first) for s in corpus.SPLITS}
    assert 0.85 < share["train"] < 0.95 and 0.02 < share["val"] < 0.08 and 0.02 < share["test"] < 0.08


def test_held_out_files_never_reach_training(tmp_path):
    for i in range(60):
        (tmp_path / f"m{i}.py").write_text(f"def f{i}(x):\n    return x + {i}\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "third.py").write_text("x = 1\n")
    splits = corpus.split_sources(corpus.iter_sources(tmp_path))
    train = {f.relpath for f in splits["train"]}
    assert train.isdisjoint(f.relpath for f in splits["test"])
    assert all("site-packages" not in f.relpath for s in splits.values() for f in s)
    assert all(corpus.split_of(f.relpath) == "test" for f in splits["test"])


def _script(*args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train_default_models.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_training_script_is_seeded_and_resumes(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for i in range(80):
        (root / f"mod_{i}.py").write_text(f'"""Module {i}."""\n\ndef add_{i}(a, b):\n    return a + b * {i}\n' * 3)
    data = tmp_path / "data"
    r = _script("data", "--out", str(data), "--root", str(root), "--vocab-size", "300")
    assert r.returncode == 0, r.stderr
    common = ["train", "--model", "draft", "--data", str(data), "--batch", "2", "--seq", "16",
              "--eval-every", "2", "--warmup", "2", "--device", "cpu"]
    r = _script(*common, "--steps", "4")
    assert r.returncode == 0, r.stderr
    r = _script(*common, "--steps", "6")
    assert r.returncode == 0, r.stderr
    assert "resumed draft at step 4" in r.stdout
    log = [json.loads(x) for x in (data / "log_draft.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == [2, 4, 6]


def test_embedded_models_load_offline_and_fit_the_size_limit():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = sum(p.stat().st_size for d in (DEFAULT_TARGET, DEFAULT_DRAFT) for p in d.iterdir())
    assert size < 40 * 2**20
    target = AutoModelForCausalLM.from_pretrained(DEFAULT_TARGET)
    draft = AutoModelForCausalLM.from_pretrained(DEFAULT_DRAFT)
    assert target.config.model_type == "qwen3_moe" and draft.config.model_type == "qwen3"
    assert target.config.num_experts >= 16 and 2 <= target.config.num_experts_per_tok <= 8
    assert AutoTokenizer.from_pretrained(DEFAULT_TARGET).get_vocab() == AutoTokenizer.from_pretrained(DEFAULT_DRAFT).get_vocab()
    n_draft = sum(p.numel() for p in draft.parameters())
    cfg = target.config
    active = sum(p.numel() for p in target.parameters()) - cfg.num_hidden_layers * (
        cfg.num_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert active > 3 * n_draft


def test_model_card_shows_the_target_clearly_better_than_the_draft():
    card = json.loads((MODELS_DIR / "model_card.json").read_text())
    assert card["target"]["val_loss"] <= card["draft"]["val_loss"] - 0.3
    assert set(card["chain_acceptance"]) == {str(k) for k in range(1, 7)}
    assert (MODELS_DIR / "MODEL_CARD.md").exists()


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "moetune.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_text_and_speed():
    r = _cli("generate", "def add(a, b):\n", "--max-new-tokens", "5", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "def add(a, b):" in r.stdout and "tokens/s" in r.stdout


@pytest.mark.parametrize("args, needle", [
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--top-p", "1.5"], "--top-p"),
    (["generate", "--device", "tpu"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_flags_get_clear_errors(args, needle):
    r = _cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr
