"""Batched replay: continuous batches composed offline from single-request traces (MoESD's prediction beside
it: traces/moesd.py).

Why: a trace's counterfactual trees are each request's own (a node's verdict and routing depend on its
request's context only), but what a speculative config is worth depends on the batch (MoESD, arXiv
2505.19645): verifying extra tokens costs little once the batch's tokens already load every expert, and
much while few are loaded. Batches of recorded requests show that without a model; a trace whose live run
was batched (traces/record.record_batch) replays at its own batch size as that run.

The batch runs as engine/batch.py runs it: at most `batch_size` requests active; a finished one leaves
and the next waiting one (trace order, once it has arrived) joins; one policy object serves every request,
each with its own request id (begin when it joins, end when it leaves). One step: every active request in
turn looks ahead and decides, and its recorded tree gives the counterfactual outcome at its own position
(TraceBackend, outcome.py); one modelled forward verifies them all; every request commits, then each
StepStats (moetune.driver.step_stats, through TraceBackend.stats) goes to observe.

Step time = t_verify + sum of drafts + B * step_overhead (accept and commit run per request, in turn):
- t_verify: LatencyModel's formula with T = sum_r (tree_size_r + 1) tokens and U = sum over layers of the
  UNION over requests of their routed experts (a forward reads each unique expert's weights once), with
  the context terms summed per request (each request attends to its own keys, as a ragged attention
  kernel does; engine/batch.py pads every request to the longest, up to B x the longest context);
- drafting: draft="serial", each request's own draft in turn, or "batched", one draft pass per drafter for
  all its requests (vLLM/SGLang): draft_time(drafter, deepest tree, all nodes); "engine" (the default), as
  engine/batch.py drafts: the draft model batched, n-gram and self drafters in turn.
StepStats carry the engine's split: the shared verify divided among requests by verified rows (a batched
draft by drafted rows), their own draft and overhead otherwise; and, as the engine's, the whole forward
(StepStats.batch_*), while each request's next decision sees the others of this step (DecodeState.batch).
With one request every term is single-request replay's (and neither is set), in the same order of
operations, so batch_size=1 replays traces.replay.replay exactly.

Budgets: eviction (budget_mode="evict") drops a request's own rows and stays lossless, so it applies:
the rows that survive layer l (outcome.py's ranking) route that layer's union. Substitution budgets are
dropped, as engine/batch.py drops them (one forward serves every request); StepStats carry the
unbudgeted config and `budgets_dropped` counts those steps. Prefill is not modelled (traces hold no
prefill timings): throughput is decode throughput.

Shape legend: B active requests, S batch steps, L MoE layers, E experts, K top-k, n selected nodes,
P recorded positions.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from time import perf_counter
from typing import Sequence

import numpy as np

from moetune.driver import check_passive_draft, observes
from moetune.policies.base import Policy
from moetune.step import DRAFTER_TRAITS, BatchContext, DecodeState, StepConfig

from .derive import prepare
from .latency import LatencyModel
from .outcome import config_subtree, evicted_rows
from .replay import LOG_COLUMNS, ReplayResult, RequestResult, TraceBackend
from .schema import RequestTrace, Trace, TreeRecord

STEP_COLUMNS = ("start", "active", "tokens", "experts", "context", "emitted", "verify_s", "draft_s", "overhead_s")
DRAFT_MODES = ("engine", "serial", "batched")


# -- what one request's step loads ------------------------------------------------------------------------
def routed_experts(record: TreeRecord, config: StepConfig, max_depth: int | None, num_experts: int) -> np.ndarray:
    """[L, E] bool: the experts one request's verified rows route to in each layer, i.e. what the forward
    must load for it. Plain: the root row; speculative: the root and the config's subtree (the nodes
    outcome.py selects, max_depth as there); an eviction budget: per layer, the rows that reach it."""
    layers, k = record.experts.shape[1], record.top_k
    alive = None  # [n+1, L] whether a row is computed in a layer (eviction only)
    if not config.speculate:
        rows = np.zeros(1, dtype=np.int64)
    else:
        sub = config_subtree(record, config, max_depth)
        if config.budgets is not None and config.budget_mode == "evict":
            rows, counts, _ = evicted_rows(record, sub, config.budgets)
            alive = np.arange(len(rows))[:, None] < counts[None, :]
        else:
            rows = np.concatenate(([0], sub.nodes + 1))
    routed = record.experts[rows, :, :k].astype(np.int64)  # [n+1, L, K]
    layer = np.broadcast_to(np.arange(layers)[None, :, None], routed.shape)  # [n+1, L, K]
    mask = np.zeros((layers, num_experts), dtype=bool)
    if alive is None:
        mask[layer, routed] = True
    else:
        keep = np.broadcast_to(alive[:, :, None], routed.shape)
        mask[layer[keep], routed[keep]] = True
    return mask


def batch_verify_time(latency: LatencyModel, tokens: Sequence, unique_sum: int, contexts: Sequence) -> float:
    """Seconds of one packed verification: tokens [B] verified rows and contexts [B] per request,
    unique_sum the experts the batch loads (sum over layers of the union). LatencyModel.verify_time's
    terms, weights read once for the batch and attention per request; for one request its very
    expression, evaluated in the same order (so batch 1 replays single-request replay exactly)."""
    c0, ct, ce, cc, cct = latency.verify
    attention = sum(cct * c * t for c, t in zip(contexts, tokens))
    return c0 + ct * sum(tokens) + ce * unique_sum + cc * sum(contexts) + attention


# -- one request in the batch ----------------------------------------------------------------------------
class Member(TraceBackend):
    """One request of the batch: TraceBackend's per-request mechanics (lookahead, recorded tree, outcome,
    commit, StepStats) stepped by the batch, plus what the batch needs (its experts, when it was served)."""

    def __init__(self, trace: Trace, req: RequestTrace, latency: LatencyModel, configs: dict, log: list,
                 policy_name: str, arrival: float):
        super().__init__(trace, req, latency, None, configs, log, policy_name)
        self.arrival, self.joined, self.left = arrival, 0.0, 0.0
        self.control, self.dropped = 0.0, 0
        self.num_experts = trace.shape.num_experts
        self.config, self.tree, self.outcome, self.accepted = None, None, None, 0  # this step's, set by plan
        self.experts, self.context = None, 0  # [L, E] bool and context length, set by plan
        self.batch: BatchContext | None = None  # the others of its last step, for its next decision (step)
        self.forward: dict = {}  # its last step's whole forward, as StepStats' batch_* fields (step)
        self.draft_forward: dict | None = None  # its last step's shared draft forward (draft_times)

    def plan(self, policy: Policy, passive: StepConfig | None, others: int) -> None:
        """Decide, draft, verify (the counterfactual outcome) and accept this request's step, in a batch
        with `others` other requests."""
        p = self.generated
        look = None if passive is None else self.lookahead(passive)
        batch = self.batch if self.batch is not None else BatchContext.unseen(others)
        t0 = perf_counter()
        config = policy.decide(DecodeState(self.req.request_id, self.steps, self.prompt_len + p, p,
                                           self.max_new_tokens - p, look, batch))
        self.control += perf_counter() - t0
        if config.budgets is not None and config.budget_mode == "substitute":  # as engine/batch.py
            config = replace(config, budgets=None, eval_agreement=False)
            self.dropped += 1
        self.config, self.tree = config, self.draft(config)
        self.outcome = self.verify(config, self.tree)
        self.accepted = self.accept(self.tree, self.outcome)
        self.experts = routed_experts(self.tree, config, self.max_new_tokens - p - 1, self.num_experts)  # [L, E]
        self.context = self.prompt_len + p

    def settle(self, t_verify: float, t_draft: float) -> int:
        """Commit with this request's share of the step's times; returns the step index committed."""
        step = self.steps
        self.t_verify, self.t_draft = t_verify, t_draft
        self.commit(self.config, self.tree, self.outcome, self.accepted)
        return step

    def report(self, policy: Policy, passive: StepConfig | None, step: int) -> None:
        """The step's StepStats (model times only, as single-request replay) to the policy's observe."""
        stats = self.stats(self.req.request_id, step, self.config, passive, self.tree, self.outcome,
                           self.accepted, 0.0)
        if self.forward or self.draft_forward:
            stats = replace(stats, **self.forward, **(self.draft_forward or {}))
        t0 = perf_counter()
        policy.observe(stats)
        self.control += perf_counter() - t0


def draft_times(latency: LatencyModel, batch: list[Member], mode: str) -> list[float]:
    """Each request's draft seconds this step: its own (serial), or its share, by its rows (root and drafted
    nodes), of one batched draft per drafter (draft_time at the deepest tree and all the drafter's nodes);
    "engine": as engine/batch.py drafts, the drafters it batches (DRAFTER_TRAITS) batched, the others serial.
    In a batch, each member of a batched draft gets the whole draft forward (Member.draft_forward), as live."""
    out = [m.t_draft for m in batch]
    for m in batch:
        m.draft_forward = None
    if mode == "serial":
        return out
    for drafter in {m.config.drafter for m in batch if m.config.speculate}:
        if mode == "engine" and not DRAFTER_TRAITS[drafter].batched:
            continue
        mine = [i for i, m in enumerate(batch) if m.config.speculate and m.config.drafter == drafter]
        rows = [batch[i].outcome.tree_size + 1 for i in mine]
        depth, nodes = max(batch[i].outcome.tree_depth for i in mine), sum(batch[i].outcome.tree_size for i in mine)
        total = float(latency.draft_time(drafter, depth, nodes))
        forward = dict(batch_draft_depth=depth, batch_draft_nodes=nodes, batch_t_draft=total,
                       batch_draft_requests=len(mine)) if len(batch) > 1 and nodes else None
        for i, r in zip(mine, rows):
            out[i] = total * (r / sum(rows))
            batch[i].draft_forward = forward
    return out


# -- the batch ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """One request's replay totals (time_s: its share of the step times) and when the batch served it."""

    result: RequestResult
    arrival: float
    joined: float
    finish: float  # the end of its last step

    def __post_init__(self):
        if not self.arrival <= self.joined <= self.finish:
            raise ValueError(f"Served needs arrival <= joined <= finish, got {self.arrival}, {self.joined}, "
                             f"{self.finish}")

    @property
    def time_per_output_token(self) -> float:
        """Seconds per generated token while in the batch: its decode span over its tokens (engine/batch.py
        counts from its first step's end over tokens - 1; replay has no first-token latency to exclude)."""
        return (self.finish - self.joined) / self.result.tokens if self.result.tokens else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Its tokens per second of its decode span (prefill is not modelled)."""
        span = self.finish - self.joined
        return self.result.tokens / span if span > 0 else 0.0


@dataclass(frozen=True, eq=False)
class BatchReplayResult:
    """One policy over a set of requests at one batch size. Speedup over plain decoding is the ratio of two
    results' throughputs at the same batch size (plain's experts depend on the batch too)."""

    replay: ReplayResult  # per-request totals and the per-request decision log, in trace order
    served: tuple[Served, ...]  # in trace order
    steps: np.ndarray  # [S, len(STEP_COLUMNS)] float64, one row per batch step
    batch_size: int
    draft: str = "engine"
    budgets_dropped: int = 0  # request-steps whose substitution budget was dropped (as engine/batch.py)

    def __post_init__(self):
        if self.steps.ndim != 2 or self.steps.shape[1] != len(STEP_COLUMNS):
            raise ValueError(f"BatchReplayResult.steps must be [S, {len(STEP_COLUMNS)}], got {self.steps.shape}")

    def column(self, name: str) -> np.ndarray:  # [S]
        return self.steps[:, STEP_COLUMNS.index(name)]

    @property
    def span(self) -> float:
        """Seconds from the first arrival to the last finish (engine.batch.throughput's span)."""
        return max(s.finish for s in self.served) - min(s.arrival for s in self.served) if self.served else 0.0

    @property
    def throughput(self) -> float:
        """Generated tokens per second of the whole run."""
        return self.replay.total().tokens / self.span if self.span > 0 else 0.0

    def summary(self) -> dict:
        """Overall figures as plain numbers."""
        t = self.replay.total()
        tpot = [s.time_per_output_token for s in self.served if s.result.tokens]
        active = self.column("active")
        return dict(policy=self.replay.policy, batch_size=self.batch_size, draft=self.draft,
                    requests=len(self.served), tokens=t.tokens, batch_steps=len(self.steps), request_steps=t.steps,
                    throughput_tok_s=self.throughput, mean_accepted=t.mean_accepted,
                    tpot_ms=1e3 * float(np.mean(tpot)) if tpot else 0.0,
                    request_tok_s=float(np.mean([s.tokens_per_s for s in self.served])) if self.served else 0.0,
                    mean_active=float(active.mean()) if len(active) else 0.0,
                    experts_per_layer=float(self.column("experts").mean() / self.replay.requests[0].unique.size)
                    if len(self.steps) and self.replay.requests else 0.0,
                    budgets_dropped=self.budgets_dropped, control_us_per_step=1e6 * t.control_s / max(t.steps, 1))


def check_batch_arguments(traces: list[Trace], batch_size, arrivals, draft: str) -> list[float]:
    """Arrival times, one per request; or a ValueError naming the argument and the fix."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1 (requests decoded together), got {batch_size!r}; "
                         "pass batch_size=1 or more")
    if draft not in DRAFT_MODES:
        raise ValueError(f"draft must be one of {DRAFT_MODES} (per request in turn, or one batched draft per "
                         f"drafter), got {draft!r}")
    if not traces:
        raise ValueError("replay_batch needs at least one trace")
    if any(t.shape != traces[0].shape for t in traces):
        raise ValueError("replay_batch traces must share one model shape; replay them separately")
    n = sum(len(t.requests) for t in traces)
    times = [0.0] * n if arrivals is None else [float(a) for a in arrivals]
    if len(times) != n:
        raise ValueError(f"arrivals needs one time per request: {n} requests, {len(times)} times; pass {n} times "
                         f"or arrivals=None (all at once)")
    if any(not 0 <= a < math.inf for a in times):
        raise ValueError("arrivals must be finite seconds >= 0; pass None for all at once")
    return times


def replay_batch(trace: Trace | Sequence[Trace], policy: Policy, latency: LatencyModel, batch_size: int,
                 arrivals: Sequence[float] | None = None, draft: str = "engine") -> BatchReplayResult:
    """Replay `policy` over every request of `trace` in continuous batches of at most `batch_size`
    (see the module docstring). arrivals: per request, seconds after the start (None: all at once)."""
    traces = [trace] if isinstance(trace, Trace) else list(trace)
    times = check_batch_arguments(traces, batch_size, arrivals, draft)
    policy.setup(traces[0].shape)
    passive = check_passive_draft(getattr(policy, "passive_draft", None))  # after setup, as the engine
    configs: dict[StepConfig, int] = {}
    log: list[tuple] = []
    name = getattr(policy, "name", type(policy).__name__)
    members = [Member(t, req, latency, configs, log, name, a)
               for (t, req), a in zip(((t, r) for t in traces for r in t.requests), times)]
    steps = serve(members, policy, passive, latency, batch_size, draft)
    requests = [m.finish() for m in members]
    for m, r in zip(members, requests):
        r.control_s = m.control
    replay = ReplayResult(name, requests, list(configs), np.array(log, dtype=float).reshape(-1, len(LOG_COLUMNS)))
    served = tuple(Served(r, m.arrival, m.joined, m.left) for r, m in zip(requests, members))
    return BatchReplayResult(replay, served, np.array(steps, dtype=float).reshape(-1, len(STEP_COLUMNS)),
                             batch_size, draft, sum(m.dropped for m in members))


def serve(members: list[Member], policy: Policy, passive: StepConfig | None, latency: LatencyModel,
          batch_size: int, draft: str) -> list[tuple]:
    """Continuous batching on the modelled clock: admit arrived requests (in order) into free slots, step,
    let finished ones leave, until all are done. Returns one STEP_COLUMNS row per batch step."""
    waiting = deque(sorted(range(len(members)), key=lambda i: (members[i].arrival, i)))
    active: list[Member] = []
    report = observes(policy)
    clock, rows = 0.0, []
    while waiting or active:
        while waiting and members[waiting[0]].arrival <= clock and len(active) < batch_size:
            m = members[waiting.popleft()]
            m.joined = m.left = clock
            t0 = perf_counter()
            policy.begin(m.req.request_id, m.prompt_len)
            m.control += perf_counter() - t0
            m.prefill(passive)
            if m.done:  # nothing recorded to generate
                leave(policy, m)
            else:
                active.append(m)
        if not active:
            clock = max(clock, members[waiting[0]].arrival)  # idle until the next arrival
            continue
        row = step(active, policy, passive, latency, draft, report)
        rows.append((clock, *row))
        *_, t_verify, t_draft, t_overhead = row
        clock += t_verify + t_draft + t_overhead
        for m in active:
            if m.done:
                m.left = clock
                leave(policy, m)
        active = [m for m in active if not m.done]
    return rows


def leave(policy: Policy, m: Member) -> None:
    t0 = perf_counter()
    policy.end(m.req.request_id)
    m.control += perf_counter() - t0


def step(batch: list[Member], policy: Policy, passive: StepConfig | None, latency: LatencyModel, draft: str,
         report: bool) -> tuple:
    """One batch step (module docstring); returns its STEP_COLUMNS values after `start`."""
    for m in batch:
        m.plan(policy, passive, len(batch) - 1)
    tokens = [m.outcome.tree_size + 1 for m in batch]  # [B] verified rows per request
    total = sum(tokens)
    union = np.logical_or.reduce([m.experts for m in batch])  # [L, E]
    unique = int(union.sum())
    contexts = [m.context for m in batch]
    t_verify = batch_verify_time(latency, tokens, unique, contexts)
    drafts = draft_times(latency, batch, draft)
    share(batch, tokens, contexts, t_verify)
    emitted = 0
    committed = []
    for m, rows, t_draft in zip(batch, tokens, drafts):
        committed.append(m.settle(t_verify * (rows / total), t_draft))  # rows / total: exactly 1 for one request
        emitted += m.emitted
    if report:
        for m, s in zip(batch, committed):
            m.report(policy, passive, s)
    overhead = len(batch) * latency.step_overhead
    return len(batch), total, unique, sum(contexts), emitted, t_verify, sum(drafts), overhead


def share(batch: list[Member], tokens: list[int], contexts: list[int], t_verify: float) -> None:
    """What each request learns of this step's batch: the whole forward (its StepStats' batch_* fields) and
    the others' rows and per-layer union of experts (its next decision's BatchContext); alone, neither,
    so a batch of one decides and learns as a single request."""
    if len(batch) == 1:
        batch[0].batch, batch[0].forward = None, {}
        return
    loads = np.sum([m.experts for m in batch], axis=0)  # [L, E] requests loading each expert
    forward = dict(batch_tokens=sum(tokens), batch_experts=int(np.count_nonzero(loads)),
                   batch_context=sum(contexts), batch_t_verify=t_verify)
    for m, rows in zip(batch, tokens):
        others = np.count_nonzero(loads - m.experts, axis=1)  # [L] the union of the others' experts
        m.batch = BatchContext(len(batch) - 1, sum(tokens) - rows, tuple(others.tolist()))
        m.forward = dict(forward, batch_experts_others=int(others.sum()))


# -- a request pool larger than the traces ---------------------------------------------------------------
def tile_requests(traces: Trace | Sequence[Trace], count: int) -> Trace:
    """`count` requests for batches larger than the traces hold: their requests in turn, the j-th reuse of
    a request starting (7 j) mod (half its length) positions in (its tail; the skipped output joins the
    prompt), so reuses of one request sit at different positions and route differently. They can still
    meet at one position later (then the union counts their experts once, as it would for two identical
    requests), so small batches of reuses understate the experts of distinct requests. Request ids are
    0..count-1; every tree is derived once (traces.derive) before it is shared by reuses."""
    traces = [traces] if isinstance(traces, Trace) else list(traces)
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1 (requests in the pool), got {count!r}")
    base = [r for t in traces for r in t.requests if r.positions]
    if not base or any(t.shape != traces[0].shape for t in traces):
        raise ValueError("tile_requests needs traces of one model shape with at least one recorded position")
    for drafter in traces[0].meta.drafters:
        prepare(tree for r in base for pos in r.positions if (tree := pos.trees.get(drafter)) is not None)
    pool = []
    for i in range(count):
        req, reuse = base[i % len(base)], i // len(base)
        skip = (7 * reuse) % max(len(req.positions) // 2, 1)
        ids = None if req.prompt_ids is None else np.concatenate((req.prompt_ids, req.output[:skip]))
        pool.append(RequestTrace(request_id=i, prompt_len=req.prompt_len + skip, kind=req.kind, prompt=req.prompt,
                                 positions=req.positions[skip:], complete=req.complete, prompt_ids=ids,
                                 max_new_tokens=req.max_new_tokens - skip if req.max_new_tokens else 0))
    return Trace(traces[0].meta, pool, path=f"{len(pool)} requests tiled from {len(base)}")
