"""Safe command outputs: checked before any expensive work, locked for the whole command, written under a
temporary name beside the output and renamed into place only on success.

Why: a failed run (bad argument, crash, Ctrl-C, kill) must never cost the user an existing output, two
moetune processes must not mix one file, and a killed `record` still keeps the trace it streamed (under
the temporary name, which it reports). Locks are `flock`s on a sibling `NAME.lock` file: the kernel drops
them when a process dies, so a lock file left by a killed run never blocks the next one.
"""
from __future__ import annotations

import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

_HELD: dict[Path, int] = {}  # lock file -> descriptor, for locks this process holds (output_lock nests)


class OutputError(ValueError):
    """An output path the user gave cannot be written (exists, busy, wrong kind, unwritable)."""


def partial_path(path: str | Path) -> Path:
    """Where `path` is written until it is complete; keeps the suffix (matplotlib picks the format by it)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


def check_output(path: str | Path, force: bool = False) -> Path:
    """Raise OutputError unless the file `path` could be written now (its folder may not exist yet)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file path")
    if path.exists() and not force:
        raise OutputError(f"output {path} exists; pass --force to overwrite it or choose another path")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: folder {folder} is not writable")
    return path


def _busy(path: Path, lock: Path) -> OutputError:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    who = f"another moetune process (pid {pid})" if pid.isdigit() else "another moetune process"
    return OutputError(f"output {path} is being written by {who} (lock {lock}); wait for it to finish "
                       f"or choose another path")


def _acquire(path: Path) -> int:
    """Take the lock of `path` without waiting. Retries when the lock file was replaced between open and
    flock (its holder removes it on release), so two processes never both hold a lock on `path`."""
    lock = lock_path(path)
    for _ in range(5):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(path, lock) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise _busy(path, lock)


def _release(lock: Path, fd: int) -> None:
    lock.unlink(missing_ok=True)  # while still locked, so nobody holds a lock on a file about to vanish
    os.close(fd)


@contextmanager
def output_lock(paths: Iterable[str | Path], force: bool = False) -> Iterator[None]:
    """Check every output of a command and hold its lock until the block ends (also on failure).

    Taken before models load, so a second writer fails at once; existence is checked under the lock, so a
    run that finished meanwhile is seen. Paths this process already holds are skipped (blocks nest)."""
    taken: list[Path] = []
    try:
        for path in map(Path, paths):
            lock = lock_path(path).resolve()
            if lock in _HELD:
                continue
            check_output(path, force)
            path.parent.mkdir(parents=True, exist_ok=True)
            _HELD[lock] = _acquire(path)
            taken.append(lock)
            check_output(path, force)
        yield
    finally:
        for lock in reversed(taken):
            _release(lock, _HELD.pop(lock))


@contextmanager
def atomic_output(path: str | Path, force: bool = False, keep_partial: bool = False,
                  label: str = "moetune") -> Iterator[Path]:
    """Yield the temporary path to write `path` under; on success it replaces `path` (fsynced first).

    On failure the old `path` is untouched; the temporary file is removed, or with `keep_partial` (a
    streamed trace that reads as a prefix) kept and reported on stderr. A block that writes nothing
    leaves `path` as it was."""
    path = Path(path)
    with output_lock([path], force):
        tmp = partial_path(path)
        try:
            yield tmp
        except BaseException:
            if keep_partial and tmp.exists():
                print(f"{label}: stopped; the partial output is in {tmp} ({path} is untouched)", file=sys.stderr)
            else:
                tmp.unlink(missing_ok=True)
            raise
        if tmp.exists():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
