"""Shared checks for the per-subcommand invalid-input tests (tests/test_cli_*.py): a bad command line
ends in one error line naming what was wrong, exit status 2, and no traceback."""
from __future__ import annotations

import huggingface_hub.constants
import pytest

from moetune.cli import main

HUB_ID = "nonexistent-org/nonexistent-model"  # resolved only with the hub offline (see offline)


def fails(capsys, argv: list[str], *names: str) -> str:
    """Run `moetune argv` in-process: exit 2, the last stderr line is `moetune <cmd>: error: ...` and
    contains every one of `names` (the bad value, the flag), nothing on stderr is a traceback."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("moetune") and ": error: " in last, err
    for name in names:
        assert name in last, f"{name!r} not in {last!r}"
    return last


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable by configuration, so a hub id never touches the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
