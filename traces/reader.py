"""Trace reader: validates every record and turns any problem into a TraceError naming the file, the
record number and what is wrong, instead of a traceback from deep inside numpy or zlib.

A file that ends inside a record (a killed run) reads up to its last complete record, and the returned
Trace says where it stopped in `truncated`; `strict=True` makes that an error too.

Shape legend: N draft nodes, L MoE layers, K top-k, M router entries kept, G grid budgets, S live steps.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from .schema import (ARRAY_DTYPES, FRAME, KIND_END, KIND_HEADER, KIND_POSITION, KIND_REQUEST, MAGIC, LiveRun,
                     Position, RequestTrace, Trace, TraceError, TraceMeta, TreeRecord, config_from_dict,
                     meta_from_dict)
from .writer import TREE_ARRAYS

FRAME_SIZE = struct.calcsize(FRAME)
DECODE_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, zlib.error, struct.error)


class _Truncated(Exception):
    """The file ends inside record n (internal: read_trace decides whether that is an error)."""


def decode(payload: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """Inverse of writer.encode; raises ValueError with what is wrong."""
    raw = zlib.decompress(payload)
    (n,) = struct.unpack_from("<I", raw, 0)
    if 4 + n > len(raw):
        raise ValueError(f"JSON length {n} runs past the payload ({len(raw)} bytes)")
    info = json.loads(raw[4:4 + n].decode())
    if not isinstance(info, dict):
        raise ValueError("record JSON is not an object")
    arrays, offset = {}, 4 + n
    for name, dtype, shape in info.pop("arrays"):
        if dtype not in ARRAY_DTYPES or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"array {name!r} has unsupported dtype {dtype!r} or shape {shape}")
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if offset + size > len(raw):
            raise ValueError(f"array {name!r} {dtype}{shape} runs past the end of the record")
        arrays[name] = np.frombuffer(raw, dtype=dtype, count=size // np.dtype(dtype).itemsize,
                                     offset=offset).reshape(shape)
        offset += size
    if offset != len(raw):
        raise ValueError(f"{len(raw) - offset} stray bytes after the arrays")
    return info, arrays


def iter_records(path: str | Path) -> Iterator[tuple[int, bytes, dict, dict]]:
    """(record number, kind, info, arrays) for each complete record; the header is record 0."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            raise TraceError(f"{path}: empty or truncated before the header")
        raise TraceError(f"{path}: not a moetune trace (bad magic bytes)")
    offset, n = len(MAGIC), 0
    while offset < len(data):
        if offset + FRAME_SIZE > len(data):
            raise _Truncated(n)
        length, crc, kind = struct.unpack_from(FRAME, data, offset)
        start = offset + FRAME_SIZE
        if start + length > len(data):
            raise _Truncated(n)
        payload = data[start:start + length]
        if zlib.crc32(kind + payload) != crc:
            raise TraceError(f"{path}: record {n}: bad checksum (the file is corrupted)")
        try:
            info, arrays = decode(payload)
        except DECODE_ERRORS as e:
            raise TraceError(f"{path}: record {n}: undecodable payload ({e})") from None
        yield n, kind, info, arrays
        offset, n = start + length, n + 1


def tree_from(name: str, info: dict, arrays: dict, meta: TraceMeta) -> TreeRecord:
    """Build and check one drafter's tree against the header's shape."""
    fields = {f: arrays[f"{name}.{f}"] for f in TREE_ARRAYS}
    s, g = meta.shape, len(meta.budget_grid)
    n = fields["parents"].shape[0] if fields["parents"].ndim == 1 else -1
    want = dict(parents=(n,), tokens=(n,), probs=(n,), argmax=(n + 1,),
                experts=(n + 1, s.num_layers, meta.router_top), router_probs=(n + 1, s.num_layers, meta.router_top),
                budget_argmax=(g, n + 1))
    for f, shape in want.items():
        if fields[f].shape != shape:
            raise ValueError(f"tree {name!r}: {f} has shape {fields[f].shape}, expected {shape}")
    parents = fields["parents"].astype(np.int64)
    if n and not np.all((parents >= -1) & (parents < np.arange(n))):
        raise ValueError(f"tree {name!r}: parents must satisfy -1 <= parent[i] < i")
    if fields["experts"].size and int(fields["experts"].max()) >= s.num_experts:
        raise ValueError(f"tree {name!r}: expert index >= num_experts={s.num_experts}")
    return TreeRecord(**fields, t_draft=float(info["t_draft"]), t_verify=float(info["t_verify"]),
                      top_k=s.top_k, grid=meta.budget_grid, limits=meta.drafters[name],
                      router_full=meta.router_top == s.num_experts)


def live_from(info: dict, arrays: dict, num_layers: int) -> LiveRun:
    live = LiveRun(policy=info["policy"], configs=[config_from_dict(c) for c in info["configs"]], **arrays)
    s = live.config_index.shape
    if any(getattr(live, f).shape != s for f in ("position", "accepted", "emitted", "tree_size")) or \
            live.unique_experts.shape != s + (num_layers,) or live.times.shape != s + (5,):
        raise ValueError("live run arrays have inconsistent shapes")
    if s[0] and not 0 <= int(live.config_index.max()) < len(live.configs):
        raise ValueError("live run config_index out of range")
    return live


def read_trace(path: str | Path, strict: bool = False) -> Trace:
    """Read and validate a whole trace file (see module docstring for truncated files)."""
    meta, requests, truncated = None, [], ""
    records = iter_records(path)
    try:
        for n, kind, info, arrays in records:
            try:
                if n == 0 or kind == KIND_HEADER:
                    if n != 0 or kind != KIND_HEADER:
                        raise ValueError("the header must be the first record and only there")
                    meta = meta_from_dict(info["meta"])
                elif kind == KIND_REQUEST:
                    if requests and not requests[-1].complete:
                        raise ValueError(f"request {requests[-1].request_id} was never ended")
                    prompt_ids = arrays.pop("prompt_ids", None)
                    live = live_from(info["live"], arrays, meta.shape.num_layers) if "live" in info else None
                    if prompt_ids is not None and prompt_ids.shape != (int(info["prompt_len"]),):
                        raise ValueError(f"prompt_ids has shape {prompt_ids.shape}, expected ({info['prompt_len']},)")
                    requests.append(RequestTrace(request_id=int(info["request_id"]),
                                                 prompt_len=int(info["prompt_len"]), kind=info["kind"],
                                                 prompt=info["prompt"], live=live,
                                                 max_new_tokens=int(info.get("max_new_tokens", 0)),
                                                 prompt_ids=prompt_ids))
                elif kind in (KIND_POSITION, KIND_END):
                    req = requests[-1] if requests and not requests[-1].complete else None
                    if req is None or int(info["request_id"]) != req.request_id:
                        raise ValueError(f"record for request {info['request_id']} outside that request")
                    if kind == KIND_END:
                        req.complete = True
                        continue
                    if int(info["p"]) != len(req.positions):
                        raise ValueError(f"position {info['p']} out of order (expected {len(req.positions)})")
                    if set(info["trees"]) - set(meta.drafters):
                        raise ValueError(f"trees for drafters not in the header: {sorted(info['trees'])}")
                    trees = {d: tree_from(d, t, arrays, meta) for d, t in info["trees"].items()}
                    req.positions.append(Position(token=int(info["token"]), trees=trees))
                else:
                    raise ValueError(f"unknown record kind {kind!r}")
            except DECODE_ERRORS as e:
                raise TraceError(f"{path}: record {n}: {e}") from None
    except _Truncated as t:
        (n,) = t.args
        if meta is None:
            raise TraceError(f"{path}: truncated inside the header record") from None
        truncated = f"file ends inside record {n}; read the {n - 1} records before it"
        if strict:
            raise TraceError(f"{path}: truncated: {truncated}") from None
    if meta is None:
        raise TraceError(f"{path}: no header record")
    return Trace(meta=meta, requests=requests, path=str(path), truncated=truncated)
