"""MoESD's prediction (arXiv 2505.19645) of a fixed speculative config's speedup over plain decoding across
batch sizes, beside what batched replay (traces/batch.py) measures.

Why: MoESD models the speedup from the latency model and N(t), the unique experts per layer that t
tokens load, alone; replay adds what the model leaves out (acceptance per request, the batch's real union
of experts, requests joining and leaving). N(t) is i.i.d. routing by default, or drawn from the traces'
own routed experts (recorded_unique).

Shape legend: P recorded positions, L MoE layers, K top-k, E experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from moetune.adaptive.experts import iid_unique
from moetune.step import DRAFTER_TRAITS, ModelShape, StepConfig

from .batch import DRAFT_MODES, BatchReplayResult, batch_verify_time
from .latency import LatencyModel
from .schema import Trace


@dataclass(frozen=True)
class StepMeans:
    """What MoESD's model needs of a speculative config, per request-step: drafter, drafted nodes, draft
    depth, accepted length and context (e.g. from its replay at batch 1)."""

    drafter: str
    tree_size: float
    tree_depth: float
    accepted: float
    context: float

    def __post_init__(self):
        if not (0 <= self.accepted <= self.tree_size and 0 <= self.tree_depth <= self.tree_size
                and 0 <= self.context < math.inf):
            raise ValueError(f"StepMeans needs 0 <= accepted <= tree_size, 0 <= tree_depth <= tree_size and a "
                             f"finite context >= 0, got {self}")

    @classmethod
    def of(cls, result: BatchReplayResult, config: StepConfig) -> "StepMeans":
        """From a static config's replay; a chain's depth is its size, a tree's the config's depth."""
        t = result.replay.total()
        steps = max(t.steps, 1)
        size = t.drafted / steps
        depth = size if config.topk == 1 and config.tree is None else min(float(config.depth), size)
        return cls(config.drafter, size, depth, t.accepted / steps, float(result.column("context").sum()) / steps)


def recorded_unique(traces: Trace | Sequence[Trace], tokens: Sequence[int], draws: int = 16,
                    seed: int = 0) -> np.ndarray:
    """[len(tokens)] mean unique experts per layer of t recorded tokens drawn at random across requests
    and positions (the root rows: tokens the target emitted): MoESD's N(t) with the traces' own expert
    popularity instead of i.i.d. routing. Drawn without replacement while the traces hold enough."""
    traces = [traces] if isinstance(traces, Trace) else list(traces)
    roots = np.stack([next(iter(pos.trees.values())).experts[0, :, :traces[0].shape.top_k]
                      for t in traces for r in t.requests for pos in r.positions]).astype(np.int64)  # [P, L, K]
    layers, rng = roots.shape[1], np.random.default_rng(seed)
    out = []
    for t in tokens:
        total = 0
        for _ in range(draws):
            pick = roots[rng.choice(len(roots), size=int(t), replace=int(t) > len(roots))]  # [t, L, K]
            mask = np.zeros((layers, traces[0].shape.num_experts), dtype=bool)
            mask[np.broadcast_to(np.arange(layers)[None, :, None], pick.shape), pick] = True
            total += int(mask.sum())
        out.append(total / (draws * layers))
    return np.array(out)


def moesd_speedup(latency: LatencyModel, shape: ModelShape, means: StepMeans, batch_sizes: Sequence[int],
                  unique: Callable | None = None, draft: str = "engine") -> np.ndarray:
    """[len(batch_sizes)] MoESD's predicted speedup of a fixed speculative config over plain decoding at
    batch b, from the latency model and N(t) alone: b requests verify b (tree_size + 1) tokens loading
    L N(b (tree_size + 1)) experts and emit b (1 + accepted); plain verifies b tokens loading L N(b). Step
    times as replay_batch charges them (drafts as `draft` says, overhead per request).
    unique: N(t), unique experts per layer of t tokens (default MoESD's i.i.d. E (1 - (1 - K/E)^t))."""
    if draft not in DRAFT_MODES:
        raise ValueError(f"draft must be one of {DRAFT_MODES}, got {draft!r}")
    n_of = unique or (lambda t: iid_unique(shape.num_experts, shape.top_k, t))
    m, layers = means, shape.num_layers
    out = []
    for b in batch_sizes:
        ctx = [m.context] * b
        plain = batch_verify_time(latency, [1] * b, layers * float(n_of(b)), ctx) + b * latency.step_overhead
        rows = m.tree_size + 1
        verify = batch_verify_time(latency, [rows] * b, layers * float(n_of(b * rows)), ctx)
        one = float(latency.draft_time(m.drafter, m.tree_depth, m.tree_size))
        serial = draft == "serial" or (draft == "engine" and not DRAFTER_TRAITS[m.drafter].batched)
        drafts = b * one if serial else float(latency.draft_time(m.drafter, m.tree_depth, b * m.tree_size))
        out.append((1 + m.accepted) * plain / (verify + drafts + b * latency.step_overhead))
    return np.array(out)
