"""Counterfactual expert offload in replay: the live fast tier (engine/offload_store.py) modelled from the
recorded routing, and the slow tier from a profile of its link, so any policy can be replayed as if its
experts lived behind a small fast tier, without a model or a disk.

- `CacheModel`: per MoE layer, `capacity` slots run by the live store's rule, step for step: one call per
  layer per target forward with the forward's unique experts in ascending id (as engine/offload.py
  passes them); ready experts are pinned first, each miss takes a free slot (lowest first), else the
  unpinned resident expert first in eviction order (lru: least recent call, then decayed use count, then
  slot; lfu: decayed use count, then recency, then slot); when every slot is pinned the earliest pinned
  expert computes and is released, so a layer needing more than `capacity` experts streams through them.
  Use counts decay by DECAY per call of their layer, exactly as the store's floats do, so ties break alike.
  On-demand loading only: the store's prefetchers (pregate, history) are not modelled. Their hits depend
  on when the reader thread finishes a read (a "late" hit), which a trace does not hold.
- `LinkProfile` / `offload_time`: the seconds a step's misses add. No overlap is assumed: the store has one
  reader thread, and a demand read can start only once its layer has routed, so every miss is paid in full
  on the critical path (the hits' compute that the store runs while misses load is not credited: an upper
  bound on the stall by that much).
- `replay_offload`: traces.replay's loop over an `OffloadBackend`, a TraceBackend whose verification also
  steps a CacheModel (cold at each request's first decode step: a trace holds no prompt routing, so the
  prefill's experts are not modelled) and adds the stall to t_verify; its StepStats carry the step's
  misses, their bytes and the stall (offload_*, as the live engine reports them). The plain baseline pays
  its own misses through a second CacheModel, so `speedup` compares both under the same offload.

Which experts a step computes (`step_forwards`), from the recorded routing: the root's and the selected
nodes' routed experts; under an eviction budget only the rows each layer keeps; under a substitution
budget only the experts it keeps (replay's ranking: exact for the layers StepOutcome.budget_layers_exact
counts, later layers route budgeted hidden states live); with eval_agreement the unbudgeted forward first.
Under an eviction budget a layer's resident experts are free against its budget, as live
(engine/eviction.kept_prefix): OffloadBackend derives the kept rows (and so nodes_kept and acceptance)
from the cache's contents as the budgeted forward starts (`CacheModel.contents`, after evaluation mode's
unbudgeted forward), which are the live store's with prefetch="none" (engine/offload.resident_experts).
Draft forwards are not modelled: a drafter that runs the offloaded target itself ("self", or a
draft_model sharing its experts) also streams through the live store.

Shape legend: L MoE layers, E experts, C capacity, K top-k, n selected nodes.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

from moetune.policies.base import Policy
from moetune.step import ModelShape, StepConfig

from .latency import LatencyModel
from .outcome import StepOutcome, config_subtree, evicted_rows, keep
from .replay import ReplayResult, TraceBackend, replay
from .schema import Trace, TreeRecord

EVICTIONS = ("lru", "lfu")  # engine/offload_store.EVICTIONS (that module imports torch)
DECAY = 0.95  # engine/offload_store.DECAY: use counts decay by this factor per call of their layer


def _check_tier(capacity, eviction: str, num_experts: int | None = None) -> None:
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity must be a whole number of experts per layer, >= 1, got {capacity!r}; "
                         f"pass e.g. capacity=8")
    if num_experts is not None and capacity > num_experts:
        raise ValueError(f"capacity {capacity} is above the model's {num_experts} experts per layer; pass "
                         f"capacity in [1, {num_experts}]")
    if eviction not in EVICTIONS:
        raise ValueError(f"eviction must be one of {EVICTIONS} (the live store's policies), got {eviction!r}")


class _Layer:
    """One layer's fast tier as engine/offload_store.LayerTier tracks it, without the weights."""

    def __init__(self, capacity: int, num_experts: int):
        self.expert_at = [-1] * capacity  # slot -> expert (-1: free)
        self.slot_of: dict[int, int] = {}  # expert -> slot
        self.last = [0] * num_experts  # the call that last used each expert
        self.uses = [0.0] * num_experts  # decayed use counts, as of `last`
        self.tick = 0  # calls so far


class CacheModel:
    """The live fast tier's on-demand policy over L layers (see the module docstring), counting per layer
    the needed experts that were resident (hits) and those that were fetched (misses)."""

    def __init__(self, num_layers: int, num_experts: int, capacity: int, eviction: str = "lru"):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be the model's MoE layer count, >= 1, got {num_layers!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be the experts per MoE layer, >= 1, got {num_experts!r}")
        _check_tier(capacity, eviction, num_experts)
        self.num_experts, self.capacity, self.eviction = num_experts, capacity, eviction
        self.layers = [_Layer(capacity, num_experts) for _ in range(num_layers)]

    def step(self, needed: Sequence[Iterable[int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One target forward: needed[l] the experts layer l computes. Returns (hits [L], misses [L])."""
        if len(needed) != len(self.layers):
            raise ValueError(f"step needs one set of experts per MoE layer ({len(self.layers)}), got {len(needed)}")
        counts = [self._call(t, sorted(set(n))) for t, n in zip(self.layers, needed)]
        return tuple(h for h, _ in counts), tuple(m for _, m in counts)

    def contents(self) -> list[frozenset[int]]:
        """[L] the experts each layer holds now: what its next call would not fetch."""
        return [frozenset(t.slot_of) for t in self.layers]

    def _call(self, t: _Layer, needed: list[int]) -> tuple[int, int]:
        """ExpertStore.stream, on demand: pin ready experts, then load misses as slots allow, releasing the
        earliest pinned expert (it computes) whenever none is free."""
        if needed and not (needed[0] >= 0 and needed[-1] < self.num_experts):
            raise ValueError(f"expert ids must be in [0, {self.num_experts}), got {needed}")
        t.tick += 1
        ready = [e for e in needed if e in t.slot_of]
        missing = [e for e in needed if e not in t.slot_of]
        remaining, window, pins = deque(ready + missing), deque(), set()
        while remaining or window:
            while remaining and self._pin(t, remaining[0], pins):
                window.append(remaining.popleft())
            e = window.popleft()  # never empty here: a pin fails only when every slot holds a pinned expert
            pins.discard(e)
            t.uses[e] = t.uses[e] * DECAY ** (t.tick - t.last[e]) + 1.0
            t.last[e] = t.tick
        return len(ready), len(missing)

    def _pin(self, t: _Layer, e: int, pins: set[int]) -> bool:
        if e not in t.slot_of:
            slot = self._victim(t, pins)
            if slot is None:
                return False
            if t.expert_at[slot] >= 0:
                del t.slot_of[t.expert_at[slot]]
            t.expert_at[slot], t.slot_of[e] = e, slot
        pins.add(e)
        return True

    def _victim(self, t: _Layer, pins: set[int]) -> int | None:
        """ExpertStore._victim without prefetch: its `avoid` term never applies then (ready experts are all
        pinned before the first miss looks for a slot, so no expert still to pin is resident)."""
        if -1 in t.expert_at:
            return t.expert_at.index(-1)
        options = [(self._key(t, e), s) for s, e in enumerate(t.expert_at) if e not in pins]
        return min(options)[1] if options else None

    def _key(self, t: _Layer, e: int) -> tuple:
        uses = t.uses[e] * DECAY ** (t.tick - t.last[e])
        return (t.last[e], uses) if self.eviction == "lru" else (uses, t.last[e])


@dataclass(frozen=True)
class LinkProfile:
    """The slow tier's link: each expert read costs latency_s plus expert_bytes at gbps (1e9 bytes/s)."""

    gbps: float
    latency_s: float
    expert_bytes: int

    def __post_init__(self):
        if not 0 < self.gbps < math.inf:
            raise ValueError(f"LinkProfile.gbps must be a positive finite read rate in GB/s, got {self.gbps!r}; "
                             f"measure it (OffloadReport read_gbps) or pass e.g. 4.0 for a PCIe 3 NVMe drive")
        if not 0 <= self.latency_s < math.inf:
            raise ValueError(f"LinkProfile.latency_s must be a finite number of seconds >= 0 per read, got "
                             f"{self.latency_s!r}")
        if isinstance(self.expert_bytes, bool) or not isinstance(self.expert_bytes, int) or self.expert_bytes < 1:
            raise ValueError(f"LinkProfile.expert_bytes must be one expert's weight bytes (gate_up + down), a "
                             f"positive int, got {self.expert_bytes!r}; LinkProfile.for_shape computes it")

    @classmethod
    def for_shape(cls, shape: ModelShape, gbps: float, latency_s: float = 0.0,
                  bytes_per_param: int = 2) -> "LinkProfile":
        """One expert of `shape` is gate_up [2I, H] + down [H, I]: 3 H I parameters."""
        if not shape.hidden_size or not shape.expert_intermediate_size:
            raise ValueError("LinkProfile.for_shape needs the trace's hidden_size and expert_intermediate_size "
                             "(this shape lacks them); pass LinkProfile(gbps, latency_s, expert_bytes) directly")
        return cls(gbps, latency_s, 3 * shape.hidden_size * shape.expert_intermediate_size * bytes_per_param)

    @property
    def transfer_s(self) -> float:
        return self.latency_s + self.expert_bytes / (self.gbps * 1e9)


def offload_time(misses: Iterable[int], link: LinkProfile) -> float:
    """Seconds a forward waits on the slow tier: every miss ([L] per layer) read in turn, none overlapped
    (see the module docstring)."""
    return float(sum(misses)) * link.transfer_s


def step_forwards(record: TreeRecord, config: StepConfig, max_depth: int | None = None,
                  free: Sequence[AbstractSet[int]] | None = None) -> list[list[set[int]]]:
    """The experts each target forward of this step computes: one [L] list of sets per forward (see the
    module docstring). free: [L] experts free against an eviction budget in the budgeted forward (the
    cache's contents as it starts)."""
    layers = record.experts.shape[1]
    sub = config_subtree(record, config, max_depth) if config.speculate else None
    nodes = sub.nodes if sub is not None else np.zeros(0, dtype=np.int64)
    rows = np.concatenate(([0], nodes + 1))  # [n+1] root first
    routed = record.experts[rows, :, :record.top_k].astype(np.int64)  # [n+1, L, K]
    full = [set(routed[:, l].ravel().tolist()) for l in range(layers)]
    if config.budgets is None or sub is None:  # a plain step's root always fits its budget
        return [full]
    if config.budget_mode == "evict":  # per layer, the ranked rows it keeps
        ranked, counts, _ = evicted_rows(record, sub, config.budgets, free)
        experts = record.experts[ranked, :, :record.top_k]  # [n+1, L, K]
        kept = [set(experts[:n, l].ravel().tolist()) for l, n in enumerate(counts)]
    else:
        lost, _ = keep(record, rows, np.asarray(config.budgets), config.selection)  # [n+1, L, K]
        kept = [set(routed[:, l][~lost[:, l]].tolist()) for l in range(layers)]
    return [full, kept] if config.eval_agreement else [kept]


@dataclass(frozen=True)
class OffloadSpec:
    """What replay offloads: `capacity` experts per layer in the fast tier, evicted by `eviction`, the rest
    read over `link`."""

    capacity: int
    link: LinkProfile
    eviction: str = "lru"

    def __post_init__(self):
        _check_tier(self.capacity, self.eviction)
        if not isinstance(self.link, LinkProfile):
            raise ValueError(f"OffloadSpec.link must be a LinkProfile (e.g. LinkProfile.for_shape(shape, gbps=4)), "
                             f"got {type(self.link).__name__}")

    def cache(self, shape: ModelShape) -> CacheModel:
        return CacheModel(shape.num_layers, shape.num_experts, self.capacity, self.eviction)


class OffloadBackend(TraceBackend):
    """TraceBackend whose every verification also runs its experts through a CacheModel and waits for the
    misses on the link (added to t_verify, so step times, the log and StepStats include the stall; the
    StepStats' offload_* fields say how much of it was transfers)."""

    def __init__(self, trace: Trace, req, latency: LatencyModel, target: float | None, configs: dict, log: list,
                 policy_name: str, offload: OffloadSpec):
        super().__init__(trace, req, latency, target, configs, log, policy_name)
        self.offload, self.cache = offload, offload.cache(trace.shape)
        layers = trace.shape.num_layers
        self.hits, self.misses = np.zeros(layers, dtype=np.int64), np.zeros(layers, dtype=np.int64)
        self.plain_misses = np.zeros(layers, dtype=np.int64)
        self.stall_s = self.plain_stall_s = 0.0

    def prefill(self, passive: StepConfig | None) -> None:
        """The plain baseline under the same offload: one root per position, its recorded routing."""
        super().prefill(passive)
        plain = self.offload.cache(self.trace.shape)
        k = self.trace.shape.top_k
        for pos in self.positions:
            root = next(iter(pos.trees.values())).experts[0, :, :k]  # [L, K]
            self.plain_misses += plain.step(root.tolist())[1]
        self.plain_stall_s = offload_time(self.plain_misses, self.offload.link)
        self.result.plain_time_s += self.plain_stall_s

    def verify(self, config: StepConfig, tree: TreeRecord) -> StepOutcome:
        """As the engine verifies: evaluation mode's unbudgeted forward first, then the step's own, whose
        eviction budget (if any) does not count the experts the cache holds as it starts."""
        depth = self.max_new_tokens - self.generated - 1
        evict = config.budgets is not None and config.budget_mode == "evict" and config.speculate
        counts = []
        if evict and config.eval_agreement:
            counts.append(self.cache.step(step_forwards(tree, replace(config, budgets=None), depth)[0]))
        free = self.cache.contents() if evict else None
        o = super().verify(config, tree, free)
        forwards = step_forwards(tree, replace(config, eval_agreement=False) if evict else config, depth, free)
        counts += [self.cache.step(needed) for needed in forwards]
        step_misses, step_stall = 0, 0.0
        for hits, misses in counts:
            self.hits += hits
            self.misses += misses
            stall = offload_time(misses, self.offload.link)
            self.stall_s += stall
            self.t_verify += stall
            step_misses += sum(misses)
            step_stall += stall
        self.verify_offload = dict(offload_misses=step_misses, offload_stall=step_stall,
                                   offload_bytes=step_misses * self.offload.link.expert_bytes,
                                   offload_capacity=self.offload.capacity)
        return o


@dataclass
class OffloadResult:
    """A replay under offload: the usual ReplayResult (stall included in its times) and the fast tier's
    per-layer counters summed over requests."""

    replay: ReplayResult
    offload: OffloadSpec
    hits: np.ndarray  # [L]
    misses: np.ndarray  # [L]
    stall_s: float
    plain_misses: np.ndarray  # [L] the plain baseline's
    plain_stall_s: float
    per_request: list[tuple[int, np.ndarray, np.ndarray]]  # (request id, hits [L], misses [L])

    def summary(self) -> dict:
        """ReplayResult.summary plus what the fast tier did."""
        needed = int(self.hits.sum() + self.misses.sum())
        steps = max(self.replay.total().steps, 1)
        return dict(self.replay.summary(), capacity=self.offload.capacity, eviction=self.offload.eviction,
                    hit_rate=float(self.hits.sum()) / needed if needed else None,
                    misses_per_step=float(self.misses.sum()) / steps, stall_s=self.stall_s,
                    plain_misses_per_token=float(self.plain_misses.sum()) / max(self.replay.total().tokens, 1),
                    plain_stall_s=self.plain_stall_s)


def replay_offload(traces: Trace | Sequence[Trace], policy: Policy, latency: LatencyModel, offload: OffloadSpec,
                   latency_target_ms: float | None = None) -> OffloadResult:
    """traces.replay.replay over OffloadBackend (see the module docstring); each request starts cold."""
    backends = []

    def backend(*args) -> OffloadBackend:
        backends.append(OffloadBackend(*args, offload))
        return backends[-1]

    result = replay(traces, policy, latency, latency_target_ms, backend)
    shape = backends[0].trace.shape
    total = lambda counts: sum(counts, np.zeros(shape.num_layers, dtype=np.int64))  # [L] over requests
    return OffloadResult(result, offload, total(b.hits for b in backends), total(b.misses for b in backends),
                         sum(b.stall_s for b in backends), total(b.plain_misses for b in backends),
                         sum(b.plain_stall_s for b in backends),
                         [(b.req.request_id, b.hits, b.misses) for b in backends])
