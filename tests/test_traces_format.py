"""Trace files: round trip, and a reader that either reads a valid prefix or raises TraceError."""
import numpy as np
import pytest

from moetune.step import ModelShape, StepConfig
from moetune.traces.reader import read_trace
from moetune.traces.schema import MAGIC, LiveRun, TraceError
from moetune.traces.synthetic import synthetic_trace
from moetune.traces.writer import TraceWriter, write_trace

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
    assert "record 6" in back.truncated
    with pytest.raises(TraceError, match="truncated"):
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
    monkeypatch.setattr(writer, "meta_to_dict", lambda m: dict(real(m), version=99))
    write_trace(trace, tmp_path / "v.trace")
    with pytest.raises(TraceError, match="record 0: trace schema version 99"):
        read_trace(tmp_path / "v.trace")
    monkeypatch.setattr(writer, "meta_to_dict", real)
    tree = trace.requests[0].positions[0].trees["draft_model"]
    tree.experts = tree.experts[:, :1]  # one layer where the header says two
    write_trace(trace, tmp_path / "s.trace")
    with pytest.raises(TraceError, match=r"record 2: tree 'draft_model': experts has shape"):
        read_trace(tmp_path / "s.trace")
