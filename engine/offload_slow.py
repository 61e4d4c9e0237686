"""The slow tier of an expert offload store (engine/offload_store.py): every expert on disk, one read each.

One safetensors file written at setup, gate_up then down of each (layer, expert) back to back at a
4096-byte aligned offset, so one read fetches an expert. Read by one of: "direct" (O_DIRECT: the page cache
is bypassed), "fadvise" (buffered reads, each dropped from the page cache afterwards with
POSIX_FADV_DONTNEED) or "paced" (buffered reads, page cache allowed, rate-limited to `slow_gbps`: a
rate-limited copy, and `describe()` says so). "auto" takes direct when the file system allows it, else
fadvise. Any kind can also be paced to `slow_gbps`.

An expert is read in chunks of CHUNK bytes (`chunks`), so the reader thread can leave a prefetch between
two chunks for a read a computing layer waits on (engine/offload_store.TransferQueue): a whole 3 MB expert
at 1 GB/s would hold such a demand read up to 3 ms. Pacing keeps one schedule for the link across reads, so
switching reads neither bursts above `slow_gbps` nor loses time to sleep overshoot.

Shape legend: E experts, H hidden, I expert intermediate.
"""
from __future__ import annotations

import json
import mmap
import os
import time
from dataclasses import dataclass

import torch

SLOW_KINDS = ("auto", "direct", "fadvise", "paced")
ALIGN = 4096  # O_DIRECT needs block-aligned offsets, lengths and buffers
CHUNK = 1 << 20  # bytes per read: the longest a demand read waits behind a prefetch (a multiple of ALIGN)
PACE_SLACK_S = 2e-4  # a chunk starting this soon after the link's schedule freed keeps it (sleep overshoot)
DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


@dataclass(frozen=True)
class Span:
    offset: int  # absolute file offset of gate_up; down follows it directly
    gate_up_bytes: int
    down_bytes: int


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor (any dtype), writable, without a copy."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def write_slow_tier(path: str, gate_ups: list[torch.Tensor], downs: list[torch.Tensor]) -> dict[tuple[int, int], Span]:
    """Write every layer's experts (gate_ups[l] [E, 2I, H], downs[l] [E, H, I]) as a safetensors file, one
    tensor per (layer, expert) and projection, each expert 4096-aligned (padding tensors fill the gaps, so
    safe_open reads it). Streams tensor by tensor: no second copy of the experts in memory."""
    header, starts, parts, pos = {}, {}, [], 0
    for l, (gu, d) in enumerate(zip(gate_ups, downs)):
        for e in range(gu.shape[0]):
            pad = -pos % ALIGN
            if pad:
                header[f"pad.{l}.{e}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [pos, pos + pad]}
                parts.append(bytes(pad))
                pos += pad
            starts[l, e] = pos
            for name, t in (("gate_up", gu[e]), ("down", d[e])):
                header[f"layers.{l}.experts.{e}.{name}"] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                                                            "data_offsets": [pos, pos + t.nbytes]}
                parts.append(t)
                pos += t.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # whitespace-padded header: the data starts aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for part in parts:
            f.write(part if isinstance(part, bytes) else _raw(part.contiguous()))
    return {(l, e): Span(8 + len(text) + start, gate_ups[l][e].nbytes, downs[l][e].nbytes)
            for (l, e), start in starts.items()}


def _pieces(parts: list[memoryview], start: int, end: int) -> list[memoryview]:
    """The slices of `parts`, taken as one byte string, that cover bytes [start, end)."""
    out, base = [], 0
    for part in parts:
        lo, hi = max(start - base, 0), min(end - base, len(part))
        if lo < hi:
            out.append(part[lo:hi])
        base += len(part)
    return out


def _open_direct(path: str, probe: int) -> int | None:
    """An O_DIRECT descriptor of `path` when the OS and file system allow it (one aligned test read)."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        os.preadv(fd, [mmap.mmap(-1, ALIGN)], probe - probe % ALIGN)
    except OSError:
        os.close(fd)
        return None
    return fd


class SlowTier:
    """The experts file and how it is read (see the module docstring for the kinds)."""

    def __init__(self, path: str, spans: dict[tuple[int, int], Span], kind: str, gbps: float | None):
        self.path, self.spans, self.gbps = path, spans, gbps
        self.fd = _open_direct(path, next(iter(spans.values())).offset) if kind in ("auto", "direct") else None
        if kind == "direct" and self.fd is None:
            raise ValueError(f"slow='direct': {path} cannot be opened with O_DIRECT on this OS or file system; "
                             f"use slow='fadvise' or slow='paced' with slow_gbps")
        if self.fd is not None:
            self.kind = "direct"
        else:
            self.kind = "paced" if kind == "paced" else "fadvise" if hasattr(os, "posix_fadvise") else "buffered"
            self.fd = os.open(path, os.O_RDONLY)
        if self.kind == "fadvise":
            os.fsync(self.fd)  # dirty pages cannot be dropped: write them back, then start cold
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self._bounce = mmap.mmap(-1, CHUNK) if self.kind == "direct" else None  # page-aligned
        self._link_free = 0.0  # perf_counter time the paced link's schedule is free again

    def describe(self) -> str:
        """What a read here is, for every report: the honest name of the slow tier."""
        pace = f", paced to at most {self.gbps:g} GB/s" if self.gbps else ""
        if self.kind == "direct":
            return (f"O_DIRECT reads of {self.path} (page cache bypassed; caches below the OS may still serve "
                    f"them){pace}")
        if self.kind == "fadvise":
            return (f"buffered reads of {self.path}, each dropped from the page cache afterwards "
                    f"(POSIX_FADV_DONTNEED; pages another process maps stay cached){pace}")
        if self.kind == "paced":
            return f"rate-limited copy: buffered reads of {self.path} (page cache allowed) paced to {self.gbps:g} GB/s"
        return (f"buffered reads of {self.path}: this OS offers neither O_DIRECT nor posix_fadvise, so the page "
                f"cache is NOT bypassed{pace}")

    def chunks(self, layer: int, expert: int, gate_up: torch.Tensor,  # [2I, H] slot
               down: torch.Tensor):
        """Fill the two slot tensors chunk by chunk (paced when slow_gbps is set), yielding each chunk's
        bytes: between two chunks the caller may run another read."""
        span = self.spans[layer, expert]
        n = span.gate_up_bytes + span.down_bytes
        slots = [_raw(gate_up), _raw(down)]
        for start in range(0, n, CHUNK):
            end = min(start + CHUNK, n)
            t0 = time.perf_counter()
            self._read_chunk(span.offset, slots, start, end)
            if self.gbps:
                self._pace(t0, end - start)
            yield end - start

    def _read_chunk(self, offset: int, slots: list[memoryview], start: int, end: int) -> None:
        """Bytes [start, end) of the expert at `offset` into the slots (a 4096-aligned start)."""
        if self.kind == "direct":
            size = -(-(end - start) // ALIGN) * ALIGN
            got = os.preadv(self.fd, [memoryview(self._bounce)[:size]], offset + start)
            at = 0
            for piece in _pieces(slots, start, end):
                piece[:] = memoryview(self._bounce)[at:at + len(piece)]
                at += len(piece)
        else:
            got = os.preadv(self.fd, _pieces(slots, start, end), offset + start)
            if self.kind == "fadvise":
                os.posix_fadvise(self.fd, offset + start, end - start, os.POSIX_FADV_DONTNEED)
        if got < end - start:
            raise OSError(f"short read of {self.path}: {got} of {end - start} bytes at offset {offset + start}")

    def _pace(self, t0: float, nbytes: int) -> None:
        """Sleep until the link, at slow_gbps, has carried these bytes after what it carried before."""
        start = self._link_free if t0 - self._link_free < PACE_SLACK_S else t0
        self._link_free = start + nbytes / (self.gbps * 1e9)
        time.sleep(max(0.0, self._link_free - time.perf_counter()))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
