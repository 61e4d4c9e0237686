"""Offline replay: drive any policy over recorded (or synthetic) traces, with step times from a latency
model instead of a GPU.

Per request: begin; then, until the recorded output is used up, decide(DecodeState) -> the counterfactual
outcome of that config at the current position (outcome.py) -> StepStats with modelled times -> observe;
end. The position advances by the tokens the step emits (under binding budgets, along the recorded greedy
output: teacher forcing, so fidelity is token agreement with the unbudgeted output). StepStats carry model
times only (t_control = 0) so replay is deterministic; the policy's own decide + observe wall time is
measured and reported separately (`control_s`). Plain decoding over the same tokens with the same latency
model is the baseline of `speedup`.

Shape legend: S steps, L MoE layers.
"""
from __future__ import annotations

import copy
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from moetune.policies.base import Policy
from moetune.policies.registry import make_policy as registry_make
from moetune.ngram import NgramIndex
from moetune.step import DecodeState, Lookahead, Probe, StepConfig, StepStats

from .derive import prepare
from .latency import LatencyModel
from .outcome import StepOutcome, outcome  # noqa: F401  (re-exported: the replay API)
from .reader import read_trace
from .schema import Trace

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
           latency_target_ms: float | None = None) -> ReplayResult:
    """Replay `policy` over every request of `traces` (see module docstring)."""
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
    overhead = latency.step_overhead
    for trace in traces:
        for req in trace.requests:
            requests.append(replay_request(req, policy, latency, shape, target, overhead, configs, log, trace))
    return ReplayResult(getattr(policy, "name", type(policy).__name__), requests, list(configs),
                        np.array(log, dtype=float).reshape(-1, len(LOG_COLUMNS)), latency_target_ms)


def drafter_trees(trace: Trace, drafter: str) -> list:
    """One drafter's trees in a trace: the first step that touches an underived tree derives all of that
    drafter's trees in one batch (traces.derive), and drafters no step asks for are never listed."""
    return [t for req in trace.requests for pos in req.positions if (t := pos.trees.get(drafter)) is not None]


def replay_request(req, policy, latency, shape, target, overhead, configs, log, trace) -> RequestResult:
    positions, total = req.positions, len(req.positions)
    output = req.output
    res = RequestResult(req.request_id, req.kind, unique=np.zeros(shape.num_layers),
                        unique_kept=np.zeros(shape.num_layers))
    ctx = req.prompt_len + np.arange(total)
    res.plain_time_s = float(np.sum(latency.plain_time(shape, ctx)))
    clock = time.perf_counter
    unique, kept = [], []
    t0 = clock()
    policy.begin(req.request_id, req.prompt_len)
    res.control_s += clock() - t0
    limit = req.max_new_tokens or total  # the engine trims trees to the tokens still allowed
    # A policy that keeps Policy's no-op observe (static ones) gets no StepStats: building its ~20 frozen
    # fields was about a third of a step's own cost.
    watches = type(policy).observe is not Policy.observe
    look, lookup, probe_cfg = None, None, getattr(policy, "probe", None)
    if probe_cfg is not None and req.prompt_ids is not None and probe_cfg.drafter in trace.meta.drafters:
        # the probe drafter's lookahead, as the engine computes it before each decision, capped at the
        # depth the trace recorded for it (no replayed step of it can draft deeper)
        lookup, cap = NgramIndex(), trace.meta.drafters[probe_cfg.drafter].depth
        context_ids = req.prompt_ids.tolist()
        lookup.prefill(context_ids)
        output_ids = output.tolist()
    p = step = 0
    last, index = None, 0  # the previous step's config and its index (hashing a StepConfig costs ~1 us)
    while p < total:
        context = req.prompt_len + p
        if lookup is not None:  # the drafter's work (timed as draft live), not the policy's
            order, chain = lookup.lookahead(context_ids, probe_cfg.depth)
            look = Lookahead(probe_cfg.drafter, order, min(len(chain), cap))
        t0 = clock()
        config = policy.decide(DecodeState(req.request_id, step, context, p, limit - p, look))
        t_decide = clock() - t0
        trees = positions[p].trees
        tree = trees.get(config.drafter) if config.speculate else next(iter(trees.values()))
        if tree is None:
            raise ValueError(f"policy {getattr(policy, 'name', policy)!r} asked for drafter {config.drafter!r}; "
                             f"this trace recorded {sorted(trees)}")
        if tree.batch is None and config.speculate:
            prepare(drafter_trees(trace, config.drafter))
        o = outcome(tree, config, limit - p - 1)
        accepted = o.budget_accepted
        emitted = min(accepted + 1, total - p)
        if o.budget_tokens is None:
            agreed = emitted
        else:
            agreed = int(np.sum(np.asarray(o.budget_tokens[:emitted]) == output[p:p + emitted]))
        t_verify = float(latency.verify_time(o.tree_size + 1, sum(o.unique_kept), context))
        t_draft = float(latency.draft_time(config.drafter, o.tree_depth, o.tree_size)) if config.speculate else 0.0
        if watches:
            probe = None if probe_cfg is None else _probe(trace, trees.get(probe_cfg.drafter), probe_cfg, emitted)
            stats = StepStats(step=step, config=config, accepted=emitted - 1, emitted=emitted,
                              tree_size=o.tree_size, tree_depth=o.tree_depth, context_len=context,
                              unique_experts=o.unique_experts, unique_experts_kept=o.unique_kept,
                              router_mass_kept=o.mass_kept, tokens_substituted=o.substituted, t_draft=t_draft,
                              t_verify=t_verify, t_accept=overhead,
                              agreement=agreed / emitted if config.budgets is not None else None,
                              probe=probe)
            t0 = clock()
            policy.observe(stats)
            t_decide += clock() - t0
        res.control_s += t_decide
        step_time = t_draft + t_verify + overhead
        res.tokens += emitted
        res.steps += 1
        res.time_s += step_time
        res.accepted += emitted - 1
        res.drafted += o.tree_size
        res.agreed += agreed
        res.inexact += not o.exact
        unique.append(o.unique_experts)
        kept.append(o.unique_kept)
        if target is not None and step_time <= target * emitted:
            res.on_target += emitted
        if config is not last:
            last, index = config, configs.setdefault(config, len(configs))
        log.append((req.request_id, step, p, index, emitted - 1, emitted, o.tree_size, step_time, agreed))
        if lookup is not None:
            context_ids += output_ids[p:p + emitted]
        p += emitted
        step += 1
    t0 = clock()
    policy.end(req.request_id)
    res.control_s += clock() - t0
    if unique:
        res.unique, res.unique_kept = np.sum(unique, axis=0, dtype=float), np.sum(kept, axis=0, dtype=float)
    return res


def _probe(trace: Trace, tree, probe: StepConfig, emitted: int) -> Probe | None:
    """The passive draft the policy asked for (Policy.probe), as the engine reports it: checked against the
    `emitted` tokens only (acceptance past them is unknown live). None when the trace lacks the drafter."""
    if tree is None:
        return None
    if tree.batch is None:
        prepare(drafter_trees(trace, probe.drafter))
    o = outcome(tree, probe)
    accepted = min(o.accepted, emitted)
    return Probe(probe.drafter, probe.depth, o.tree_size, accepted, accepted == emitted < o.tree_size)


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
