"""The reader thread of an expert offload store (engine/offload_store.py): transfers by priority.

Why chunks: a demand read is one a computing layer waits on; a prefetch is a guess for a later layer. With
whole-expert reads a demand arriving while a prefetch runs waits for all of it (a 3 MB expert at 1 GB/s:
up to 3 ms, once per miss). A transfer here is a function returning an iterator whose items end chunks
(engine/offload_slow.SlowTier.chunks): between two chunks the thread leaves a transfer for a more urgent
one and comes back to it later, so a demand read waits at most one chunk.
"""
from __future__ import annotations

import heapq
import itertools
import threading
from concurrent.futures import Future

DEMAND, PREFETCH = 0, 1  # transfer priorities: computing layers never queue behind predictions


class TransferQueue:
    """One daemon reader thread running transfers by priority (lowest tuple first), so reads overlap compute.

    A transfer is a function returning an iterator: each item ends a chunk, where the thread switches to a
    queued transfer of higher priority and comes back later (the iterator's return value is the result).
    A daemon thread, not a ThreadPoolExecutor: a read stuck in the kernel must not hang interpreter exit."""

    def __init__(self):
        self._heap: list = []
        self._jobs: dict[Future, object] = {}  # queued, not yet started
        self._paused: dict[Future, object] = {}  # started, left for a more urgent one: its iterator
        self._running: list = [None, None]  # [future, priority] of the transfer on the thread now
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="moetune-offload-reader", daemon=True)
        self._thread.start()

    def submit(self, priority: tuple, fn) -> Future:
        future = Future()
        with self._cond:
            self._jobs[future] = fn
            heapq.heappush(self._heap, (priority, next(self._seq), future))
            self._cond.notify()
        return future

    def promote(self, future: Future, priority: tuple) -> None:
        """Queue a not yet finished transfer again at `priority`; its earliest entry runs it."""
        with self._cond:
            if self._running[0] is future:
                self._running[1] = min(self._running[1], priority)
            elif future in self._jobs or future in self._paused:
                heapq.heappush(self._heap, (priority, next(self._seq), future))
                self._cond.notify()

    def _next(self):
        """(future, iterator) of the most urgent transfer, started if new; None once closed."""
        with self._cond:
            while True:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                priority, _, future = heapq.heappop(self._heap)
                self._running = [future, priority]
                if future in self._paused:
                    return future, self._paused.pop(future)
                fn = self._jobs.pop(future, None)
                if fn is not None and future.set_running_or_notify_cancel():
                    break  # else an earlier entry of a promoted transfer ran it, or it was cancelled
        try:
            return future, iter(fn())
        except Exception as exc:
            future.set_exception(exc)
            return future, iter(())

    def _run(self) -> None:
        while (job := self._next()) is not None:
            future, chunks = job
            try:
                while True:
                    next(chunks)
                    with self._cond:
                        if self._closed:
                            future.set_exception(RuntimeError("the offload store was closed during this read"))
                            break
                        priority = self._running[1]
                        if self._heap and self._heap[0][0] < priority:
                            self._paused[future] = chunks
                            heapq.heappush(self._heap, (priority, next(self._seq), future))
                            break
            except StopIteration as done:
                if not future.done():
                    future.set_result(done.value)
            except Exception as exc:  # delivered to whoever waits on the transfer, with layer and expert
                future.set_exception(exc)

    def close(self) -> None:
        """Stop the thread after its current chunk; queued transfers are cancelled, paused ones fail."""
        with self._cond:
            self._closed = True
            for future in self._jobs:
                future.cancel()
            for future in self._paused:
                future.set_exception(RuntimeError("the offload store was closed during this read"))
            self._jobs.clear()
            self._paused.clear()
            self._heap.clear()
            self._cond.notify()
