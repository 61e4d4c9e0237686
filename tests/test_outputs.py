"""Outputs of record, profile and replay: never lost to a failed run, never overwritten without --force,
never mixed by two writers (moetune/outputs.py)."""
import fcntl
import json
import os
import signal
import subprocess
import sys

import pytest

from moetune.cli import main
from moetune.outputs import OutputError, atomic_output, check_output, lock_path, output_lock, partial_path
from moetune.step import ModelShape
from moetune.traces.latency import LatencyModel
from moetune.traces.reader import read_trace
from moetune.traces.synthetic import synthetic_trace
from moetune.traces.writer import write_trace
from tiny import tiny_moe_config

# One 2-token request per kind on the embedded models, n-gram drafting only: about a second each.
RECORD = ["record", "--kinds", "code", "--per-kind", "1", "--max-new-tokens", "2", "--drafters", "ngram",
          "--policy", "static:depth=2,drafter=ngram", "--depth", "2", "--grid", "4", "--device", "cpu"]


@pytest.fixture
def old_trace(tmp_path):
    """An existing output worth keeping: a small synthetic trace."""
    path = tmp_path / "old.trace"
    write_trace(synthetic_trace(ModelShape(num_layers=2, num_experts=8, top_k=2), n_requests=1, n_tokens=8), path)
    return path


@pytest.fixture
def held_lock():
    """Hold an output's lock through a descriptor of our own, as another process would."""
    fds = []

    def hold(path):
        fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fds.append(fd)
    yield hold
    for fd in fds:
        os.close(fd)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_check_output_rules(tmp_path):
    (tmp_path / "f").write_text("x")
    assert check_output(tmp_path / "new" / "deeper" / "a.json") == tmp_path / "new" / "deeper" / "a.json"
    assert check_output(tmp_path / "f", force=True) == tmp_path / "f"
    for path, why in ((tmp_path / "f", "exists; pass --force"), (tmp_path, "is a folder"),
                      (tmp_path / "f" / "a.json", "is a file, not a folder")):
        with pytest.raises(OutputError, match=why):
            check_output(path, force=why != "exists; pass --force")


def test_atomic_output_replaces_only_on_success(tmp_path, capsys):
    out = tmp_path / "out.trace"
    out.write_text("old")
    with pytest.raises(OutputError, match="--force"):
        with atomic_output(out):
            pass
    for keep in (False, True):
        with pytest.raises(KeyboardInterrupt):
            with atomic_output(out, force=True, keep_partial=keep, label="moetune x") as tmp:
                tmp.write_text("half")
                raise KeyboardInterrupt
        assert out.read_text() == "old" and partial_path(out).exists() == keep
    assert f"partial output is in {partial_path(out)}" in capsys.readouterr().err
    with atomic_output(out, force=True) as tmp:
        assert tmp == partial_path(out) and lock_path(out).exists()
        tmp.write_text("new")
    assert out.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.trace"]


def test_a_second_process_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    out = tmp_path / "p.json"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom moetune.outputs import output_lock\n"
         f"with output_lock([{str(out)!r}]):\n    print('locked', flush=True)\n    sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputError, match=f"{out} is being written by another moetune process "
                                              f"\\(pid {holder.pid}"):
            with output_lock([out]):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists()  # left by the killed run, but no longer locked
    with output_lock([out]), atomic_output(out) as tmp:  # nested: the lock is this process's already
        tmp.write_text("{}")
    assert out.read_text() == "{}" and not lock_path(out).exists()


def test_failed_record_leaves_an_existing_trace_untouched(old_trace, capsys):
    before = old_trace.read_bytes()
    assert main(RECORD + ["--policy", "bogus", "--force", "--out", str(old_trace)]) == 2
    assert "unknown policy 'bogus'" in error_line(capsys)
    assert main(RECORD + ["--out", str(old_trace)]) == 2
    err = error_line(capsys)
    assert str(old_trace) in err and "--force" in err
    assert old_trace.read_bytes() == before
    assert sorted(p.name for p in old_trace.parent.iterdir()) == ["old.trace"]
    assert main(RECORD + ["--out", str(old_trace), "--force", "--ngram-max-n", "3"]) == 0
    trace = read_trace(old_trace)
    assert [r.kind for r in trace.requests] == ["code"] and trace.requests[0].complete
    assert (trace.meta.ngram_max_n, trace.meta.ngram_min_n) == (3, 1)  # the drafter's orders, for replay
    assert sorted(p.name for p in old_trace.parent.iterdir()) == ["old.trace"]


def test_record_refuses_a_concurrent_writer(tmp_path, held_lock, capsys):
    out = tmp_path / "traces"
    out.mkdir()
    held_lock(out / "code.trace")
    assert main(RECORD + ["--out", str(out)]) == 2
    err = error_line(capsys)
    assert f"{out / 'code.trace'} is being written by another moetune process" in err
    assert not (out / "code.trace").exists()


def test_interrupted_record_keeps_the_old_trace_and_a_readable_partial(old_trace, monkeypatch, capsys):
    import moetune.traces.record as rec

    real, calls = rec.record_request, []

    def record_then_interrupt(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(rec, "record_request", record_then_interrupt)
    before = old_trace.read_bytes()
    assert main(RECORD + ["--kinds", "code,repetitive", "--out", str(old_trace), "--force"]) == 130
    partial = partial_path(old_trace)
    assert old_trace.read_bytes() == before
    captured = capsys.readouterr()
    assert f"writing {partial}" in captured.out and f"partial output is in {partial}" in captured.err
    trace = read_trace(partial)
    assert [r.kind for r in trace.requests] == ["code"] and trace.requests[0].complete
    assert not lock_path(old_trace).exists()


def test_profile_out_rules(tmp_path, held_lock, capsys):
    (tmp_path / "cfg.json").write_text(json.dumps(tiny_moe_config("qwen3_moe").to_dict()))
    out = tmp_path / "p.json"
    out.write_text("{}")
    argv = ["profile", "--config", str(tmp_path / "cfg.json"), "--layers", "1", "--device", "cpu", "--tokens",
            "1,2,4", "--unique", "0,1", "--contexts", "8,16", "--repeats", "1", "--quiet", "--out", str(out)]
    assert main(argv) == 2
    assert f"output {out} exists; pass --force" in error_line(capsys)
    held_lock(out)
    assert main(argv + ["--force"]) == 2
    assert "another moetune process" in error_line(capsys) and out.read_text() == "{}"
    assert main(argv + ["--force", "--out", str(tmp_path / "q.json")]) == 0
    assert json.loads((tmp_path / "q.json").read_text())["layers_measured"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "p.json", "p.json.lock", "q.json"]


def test_replay_out_rules(tmp_path, held_lock, capsys):
    shape = ModelShape(num_layers=2, num_experts=8, top_k=2)
    trace = tmp_path / "s.trace"
    write_trace(synthetic_trace(shape, n_requests=1, n_tokens=12, seed=1), trace)
    LatencyModel.analytic(shape).to_json(tmp_path / "lat.json")
    out = tmp_path / "out"

    def replay(policy, *extra, to=out):
        return main(["replay", str(trace), "--policy", policy, "--profile", str(tmp_path / "lat.json"),
                     "--out", str(to), *extra])

    assert replay("static:depth=3,topk=2,budgets=2/2") == 0
    assert (out / "budgets_over_time.png").exists()
    assert replay("plain") == 2
    assert f"output {out / 'goodput_vs_fidelity.png'} exists; pass --force" in error_line(capsys)
    assert replay("plain", to=trace) == 2
    assert f"{trace} is a file, not a folder" in error_line(capsys)
    assert replay("plain", "--force") == 0
    report = (out / "replay.json").read_bytes()
    assert json.loads(report)["overall"][0]["policy"] == "plain"
    # the budget plot of the first run is gone: the folder holds one run's outputs
    assert sorted(p.name for p in out.iterdir()) == ["acceptance_over_time.png", "goodput_vs_fidelity.png",
                                                    "replay.json"]
    held_lock(out / "replay.json")
    assert replay("static:depth=2", "--force") == 2
    assert "another moetune process" in error_line(capsys) and (out / "replay.json").read_bytes() == report
