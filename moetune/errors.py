"""Expected failures: bad input a user can fix, as opposed to bugs.

Why a class of its own: `moetune.cli.main` prints these (and any ValueError, which every config raises)
as one line, `moetune <command>: error: <what>; <what to do>`, and exits 2, while anything else is a bug
and keeps its traceback. Paths a user gave are checked where they are opened, so the message names them.
"""
from __future__ import annotations

import json
from pathlib import Path

# what went wrong with a path, by the OSError subclass that said so
_OS_REASONS = ((FileNotFoundError, "no such file or directory"), (IsADirectoryError, "is a directory, not a file"),
               (NotADirectoryError, "a part of the path is a file, not a directory"),
               (PermissionError, "permission denied"))


class UserError(ValueError):
    """Bad input a user can fix; the message says what is wrong and what to do."""


def path_error(what: str, error: OSError, fix: str) -> UserError:
    """A UserError for an OSError on a user-given path: `what` names the flag and path, `fix` what to do."""
    reason = next((r for cls, r in _OS_REASONS if isinstance(error, cls)), error.strerror or str(error))
    return UserError(f"{what}: {reason}; {fix}")


def read_json(path: str | Path, what: str, fix: str):
    """The JSON in a user-given file, or a UserError naming `what` (flag and path) and `fix`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise path_error(what, e, fix) from None
    except UnicodeDecodeError:
        raise UserError(f"{what}: not a text file; {fix}") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise UserError(f"{what}: not valid JSON ({e}); {fix}") from None

