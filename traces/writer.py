"""Streaming trace writer: every record is appended whole, checksummed and flushed, so a run killed
midway leaves a file that reads (and replays) up to its last complete position.

Shape legend: N draft nodes, L MoE layers, M router entries kept, G grid budgets, S live steps.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

from .schema import (FRAME, KIND_END, KIND_HEADER, KIND_POSITION, KIND_REQUEST, MAGIC, LiveRun, Trace, TraceMeta,
                     TreeRecord, config_to_dict, meta_to_dict)

TREE_ARRAYS = ("parents", "tokens", "probs", "argmax", "experts", "router_probs", "budget_argmax")
TREE_DTYPES = dict(parents=np.int16, tokens=np.int32, probs=np.float16, argmax=np.int32,
                   router_probs=np.float16, budget_argmax=np.int32)


def encode(info: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """One record payload: JSON (with the array table) + raw array bytes, zlib-compressed together."""
    table, blobs = [], []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        table.append([name, a.dtype.name, list(a.shape)])
        blobs.append(a.tobytes())
    head = json.dumps(dict(info, arrays=table), separators=(",", ":")).encode()
    return zlib.compress(struct.pack("<I", len(head)) + head + b"".join(blobs), 6)


def frame(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(FRAME, len(payload), zlib.crc32(kind + payload), kind) + payload


def expert_dtype(num_experts: int):
    return np.uint8 if num_experts <= 256 else np.int16


class TraceWriter:
    """Append-only writer. Use as a context manager; call begin_request / position / end_request."""

    def __init__(self, path: str | Path, meta: TraceMeta):
        self.path = Path(path)
        self.meta = meta
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "wb")
        self._f.write(MAGIC)
        self.bytes_written = len(MAGIC)
        self._request: int | None = None
        self._p = 0
        self._write(KIND_HEADER, dict(meta=meta_to_dict(meta)), {})

    def _write(self, kind: bytes, info: dict, arrays: dict) -> None:
        data = frame(kind, encode(info, arrays))
        self._f.write(data)
        self._f.flush()
        self.bytes_written += len(data)

    def begin_request(self, request_id: int, prompt_len: int, kind: str = "", prompt: str = "",
                      live: LiveRun | None = None, max_new_tokens: int = 0, prompt_ids=None) -> None:
        """Start a request. `live` (what ran while recording) goes first so the self-check needs no tail.
        `prompt_ids` (optional, prompt_len token ids) let replay run model-free lookups over the context."""
        if self._request is not None:
            raise ValueError(f"request {self._request} is still open; call end_request first")
        info = dict(request_id=int(request_id), prompt_len=int(prompt_len), kind=kind, prompt=prompt,
                    max_new_tokens=int(max_new_tokens))
        arrays = {}
        if prompt_ids is not None:
            if len(prompt_ids) != prompt_len:
                raise ValueError(f"prompt_ids has {len(prompt_ids)} tokens but prompt_len is {prompt_len}")
            arrays["prompt_ids"] = np.asarray(prompt_ids, dtype=np.int32)
        if live is not None:
            info["live"] = dict(policy=live.policy, configs=[config_to_dict(c) for c in live.configs])
            arrays.update(config_index=live.config_index.astype(np.int32), position=live.position.astype(np.int32),
                          accepted=live.accepted.astype(np.int32), emitted=live.emitted.astype(np.int32),
                          tree_size=live.tree_size.astype(np.int32),
                          unique_experts=live.unique_experts.astype(np.int16),
                          times=live.times.astype(np.float64))
            if live.forward is not None:
                arrays["forward"] = live.forward.astype(np.float64)
        self._write(KIND_REQUEST, info, arrays)
        self._request, self._p = int(request_id), 0

    def position(self, token: int, trees: dict[str, TreeRecord]) -> None:
        """Append the next output position of the open request (positions are numbered in order)."""
        if self._request is None:
            raise ValueError("position() outside a request; call begin_request first")
        info = dict(request_id=self._request, p=self._p, token=int(token), trees={})
        arrays = {}
        edtype = expert_dtype(self.meta.shape.num_experts)
        for name, tree in trees.items():
            info["trees"][name] = dict(t_draft=float(tree.t_draft), t_verify=float(tree.t_verify))
            for field in TREE_ARRAYS:
                arrays[f"{name}.{field}"] = getattr(tree, field).astype(TREE_DTYPES.get(field, edtype), copy=False)
        self._write(KIND_POSITION, info, arrays)
        self._p += 1

    def end_request(self, stop: str = "") -> None:
        if self._request is None:
            raise ValueError("end_request() without an open request")
        self._write(KIND_END, dict(request_id=self._request, positions=self._p, stop=stop), {})
        self._request = None

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "TraceWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_trace(trace: Trace, path: str | Path) -> int:
    """Write a whole in-memory trace (e.g. a synthetic one); returns the bytes written."""
    with TraceWriter(path, trace.meta) as w:
        for r in trace.requests:
            w.begin_request(r.request_id, r.prompt_len, r.kind, r.prompt, r.live, r.max_new_tokens, r.prompt_ids)
            for pos in r.positions:
                w.position(pos.token, pos.trees)
            if r.complete:
                w.end_request()
        return w.bytes_written

