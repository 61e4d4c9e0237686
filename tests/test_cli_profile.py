"""`moetune profile` with bad input: one error line naming the bad value, exit 2, no traceback, no
profile written. The grid's size is bounded before any model loads; contexts must fit the model's
positions, checked before the first measurement."""
import json
from pathlib import Path

import pytest
from cli_check import fails
from test_loader import broken_copy, tiny_models
from tiny import tiny_moe_config

SAMPLE = str(Path(__file__).resolve().parents[1] / "traces" / "samples" / "code.trace")
SMALL = ["--tokens", "1,2", "--unique", "0,1", "--contexts", "8", "--repeats", "1", "--quiet"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    tiny_models(root)
    (root / "cfg.json").write_text(json.dumps(tiny_moe_config("qwen3_moe").to_dict()))
    return root


def flags(root, out, *extra):
    return ["profile", "--target", str(root / "target"), "--device", "cpu", "--out", str(out), *SMALL, *extra]


@pytest.mark.parametrize("extra, names", [
    (["--tokens", "100000"], ["tokens must be <= 1025", "100000", "--tokens"]),
    (["--tokens", "0"], ["tokens and contexts >= 1", "(0,)"]),
    (["--tokens", "x"], ["--tokens", "'x'"]),
    (["--unique", "nan"], ["unique_fractions", "nan"]),
    (["--unique", "2"], ["unique_fractions", "2.0"]),
    (["--contexts", "0"], ["tokens and contexts >= 1", "(0,)"]),
    (["--repeats", "0"], ["repeats >= 1", "0"]),
    (["--repeats", "100000"], ["forward passes", "--repeats"]),
    (["--layers", "1"], ["--layers applies only with --config"]),
    (["--device", "tpu"], ["--device", "tpu"]),
])
def test_bad_values_fail_before_models_load(capsys, root, tmp_path, extra, names):
    fails(capsys, flags(root, tmp_path / "p.json", *extra), *names)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("contexts", ["100000", "300"])
def test_contexts_beyond_the_models_positions(capsys, root, tmp_path, contexts):
    fails(capsys, flags(root, tmp_path / "p.json", "--contexts", contexts),
          f"context {contexts}", "the model has 256 (max_position_embeddings)", "--contexts of at most 254")
    assert not (tmp_path / "p.json").exists()


def test_grid_too_small_to_fit(capsys, root, tmp_path):
    fails(capsys, flags(root, tmp_path / "p.json"), "gives 3 distinct measurements", "at least 5", "--tokens")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("content, names", [
    (None, ["no such file or directory"]),
    ("{not json", ["not valid JSON"]),
    ('{"hidden_size": 8}', ['no "model_type"']),
    ('{"model_type": "nonsense"}', ["not a usable model config"]),
    ("sample", ["not a text file"]),
])
def test_bad_model_configs(capsys, root, tmp_path, content, names):
    path = Path(SAMPLE) if content == "sample" else tmp_path / "cfg.json"
    if content not in (None, "sample"):
        path.write_text(content)
    fails(capsys, ["profile", "--config", str(path), "--device", "cpu", "--out", str(tmp_path / "p.json"), *SMALL],
          f"--config {path}", *names)


def test_layers_beyond_the_config(capsys, root, tmp_path):
    fails(capsys, ["profile", "--config", str(root / "cfg.json"), "--layers", "0", "--out", str(tmp_path / "p.json"),
                   *SMALL], "--layers must be in [1, 2]", "0")


def test_broken_target_folder(capsys, root, tmp_path):
    folder = broken_copy(root / "target", tmp_path, "truncated weights")
    fails(capsys, flags(root, tmp_path / "p.json") + ["--target", str(folder)], f"--target {folder}",
          "damaged or truncated")


@pytest.mark.parametrize("make", [lambda p: p.mkdir(), lambda p: p.parent.joinpath("f").write_text("x")])
def test_bad_output_paths(capsys, root, tmp_path, make):
    """An output that is a folder, or whose parent is a file: one line naming it, from moetune.outputs."""
    out = tmp_path / "p.json"
    make(out)
    bad = out if out.exists() else tmp_path / "f" / "p.json"
    fails(capsys, flags(root, bad), str(bad))
