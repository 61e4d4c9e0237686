"""Recording a batched live run (traces/record.record_batch): each request's LiveRun is its steps in the
batch, and replay_batch of the trace at the recorded batch size reproduces the live batched run step by
step, the shared forward (rows and union of experts) included."""
import numpy as np
import pytest
from test_batch import prompts
from test_outputs import RECORD
from test_traces_record import Collect, same_step
from tiny import tiny_moe

from moetune.cli import main
from moetune.engine.batch import generate_batch
from moetune.engine.drafters import DraftModelDrafter, NgramDrafter
from moetune.engine.loader import moe_shape
from moetune.step import StepConfig
from moetune.traces.batch import replay_batch
from moetune.traces.latency import fit_trace
from moetune.traces.reader import read_trace
from moetune.traces.record import record_batch
from moetune.traces.schema import TraceMeta, TreeLimits
from moetune.traces.writer import TraceWriter

NEW = 12
LIMITS = {"draft_model": TreeLimits(depth=3, topk=2), "ngram": TreeLimits(depth=3, topk=1)}


def forward(s):
    return s.batch_tokens, s.batch_experts, s.batch_context


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    target = tiny_moe("qwen3_moe", seed=0)
    drafters = {"draft_model": DraftModelDrafter(target), "ngram": NgramDrafter()}
    meta = TraceMeta(shape=moe_shape(target), drafters=LIMITS, router_top=moe_shape(target).top_k,
                     live_batch_size=2)
    path = tmp_path_factory.mktemp("rec") / "batched.trace"
    ps = prompts((5, 9, 3))
    requests = [(10 + i, p, "test", "") for i, p in enumerate(ps)]
    with TraceWriter(path, meta) as w:
        res = record_batch(w, target, drafters, LIMITS, Collect(StepConfig(depth=2)), requests, batch_size=2,
                           max_new_tokens=NEW, eos_token_id=-1)
    assert [r.mismatches for r in res] == [0, 0, 0]
    return target, drafters, ps, read_trace(path, strict=True)


@pytest.mark.parametrize("config", [StepConfig(depth=2), StepConfig(depth=3, topk=2, num_draft_tokens=4),
                                    StepConfig(drafter="ngram", depth=3),
                                    StepConfig(depth=3, topk=2, budgets=(3, 4))])
def test_batched_replay_equals_the_live_batched_run(recorded, config):
    """The same policy live in a batch of 2 (3 requests: one joins when another leaves) and in
    replay_batch of the recorded trace: every request's steps agree field by field, and so does each
    step's shared forward."""
    target, drafters, ps, trace = recorded
    live = Collect(config)
    out = generate_batch(target, None, ps, drafter=dict(drafters), policy=live, batch_size=2, max_new_tokens=NEW,
                         eos_token_id=-1, routing=True, request_ids=[r.request_id for r in trace.requests])
    assert [o.token_ids for o in out] == [r.output.tolist() for r in trace.requests]
    replayed = Collect(config)
    replay_batch(trace, replayed, fit_trace(trace), batch_size=2)

    def by_request(seen):
        return sorted(seen, key=lambda s: (s.request_id, s.step))
    assert [same_step(s) for s in by_request(replayed.seen)] == [same_step(s) for s in by_request(live.seen)]
    assert [forward(s) for s in by_request(replayed.seen)] == [forward(s) for s in by_request(live.seen)]
    assert any(s.batch_tokens is not None for s in live.seen) and any(s.batch_tokens is None for s in live.seen)
    assert config.budgets is None or any(s.nodes_kept < s.tree_size for s in live.seen)


def test_live_run_is_each_requests_share_of_the_batch(recorded):
    """The header says the batch size; each request's LiveRun holds its own steps and the forward each
    shared; the latency fit takes each shared forward once (its requests' rows add up to its rows) and
    each step that ran alone as its own."""
    _, _, _, trace = recorded
    assert trace.meta.live_batch_size == 2
    forwards, alone = {}, 0
    for req in trace.requests:
        assert req.live.emitted.sum() == len(req.output)
        assert req.live.configs == [StepConfig(depth=2)]
        shared = req.live.forward if req.live.forward is not None else -np.ones((len(req.live.emitted), 4))
        for f, n in zip(shared.tolist(), req.live.tree_size.tolist()):
            if f[0] < 0:
                alone += 1
            else:
                forwards[tuple(f)] = forwards.get(tuple(f), 0) + n + 1
    assert alone and forwards and all(f[0] == rows for f, rows in forwards.items())
    assert fit_trace(trace, include_trees=False).error["n"] == len(forwards) + alone


def test_writer_must_say_the_batch_size(tmp_path):
    target = tiny_moe("qwen3_moe", seed=0)
    meta = TraceMeta(shape=moe_shape(target), drafters={"ngram": TreeLimits(depth=2, topk=1)},
                     router_top=moe_shape(target).top_k)
    with TraceWriter(tmp_path / "t.trace", meta) as w, pytest.raises(ValueError, match="live_batch_size=2"):
        record_batch(w, target, {"ngram": NgramDrafter()}, {"ngram": TreeLimits(depth=2, topk=1)},
                     Collect(StepConfig(drafter="ngram", depth=2)), [(0, [3, 4, 5], "", "")], batch_size=2)


def test_record_cli_batches_the_live_run(tmp_path, capsys):
    """`moetune record --batch-size 2` on the embedded models writes a trace whose header says so."""
    out = tmp_path / "b.trace"
    assert main([*RECORD, "--per-kind", "2", "--batch-size", "2", "--out", str(out)]) == 0
    trace = read_trace(out, strict=True)
    assert trace.meta.live_batch_size == 2 and len(trace.requests) == 2
    assert "root mismatches" in capsys.readouterr().out


def test_self_check_batched_live_policy_replays_to_measured_goodput(recorded):
    """The policy that ran, replayed batched on its own trace with the live steps' fit (each shared forward
    and batched draft once), gives back its measured goodput."""
    _, _, _, trace = recorded
    live = [r.live for r in trace.requests]
    measured = sum(l.emitted.sum() for l in live) / sum(l.times.sum() for l in live)
    result = replay_batch(trace, Collect(live[0].configs[0]), fit_trace(trace, include_trees=False), 2)
    assert result.replay.total().goodput == pytest.approx(measured, rel=0.10)
