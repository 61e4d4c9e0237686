"""Synthetic traces with known answers, for testing policies without a model.

What is made up (and stated in the trace's `meta.synthetic`):
- Acceptance: per phase and drafter, `accept[j-1]` is the probability that the most probable child of an
  accepted node at depth j-1 matches the target (the last value repeats for deeper nodes); when it does
  not, the next-ranked child matches with probability `alt`, and so on. So a chain of depth d accepts
  adaptive.acceptance.expected_accepted(accept padded to d)[d - 1] tokens on average, and wider trees
  gain from `alt`.
- Draft probabilities: the top child's probability tracks the phase's acceptance (a calibrated drafter)
  with noise; siblings share the rest geometrically. Trees grow as the engine's EAGLE-2 drafter grows
  them (TreeLimits: `topk` children per frontier node, a frontier of `topk` per level, to `depth`).
- Routing: per layer, Zipf-distributed expert popularity (heavy tail), a per-request/phase topic that
  boosts a cluster of experts (co-activation), and router noise correlated between a node and its parent.
  Router probabilities are the softmax.
- Budget outcomes: for each grid budget, a node that loses routed experts (or has an ancestor that did)
  flips its argmax with probability min(1, flip * mean routed mass lost); otherwise it is unchanged.
- Tokens are random ids; step timings are left at zero (use LatencyModel.analytic).

Shape legend: N draft nodes, L MoE layers, K top-k, M router entries, E experts, G grid budgets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from moetune import __version__
from moetune.step import ModelShape

from .outcome import keep
from .schema import Position, RequestTrace, Trace, TraceMeta, TreeLimits, TreeRecord

DEFAULT_LIMITS = {"draft_model": TreeLimits(depth=6, topk=4), "ngram": TreeLimits(depth=6, topk=1),
                  "self": TreeLimits(depth=6, topk=2)}


@dataclass(frozen=True)
class Phase:
    """A stretch of a request with fixed acceptance: `accept` per depth (one tuple for every drafter, or a
    dict drafter -> tuple), `alt` for lower-ranked siblings, `topic` picks the boosted expert cluster."""

    tokens: int
    accept: tuple[float, ...] | dict = (0.7,)
    alt: float = 0.3
    kind: str = ""
    topic: int = 0

    def __post_init__(self):
        if self.tokens < 1:
            raise ValueError(f"Phase.tokens must be >= 1, got {self.tokens}")
        for acc in (self.accept.values() if isinstance(self.accept, dict) else [self.accept]):
            if not acc or any(not 0.0 <= a <= 1.0 for a in acc):
                raise ValueError(f"Phase.accept needs probabilities in [0, 1], got {acc}")
        if not 0.0 <= self.alt <= 1.0:
            raise ValueError(f"Phase.alt must be in [0, 1], got {self.alt}")

    def acceptance(self, drafter: str) -> tuple[float, ...]:
        if isinstance(self.accept, dict):
            return tuple(self.accept.get(drafter, (0.0,)))
        return tuple(self.accept)


def synthetic_trace(shape: ModelShape, n_requests: int = 4, n_tokens: int = 128,
                    phases: Sequence[Phase] | Sequence[Sequence[Phase]] | None = None, seed: int = 0,
                    drafters: dict[str, TreeLimits] | Sequence[str] = ("draft_model",),
                    budget_grid: Sequence[int] | None = None, router_top: int | None = None,
                    vocab: int = 4096, zipf: float = 1.1, flip: float = 2.0) -> Trace:
    """A trace of `n_requests` requests of `n_tokens` output tokens each (see module docstring).

    `phases` is one list of phases for every request, or a list of such lists used by requests in turn
    (mixed request kinds). A request runs through its phases in order; the last one lasts to the end.
    """
    phases = list(phases or [Phase(tokens=n_tokens)])
    kinds = [list(p) for p in phases] if not isinstance(phases[0], Phase) else [phases]
    limits = dict(drafters) if isinstance(drafters, dict) else {d: DEFAULT_LIMITS[d] for d in drafters}
    e, k = shape.num_experts, shape.top_k
    grid = tuple(budget_grid) if budget_grid is not None else tuple(sorted({max(k, e * f // 8) for f in (2, 4, 6)}))
    meta = TraceMeta(shape=shape, drafters=limits, router_top=router_top or k, budget_grid=grid,
                     target="synthetic", draft="synthetic", moetune_version=__version__, seed=seed,
                     synthetic=__doc__.split("What is made up")[1].split("Shape legend")[0].strip())
    rng = np.random.default_rng(seed)
    popularity = np.log(1.0 / np.arange(1, e + 1) ** zipf)
    base = np.stack([rng.permutation(popularity) for _ in range(shape.num_layers)])  # [L, E]
    requests = []
    for r in range(n_requests):
        plan = kinds[r % len(kinds)]
        positions = []
        output = rng.integers(2, vocab, size=n_tokens + max(lim.depth for lim in limits.values()) + 1)
        for p in range(n_tokens):
            phase = phase_at(plan, p)
            topic = topic_bias(shape, r * 7919 + phase.topic, e)
            trees = {d: tree(rng, lim, phase, phase.acceptance(d), output[p:], base + topic, meta, vocab, flip)
                     for d, lim in limits.items()}
            positions.append(Position(token=int(output[p]), trees=trees))
        requests.append(RequestTrace(request_id=r, prompt_len=32, kind=plan[0].kind or f"kind{r % len(kinds)}",
                                     positions=positions, complete=True))
    return Trace(meta=meta, requests=requests, path="<synthetic>")


def phase_at(plan: list[Phase], p: int) -> Phase:
    for phase in plan:
        if p < phase.tokens:
            return phase
        p -= phase.tokens
    return plan[-1]


def topic_bias(shape: ModelShape, topic: int, e: int) -> np.ndarray:
    """[L, E] boost for a cluster of ~E/4 experts per layer that a topic's tokens co-activate."""
    rng = np.random.default_rng(topic)
    bias = np.zeros((shape.num_layers, e))
    for layer in range(shape.num_layers):
        bias[layer, rng.choice(e, size=max(1, e // 4), replace=False)] = 1.5
    return bias


def tree(rng, lim: TreeLimits, phase: Phase, accept, future: np.ndarray, logits_base: np.ndarray,
         meta: TraceMeta, vocab: int, flip: float) -> TreeRecord:
    """One position's largest tree, verdicts, routing and grid outcomes (see module docstring)."""
    parents, probs, cum, on_path, tokens = [], [], [], [], []
    argmax = [int(future[0])]

    def grow(node: int, d: int) -> list[int]:
        """Create the topk children (depth d + 1) of `node` (-1: the root) in rank order."""
        a = accept[min(d, len(accept) - 1)]
        top = float(np.clip(a + rng.normal(0, 0.1), 0.05, 0.98))
        path = node < 0 or on_path[node]
        hit = -1
        if path:
            for rank, chance in enumerate([a] + [phase.alt] * (lim.topk - 1)):
                if rng.random() < chance:
                    hit = rank
                    break
        ids = []
        for rank in range(lim.topk):
            q = top if rank == 0 else (1 - top) * 0.5 ** rank
            on = path and rank == hit
            ids.append(len(parents))
            parents.append(node)
            probs.append(q)
            cum.append(q * (cum[node] if node >= 0 else 1.0))
            on_path.append(on)
            tokens.append(int(future[d]) if on else int(rng.integers(2, vocab)))
            argmax.append(int(future[d + 1]) if on else int(rng.integers(2, vocab)))
        return ids

    frontier = grow(-1, 0)
    for level in range(1, lim.depth):
        new = [c for node in frontier for c in grow(node, level)]
        frontier = sorted(new, key=lambda j: (-cum[j], j))[:lim.topk]
    n = len(parents)
    parents_a = np.array(parents, dtype=np.int16)
    tokens_a = np.array(tokens, dtype=np.int32)
    argmax_a = np.array(argmax, dtype=np.int32)
    for i in range(n):  # an off-path token must not equal the argmax at its parent by accident
        if not on_path[i] and tokens_a[i] == argmax_a[parents[i] + 1]:
            tokens_a[i] = tokens_a[i] % (vocab - 2) + 2 if tokens_a[i] + 1 >= vocab else tokens_a[i] + 1
    experts, router_probs = routing(rng, parents, logits_base, meta)
    rec = TreeRecord(parents=parents_a, tokens=tokens_a, probs=np.array(probs, dtype=np.float16),
                     argmax=argmax_a, experts=experts, router_probs=router_probs,
                     budget_argmax=np.zeros((0, n + 1), dtype=np.int32), top_k=meta.shape.top_k,
                     grid=meta.budget_grid, limits=lim)
    rec.budget_argmax = grid_outcomes(rng, rec, meta, vocab, flip)
    return rec


def routing(rng, parents: list[int], logits_base: np.ndarray, meta: TraceMeta):
    """Router entries [N+1, L, M] by descending probability, and those probabilities [N+1, L, M]."""
    layers, e = logits_base.shape
    noise = rng.gumbel(size=(len(parents) + 1, layers, e))
    for i, p in enumerate(parents):  # a node's routing resembles its parent's (shared context)
        noise[i + 1] = 0.6 * noise[p + 1] + 0.8 * noise[i + 1]
    logits = logits_base[None] + noise
    prob = np.exp(logits - logits.max(axis=2, keepdims=True))
    prob /= prob.sum(axis=2, keepdims=True)
    order = np.argsort(-prob, axis=2)[:, :, :meta.router_top]
    top = np.take_along_axis(prob, order, axis=2)
    edtype = np.uint8 if e <= 256 else np.int16
    return order.astype(edtype), top.astype(np.float16)


def grid_outcomes(rng, rec: TreeRecord, meta: TraceMeta, vocab: int, flip: float) -> np.ndarray:
    """[G, N+1] argmax per node under each uniform grid budget over the whole tree."""
    n = rec.num_nodes
    rows = np.arange(n + 1)
    out = np.repeat(rec.argmax[None], len(meta.budget_grid), axis=0)
    for g, b in enumerate(meta.budget_grid):
        lost, mass = keep(rec, rows, np.full(meta.shape.num_layers, b), meta.selection)
        loss = 1.0 - mass.mean(axis=1)  # [N+1]
        hurt = lost.any(axis=(1, 2))
        for i in range(n):  # damage upstream reaches descendants through attention
            hurt[i + 1] |= hurt[rec.parents[i] + 1]
            loss[i + 1] = max(loss[i + 1], loss[rec.parents[i] + 1])
        flips = hurt & (rng.random(n + 1) < np.minimum(1.0, flip * loss))
        out[g, flips] = (out[g, flips] + 1 + rng.integers(0, vocab - 3, size=int(flips.sum()))) % vocab
    return out
