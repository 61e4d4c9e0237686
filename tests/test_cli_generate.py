"""`moetune generate` with bad input: one error line naming the bad value, exit 2, no traceback. Also the
one end-to-end check in a real process (the console entry point, stderr as a user sees it)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_check import HUB_ID, fails, offline  # noqa: F401  (a fixture)
from test_loader import BROKEN, broken_copy, tiny_models

from moetune.cli import main

SAMPLE = str(Path(__file__).resolve().parents[1] / "traces" / "samples" / "code.trace")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("generate"))[0]


def flags(target, *extra):
    return ["generate", "w5 w9", "--target", str(target), "--device", "cpu", "--max-new-tokens", "2", *extra]


@pytest.mark.parametrize("extra, names", [
    (["--temperature", "nan"], ["--temperature", "nan"]),
    (["--temperature", "inf"], ["--temperature", "inf"]),
    (["--temperature", "-1"], ["--temperature", "-1"]),
    (["--top-p", "0"], ["--top-p", "0"]),
    (["--top-p", "nan"], ["--top-p", "nan"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", "0"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--max-new-tokens", "x"], ["--max-new-tokens", "x"]),
])
def test_bad_values(capsys, target, extra, names):
    fails(capsys, flags(target, *extra), *names)


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(capsys, target, prompt):
    fails(capsys, ["generate", prompt, "--target", str(target)], "prompt is empty")


@pytest.mark.parametrize("case", BROKEN)
def test_broken_target_folder(capsys, target, tmp_path, case):
    folder = broken_copy(target, tmp_path, case)
    fails(capsys, flags(folder), f"--target {folder}", BROKEN[case][1])


def test_dense_target_is_refused(capsys, target):
    draft = target.parent / "draft"
    fails(capsys, flags(draft), f"--target {draft}", "supports the MoE families")


def test_hub_id_without_network(capsys, offline):  # noqa: F811
    fails(capsys, flags(HUB_ID), f"--target {HUB_ID}", "hub cannot provide it", "pass a local model folder")


@pytest.mark.parametrize("argv, names", [
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    (["bogus"], ["invalid choice: 'bogus'"]),
])
def test_bad_commands_are_argparse_errors(capsys, argv, names):
    fails(capsys, argv, *names)


@pytest.mark.parametrize("raised, code, line", [
    (KeyboardInterrupt(), 130, "moetune generate: interrupted"),
    (PermissionError(13, "Permission denied", "/x/out.json"),
     2, "moetune generate: error: /x/out.json: permission denied; check the path and its permissions"),
    (ValueError("two\nlines"), 2, "moetune generate: error: two lines"),
])
def test_the_boundary_ends_expected_failures_in_one_line(capsys, monkeypatch, raised, code, line):
    import moetune.commands.generate as command

    def stopped(args):
        raise raised
    monkeypatch.setattr(command, "main", stopped)
    assert main(["generate", "x"]) == code
    assert capsys.readouterr().err == line + "\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    import moetune.commands.generate as command

    def buggy(args):
        raise TypeError("a bug")
    monkeypatch.setattr(command, "main", buggy)
    with pytest.raises(TypeError, match="a bug"):
        main(["generate", "x"])


def test_end_to_end_no_traceback_in_a_real_process(tmp_path):
    """The console entry point with the hub offline: a bad flag, a hub id and a trace given as a profile
    each end in one `error:` line with exit status 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cases = [(["--bogus"], "unrecognized arguments"),
             (["generate", "--target", HUB_ID], f"moetune generate: error: --target {HUB_ID}"),
             (["replay", SAMPLE, "--policy", "plain", "--profile", SAMPLE], "is not a latency profile JSON")]
    for argv, expected in cases:
        p = subprocess.run([sys.executable, "-c", "import sys; from moetune.cli import main; sys.exit(main())", *argv],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert expected in p.stderr.strip().splitlines()[-1]
