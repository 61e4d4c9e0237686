"""Prompt files: a JSON list of {"kind", "source", "text"} objects (moetune/models/prompts.json).

Why one reader: `moetune run` and `moetune record` take the same files, and a malformed one should fail
before any model loads, with the file and the entry named, rather than as a KeyError mid-run.
"""
from __future__ import annotations

from pathlib import Path

from moetune.errors import UserError, read_json

FIX = 'pass a JSON list of objects like {"kind": "code", "text": "def f(x):"}'


def read_prompts(path: str | Path, flag: str) -> list[dict]:
    """The prompts in `path` (given as `flag`), each with a non-empty string "text" and a string "kind"."""
    what = f"{flag} {path}"
    prompts = read_json(path, what, FIX)
    if not isinstance(prompts, list) or not prompts:
        raise UserError(f"{what}: not a non-empty list of prompts; {FIX}")
    for i, p in enumerate(prompts):
        if not isinstance(p, dict) or not isinstance(p.get("text"), str) or not p["text"].strip():
            raise UserError(f"{what}: entry {i} has no non-empty \"text\"; {FIX}")
        if not isinstance(p.get("kind", ""), str):
            raise UserError(f"{what}: entry {i} has a \"kind\" that is not a string; {FIX}")
    return prompts
