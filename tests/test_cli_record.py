"""`moetune record` with bad input: one error line naming the bad value, exit 2, no traceback, and no
output file left behind. Flag values fail before any model loads; values that need the model's shape
(router entries, budget grid) fail right after the target loads."""
import json

import pytest
from cli_check import fails
from test_loader import BROKEN, broken_copy, tiny_models


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("record")
    tiny_models(root)
    (root / "prompts.json").write_text(json.dumps([{"kind": "code", "source": "t", "text": "w5 w9 w11"}]))
    return root


def flags(root, out, *extra, target=None, draft=None, prompts=None):
    return ["record", "--target", str(target or root / "target"), "--draft", str(draft or root / "draft"),
            "--prompts", str(prompts or root / "prompts.json"), "--kinds", "code", "--max-new-tokens", "2",
            "--depth", "2", "--topk", "2", "--device", "cpu", "--out", str(out), *extra]


@pytest.mark.parametrize("extra, names", [
    (["--per-kind", "-1"], ["--per-kind", "-1"]),
    (["--per-kind", "0"], ["--per-kind", "0"]),
    (["--router-top", "0"], ["--router-top", "0"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", "0"]),
    (["--batch-size", "0"], ["--batch-size", "0"]),
    (["--drafters", "eagle"], ["--drafters", "eagle"]),
    (["--policy", "eagle"], ["unknown policy 'eagle'"]),
    (["--policy", "moespec:budget=0"], ["budget must be >= 1"]),
    (["--grid", "x"], ["--grid", "'x'"]),
    (["--grid", "0"], ["--grid", "'0'"]),
    (["--kinds", "nope"], ["--kinds", "'nope'"]),
    (["--topk", "16", "--depth", "6"], ["topk=16", "1296"]),
    (["--topk", "1000"], ["topk=1000", "--topk"]),
    (["--depth", "5000"], ["depth=5000", "--depth"]),
    (["--depth", "300"], ["depth <= 256", "depth=300"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--ngram-min-n", "5"], ["--ngram-min-n", "--ngram-max-n", "5 and 4"]),
    (["--ngram-max-n", "65"], ["--ngram-max-n", "<= 64", "65"]),
])
def test_bad_values_fail_before_models_load(capsys, root, tmp_path, extra, names):
    out = tmp_path / "x.trace"
    fails(capsys, flags(root, out, *extra), *names)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, names", [
    (["--router-top", "1000"], ["router_top", "1000"]),
    (["--grid", "1000"], ["budget_grid", "1000"]),
])
def test_values_beyond_the_model_fail_after_the_target_loads(capsys, root, tmp_path, extra, names):
    fails(capsys, flags(root, tmp_path / "x.trace", *extra), *names)
    assert not (tmp_path / "x.trace").exists()


@pytest.mark.parametrize("content, names", [
    ('[{"kind": "code"}]', ['entry 0 has no non-empty "text"']),
    ('{"kind": "code"}', ["not a non-empty list"]),
    ("{not json", ["not valid JSON"]),
    ('[{"kind": "code", "text": ""}]', ['entry 0 has no non-empty "text"']),
])
def test_bad_prompt_files(capsys, root, tmp_path, content, names):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    fails(capsys, flags(root, tmp_path / "x.trace", prompts=path), f"--prompts {path}", *names)


def test_output_whose_parent_is_a_file(capsys, root, tmp_path):
    (tmp_path / "file").write_text("x")
    fails(capsys, flags(root, tmp_path / "file" / "x.trace"), str(tmp_path / "file"))


@pytest.mark.parametrize("flag, model, case", [("--target", "target", "missing"),
                                               ("--target", "target", "corrupt config"),
                                               ("--draft", "draft", "truncated weights")])
def test_broken_model_folders(capsys, root, tmp_path, flag, model, case):
    folder = broken_copy(root / model, tmp_path, case)
    kw = {model: folder}
    fails(capsys, flags(root, tmp_path / "x.trace", **kw), f"{flag} {folder}", BROKEN[case][1])
    assert not (tmp_path / "x.trace").exists()
