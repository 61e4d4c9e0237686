"""Fuzzing the trace reader with mutated sample traces: every mutation either reads and replays, or fails
with one TraceError line naming the file and the record, each within a time bound and all within a memory
bound. Content changes are re-encoded with valid checksums (writer.encode / frame), so they reach the
checks behind the checksum."""
import json
import re
import resource
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from moetune.traces.latency import LatencyModel
from moetune.traces.reader import iter_records, read_trace
from moetune.traces.replay import make_policy, replay
from moetune.traces.schema import ARRAY_DTYPES, KIND_END, KIND_POSITION, MAGIC, TraceError
from moetune.traces.writer import encode, frame

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "traces" / "samples").glob("*.trace"))
HOSTILE = [-1, 0, 1, 2**31, 2**63, 1.5, float("nan"), float("inf"), -0.0, True, None, "x", [], {}, [1, 2],
           {"a": 1}, 10**30]
CASE_SECONDS = 2.0
MAX_RSS_GROWTH_MB = 300


def records(path) -> list[tuple[bytes, dict, dict]]:
    return [(kind, info, arrays) for _, kind, info, arrays in iter_records(path)]


def blob(recs) -> bytes:
    return MAGIC + b"".join(frame(kind, encode(info, arrays)) for kind, info, arrays in recs)


def small(recs, keep=(4, 2)) -> list:
    """The header and the first positions of the first requests, each closed by an end record: a base that
    reads in milliseconds."""
    out, i = [recs[0]], 1
    for count in keep:
        kind, info, arrays = recs[i]
        out.append((kind, info, arrays))
        out += recs[i + 1:i + 1 + count]
        out.append((KIND_END, dict(request_id=info["request_id"], positions=count, stop="eos"), {}))
        i = next(j for j in range(i + 1, len(recs)) if recs[j][0] == KIND_END) + 1
    return out


def bomb(raw: bytes, zeros_mib: int) -> bytes:
    """A zlib stream of `raw` followed by `zeros_mib` MiB of zeros, built from one repeated deflate block
    (after a full flush a block does not depend on what came before), with a correct adler32 trailer."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(raw) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    tail = c.flush()
    adler = zlib.adler32(raw)
    a, b = adler & 0xFFFF, ((adler >> 16) + (zeros_mib << 20) * (adler & 0xFFFF)) % 65521
    return b"\x78\xda" + head + block * zeros_mib + tail + struct.pack(">I", (b << 16) | a)


def offsets(data: bytes) -> list[int]:
    """Where each record's frame starts."""
    out, o = [], len(MAGIC)
    while o < len(data):
        out.append(o)
        o += 9 + struct.unpack_from("<I", data, o)[0]
    return out


def set_leaf(info: dict, path: tuple, value) -> None:
    node = info
    for key in path[:-1]:
        node = node[key]
    if value is KeyError and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = None if value is KeyError else value


def leaves(obj, path=()):
    if path:
        yield path
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from leaves(v, path + (k,))


def mutate_json(recs, rng):
    i = int(rng.integers(len(recs)))
    kind, info, arrays = recs[i]
    info = json.loads(json.dumps(info))
    paths = list(leaves(info))
    if not paths:
        return None
    path = paths[int(rng.integers(len(paths)))]
    value = KeyError if rng.random() < 0.15 else HOSTILE[int(rng.integers(len(HOSTILE)))]
    set_leaf(info, path, value)
    return f"json record {i} {path} = {value!r}", recs[:i] + [(kind, info, arrays)] + recs[i + 1:]


def mutate_array(recs, rng):
    i = int(rng.integers(1, len(recs)))
    kind, info, arrays = recs[i]
    if not arrays:
        return None
    arrays = {k: v.copy() for k, v in arrays.items()}
    name = sorted(arrays)[int(rng.integers(len(arrays)))]
    a, how = arrays[name], int(rng.integers(4))
    if how == 0:
        arrays[name] = a.astype(ARRAY_DTYPES[int(rng.integers(len(ARRAY_DTYPES)))])
    elif how == 1:
        arrays[name] = a[None] if a.ndim < 3 else a[:-1]
    elif how == 2 and a.size:
        flat = a.reshape(-1)
        big = np.nan if a.dtype.kind == "f" else np.iinfo(a.dtype).max
        flat[int(rng.integers(a.size))] = [big, 0, -1 if a.dtype.kind != "u" else 200][int(rng.integers(3))]
    else:
        arrays[name] = a.reshape(-1)
    return f"array record {i} {name} change {how}", recs[:i] + [(kind, info, arrays)] + recs[i + 1:]


def mutate_raw(data: bytes, rng, inflated: bool):
    """Flip bytes of one record's payload (inflated or compressed) and recompute its checksum."""
    starts = offsets(data)
    i = int(rng.integers(len(starts)))
    o = starts[i]
    length, _, kind = struct.unpack_from("<IIc", data, o)
    payload = bytearray(zlib.decompress(data[o + 9:o + 9 + length]) if inflated else data[o + 9:o + 9 + length])
    for _ in range(int(rng.integers(1, 4))):
        payload[int(rng.integers(len(payload)))] ^= int(rng.integers(1, 256))
    payload = zlib.compress(bytes(payload)) if inflated else bytes(payload)
    return f"raw record {i} inflated={inflated}", data[:o] + frame(kind, payload) + data[o + 9 + length:]


def damage_length(data: bytes, rng):
    starts = offsets(data)
    i = int(rng.integers(len(starts)))
    length = struct.unpack_from("<I", data, starts[i])[0]
    new = [length + int(rng.integers(1, 64)), max(length - int(rng.integers(1, 64)), 0), int(rng.integers(2**32)),
           len(data) * 2, 2**32 - 1][int(rng.integers(5))]
    if new == length:
        new += 1
    b = bytearray(data)
    struct.pack_into("<I", b, starts[i], new)
    return f"length record {i} {length} -> {new}", bytes(b)


def run_case(path: Path, label: str, data: bytes, policy: str) -> str:
    """'read' or 'error' (one line naming the file and the record); anything else fails the test."""
    path.write_bytes(data)
    t0 = time.perf_counter()
    try:
        trace = read_trace(path)
        if trace.num_tokens:
            replay(trace, make_policy(policy), LatencyModel.analytic(trace.shape))
        outcome = "read"
    except TraceError as e:
        msg = str(e)
        assert "\n" not in msg, f"{label}: {msg}"
        assert re.match(re.escape(f"{path}: ") + r"(record \d+: |truncated inside the header|empty or truncated"
                        r"|not a moetune trace)", msg), f"{label}: {msg}"
        outcome = "error"
    except Exception as e:  # noqa: BLE001  (the point: nothing but TraceError may escape)
        pytest.fail(f"{label}: {type(e).__name__}: {e}")
    assert time.perf_counter() - t0 < CASE_SECONDS, label
    return outcome


def test_mutated_samples_read_and_replay_or_fail_in_one_line(tmp_path):
    assert len(SAMPLES) == 3
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rng = np.random.default_rng(11)
    counts = {"read": 0, "error": 0}
    for s, sample in enumerate(SAMPLES):
        full = records(sample)
        recs = small(full)
        data = blob(recs)
        path = tmp_path / f"m{s}.trace"
        cases = [mutate_json(recs, rng) for _ in range(80)] + [mutate_array(recs, rng) for _ in range(60)]
        cases = [(label, blob(r)) for label, r in filter(None, cases)]
        cases += [mutate_raw(data, rng, inflated=k % 4 != 0) for k in range(40)]
        for k, label_data in enumerate(cases):
            counts[run_case(path, *label_data, ("plain", "static:depth=4")[k % 2])] += 1
        for _ in range(16):  # damaged length fields are damage, never a killed run's prefix
            label, bad = damage_length(data, rng)
            assert run_case(path, label, bad, "plain") == "error", label
        header_end = offsets(data)[1]
        for cut in rng.integers(len(MAGIC), len(data), 16):  # cuts are killed runs: a prefix, never damage
            outcome = run_case(path, f"cut at {cut}", data[:cut], "static:depth=4")
            assert outcome == ("read" if cut >= header_end else "error"), f"cut at {cut}"
            if outcome == "read" and cut not in offsets(data):
                assert read_trace(path).truncated.startswith("killed run: ")
        bombed = blob(recs[:2]) + frame(KIND_POSITION, bomb(zlib.decompress(encode(*recs[2][1:])), 1024))
        assert run_case(path, "bomb", bombed, "plain") == "error"
    assert counts["read"] > 40 and counts["error"] > 200, counts
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert growth_mb < MAX_RSS_GROWTH_MB


def test_cut_full_samples_read_as_killed_runs(tmp_path):
    """Cuts anywhere in a full sample read as an exact prefix with the kill reported."""
    rng = np.random.default_rng(5)
    path = tmp_path / "cut.trace"
    for sample in SAMPLES:
        data = sample.read_bytes()
        whole = read_trace(sample, strict=True)
        for cut in rng.integers(offsets(data)[1], len(data), 3):
            path.write_bytes(data[:cut])
            part = read_trace(path)
            assert part.truncated.startswith("killed run: ") or cut in offsets(data)
            for r, f in zip(part.requests, whole.requests):
                assert np.array_equal(r.output, f.output[:len(r.output)])
