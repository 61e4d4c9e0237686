"""Trace reader: validates every record and turns any problem into a one-line TraceError naming the file,
the record number and the field, instead of a traceback from deep inside numpy or zlib, or wrong figures.

What is checked: each record's checksum; its size (the JSON is inflated first and then only as many bytes
as its array table declares, never more than MAX_RECORD_BYTES, so a compression bomb is rejected after one
byte too many); and its contents: types, ranges and shapes against the header, whose sizes are bounded
first (schema.meta_from_dict), the writer's array dtypes, token ids, expert ids, probabilities, timings.

Killed or damaged. The writer appends whole records, so a run killed mid-write can only cut the LAST
record: its frame header or its payload ends at end-of-file. A record that claims to run past the end of
the file is taken for such a cut only if what is there can be its start: a known kind, a length a record
can have, and bytes that begin a zlib stream without finishing it. A damaged length field fails this (the
real record's stream ends inside the bytes left, or they do not start one), and one damaged to land inside
the file fails the checksum. Damage is always a TraceError, strict or not: nothing after it can be trusted,
and a prefix would replay as if it were the whole run. A killed run (a cut last record, or a last request
without its end record) reads up to its last complete record, `Trace.truncated` says where it stopped and
what was read, and strict=True makes it a TraceError.

Shape legend: N draft nodes, L MoE layers, M router entries kept, E experts, G grid budgets, S live steps.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from moetune.step import ModelShape

from .schema import (ARRAY_DTYPES, FORWARD_COLUMNS, FRAME, INT32_MAX, KIND_END, KIND_HEADER, KIND_POSITION,
                     KIND_REQUEST, MAGIC, MAX_NODES, MAX_SECONDS, Fields, LiveRun, Position, RequestTrace, Trace, TraceError,
                     TraceMeta, TreeRecord, config_from_dict, meta_from_dict, show)
from .writer import TREE_ARRAYS, TREE_DTYPES, expert_dtype

FRAME_SIZE = struct.calcsize(FRAME)
KINDS = {KIND_HEADER: "header", KIND_REQUEST: "request", KIND_POSITION: "position", KIND_END: "end"}
# One record, inflated. The largest real ones (L = 60, M = E = 256, three drafters of ~500 nodes) are ~70 MB.
MAX_RECORD_BYTES = 256 << 20
MAX_NDIM = 4
CHUNK = 1 << 20  # bytes of input or output per zlib call when checking a cut record
_DTYPES = {name: np.dtype(name) for name in ARRAY_DTYPES}
_LIMITS = {name: np.iinfo(dt) for name, dt in _DTYPES.items() if dt.kind in "iu"}
# Checks raise ValueError; the others are a safety net, so bad input never escapes as a traceback.
DECODE_ERRORS = (KeyError, TypeError, ValueError, IndexError, AttributeError, zlib.error, struct.error)
LIVE_ARRAYS = dict(config_index=np.int32, position=np.int32, accepted=np.int32, emitted=np.int32,
                   tree_size=np.int32, unique_experts=np.int16, times=np.float64)  # as TraceWriter writes them


class _Cut(Exception):
    """The file ends inside record n, of kind `kind` (None: inside its frame header). Internal."""

    def __init__(self, n: int, kind: bytes | None):
        super().__init__(n, kind)
        self.n, self.kind = n, kind


def _why(e: Exception) -> str:
    """An exception as one line of a TraceError."""
    text = f"missing {e.args[0]!r}" if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(text.split()) or type(e).__name__


def _inflate(z, data, want: int) -> bytes:
    """Up to `want` more bytes of z's output, fed `data` (then whatever z leaves unconsumed)."""
    out, got = [], 0
    while got < want and not z.eof:
        chunk = z.decompress(data, want - got)
        if not chunk and len(z.unconsumed_tail) == len(data):
            break  # input used up, no output pending
        data = z.unconsumed_tail
        out.append(chunk)
        got += len(chunk)
    return b"".join(out)


def _array_table(table) -> list[tuple[str, np.dtype, tuple, int]]:
    """(name, dtype, shape, bytes) per array of a record's table: names once each, known dtypes, at most
    MAX_NDIM non-negative dimensions."""
    if not isinstance(table, list):
        raise ValueError(f"arrays: expected the record's array table (a list), got {show(table)}")
    out, seen = [], set()
    for entry in table:
        ok = type(entry) is list and len(entry) == 3 and type(entry[0]) is str and type(entry[1]) is str
        dt, shape = _DTYPES.get(entry[1]) if ok else None, entry[2] if ok else None
        if dt is None or type(shape) is not list or len(shape) > MAX_NDIM or \
                any(type(d) is not int or not 0 <= d <= MAX_RECORD_BYTES for d in shape):
            raise ValueError(f"arrays: bad array table entry {show(entry)}")
        if entry[0] in seen:
            raise ValueError(f"arrays: {entry[0]!r} is listed twice")
        seen.add(entry[0])
        out.append((entry[0], dt, tuple(shape), math.prod(shape) * dt.itemsize))
    return out


def decode(payload) -> tuple[dict, dict[str, np.ndarray]]:
    """Inverse of writer.encode; raises ValueError saying what is wrong (see the module docstring for
    how inflating is bounded)."""
    z = zlib.decompressobj()
    head = _inflate(z, payload, 4)
    if len(head) < 4:
        raise ValueError("the record ends before its JSON length")
    (n,) = struct.unpack("<I", head)
    if n > MAX_RECORD_BYTES:
        raise ValueError(f"JSON length {n} is more than a record may hold ({MAX_RECORD_BYTES} bytes)")
    text = _inflate(z, z.unconsumed_tail, n)
    if len(text) < n:
        raise ValueError(f"JSON length {n} runs past the end of the record ({len(text)} bytes)")
    try:
        info = json.loads(text.decode())
    except RecursionError:
        raise ValueError("record JSON is nested too deeply") from None
    if not isinstance(info, dict):
        raise ValueError("record JSON is not an object")
    table = _array_table(info.pop("arrays", None))
    size = sum(t[3] for t in table)
    if 4 + n + size > MAX_RECORD_BYTES:
        raise ValueError(f"arrays: the table declares {size} bytes, more than a record may hold "
                         f"({MAX_RECORD_BYTES} bytes)")
    body = _inflate(z, z.unconsumed_tail, size + 1)
    if len(body) != size:
        raise ValueError(f"arrays: the table declares {size} bytes, the record holds "
                         f"{'more' if len(body) > size else len(body)}")
    if not z.eof or z.unused_data:
        raise ValueError("the compressed data is cut short" if not z.eof else "stray bytes after the compressed data")
    arrays, offset = {}, 0
    for name, dt, shape, nbytes in table:
        arrays[name] = np.frombuffer(body, dtype=dt, count=nbytes // dt.itemsize, offset=offset).reshape(shape)
        offset += nbytes
    return info, arrays


def _stream_end(rest: memoryview) -> int | None:
    """Bytes of `rest` that the zlib stream starting it takes, or None when `rest` is a prefix of one;
    raises zlib.error (not a stream) or ValueError (inflates past MAX_RECORD_BYTES). Output is discarded."""
    z, out, pos = zlib.decompressobj(), 0, 0
    while pos < len(rest):
        data = rest[pos:pos + CHUNK]
        pos += len(data)
        while True:
            chunk = z.decompress(data, CHUNK)
            out += len(chunk)
            if z.eof:
                return pos - len(z.unused_data)
            if out > MAX_RECORD_BYTES:
                raise ValueError(f"it inflates past {MAX_RECORD_BYTES} bytes")
            if not chunk and len(z.unconsumed_tail) == len(data):
                break
            data = z.unconsumed_tail
    return None


def _check_cut(path, n: int, kind: bytes, length: int, rest: memoryview) -> None:
    """Raise TraceError unless record n, which claims `length` bytes where only `rest` is left, can be a
    killed writer's last record (module docstring)."""
    where = f"{path}: record {n}"
    if kind not in KINDS:
        raise TraceError(f"{where}: damaged frame (unknown record kind {kind!r}); the file is corrupted")
    try:
        end = _stream_end(rest)
    except (zlib.error, ValueError) as e:
        raise TraceError(f"{where}: damaged: the {len(rest)} bytes after its frame are not the start of a record "
                         f"({_why(e)}); the file is corrupted") from None
    if end is not None:
        raise TraceError(f"{where}: damaged length field: it claims {length} bytes, but the record ends after "
                         f"{end} and {len(rest) - end} more bytes follow; the file is corrupted")


def iter_records(path: str | Path) -> Iterator[tuple[int, bytes, dict, dict]]:
    """(record number, kind, info, arrays) for each complete record; the header is record 0. Raises _Cut
    when the file ends inside a record, TraceError on damage."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TraceError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            raise TraceError(f"{path}: empty or truncated before the header")
        raise TraceError(f"{path}: not a moetune trace (bad magic bytes)")
    view = memoryview(data)
    offset, n = len(MAGIC), 0
    while offset < len(data):
        if offset + FRAME_SIZE > len(data):
            raise _Cut(n, None)
        length, crc, kind = struct.unpack_from(FRAME, data, offset)
        start = offset + FRAME_SIZE
        if start + length > len(data):
            _check_cut(path, n, kind, length, view[start:])
            raise _Cut(n, kind)
        payload = view[start:start + length]
        if zlib.crc32(payload, zlib.crc32(kind)) != crc:
            raise TraceError(f"{path}: record {n}: bad checksum (the file is corrupted)")
        try:
            info, arrays = decode(payload)
        except DECODE_ERRORS as e:
            raise TraceError(f"{path}: record {n}: undecodable payload ({_why(e)})") from None
        yield n, kind, info, arrays
        offset, n = start + length, n + 1


def check_array(arrays: dict, name: str, dtype, shape: tuple, lo, hi) -> np.ndarray:
    """arrays[name] with the writer's dtype, the shape the header implies and values in [lo, hi]; NaN fails
    and so does -0.0 when lo = 0 (replay orders draft probabilities by their bits)."""
    a = arrays.get(name)
    if a is None:
        raise ValueError(f"{name}: missing")
    if a.dtype != dtype:
        raise ValueError(f"{name}: dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.shape != shape:
        raise ValueError(f"{name}: shape {a.shape}, expected {shape}")
    if a.size and not _in_range(a, lo, hi):
        raise ValueError(f"{name}: values must be in [{lo}, {hi}], found {a.min()}..{a.max()}")
    return a


def _in_range(a: np.ndarray, lo, hi) -> bool:
    """All of a in [lo, hi], with one reduction where the dtype implies a bound. Non-negative floats
    (sign bit clear, not NaN) order like their bits, so lo = 0 checks the bits against hi's."""
    if a.dtype.kind == "f" and lo == 0:
        bits = np.dtype(f"u{a.dtype.itemsize}")
        return a.view(bits).max() <= np.array(hi, a.dtype).view(bits)
    if a.dtype.kind == "f":
        return lo <= a.min() <= a.max() <= hi
    limits = _LIMITS[a.dtype.name]
    return (lo <= limits.min or a.min() >= lo) and (hi >= limits.max or a.max() <= hi)


def tree_from(name: str, info: Fields, arrays: dict, meta: TraceMeta) -> TreeRecord:
    """One drafter's tree, checked against the header: dtypes, shapes from N and the header, parents
    before children, token ids, distinct expert ids below E, probabilities in [0, 1], timings."""
    s, m, e = meta.shape, meta.router_top, meta.shape.num_experts
    parents = arrays.get(f"{name}.parents")
    n = parents.shape[0] if parents is not None and parents.ndim else 0
    if n > MAX_NODES:
        raise ValueError(f"{name}.parents: {n} nodes, more than {MAX_NODES}")
    rows = (n + 1, s.num_layers, m)
    want = dict(parents=((n,), -1, MAX_NODES), tokens=((n,), 0, INT32_MAX), probs=((n,), 0, 1),
                argmax=((n + 1,), 0, INT32_MAX), experts=(rows, 0, e - 1), router_probs=(rows, 0, 1),
                budget_argmax=((len(meta.budget_grid), n + 1), 0, INT32_MAX))
    dtypes = dict(TREE_DTYPES, experts=expert_dtype(e))
    got = {f: check_array(arrays, f"{name}.{f}", dtypes[f], *want[f]) for f in TREE_ARRAYS}
    if n and np.any(got["parents"] >= np.arange(n)):
        raise ValueError(f"{name}.parents: a node's parent must come before it (-1 <= parent[i] < i)")
    ranked = np.sort(got["experts"], axis=2)
    if np.any(ranked[:, :, 1:] == ranked[:, :, :-1]):
        raise ValueError(f"{name}.experts: an expert is listed twice for one token and layer")
    return TreeRecord(**got, t_draft=info.real("t_draft"), t_verify=info.real("t_verify"), top_k=s.top_k,
                      grid=meta.budget_grid, limits=meta.drafters[name], router_full=m == e)


def live_from(info: Fields, arrays: dict, shape: ModelShape) -> LiveRun:
    """A request's live run, checked: S steps in every array, config indices into its configs,
    non-negative counts, unique experts in [0, E], finite non-negative times."""
    configs = [config_from_dict(c, f"live.configs[{i}]", shape) for i, c in enumerate(info.items("configs"))]
    index = arrays.get("config_index")
    steps = index.shape[0] if index is not None and index.ndim else 0
    one = (steps,)
    want = dict(config_index=(one, 0, len(configs) - 1), position=(one, 0, INT32_MAX), accepted=(one, 0, INT32_MAX),
                emitted=(one, 0, INT32_MAX), tree_size=(one, 0, INT32_MAX),
                unique_experts=((steps, shape.num_layers), 0, shape.num_experts), times=((steps, 5), 0, MAX_SECONDS))
    got = {k: check_array(arrays, k, dtype, *want[k]) for k, dtype in LIVE_ARRAYS.items()}
    if "forward" in arrays:  # a batched live run's shared forwards
        got["forward"] = check_array(arrays, "forward", np.float64, (steps, len(FORWARD_COLUMNS)), -1, INT32_MAX)
    return LiveRun(policy=info.text("policy"), configs=configs, **got)


class _Builder:
    """Builds a Trace from validated records, one at a time (what one record may say depends on those
    before it: the header's sizes, the open request, its position count)."""

    def __init__(self):
        self.meta: TraceMeta | None = None
        self.requests: list[RequestTrace] = []
        self.ids: set[int] = set()
        self.last = -1  # number of the last record read

    def add(self, path, n: int, kind: bytes, info: dict, arrays: dict) -> None:
        try:
            if n == 0 or kind == KIND_HEADER:
                if n != 0 or kind != KIND_HEADER:
                    raise ValueError("the header must be the first record and only there")
                if arrays:
                    raise ValueError(f"arrays: the header holds none, got {show(sorted(arrays))}")
                self.meta = meta_from_dict(Fields(info, "").get("meta"))
            elif kind in (KIND_REQUEST, KIND_POSITION, KIND_END):
                f = Fields(info, "")
                {KIND_REQUEST: self.request, KIND_POSITION: self.position, KIND_END: self.end}[kind](f, arrays)
            else:
                raise ValueError(f"unknown record kind {kind!r}")
        except DECODE_ERRORS as e:
            raise TraceError(f"{path}: record {n}: {_why(e)}") from None
        self.last = n

    def request(self, f: Fields, arrays: dict) -> None:
        if self.requests and not self.requests[-1].complete:
            raise ValueError(f"request {self.requests[-1].request_id} was never ended")
        rid = f.integer("request_id")
        if rid in self.ids:
            raise ValueError(f"request_id: request {rid} appears twice")
        prompt_len = f.integer("prompt_len")
        allowed = {"prompt_ids", "forward", *LIVE_ARRAYS} if "live" in f.d else {"prompt_ids"}
        if set(arrays) - allowed:
            raise ValueError(f"arrays: unexpected {show(sorted(set(arrays) - allowed))}")
        live = live_from(f.obj("live"), arrays, self.meta.shape) if "live" in f.d else None
        prompt_ids = None
        if "prompt_ids" in arrays:
            prompt_ids = check_array(arrays, "prompt_ids", np.int32, (prompt_len,), 0, INT32_MAX)
        self.requests.append(RequestTrace(request_id=rid, prompt_len=prompt_len, kind=f.text("kind", ""),
                                          prompt=f.text("prompt", ""), live=live, prompt_ids=prompt_ids,
                                          max_new_tokens=f.integer("max_new_tokens", default=0)))
        self.ids.add(rid)

    def open_request(self, f: Fields) -> RequestTrace:
        rid = f.integer("request_id")
        req = self.requests[-1] if self.requests and not self.requests[-1].complete else None
        if req is None or rid != req.request_id:
            raise ValueError(f"request_id: a record for request {rid} outside that request")
        return req

    def position(self, f: Fields, arrays: dict) -> None:
        req = self.open_request(f)
        p = f.integer("p")
        if p != len(req.positions):
            raise ValueError(f"p: position {p} out of order (expected {len(req.positions)})")
        if req.max_new_tokens and p >= req.max_new_tokens:
            raise ValueError(f"p: position {p} is past the request's max_new_tokens={req.max_new_tokens}")
        trees = f.obj("trees")
        if set(trees.d) != set(self.meta.drafters):  # so a policy never meets a position without its drafter
            raise ValueError(f"trees: a position holds one tree per drafter in the header "
                             f"{sorted(self.meta.drafters)}, got {show(sorted(trees.d))}")
        names = {f"{d}.{a}" for d in trees.d for a in TREE_ARRAYS}
        if set(arrays) - names:
            raise ValueError(f"arrays: unexpected {show(sorted(set(arrays) - names))}")
        built = {d: tree_from(d, trees.obj(d), arrays, self.meta) for d in trees.d}
        req.positions.append(Position(token=f.integer("token"), trees=built))

    def end(self, f: Fields, arrays: dict) -> None:
        req = self.open_request(f)
        if arrays:
            raise ValueError(f"arrays: an end record holds none, got {show(sorted(arrays))}")
        count = f.integer("positions")
        if count != len(req.positions):
            raise ValueError(f"positions: the end record counts {count} positions, request {req.request_id} "
                             f"has {len(req.positions)}")
        f.text("stop", "")
        req.complete = True

    def stopped(self, cut: _Cut | None) -> str:
        """Where a killed run's file stops, and the last request and position read ('' if it does not)."""
        last = self.requests[-1] if self.requests else None
        if cut is None and (last is None or last.complete):
            return ""
        if cut is None:
            where = f"the file ends after record {self.last}, before request {last.request_id}'s end record"
        else:
            what = f"a {KINDS[cut.kind]} record" if cut.kind else "its frame header"
            where = f"the file ends inside record {cut.n} ({what} cut short)"
        if last is None:
            read = "no request was read"
        elif last.complete:
            read = f"read through the end of request {last.request_id}"
        elif last.positions:
            read = f"read through request {last.request_id} position {len(last.positions) - 1}"
        else:
            read = f"read request {last.request_id}'s start, no positions"
        return f"killed run: {where}; {read}"


def read_trace(path: str | Path, strict: bool = False) -> Trace:
    """Read and validate a whole trace file (see the module docstring for killed and damaged files)."""
    build, cut = _Builder(), None
    try:
        for n, kind, info, arrays in iter_records(path):
            build.add(path, n, kind, info, arrays)
    except _Cut as c:
        cut = c
    if build.meta is None:
        raise TraceError(f"{path}: truncated inside the header record" if cut else f"{path}: no header record")
    truncated = build.stopped(cut)
    if truncated and strict:
        raise TraceError(f"{path}: truncated: {truncated}")
    return Trace(meta=build.meta, requests=build.requests, path=str(path), truncated=truncated)
