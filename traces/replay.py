"""Offline replay: drive any policy over recorded (or synthetic) traces, with step times from a latency
model instead of a GPU.

Each request runs through moetune.driver, the step protocol the live engine runs too, over a
`TraceBackend`: lookahead (the n-gram index, with the trace's recorded orders, over the recorded prompt
and output) -> decide(DecodeState)
-> draft (the recorded tree of the chosen drafter at the current position) -> verify (the
counterfactual outcome of that config there, outcome.py, with modelled times) -> accept -> commit ->
StepStats -> observe. The position advances by the tokens the step emits (under binding budgets, along
the recorded greedy output: teacher forcing, so fidelity is token agreement with the unbudgeted output).
StepStats carry model times only (t_control = 0) so replay is deterministic; the policy's own begin,
decide, observe and end wall time is measured and reported separately (`control_s`). Plain decoding over
the same tokens with the same latency model is the baseline of `speedup`.

Shape legend: S steps, L MoE layers.
"""
from __future__ import annotations

import copy
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from moetune.driver import decode, step_stats
from moetune.ngram import NgramIndex
from moetune.policies.base import Policy
from moetune.policies.registry import make_policy as registry_make
from moetune.step import Lookahead, StepConfig, StepStats

from .derive import prepare
from .latency import LatencyModel
from .outcome import StepOutcome, config_subtree, outcome  # StepOutcome and outcome are also the replay API
from .reader import read_trace
from .schema import Trace, TreeRecord

LOG_COLUMNS = ("request_id", "step", "position", "config", "accepted", "emitted", "tree_size", "step_time",
               "agreed")


@dataclass
class RequestResult:
    """Totals of one replayed request; rates are properties so results merge by adding."""

    request_id: int
    kind: str
    tokens: int = 0
    steps: int = 0
    time_s: float = 0.0  # modelled step time (draft + verify + per-step overhead)
    plain_time_s: float = 0.0  # plain decoding of the same tokens, same latency model
    accepted: int = 0
    drafted: int = 0
    agreed: int = 0  # emitted tokens equal to the unbudgeted greedy output
    on_target: int = 0  # tokens of steps whose time per output token met the latency target
    control_s: float = 0.0  # measured policy decide + observe wall time
    inexact: int = 0  # steps whose config reached beyond the recorded tree
    unique: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [L] summed over steps
    unique_kept: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [L] summed over steps

    @property
    def goodput(self) -> float:
        return self.tokens / self.time_s if self.time_s > 0 else 0.0

    @property
    def speedup(self) -> float:
        return self.plain_time_s / self.time_s if self.time_s > 0 else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def fidelity(self) -> float:
        return self.agreed / self.tokens if self.tokens else 1.0

    @property
    def attainment(self) -> float:
        return self.on_target / self.tokens if self.tokens else 1.0


@dataclass
class ReplayResult:
    """One policy over a set of traces: per-request results, overall figures and the decision log."""

    policy: str
    requests: list[RequestResult]
    configs: list[StepConfig]  # distinct configs, indexed by the log's `config` column
    log: np.ndarray  # [S, len(LOG_COLUMNS)] float64
    latency_target_ms: float | None = None

    def total(self) -> RequestResult:
        t = RequestResult(request_id=-1, kind="all")
        for r in self.requests:
            for f in ("tokens", "steps", "time_s", "plain_time_s", "accepted", "drafted", "agreed", "on_target",
                      "control_s", "inexact"):
                setattr(t, f, getattr(t, f) + getattr(r, f))
        if self.requests:
            t.unique = np.sum([r.unique for r in self.requests], axis=0)
            t.unique_kept = np.sum([r.unique_kept for r in self.requests], axis=0)
        return t

    def summary(self) -> dict:
        """Overall figures as plain numbers (the table and JSON `moetune replay` writes)."""
        t = self.total()
        steps = max(t.steps, 1)
        return dict(policy=self.policy, requests=len(self.requests), tokens=t.tokens, steps=t.steps,
                    goodput_tok_s=t.goodput, speedup=t.speedup, mean_accepted=t.mean_accepted,
                    unique_experts=(t.unique / steps).round(2).tolist(),
                    unique_kept=(t.unique_kept / steps).round(2).tolist(), fidelity=t.fidelity,
                    attainment=t.attainment if self.latency_target_ms else None,
                    control_us_per_step=1e6 * t.control_s / steps, inexact_steps=t.inexact)

    @classmethod
    def merge(cls, results: Sequence["ReplayResult"]) -> "ReplayResult":
        """Results of one policy over several trace sets (e.g. from workers), config indices remapped."""
        configs: list[StepConfig] = []
        index: dict[StepConfig, int] = {}
        logs = []
        for r in results:
            remap = np.array([index.setdefault(c, len(index)) for c in r.configs] or [0])
            log = r.log.copy()
            if len(log):
                log[:, 3] = remap[log[:, 3].astype(int)]
            logs.append(log)
        configs = list(index)
        return cls(results[0].policy, [q for r in results for q in r.requests], configs,
                   np.concatenate(logs) if logs else np.zeros((0, len(LOG_COLUMNS))), results[0].latency_target_ms)


def replay(traces: Trace | Sequence[Trace], policy: Policy, latency: LatencyModel,
           latency_target_ms: float | None = None, backend=None) -> ReplayResult:
    """Replay `policy` over every request of `traces` (see module docstring). backend(trace, request,
    latency, target, configs, log, name): the Backend of one request (default TraceBackend; e.g.
    traces.offload's, which adds a cache model's stalls)."""
    make = TraceBackend if backend is None else backend
    traces = [traces] if isinstance(traces, Trace) else list(traces)
    if not traces:
        raise ValueError("replay needs at least one trace")
    shape = traces[0].shape
    if any(t.shape != shape for t in traces):
        raise ValueError("replay traces must share one model shape; replay them separately")
    target = latency_target_ms / 1e3 if latency_target_ms else None
    policy.setup(shape)
    configs: dict[StepConfig, int] = {}
    log: list[tuple] = []
    requests = []
    name = getattr(policy, "name", type(policy).__name__)
    for trace in traces:
        for req in trace.requests:
            b = make(trace, req, latency, target, configs, log, name)
            b.result.control_s = decode(policy, b, req.request_id)
            requests.append(b.finish())
    return ReplayResult(name, requests, list(configs),
                        np.array(log, dtype=float).reshape(-1, len(LOG_COLUMNS)), latency_target_ms)


def drafter_trees(trace: Trace, drafter: str) -> list:
    """One drafter's trees in a trace: the first step that touches an underived tree derives all of that
    drafter's trees in one batch (traces.derive), and drafters no step asks for are never listed."""
    return [t for req in trace.requests for pos in req.positions if (t := pos.trees.get(drafter)) is not None]


class TraceBackend:
    """moetune.driver.Backend over one recorded request: a step's tree is the recorded tree's subtree at
    the current position, its verdict the counterfactual outcome (outcome.py), its times the latency
    model's; commit advances along the recorded output and keeps the replay accounting (RequestResult,
    the decision log). StepStats carry model times only (t_control = 0) so replay is deterministic."""

    keeps_steps = False  # the accounting needs no StepStats: a policy that ignores them gets none

    def __init__(self, trace: Trace, req, latency: LatencyModel, target: float | None,
                 configs: dict[StepConfig, int], log: list[tuple], policy_name: str = "policy"):
        """target: seconds per output token to meet (None: no latency target); configs and log: the
        replay's distinct configs and decision log, shared by its requests."""
        self.trace, self.req, self.latency, self.target, self.configs, self.log = \
            trace, req, latency, target, configs, log
        self.policy_name = policy_name  # for messages
        self.positions, self.output = req.positions, req.output
        self.total = len(req.positions)
        self.prompt_len = req.prompt_len
        self.max_new_tokens = req.max_new_tokens or self.total  # the engine trims trees to the tokens allowed
        self.generated, self.done = 0, self.total == 0
        layers = trace.shape.num_layers
        self.result = RequestResult(req.request_id, req.kind, unique=np.zeros(layers), unique_kept=np.zeros(layers))
        self.overhead = latency.step_overhead
        self.lookup = None  # the passive drafter's n-gram index, when the trace keeps the prompt ids
        self.unique, self.kept = [], []  # per step [L]
        self.steps, self.start, self.emitted, self.agreed = 0, 0, 0, 0
        self.t_draft = self.t_verify = 0.0
        self.verify_offload: dict | None = None  # StepStats.offload_* of the last verification (traces/offload.py)
        self.last, self.index = None, 0  # the previous step's config and its index (hashing one costs ~1 us)

    def prefill(self, passive: StepConfig | None) -> None:
        """The plain-decoding baseline, and the passive drafter's lookup over the prompt (as the engine's)."""
        ctx = self.prompt_len + np.arange(self.total)
        self.result.plain_time_s = float(np.sum(self.latency.plain_time(self.trace.shape, ctx)))
        self.output_ids = self.output.tolist()
        meta = self.trace.meta
        if passive is not None and self.req.prompt_ids is not None and passive.drafter in meta.drafters:
            # capped at the depth the trace recorded for it: no replayed step of it can draft deeper
            self.lookup = NgramIndex(meta.ngram_max_n, meta.ngram_min_n)
            self.cap = meta.drafters[passive.drafter].depth
            self.context_ids = self.req.prompt_ids.tolist()
            self.lookup.prefill(self.context_ids)

    def lookahead(self, passive: StepConfig) -> Lookahead | None:
        if self.lookup is None:
            return None
        order, chain = self.lookup.lookahead(self.context_ids, passive.depth)
        return Lookahead(passive.drafter, order, min(len(chain), self.cap))

    def draft(self, config: StepConfig) -> TreeRecord:
        """The recorded tree of the step's drafter here (plain steps read any tree's root routing)."""
        trees = self.positions[self.generated].trees
        if not config.speculate:
            return next(iter(trees.values()))
        tree = trees.get(config.drafter)
        if tree is None:
            raise ValueError(f"policy {self.policy_name!r} asked for drafter {config.drafter!r}; this trace "
                             f"recorded {sorted(trees)}")
        if tree.batch is None:
            prepare(drafter_trees(self.trace, config.drafter))
        return tree

    def verify(self, config: StepConfig, tree: TreeRecord, free=None) -> StepOutcome:
        """The counterfactual outcome of `config` here, and its modelled draft and verify times (free: [L]
        experts free against an eviction budget, see outcome)."""
        p = self.generated
        o = outcome(tree, config, self.max_new_tokens - p - 1, free)
        lat = self.latency
        self.t_verify = float(lat.verify_time(o.tree_size + 1, sum(o.unique_kept), self.prompt_len + p))
        self.t_draft = float(lat.draft_time(config.drafter, o.tree_depth, o.tree_size)) if config.speculate else 0.0
        return o

    def accept(self, tree: TreeRecord, o: StepOutcome) -> int:
        return o.budget_accepted

    def commit(self, config: StepConfig, tree: TreeRecord, o: StepOutcome, accepted: int) -> None:
        """Emit along the recorded output (teacher forcing) and account for the step."""
        p = self.start = self.generated
        emitted = self.emitted = min(accepted + 1, self.total - p)
        if o.budget_tokens is None:
            agreed = emitted
        else:
            agreed = int(np.sum(np.asarray(o.budget_tokens[:emitted]) == self.output[p:p + emitted]))
        self.agreed = agreed
        step_time = self.t_draft + self.t_verify + self.overhead
        res = self.result
        res.tokens += emitted
        res.steps += 1
        res.time_s += step_time
        res.accepted += accepted
        res.drafted += o.tree_size
        res.agreed += agreed
        res.inexact += not o.exact
        self.unique.append(o.unique_experts)
        self.kept.append(o.unique_kept)
        if self.target is not None and step_time <= self.target * emitted:
            res.on_target += emitted
        if config is not self.last:
            self.last, self.index = config, self.configs.setdefault(config, len(self.configs))
        self.log.append((res.request_id, self.steps, p, self.index, accepted, emitted, o.tree_size, step_time, agreed))
        if self.lookup is not None:
            self.context_ids += self.output_ids[p:p + emitted]
        self.steps += 1
        self.generated = p + emitted
        self.done = self.generated >= self.total

    def stats(self, request_id: int, step: int, config: StepConfig, passive: StepConfig | None, tree: TreeRecord,
              o: StepOutcome, accepted: int, t_control: float) -> StepStats:
        """Model times only: the policy's own control time is measured and reported apart (control_s)."""
        p, emitted = self.start, self.emitted
        return step_stats(
            request_id, step, config, accepted=accepted, emitted=self.output_ids[p:p + emitted],
            tree_size=o.tree_size, tree_depth=o.tree_depth, context_len=self.prompt_len + p,
            times=(self.t_draft, self.t_verify, self.overhead, 0.0), t_control=0.0, unique=o.unique_experts,
            kept=o.unique_kept, mass_kept=o.mass_kept, substituted=o.substituted, nodes_kept=o.nodes_kept,
            agreement=self.agreed / emitted if config.budgets is not None else None,
            passive=passive, chain=None if passive is None else self._chain(passive, p), offload=self.verify_offload)

    def _chain(self, passive: StepConfig, p: int) -> list[int] | None:
        """The passive draft's chain at position p, from its recorded tree (None: the trace lacks it)."""
        tree = self.positions[p].trees.get(passive.drafter)
        if tree is None:
            return None
        if tree.batch is None:
            prepare(drafter_trees(self.trace, passive.drafter))
        return tree.tokens[config_subtree(tree, passive).nodes].tolist()

    def finish(self) -> RequestResult:
        res = self.result
        if self.unique:
            res.unique = np.sum(self.unique, axis=0, dtype=float)
            res.unique_kept = np.sum(self.kept, axis=0, dtype=float)
        return res


def make_policy(spec: str | Policy | Callable[[], Policy]) -> Policy:
    """A fresh policy: a spec string through moetune.policies.registry (e.g. "static:depth=4,topk=2"),
    a copy of a Policy instance, or a factory's product."""
    if isinstance(spec, Policy):
        return copy.deepcopy(spec)
    if callable(spec):
        return spec()
    return registry_make(spec)


def _replay_job(job: tuple) -> ReplayResult:
    path, spec, latency, target = job
    result = replay(read_trace(path), make_policy(spec), latency, target)
    if isinstance(spec, str):
        result.policy = spec  # the spec says more than the class name ("static:depth=4" vs "static")
    return result


def replay_many(trace_paths: Sequence[str | Path], policies: Sequence, latency: LatencyModel,
                latency_target_ms: float | None = None, workers: int = 1) -> list[ReplayResult]:
    """Every policy over every trace file, one (policy, file) job per worker process; a fresh policy per
    job (what a policy learns does not cross files). Returns one merged ReplayResult per policy, in order."""
    jobs = [(str(path), spec, latency, latency_target_ms) for spec in policies for path in trace_paths]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_replay_job, jobs))
    else:
        results = [_replay_job(j) for j in jobs]
    n = len(trace_paths)
    return [ReplayResult.merge(results[i * n:(i + 1) * n]) for i in range(len(policies))]
