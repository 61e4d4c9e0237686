"""Tiered expert storage: a small fast tier per MoE layer in front of a slow tier of every expert on disk.

Why: big MoEs run on small machines by keeping experts in slower memory (llama.cpp --cpu-moe,
KTransformers); every expert a token needs and the fast tier lacks is fetched on the critical path. This
module holds the two tiers and moves experts between them; engine/offload.py computes through it.

- Slow tier (`SlowTier`, engine/offload_slow.py): every expert in one safetensors file, read so that
  one read fetches an expert, with the page cache bypassed where the OS allows it.
- Fast tier (`LayerTier`): `capacity` preallocated slots per layer, so it can never hold more; experts
  a layer computes are pinned meanwhile. Eviction: least recently used with a decayed use count as
  tie-break ("lru"), or the decayed use count first ("lfu").
- Transfers (engine/offload_queue.TransferQueue): one reader thread, demand reads before prefetches,
  earlier layers first, chunk by chunk; a failed or timed-out read raises OffloadError naming layer and
  expert. A layer's call drops its prefetches that have not started and that it turned out not to need:
  they were wrong guesses, and reading them would only hold the link and evict experts.

Only the main thread changes tier state; the reader thread only fills slot memory it was given and
counts bytes. Shape legend: L MoE layers, E experts, C capacity (slots), H hidden, I expert intermediate.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, TimeoutError as FutureTimeout, wait
from dataclasses import dataclass, fields, replace
from functools import partial

import torch

from .offload_queue import DEMAND, PREFETCH, TransferQueue
from .offload_slow import SlowTier

EVICTIONS = ("lru", "lfu")
DECAY = 0.95  # use counts decay by this factor per call of their layer


class OffloadError(RuntimeError):
    """A slow-tier transfer failed or did not finish in time; the message names the layer and expert."""


@dataclass
class LayerStats:
    """One layer's counters since the last reset. needed: unique experts its calls computed; hits: ready in
    the fast tier; late: still in flight (prefetched, not yet arrived); misses: fetched on demand."""

    calls: int = 0
    needed: int = 0
    hits: int = 0
    late: int = 0
    misses: int = 0
    predicted: int = 0  # experts the prefetcher asked for, summed over calls
    predicted_needed: int = 0  # of those, the ones the call then needed
    demand_bytes: int = 0
    prefetch_bytes: int = 0
    read_s: float = 0.0  # reader-thread time spent in slow-tier reads (pacing included)
    stall_s: float = 0.0  # compute time spent waiting on the slow tier
    prefetch_failed: int = 0
    peak_pinned: int = 0

    def _zip(self, other: "LayerStats", op) -> "LayerStats":
        return LayerStats(**{f.name: op(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})

    def __add__(self, other: "LayerStats") -> "LayerStats":
        return replace(self._zip(other, lambda a, b: a + b), peak_pinned=max(self.peak_pinned, other.peak_pinned))

    def __sub__(self, other: "LayerStats") -> "LayerStats":
        """The counts between two snapshots (the peak is the later snapshot's)."""
        return replace(self._zip(other, lambda a, b: a - b), peak_pinned=self.peak_pinned)


class LayerTier:
    """One MoE layer's fast tier: `capacity` preallocated expert slots and what eviction needs to know."""

    def __init__(self, capacity: int, num_experts: int, gate_up_shape: tuple, down_shape: tuple, dtype: torch.dtype):
        self.gate_up = torch.empty(capacity, *gate_up_shape, dtype=dtype)  # [C, 2I, H]
        self.down = torch.empty(capacity, *down_shape, dtype=dtype)  # [C, H, I]
        self.num_experts = num_experts
        self.stats = LayerStats()
        self.clear()

    def clear(self) -> None:
        C, E = self.gate_up.shape[0], self.num_experts
        self.expert_at = [-1] * C  # slot -> expert (-1: free)
        self.slot_of: dict[int, int] = {}  # expert -> slot, resident or still loading
        self.loading: dict[int, Future] = {}  # expert -> its transfer, until seen complete
        self.prefetched: set[int] = set()  # loading experts whose transfer a prefetch started
        self.pins: set[int] = set()  # experts the layer is computing now: never evicted
        self.protected: set[int] = set()  # prefetched for the layer's next call: not evicted by prefetches
        self.predicted: set[int] = set()  # what the prefetcher asked for since the layer's last call
        self.last = [0] * E  # the call that last used each expert
        self.uses = [0.0] * E  # decayed use counts, as of `last`
        self.tick = 0  # calls so far

    @property
    def capacity(self) -> int:
        return self.gate_up.shape[0]

    @property
    def nbytes(self) -> int:
        return self.gate_up.nbytes + self.down.nbytes


class ExpertStore:
    """Both tiers of every MoE layer and the transfers between them (see the module docstring)."""

    def __init__(self, tier: SlowTier, layers: list[LayerTier], eviction: str, timeout_s: float):
        self.tier, self.layers, self.eviction, self.timeout_s = tier, layers, eviction, timeout_s
        self.queue = TransferQueue()
        self.broken: str | None = None  # set when a read timed out: the reader may still be stuck in it
        self._lock = threading.Lock()  # stats the reader thread adds to

    def _key(self, t: LayerTier, e: int) -> tuple:
        """Eviction order, smallest first: least recently used (lru) or least used (lfu), decayed."""
        uses = t.uses[e] * DECAY ** (t.tick - t.last[e])
        return (t.last[e], uses) if self.eviction == "lru" else (uses, t.last[e])

    def _touch(self, t: LayerTier, e: int) -> None:
        t.uses[e] = t.uses[e] * DECAY ** (t.tick - t.last[e]) + 1.0
        t.last[e] = t.tick

    def _free(self, t: LayerTier, e: int) -> None:
        t.expert_at[t.slot_of.pop(e)] = -1
        t.loading.pop(e, None)
        t.prefetched.discard(e)

    def _reap(self, t: LayerTier) -> None:
        """Forget finished transfers; a failed prefetch frees its slot (a demand for it reads again)."""
        for e, future in list(t.loading.items()):
            if future.done() and e not in t.pins:  # pinned ones are waited on, and their errors raised, by stream
                if future.cancelled() or future.exception() is not None:
                    self._free(t, e)
                    t.stats.prefetch_failed += 1
                else:
                    del t.loading[e]
                    t.prefetched.discard(e)

    def _victim(self, t: LayerTier, avoid) -> int | None:
        """A free slot, else the slot of the first resident expert in eviction order that is not pinned,
        loading or protected (experts in `avoid` last); None when every slot is busy."""
        self._reap(t)
        if -1 in t.expert_at:
            return t.expert_at.index(-1)
        busy = t.pins | t.loading.keys() | t.protected
        options = [(e in avoid, self._key(t, e), s) for s, e in enumerate(t.expert_at) if e not in busy]
        return min(options)[2] if options else None

    def _load(self, layer: int, e: int, slot: int, priority: int) -> None:
        t = self.layers[layer]
        if t.expert_at[slot] >= 0:
            del t.slot_of[t.expert_at[slot]]
        t.expert_at[slot], t.slot_of[e] = e, slot
        self._submit(layer, e, priority)

    def _submit(self, layer: int, e: int, priority: int) -> None:
        t = self.layers[layer]
        kind = "demand_bytes" if priority == DEMAND else "prefetch_bytes"
        t.loading[e] = self.queue.submit((priority, layer), partial(self._read, layer, e, t.slot_of[e], kind))
        (t.prefetched.add if priority == PREFETCH else t.prefetched.discard)(e)

    def _read(self, layer: int, e: int, slot: int, kind: str):
        """On the reader thread: one expert into its slot, chunk by chunk (a generator; returns the bytes)."""
        t = self.layers[layer]
        chunks = self.tier.chunks(layer, e, t.gate_up[slot], t.down[slot])
        n = 0
        while True:
            t0 = time.perf_counter()
            got = next(chunks, None)
            with self._lock:
                t.stats.read_s += time.perf_counter() - t0
                if got is not None:
                    setattr(t.stats, kind, getattr(t.stats, kind) + got)
            if got is None:
                return n
            n += got
            yield

    def check(self) -> None:
        if self.broken:
            raise OffloadError(f"{self.broken}; the reader may still be stuck in that read: remove() the offload "
                               f"and enable it again")

    def prefetch(self, layer: int, experts: list[int]) -> None:
        """Start fetching `experts` (most wanted first, at most capacity) for the layer's next call; never
        waits and never evicts what is pinned, loading or already prefetched."""
        if self.broken:
            return
        t = self.layers[layer]
        wanted = experts[:t.capacity]
        t.predicted.update(wanted)
        t.protected.update(e for e in wanted if e in t.slot_of)
        for e in wanted:
            if e not in t.slot_of:
                slot = self._victim(t, ())
                if slot is None:
                    return
                self._load(layer, e, slot, PREFETCH)
                t.protected.add(e)

    def _count(self, t: LayerTier, needed: set[int]) -> None:
        s = t.stats
        s.calls += 1
        s.needed += len(needed)
        s.hits += sum(e in t.slot_of and e not in t.loading for e in needed)
        s.late += sum(e in t.loading for e in needed)
        s.misses += sum(e not in t.slot_of for e in needed)
        s.predicted += len(t.predicted)
        s.predicted_needed += len(t.predicted & needed)
        t.predicted = set()

    def stream(self, layer: int, needed: list[int]):
        """Yield (expert, gate_up [2I, H], down [H, I]) for every needed expert, fetching misses on demand.

        Ready experts come first, so misses load while they compute; at most `capacity` experts are pinned
        at once and each is unpinned once its consumer asks for the next."""
        self.check()
        t = self.layers[layer]
        t.tick += 1
        t.protected.clear()
        self._reap(t)
        self._count(t, set(needed))
        self._drop_wrong(t, set(needed))
        order = sorted(needed, key=lambda e: 2 if e not in t.slot_of else int(e in t.loading))
        remaining, window = deque(order), deque()
        try:
            while remaining or window:
                while remaining and self._pin(layer, remaining[0], remaining):
                    window.append(remaining.popleft())
                t.stats.peak_pinned = max(t.stats.peak_pinned, len(t.pins))
                if not window:
                    self._wait_any(layer)
                    continue
                e = window.popleft()
                self._wait(layer, e)
                slot = t.slot_of[e]
                yield e, t.gate_up[slot], t.down[slot]
                t.pins.discard(e)
                self._touch(t, e)
        finally:
            t.pins.clear()

    def _drop_wrong(self, t: LayerTier, needed: set[int]) -> None:
        """Cancel the prefetches for this call that have not started and that it does not need; free
        their slots."""
        for e in [e for e in t.prefetched if e not in needed and e in t.loading]:
            if t.loading[e].cancel():
                self._free(t, e)

    def _pin(self, layer: int, e: int, remaining) -> bool:
        """Pin `e`, starting its read when it is not in the fast tier; False when no slot can take it yet."""
        t = self.layers[layer]
        if e not in t.slot_of:
            slot = self._victim(t, remaining)
            if slot is None:
                return False
            self._load(layer, e, slot, DEMAND)
        elif e in t.loading:
            self.queue.promote(t.loading[e], (DEMAND, layer))
        t.pins.add(e)
        return True

    def _wait(self, layer: int, e: int) -> None:
        """Block until expert e's transfer is done (stall time). A failed prefetch is read again on demand;
        a failed or hung demand read raises OffloadError naming the layer and expert."""
        t = self.layers[layer]
        while e in t.loading:
            t0 = time.perf_counter()
            try:
                t.loading[e].result(timeout=self.timeout_s)
            except FutureTimeout:
                self.broken = (f"MoE layer {layer} expert {e}: the slow-tier read did not finish within "
                               f"{self.timeout_s:g} s ({self.tier.describe()})")
                self.check()
            except Exception as exc:  # the reader's error, re-raised by result()
                if e in t.prefetched:
                    t.stats.prefetch_failed += 1
                    self._submit(layer, e, DEMAND)
                    continue
                self._free(t, e)
                raise OffloadError(f"MoE layer {layer} expert {e}: reading it from the slow tier failed "
                                   f"({exc!r}); check {self.tier.path} and the disk holding it") from exc
            finally:
                t.stats.stall_s += time.perf_counter() - t0
            del t.loading[e]
            t.prefetched.discard(e)

    def _wait_any(self, layer: int) -> None:
        """Every slot is busy loading experts this call does not need: wait for one to finish."""
        t = self.layers[layer]
        t0 = time.perf_counter()
        done, _ = wait(list(t.loading.values()), timeout=self.timeout_s, return_when=FIRST_COMPLETED)
        t.stats.stall_s += time.perf_counter() - t0
        if not done:
            self.broken = (f"MoE layer {layer} experts {sorted(t.loading)}: no slow-tier read finished within "
                           f"{self.timeout_s:g} s ({self.tier.describe()})")
            self.check()

    def clear(self) -> None:
        """Empty every fast tier (after in-flight reads land, so no slot is written once freed)."""
        for t in self.layers:
            if t.loading and wait(list(t.loading.values()), timeout=self.timeout_s).not_done:
                raise OffloadError(f"MoE layer {self.layers.index(t)}: in-flight reads did not finish within "
                                   f"{self.timeout_s:g} s; the slow tier is stuck")
            t.clear()

    def snapshot(self) -> list[LayerStats]:
        with self._lock:
            return [replace(t.stats) for t in self.layers]

    def reset_stats(self) -> None:
        with self._lock:
            for t in self.layers:
                t.stats = LayerStats()

    def close(self) -> None:
        self.queue.close()
        self.tier.close()
