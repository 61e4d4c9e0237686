"""Offload transfers (engine/offload_queue.TransferQueue, engine/offload_slow.SlowTier.chunks): reads go
chunk by chunk, a prefetch leaves the reader to a demand read between two chunks, a layer's call drops
the not yet started prefetches it does not need, and chunked reads of every slow-tier kind fill the slots
with the expert's exact bytes."""
import copy
import random
import threading

import pytest
import torch
from tiny import tiny_moe

from moetune.engine import offload_slow
from moetune.engine.offload import enable_offload
from moetune.engine.offload_queue import DEMAND, PREFETCH, TransferQueue

PROMPT = [5, 17, 33, 17, 33, 90, 4, 17, 33]


def _job(log, name, chunks, gate=None):
    """A transfer of `chunks` chunks logging each; before its second chunk it waits on `gate` (if given)."""
    def run():
        for i in range(chunks):
            if i == 1 and gate is not None:
                gate[0].set()
                gate[1].wait(5)
            log.append(f"{name}{i}")
            yield
        return name
    return run


def _held(queue, log, name, priority):
    """A 3-chunk transfer submitted and held before its second chunk: (its future, the event releasing it)."""
    started, go = threading.Event(), threading.Event()
    future = queue.submit(priority, _job(log, name, 3, (started, go)))
    assert started.wait(5)
    return future, go


def test_a_demand_read_runs_between_two_chunks_of_a_prefetch():
    queue, log = TransferQueue(), []
    try:
        slow, go = _held(queue, log, "p", (PREFETCH, 1))
        urgent = queue.submit((DEMAND, 0), _job(log, "d", 1))
        go.set()
        assert urgent.result(5) == "d" and slow.result(5) == "p"
        assert log == ["p0", "p1", "d0", "p2"]  # the prefetch paused after its chunk p1, then finished
    finally:
        queue.close()


def test_a_promoted_paused_prefetch_runs_before_other_prefetches():
    queue, log = TransferQueue(), []
    try:
        first, go = _held(queue, log, "a", (PREFETCH, 0))
        other = queue.submit((PREFETCH, 0), _job(log, "b", 1))
        demand = queue.submit((DEMAND, 0), _job(log, "d", 1))  # pauses a after a1
        queue.promote(first, (DEMAND, 0))  # a: now wanted by a computing layer
        go.set()
        assert [f.result(5) for f in (first, other, demand)] == ["a", "b", "d"]
        assert log.index("a2") < log.index("b0")
    finally:
        queue.close()


def test_close_fails_a_paused_transfer_instead_of_leaving_it_waited_on():
    queue, log = TransferQueue(), []
    paused, go = _held(queue, log, "p", (PREFETCH, 0))
    blocker = threading.Event()

    def demand():
        blocker.wait(5)
        yield

    queue.submit((DEMAND, 0), demand)
    go.set()
    while "p1" not in log:  # p pauses right after this chunk, for the demand read
        threading.Event().wait(0.001)
    threading.Event().wait(0.05)
    queue.close()
    blocker.set()
    with pytest.raises(RuntimeError, match="closed during this read"):
        paused.result(5)


@pytest.fixture(scope="module")
def model():
    return tiny_moe("qwen3_moe")


@pytest.mark.parametrize("slow", ["direct", "fadvise", "paced"])
def test_chunked_reads_fill_slots_with_the_experts_exact_bytes(model, monkeypatch, tmp_path, slow):
    """Chunks smaller than an expert, one of them across the gate_up / down boundary."""
    monkeypatch.setattr(offload_slow, "CHUNK", 8192)  # a tiny expert: 12288 bytes of gate_up, 6144 of down
    try:
        handle = enable_offload(copy.deepcopy(model), capacity=2, slow=slow, prefetch="none",
                                slow_gbps=100.0 if slow == "paced" else None, workdir=str(tmp_path))
    except ValueError as exc:
        pytest.skip(str(exc))  # no O_DIRECT on this file system
    try:
        tier = handle.store.tier
        for layer, block in enumerate(model.model.layers):
            experts = block.mlp.experts
            for e in (0, 5):
                gate_up, down = torch.zeros_like(experts.gate_up_proj[e]), torch.zeros_like(experts.down_proj[e])
                sizes = list(tier.chunks(layer, e, gate_up, down))
                assert sizes == [8192, 8192, 2048]
                assert torch.equal(gate_up, experts.gate_up_proj[e]) and torch.equal(down, experts.down_proj[e])
    finally:
        handle.remove()


def test_a_call_drops_the_queued_prefetches_it_does_not_need(model):
    handle = enable_offload(copy.deepcopy(model), capacity=2, slow="paced", slow_gbps=100.0, prefetch="none")
    store = handle.store
    read, started, release = store.tier.chunks, threading.Event(), threading.Event()

    def held(*args):
        started.set()
        release.wait(5)
        yield from read(*args)

    try:
        store.tier.chunks = held
        store.prefetch(1, [3])  # holds the reader
        assert started.wait(5)  # the reader took `held` before the next reads get the real one
        store.tier.chunks = read
        store.prefetch(0, [6, 7])  # queued behind it: guesses for layer 0's next call
        wrong = store.layers[0].loading[7]
        threading.Timer(0.1, release.set).start()
        streamed = [e for e, _, _ in store.stream(0, [2, 6])]
        assert sorted(streamed) == [2, 6]
        assert wrong.cancelled() and 7 not in store.layers[0].slot_of  # dropped, its slot free again
        assert store.layers[0].stats.prefetch_bytes == store.layers[0].stats.demand_bytes  # only 6 was read
    finally:
        release.set()
        handle.remove()


def test_random_transfers_each_run_once_in_order_or_are_cancelled():
    """Randomised: transfers of 1-4 chunks at random priorities, some promoted, some cancelled while queued;
    every transfer not cancelled completes with its own result, its chunks run once and in order, and a
    cancelled one never runs."""
    rng = random.Random(0)
    for _ in range(20):
        queue, log, futures, sizes = TransferQueue(), [], {}, {}
        try:
            for job in range(30):
                sizes[job] = rng.randint(1, 4)
                futures[job] = queue.submit((rng.randint(0, 1), rng.randint(0, 5)), _job(log, f"{job}:", sizes[job]))
                other = futures[rng.randrange(job + 1)]
                if rng.random() < 0.3:
                    queue.promote(other, (DEMAND, 0))
                elif rng.random() < 0.2:
                    other.cancel()
            for job, future in futures.items():
                if not future.cancelled():
                    assert future.result(5) == f"{job}:"
            for job, future in futures.items():
                chunks = [entry for entry in log if entry.split(":")[0] == str(job)]
                assert chunks == ([] if future.cancelled() else [f"{job}:{i}" for i in range(sizes[job])])
        finally:
            queue.close()
