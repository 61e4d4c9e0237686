"""Corpus for the embedded default models: the local Python standard library sources.

Files are split into train / validation / test by a hash of their path relative to the stdlib root,
so the split is the same on every machine with the same Python version. Test files are held out for
benchmark prompts and are never trained on.
"""
from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """90 / 5 / 5 split by the first byte pair of sha1(relative path)."""
    bucket = int(hashlib.sha1(relpath.encode()).hexdigest()[:4], 16) % 100
    return "train" if bucket < 90 else ("val" if bucket < 95 else "test")


@dataclass(frozen=True)
class SourceFile:
    relpath: str
    text: str


def iter_sources(root: Path | None = None) -> list[SourceFile]:
    """All stdlib .py files (site-packages excluded), sorted by relative path."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            files.append(SourceFile(rel, text))
    return files


def split_sources(files: list[SourceFile]) -> dict[str, list[SourceFile]]:
    out: dict[str, list[SourceFile]] = {s: [] for s in SPLITS}
    for f in files:
        out[split_of(f.relpath)].append(f)
    return out


def _repetition(text: str) -> float:
    """Share of non-blank lines that repeat an earlier line once stripped (how loopy the file is)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return 1.0 - len(set(lines)) / max(1, len(lines))


def build_prompts(test_files: list[SourceFile], per_kind: int = 8, seed: int = 0,
                  max_chars: int = 600) -> list[dict]:
    """Held-out prompts of three kinds: repetitive code, fresh code, docstring prose.

    - repetitive: a window ending at a line start in the most self-repetitive test files;
    - code: a window ending just after a ``def`` line, in files that repeat little;
    - docstring: the opening of a module docstring.
    """
    rng = random.Random(seed)
    by_rep = sorted(test_files, key=lambda f: _repetition(f.text))
    prompts: list[dict] = []

    def window(f: SourceFile, end: int) -> str:
        start = max(0, end - max_chars)
        start = f.text.find("\n", start) + 1 if start > 0 else 0
        return f.text[start:end]

    for f in reversed(by_rep):
        if sum(p["kind"] == "repetitive" for p in prompts) >= per_kind:
            break
        if len(f.text) < 2 * max_chars:
            continue
        cut = f.text.find("\n", rng.randrange(max_chars, len(f.text) - max_chars // 2)) + 1
        prompts.append({"kind": "repetitive", "source": f.relpath, "text": window(f, cut)})
    for f in by_rep:
        if sum(p["kind"] == "code" for p in prompts) >= per_kind:
            break
        defs = [i for i in range(len(f.text)) if f.text.startswith("\n    def ", i) or f.text.startswith("\ndef ", i)]
        defs = [i for i in defs if i > max_chars // 2]
        if not defs:
            continue
        i = rng.choice(defs)
        end = f.text.find("\n", i + 1) + 1
        prompts.append({"kind": "code", "source": f.relpath, "text": window(f, end)})
    for f in test_files:
        if sum(p["kind"] == "docstring" for p in prompts) >= per_kind:
            break
        head = f.text.lstrip()
        if head.startswith('"""') and len(head) > 200:
            prompts.append({"kind": "docstring", "source": f.relpath, "text": head[:160]})
    return prompts


def write_prompts(path: Path, prompts: list[dict]) -> None:
    path.write_text(json.dumps(prompts, indent=1) + "\n")
