"""Trace files: round trip, and a reader that either reads a valid prefix or raises TraceError: killed runs
are told from damage, and checksum-valid but invalid contents fail with one line naming the field."""
import json
import re
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest

from moetune.cli import main
from moetune.step import ModelShape, StepConfig
from moetune.traces import reader
from moetune.traces.latency import LatencyModel
from moetune.traces.reader import iter_records, read_trace
from moetune.traces.schema import KIND_POSITION, MAGIC, LiveRun, RequestTrace, TraceError
from moetune.traces.synthetic import synthetic_trace
from moetune.traces.writer import TraceWriter, encode, frame, write_trace
from test_trace_fuzz import bomb, offsets

SHAPE = ModelShape(num_layers=2, num_experts=8, top_k=2)


def small_trace(**kw):
    return synthetic_trace(SHAPE, n_requests=2, n_tokens=6, seed=3, drafters=("draft_model", "ngram"), **kw)


def same_tree(a, b):
    fields = ("parents", "tokens", "probs", "argmax", "experts", "router_probs", "budget_argmax")
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in fields)


def assert_prefix(part, full):
    """Every request and position read from a damaged file equals the original's."""
    assert part.meta == full.meta
    assert len(part.requests) <= len(full.requests)
    for r, f in zip(part.requests, full.requests):
        assert (r.request_id, r.prompt_len, r.kind) == (f.request_id, f.prompt_len, f.kind)
        assert len(r.positions) <= len(f.positions)
        for p, q in zip(r.positions, f.positions):
            assert p.token == q.token and p.trees.keys() == q.trees.keys()
            assert all(same_tree(p.trees[d], q.trees[d]) for d in p.trees)


def test_round_trip(tmp_path):
    trace = small_trace()
    live = LiveRun("static", [StepConfig(depth=3)], np.zeros(2, np.int32), np.array([0, 3], np.int32),
                   np.array([2, 1], np.int32), np.array([3, 2], np.int32), np.array([3, 3], np.int32),
                   np.ones((2, 2), np.int16), np.full((2, 5), 1e-3))
    trace.requests[0].live = live
    trace.requests[0].prompt_ids = np.arange(trace.requests[0].prompt_len, dtype=np.int32) + 7
    size = write_trace(trace, tmp_path / "t.trace")
    assert size == (tmp_path / "t.trace").stat().st_size
    back = read_trace(tmp_path / "t.trace", strict=True)
    assert_prefix(back, trace)
    assert [len(r.positions) for r in back.requests] == [6, 6] and all(r.complete for r in back.requests)
    assert back.truncated == ""
    got = back.requests[0].live
    assert got.configs == [StepConfig(depth=3)] and np.array_equal(got.times, live.times)
    assert got.goodput == pytest.approx(5 / 0.01)
    assert np.array_equal(back.requests[0].prompt_ids, trace.requests[0].prompt_ids)
    assert back.requests[1].prompt_ids is None  # optional: traces without prompt ids still read


def test_ngram_orders_round_trip_and_default_in_older_traces(tmp_path):
    """The n-gram drafter's orders travel in the header; a header written before they were reads as the
    drafter's defaults (4, 1)."""
    from dataclasses import replace
    trace = small_trace()
    trace.meta = replace(trace.meta, ngram_max_n=3, ngram_min_n=2)
    write_trace(trace, tmp_path / "t.trace")
    meta = read_trace(tmp_path / "t.trace").meta
    assert (meta.ngram_max_n, meta.ngram_min_n) == (3, 2)
    old = rewrite(tmp_path / "t.trace", tmp_path / "old.trace", 0, lambda info, arrays: info["meta"].pop("ngram"))
    meta = read_trace(old).meta
    assert (meta.ngram_max_n, meta.ngram_min_n) == (4, 1)
    with pytest.raises(ValueError, match="min_n <= max_n"):
        replace(meta, ngram_min_n=5)


def test_prompt_ids_must_match_the_prompt_length(tmp_path):
    trace = small_trace()
    trace.requests[0].prompt_ids = np.zeros(trace.requests[0].prompt_len + 1, dtype=np.int32)
    with pytest.raises(ValueError, match="prompt_ids has .* tokens but prompt_len is"):
        write_trace(trace, tmp_path / "t.trace")


def test_killed_run_reads_up_to_last_complete_position(tmp_path):
    trace = small_trace()
    path = tmp_path / "k.trace"
    w = TraceWriter(path, trace.meta)
    w.begin_request(0, 32)
    for pos in trace.requests[0].positions[:4]:
        w.position(pos.token, pos.trees)
    data = path.read_bytes()  # flushed per record: everything so far is on disk without close()
    path.write_bytes(data + b"\x07" * 5)  # a record header cut short, as if killed mid-write
    back = read_trace(path)
    assert len(back.requests[0].positions) == 4 and not back.requests[0].complete
    assert back.truncated == ("killed run: the file ends inside record 6 (its frame header cut short); "
                              "read through request 0 position 3")
    with pytest.raises(TraceError, match=r"truncated: killed run: .*record 6.*position 3$"):
        read_trace(path, strict=True)
    path.write_bytes(data)  # killed between records: the request has no end record
    assert read_trace(path).truncated == ("killed run: the file ends after record 5, before request 0's end "
                                          "record; read through request 0 position 3")
    with pytest.raises(TraceError, match="truncated: killed run"):
        read_trace(path, strict=True)
    w.close()


def test_fuzz_truncations_and_byte_flips(tmp_path):
    trace = small_trace()
    path = tmp_path / "f.trace"
    write_trace(trace, path)
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    outcomes = {"prefix": 0, "error": 0}
    damaged = [data[:n] for n in rng.integers(0, len(data), 60)]
    for _ in range(60):
        b = bytearray(data)
        i = int(rng.integers(0, len(b)))
        b[i] ^= int(rng.integers(1, 256))
        damaged.append(bytes(b))
    for blob in damaged:
        path.write_bytes(blob)
        try:
            part = read_trace(path)
        except TraceError as e:
            assert str(path) in str(e)
            outcomes["error"] += 1
            continue
        assert_prefix(part, trace)
        outcomes["prefix"] += 1
    assert outcomes["prefix"] > 0 and outcomes["error"] > 0


def test_clear_errors(tmp_path):
    path = tmp_path / "e.trace"
    path.write_bytes(b"hello world, not a trace")
    with pytest.raises(TraceError, match="not a moetune trace"):
        read_trace(path)
    path.write_bytes(MAGIC[:5])
    with pytest.raises(TraceError, match="truncated before the header"):
        read_trace(path)
    trace = small_trace()
    write_trace(trace, path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last record's payload
    path.write_bytes(bytes(data))
    with pytest.raises(TraceError, match=r"record \d+: bad checksum"):
        read_trace(path)


def test_wrong_version_and_inconsistent_shapes(tmp_path, monkeypatch):
    import moetune.traces.writer as writer
    trace = small_trace()
    real = writer.meta_to_dict
    for version, why in ((99, "99 is newer than this moetune reads .*; upgrade moetune"),
                         ("1.1", "1.1 is newer .*; upgrade moetune"), (1.5, "1.5 is newer"),
                         (0, "0 is not supported .*; re-record the trace"), ("one", "expected a version number"),
                         (True, "expected a version number")):
        monkeypatch.setattr(writer, "meta_to_dict", lambda m: dict(real(m), version=version))
        write_trace(trace, tmp_path / "v.trace")
        with pytest.raises(TraceError, match=f"record 0: meta.version: (trace schema version )?{why}"):
            read_trace(tmp_path / "v.trace")
    monkeypatch.setattr(writer, "meta_to_dict", lambda m: dict(real(m), version="1.0"))
    write_trace(trace, tmp_path / "v.trace")
    assert read_trace(tmp_path / "v.trace").meta.version == 1
    monkeypatch.setattr(writer, "meta_to_dict", real)
    tree = trace.requests[0].positions[0].trees["draft_model"]
    tree.experts = tree.experts[:, :1]  # one layer where the header says two
    write_trace(trace, tmp_path / "s.trace")
    with pytest.raises(TraceError, match=r"record 2: draft_model.experts: shape \(\d+, 1, 2\), expected \(\d+, 2, 2\)"):
        read_trace(tmp_path / "s.trace")


def live_trace_file(path):
    """A small trace whose first request has a live run and prompt ids. Records: 0 header, 1 request 0,
    2-7 its positions, 8 its end, 9 request 1, 10-15 positions, 16 end."""
    trace = small_trace()
    trace.requests[0].live = LiveRun("static", [StepConfig(depth=3)], np.zeros(2, np.int32), np.array([0, 3], np.int32),
                                     np.array([2, 1], np.int32), np.array([3, 2], np.int32),
                                     np.array([3, 3], np.int32), np.ones((2, 2), np.int16), np.full((2, 5), 1e-3))
    trace.requests[0].prompt_ids = np.arange(trace.requests[0].prompt_len, dtype=np.int32)
    write_trace(trace, path)
    return path


def rewrite(src, dst, index, change):
    """Copy trace `src` to `dst` with change(info, arrays) applied to record `index`, re-encoded with a valid
    checksum (so only the content checks can catch it)."""
    recs = [(k, json.loads(json.dumps(i)), {n: a.copy() for n, a in arr.items()}) for _, k, i, arr in iter_records(src)]
    change(recs[index][1], recs[index][2])
    dst.write_bytes(MAGIC + b"".join(frame(k, encode(i, a)) for k, i, a in recs))
    return dst


def setitem(d, key, value):
    d[key] = value


def poke(name, value, where=0):
    """A change that sets one element of array `name`."""
    def change(info, arrays):
        arrays[name].reshape(-1)[where] = value
    return change


def header_shape(**kw):
    """A change to the header's model shape."""
    return lambda info, arrays: info["meta"]["shape"].update(kw)


CONTENT_CASES = [  # (record, change, message): every checksum-valid content error names record and field
    (0, header_shape(num_layers=10**12), r"record 0: meta.shape.num_layers: 1000000000000 is out of range"),
    (0, header_shape(num_experts=2**20), r"record 0: meta.shape.num_experts: 1048576 is out of range"),
    (0, header_shape(top_k=2.0), r"record 0: meta.shape.top_k: expected an integer, got 2.0"),
    (0, lambda i, a: i["meta"]["drafters"]["draft_model"].update(depth=10**6), r"meta.drafters.draft_model.depth"),
    (0, lambda i, a: i["meta"]["drafters"]["ngram"].update(topk=True), r"meta.drafters.ngram.topk: expected an int"),
    (0, lambda i, a: setitem(i["meta"], "router_top", 9), r"meta.router_top: 9 is out of range \[2, 8\]"),
    (0, lambda i, a: setitem(i["meta"], "hardware", dict(gpu=[[1]])), r"meta.hardware.gpu: expected a plain value"),
    (0, lambda i, a: setitem(i["meta"], "ngram", dict(max_n=2, min_n=3)), r"meta.ngram.min_n: 3 is out of range"),
    (0, lambda i, a: setitem(i["meta"], "ngram", dict(max_n=10**6)), r"meta.ngram.max_n: 1000000 is out of range"),
    (0, lambda i, a: setitem(i["meta"], "ngram", dict(max_n=2.0)), r"meta.ngram.max_n: expected an integer"),
    (2, lambda i, a: setitem(i, "token", 2**31), r"record 2: token: 2147483648 is out of range"),
    (2, lambda i, a: setitem(a, "ngram.tokens", a["ngram.tokens"].astype(np.int64) + 2**32),
     r"record 2: ngram.tokens: dtype int64, expected int32"),
    (3, poke("draft_model.tokens", -5), r"record 3: draft_model.tokens: values must be in \[0, 2147483647\]"),
    (2, lambda i, a: setitem(a, "draft_model.experts", a["draft_model.experts"].astype(np.float32)),
     r"draft_model.experts: dtype float32, expected uint8"),
    (2, lambda i, a: setitem(a, "draft_model.experts", a["draft_model.experts"] > 0),
     r"draft_model.experts: dtype bool, expected uint8"),
    (2, poke("draft_model.experts", 8), r"record 2: draft_model.experts: values must be in \[0, 7\], found 0..8"),
    (2, lambda i, a: setitem(a, "draft_model.argmax", a["draft_model.argmax"][None]),
     r"record 2: draft_model.argmax: shape \(1, \d+\), expected \(\d+,\)"),
    (2, lambda i, a: (i["trees"].clear(), a.clear()), r"record 2: trees: a position holds one tree per drafter"),
    (4, lambda i, a: i["trees"].pop("ngram"), r"record 4: trees: a position holds one tree per drafter"),
    (2, lambda i, a: setitem(a, "extra", np.zeros(3)), r"record 2: arrays: unexpected \['extra'\]"),
    (2, poke("draft_model.probs", np.nan), r"record 2: draft_model.probs: values must be in \[0, 1\], found nan"),
    (2, poke("draft_model.probs", -0.0), r"record 2: draft_model.probs: values must be in \[0, 1\]"),
    (2, poke("ngram.router_probs", -0.25, 3), r"record 2: ngram.router_probs: values must be in \[0, 1\]"),
    (2, lambda i, a: i["trees"]["draft_model"].update(t_draft=float("nan")),
     r"record 2: trees.draft_model.t_draft: expected a finite number, got nan"),
    (2, lambda i, a: i["trees"]["ngram"].update(t_verify=-1.0), r"trees.ngram.t_verify: -1.0 is out of range"),
    (2, poke("draft_model.parents", 5, 1), r"record 2: draft_model.parents: a node's parent must come before it"),
    (2, lambda i, a: i.pop("p"), r"record 2: p: missing"),
    (3, lambda i, a: setitem(i, "p", 2), r"record 3: p: position 2 out of order \(expected 1\)"),
    (1, lambda i, a: setitem(a, "config_index", a["config_index"] + 0.5),
     r"record 1: config_index: dtype float64, expected int32"),
    (1, poke("config_index", 1), r"record 1: config_index: values must be in \[0, 0\]"),
    (1, lambda i, a: i["live"]["configs"][0].update(depth=2.5), r"record 1: live.configs\[0\].depth: expected an int"),
    (1, lambda i, a: i["live"]["configs"][0].update(budgets=[1, 99]), r"live.configs\[0\].budgets: 99 is out of"),
    (1, lambda i, a: i["live"]["configs"][0].update(drafter="x"), r"live.configs\[0\]: StepConfig.drafter must be"),
    (1, poke("times", -1.0, 4), r"record 1: times: values must be in \[0, 1000000.0\]"),
    (1, poke("times", np.inf, 4), r"record 1: times: values must be in"),
    (1, lambda i, a: setitem(a, "prompt_ids", a["prompt_ids"][:-1]), r"record 1: prompt_ids: shape"),
    (1, lambda i, a: setitem(i, "prompt", ["not", "text"]), r"record 1: prompt: expected a string"),
    (9, lambda i, a: setitem(i, "request_id", 0), r"record 9: request_id: request 0 appears twice"),
    (8, lambda i, a: setitem(i, "positions", 5), r"record 8: positions: the end record counts 5 positions, "
                                                 r"request 0 has 6"),
    (16, lambda i, a: setitem(i, "positions", 7), r"record 16: positions: the end record counts 7 positions"),
]


@pytest.mark.parametrize("index,change,message", CONTENT_CASES)
def test_invalid_contents_fail_naming_record_and_field(tmp_path, index, change, message):
    src = live_trace_file(tmp_path / "ok.trace")
    bad = rewrite(src, tmp_path / "bad.trace", index, change)
    with pytest.raises(TraceError, match=message) as e:
        read_trace(bad)
    assert str(e.value).startswith(f"{bad}: record {index}: ") and "\n" not in str(e.value)


def raw_record(kind: bytes, text: bytes, body: bytes = b"", level: int = 6) -> bytes:
    """A framed record from raw JSON text and array bytes (for what writer.encode cannot write)."""
    return frame(kind, zlib.compress(struct.pack("<I", len(text)) + text + body, level))


def with_record(tmp_path, record: bytes, index: int = 2):
    """The small trace with record `index` replaced."""
    data = small_trace_file(tmp_path)
    starts = offsets(data) + [len(data)]
    path = tmp_path / "x.trace"
    path.write_bytes(data[:starts[index]] + record + data[starts[index + 1]:])
    return path


def small_trace_file(tmp_path) -> bytes:
    write_trace(small_trace(), tmp_path / "s.trace")
    return (tmp_path / "s.trace").read_bytes()


def test_deeply_nested_json_and_oversized_tables(tmp_path):
    nested = b'{"request_id":0,"p":0,"token":1,"trees":' + b"[" * 100_000 + b"]" * 100_000 + b',"arrays":[]}'
    with pytest.raises(TraceError, match=r"record 2: undecodable payload \(record JSON is nested too deeply\)"):
        read_trace(with_record(tmp_path, raw_record(KIND_POSITION, nested)))
    for shape, why in (([2**20, 2**20], "the table declares 1099511627776 bytes, more than a record may hold"),
                       ([2**40], "bad array table entry"), ([1.5], "bad array table entry"), ([-1], "bad array")):
        table = json.dumps(dict(request_id=0, p=0, token=1, trees={}, arrays=[["x", "uint8", shape]])).encode()
        with pytest.raises(TraceError, match=f"record 2: undecodable payload \\(arrays: {why}"):
            read_trace(with_record(tmp_path, raw_record(KIND_POSITION, table)))


def test_compression_bombs_are_rejected_within_bounded_memory(tmp_path, monkeypatch):
    small_trace_file(tmp_path)
    recs = list(iter_records(tmp_path / "s.trace"))
    raw = zlib.decompress(encode(recs[2][2], recs[2][3]))
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(TraceError, match=r"record 2: undecodable payload \(arrays: the table declares \d+ bytes, "
                                         r"the record holds more\)"):
        read_trace(with_record(tmp_path, frame(KIND_POSITION, bomb(raw, 2048))))  # 2 GiB inflated
    # a killed run's last record is checked by inflating it (output discarded) up to the cap
    monkeypatch.setattr(reader, "MAX_RECORD_BYTES", 32 << 20)
    data = small_trace_file(tmp_path)
    cut = bomb(raw, 64)[:-4]
    (tmp_path / "c.trace").write_bytes(data + struct.pack("<IIc", len(cut) + 100, 0, KIND_POSITION) + cut)
    with pytest.raises(TraceError, match=r"record 17: damaged: the \d+ bytes after its frame are not the start of a "
                                         r"record \(it inflates past 33554432 bytes\)"):
        read_trace(tmp_path / "c.trace")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 << 20 and time.perf_counter() - t0 < 4


def test_damage_is_not_read_as_a_killed_run(tmp_path):
    data = small_trace_file(tmp_path)
    starts = offsets(data)
    path = tmp_path / "d.trace"
    for index, length, why in ((3, 10**6, r"damaged length field: it claims 1000000 bytes, but the record ends "
                                          r"after \d+ and \d+ more bytes follow; the file is corrupted"),
                               (3, 10, "bad checksum"), (16, 2**32 - 1, "damaged length field"),
                               (16, 40, "bad checksum")):
        b = bytearray(data)
        struct.pack_into("<I", b, starts[index], length)
        path.write_bytes(bytes(b))
        with pytest.raises(TraceError, match=f"^{re.escape(str(path))}: record {index}: {why}"):
            read_trace(path)
    cut_frame = struct.pack("<II", 500, 0)  # a last record claiming 500 bytes, with fewer left
    for tail, why in ((cut_frame + b"Z\x78\x9c", "damaged frame \\(unknown record kind"),
                      (cut_frame + KIND_POSITION + bytes(100), "damaged: the 100 bytes after its frame")):
        path.write_bytes(data + tail)
        with pytest.raises(TraceError, match=f"record 17: {why}"):
            read_trace(path)


def killed_trace(tmp_path):
    """A run killed inside record 5 (request 0's fourth position): positions 0-2 read."""
    trace = small_trace()
    path = tmp_path / "killed.trace"
    write_trace(trace, path)
    data = path.read_bytes()
    starts = offsets(data)
    path.write_bytes(data[:starts[5] + 40])
    return path


def test_replay_reports_a_killed_run_and_strict_fails(tmp_path, capsys):
    path, prof = killed_trace(tmp_path), tmp_path / "lat.json"
    LatencyModel.analytic(SHAPE).to_json(prof)
    assert main(["replay", str(path), "--policy", "plain", "--profile", str(prof)]) == 0
    err = capsys.readouterr().err
    assert err == (f"moetune replay: warning: {path}: stopped early: killed run: the file ends inside record 5 "
                   f"(a position record cut short); read through request 0 position 2; replaying what was read "
                   f"(--strict fails instead)\n")
    assert main(["replay", str(path), "--policy", "plain", "--profile", str(prof), "--strict"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moetune replay: error: {path}: truncated: killed run: ") and err.count("\n") == 1
    b = bytearray(path.read_bytes())
    struct.pack_into("<I", b, offsets(bytes(b))[2], 10**6)
    path.write_bytes(bytes(b))
    for strict in ([], ["--strict"]):
        assert main(["replay", str(path), "--policy", "plain", "--profile", str(prof), *strict]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"moetune replay: error: {path}: record 2: damaged length field") and err.count("\n") == 1


def test_replay_of_a_trace_without_positions_reports_it(tmp_path, capsys):
    trace = small_trace()
    trace.requests = [RequestTrace(request_id=0, prompt_len=4, complete=True)]
    path, prof = tmp_path / "empty.trace", tmp_path / "lat.json"
    write_trace(trace, path)
    LatencyModel.analytic(SHAPE).to_json(prof)
    for extra in ([], ["--per-request"]):
        rc = main(["replay", str(path), "--policy", "plain", "--policy", "static:depth=4", "--profile", str(prof),
                   *extra])
        out, err = capsys.readouterr()
        assert rc == 0 and "| plain | 1 | 0 |" in out
        assert err == f"moetune replay: warning: {path}: no recorded positions to replay\n"
