"""`moetune replay` with bad input: one error line naming the bad value, exit 2, no traceback. The same
rules as `moetune run` (latency target finite and > 0, budgets within [top_k, num_experts])."""
import json
from pathlib import Path

import pytest
from cli_check import fails

from moetune.step import ModelShape
from moetune.traces.latency import LatencyModel
from moetune.traces.synthetic import synthetic_trace
from moetune.traces.writer import write_trace

SAMPLE = str(Path(__file__).resolve().parents[1] / "traces" / "samples" / "code.trace")  # L=6, E=32, K=4


def replay(*extra):
    return ["replay", SAMPLE, "--policy", "plain", *extra]


@pytest.mark.parametrize("extra, names", [
    (["--latency-target-ms", "0"], ["--latency-target-ms", "got 0"]),
    (["--latency-target-ms", "-5"], ["--latency-target-ms", "-5"]),
    (["--latency-target-ms", "nan"], ["--latency-target-ms", "nan"]),
    (["--latency-target-ms", "inf"], ["--latency-target-ms", "inf"]),
    (["--workers", "0"], ["--workers", "0"]),
    (["--policy", "eagle"], ["unknown policy 'eagle'"]),
    (["--policy", "static:topk=1000"], ["topk=1000", "lower topk"]),
    (["--policy", "adaptive:hysteresis=nan"], ["hysteresis", "nan"]),
    (["--policy", "moespec:budget=1000"], ["moespec budget", "expert budget 1000 is outside [4, 32]"]),
    (["--policy", "moespec:budget=2"], ["moespec budget", "expert budget 2 is outside [4, 32]"]),
    (["--policy", "static:budgets=8/8/8/8/8/100"], ["static budgets", "expert budget 100 is outside [4, 32]"]),
    (["--profile", SAMPLE], [SAMPLE, "is not a latency profile JSON (moetune profile writes one)"]),
    (["--profile", "/no/such/profile.json"], ["cannot read latency profile /no/such/profile.json",
                                              "no such file or directory"]),
    (["--offload", "8"], ["--offload CAPACITY and --offload-gbps G go together"]),
    (["--offload", "99", "--offload-gbps", "1"], ["--offload 99", "capacity 99 is above the model's 32 experts"]),
    (["--offload", "8", "--offload-gbps", "-1"], ["--offload 8 --offload-gbps -1", "LinkProfile.gbps"]),
    (["--batch-size", "0"], ["--batch-size must be >= 1", "got --batch-size 0"]),
    (["--batch-size", "4", "--offload", "8", "--offload-gbps", "1"], ["without --offload and --latency-target-ms"]),
    (["--batch-size", "4", "--latency-target-ms", "5"], ["without --offload and --latency-target-ms"]),
])
def test_bad_values(capsys, extra, names):
    fails(capsys, replay(*extra), *names)


@pytest.mark.parametrize("field, value", [("verify", [float("nan"), 0, 0, 0, 0]), ("verify", [1e-3, -1, 0, 0, 0]),
                                          ("step_overhead", float("inf")), ("verify", "fast")])
def test_profiles_with_bad_coefficients(capsys, tmp_path, field, value):
    path = tmp_path / "profile.json"
    d = json.loads(LatencyModel(verify=(1e-3, 1e-5, 1e-5, 0.0, 0.0)).to_json())
    path.write_text(json.dumps(dict(d, **{field: value})))  # json writes NaN / Infinity, as Python reads them
    fails(capsys, replay("--profile", str(path)), f"{path} is not a latency profile JSON")


def test_traces_of_different_shapes(capsys, tmp_path):
    other = tmp_path / "other.trace"
    write_trace(synthetic_trace(ModelShape(num_layers=2, num_experts=8, top_k=2), n_requests=1, n_tokens=8), other)
    fails(capsys, ["replay", SAMPLE, str(other), "--policy", "plain"], f"{other} was recorded on another model shape",
          "num_layers=2", "replay traces of different models separately")


@pytest.mark.parametrize("make, names", [
    (lambda p: None, ["no such file"]),
    (lambda p: p.mkdir(), ["directory"]),
    (lambda p: p.write_text("not a trace"), []),
])
def test_bad_trace_paths(capsys, tmp_path, make, names):
    path = tmp_path / "bad.trace"
    make(path)
    last = fails(capsys, ["replay", str(path), "--policy", "plain"], str(path))
    assert all(n in last.lower() for n in names)


def test_output_that_is_a_file(capsys, tmp_path):
    (tmp_path / "out").write_text("x")
    fails(capsys, replay("--out", str(tmp_path / "out" / "plots")), str(tmp_path / "out"))


def test_offloaded_replay_reports_the_fast_tier(capsys):
    """--offload: the table gains hit rate, misses per step and stall; a small fast tier stalls more."""
    from moetune.cli import main
    rows = {}
    for capacity in ("4", "32"):
        assert main(replay("--offload", capacity, "--offload-gbps", "1")) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("| plain |"))
        rows[capacity] = [c.strip() for c in line.strip("|").split("|")]
    assert float(rows["4"][-1]) > float(rows["32"][-1]) > 0  # stall_s: cold misses even with every expert fitting
    assert float(rows["4"][-3]) < float(rows["32"][-3])  # hit rate


def test_batched_replay_reports_speedup_over_batched_plain(capsys):
    """--batch-size: the table is the batch's (throughput, speedup over batched plain at that size, time
    per output token); plain is 1.00x and the batch of 4 runs the recorded requests together."""
    from moetune.cli import main
    assert main(["replay", SAMPLE, "--policy", "plain", "--policy", "static:drafter=ngram,depth=4",
                 "--batch-size", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    start = next(i for i, x in enumerate(out) if x.startswith("| policy | batch_size"))
    header = [c.strip() for c in out[start].strip("|").split("|")]
    rows = {c[0]: dict(zip(header, c)) for c in ([x.strip() for x in line.strip("|").split("|")]
                                                for line in out[start + 2:start + 4])}
    assert float(rows["plain"]["speedup"]) == 1.0 and rows["plain"]["batch_size"] == "4"
    assert float(rows["static"]["speedup"]) > 1.0 and float(rows["plain"]["mean_active"]) > 1.0
