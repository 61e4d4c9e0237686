"""`moetune run` with bad input: one error line naming the bad value, exit 2, no traceback. Flag values
fail before any model loads; budgets that need the model's shape fail right after the target loads."""
import json
from pathlib import Path

import pytest
from cli_check import HUB_ID, fails, offline  # noqa: F401  (a fixture)
from test_loader import BROKEN, broken_copy, tiny_models

SAMPLE = str(Path(__file__).resolve().parents[1] / "traces" / "samples" / "code.trace")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    tiny_models(root)
    (root / "prompts.json").write_text(json.dumps([{"kind": "code", "source": "t", "text": "w5 w9 w11"}]))
    return root


def flags(root, *extra, target=None, draft=None, prompts=None):
    return ["run", "--target", str(target or root / "target"), "--draft", str(draft or root / "draft"),
            "--prompts-file", str(prompts or root / "prompts.json"), "--prompts", "1", "--max-new-tokens", "2",
            "--device", "cpu", "--threads", "1", *extra]


@pytest.mark.parametrize("extra, names", [
    (["--topk", "1000"], ["topk=1000", "lower topk (--topk)"]),
    (["--topk", "100"], ["topk=100", "--num-draft-tokens"]),
    (["--depth", "5000"], ["depth must be <= 1024", "5000"]),
    (["--threads", "10000"], ["--threads", "10000"]),
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--temperature", "inf"], ["--temperature", "inf"]),
    (["--top-p", "nan"], ["--top-p", "nan"]),
    (["--latency-target-ms", "nan"], ["--latency-target-ms", "nan"]),
    (["--latency-target-ms", "inf"], ["--latency-target-ms", "inf"]),
    (["--latency-target-ms", "-1"], ["--latency-target-ms", "-1"]),
    (["--policy", "adaptive:ucb_c=nan"], ["ucb_c", "nan"]),
    (["--policy", "adaptive:widths=1/100"], ["widths up to 100", "lower widths or max_depth"]),
    (["--policy", "cascade:ks=0/5000"], ["depth must be <= 1024", "5000"]),
    (["--policy", f"adaptive:profile={SAMPLE}"], [SAMPLE, "is not a latency profile JSON"]),
])
def test_bad_values_fail_before_models_load(capsys, root, extra, names):
    fails(capsys, flags(root, *extra), *names)


@pytest.mark.parametrize("spec, names", [
    ("moespec:budget=1000", ["moespec budget", "expert budget 1000 is outside [2, 8]"]),
    ("moespec:budget=1", ["moespec budget", "expert budget 1 is outside [2, 8]"]),
    ("static:budgets=2/100", ["static budgets", "expert budget 100 is outside [2, 8]"]),
])
def test_budgets_follow_one_rule(capsys, root, spec, names):
    """Budgets outside [top_k, num_experts] are refused, never clamped: the same rule as replay."""
    fails(capsys, flags(root, "--policy", spec), *names)


@pytest.mark.parametrize("content, names", [
    (None, ["no such file or directory"]),
    ("{not json", ["not valid JSON"]),
    ('{"text": "w5"}', ["not a non-empty list"]),
    ("[]", ["not a non-empty list"]),
    ('[{"kind": "code"}]', ['entry 0 has no non-empty "text"']),
    ('[{"text": "w5"}, {"text": ""}]', ['entry 1 has no non-empty "text"']),
    ('["w5"]', ['entry 0 has no non-empty "text"']),
    ('[{"text": "w5", "kind": 3}]', ['entry 0 has a "kind" that is not a string']),
    (b"\xff\xfe\x00binary", ["not a text file"]),
])
def test_bad_prompt_files(capsys, root, tmp_path, content, names):
    path = tmp_path / "prompts.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    fails(capsys, flags(root, prompts=path), f"--prompts-file {path}", *names)


def test_prompt_file_that_is_a_directory(capsys, root, tmp_path):
    fails(capsys, flags(root, prompts=tmp_path), f"--prompts-file {tmp_path}", "is a directory")


@pytest.mark.parametrize("case", ["missing", "a file", "truncated weights", "config wider than weights"])
def test_broken_draft_folder(capsys, root, tmp_path, case):
    folder = broken_copy(root / "draft", tmp_path, case)
    fails(capsys, flags(root, draft=folder), f"--draft {folder}", BROKEN[case][1])


def test_broken_target_folder(capsys, root, tmp_path):
    folder = broken_copy(root / "target", tmp_path, "no weights")
    fails(capsys, flags(root, target=folder), f"--target {folder}", "no weights")


def test_draft_hub_id_without_network(capsys, root, offline):  # noqa: F811
    fails(capsys, flags(root, draft=HUB_ID), f"--draft {HUB_ID}", "hub cannot provide it")
