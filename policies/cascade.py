"""Cascade-style speculation (arXiv 2506.20675): measure, per request, which draft length pays.

Per request a short *test* phase runs each K in `ks` (K = 0 is plain decoding) for `test_steps` steps
and measures its utility = (tokens emitted per second at K) / (tokens per second of plain decoding);
a longer *set* phase then uses the best K (speculation off when no K reaches utility 1) for `set_steps`
steps; then it tests again, so a request whose behaviour changes is re-evaluated. No model of the
hardware: only measured step times, which is both its strength (robust) and its cost (test steps at
poor K are spent on every request).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moetune.step import DRAFTERS, PLAIN, DecodeState, StepConfig, StepStats

from .base import Policy


@dataclass(frozen=True)
class CascadeConfig:
    ks: tuple[int, ...] = (0, 1, 2, 4, 6)  # draft lengths tried; 0 = plain decoding
    test_steps: int = 2  # steps per K in a test phase
    set_steps: int = 48  # steps using the best K before testing again
    topk: int = 1
    drafter: str = "draft_model"

    def __post_init__(self):
        if not self.ks or any(k < 0 for k in self.ks) or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"CascadeConfig.ks must be distinct draft lengths >= 0 (0 = plain), got {self.ks}")
        if 0 not in self.ks:
            raise ValueError(f"CascadeConfig.ks must include 0 (plain decoding is the utility baseline), got {self.ks}")
        if self.test_steps < 1 or self.set_steps < 1:
            raise ValueError(f"CascadeConfig.test_steps and set_steps must be >= 1, got {self.test_steps}, "
                             f"{self.set_steps}")
        if self.topk < 1:
            raise ValueError(f"CascadeConfig.topk must be >= 1, got {self.topk}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"CascadeConfig.drafter must be one of {DRAFTERS}, got {self.drafter!r}")
        deepest = max(self.ks)  # its StepConfig bounds the cost of every K
        if deepest:
            StepConfig(drafter=self.drafter, depth=deepest, topk=self.topk,
                       num_draft_tokens=None if self.topk == 1 else self.topk * deepest)


@dataclass
class _Request:
    step: int = 0
    best: int = 0  # index into ks
    arm: int = 0  # index into ks of the step decided last (what its StepStats measure)
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))
    time: np.ndarray = field(default_factory=lambda: np.zeros(0))


class Cascade(Policy):
    """Test phase over ks, then set phase at the best measured utility, repeated."""

    name = "cascade"

    def __init__(self, config: CascadeConfig = CascadeConfig()):
        if not isinstance(config, CascadeConfig):
            raise ValueError(f"Cascade needs a CascadeConfig, got {type(config).__name__}")
        self.config = config
        self.drafters = (config.drafter,)
        c = config
        self.configs = [PLAIN if k == 0 else StepConfig(drafter=c.drafter, depth=k, topk=c.topk,
                                                        num_draft_tokens=None if c.topk == 1 else c.topk * k)
                        for k in c.ks]
        self.period = len(c.ks) * c.test_steps + c.set_steps
        self.requests: dict[int, _Request] = {}

    def begin(self, request_id: int, prompt_len: int) -> None:
        n = len(self.config.ks)
        self.requests[request_id] = _Request(tokens=np.zeros(n), time=np.zeros(n))

    def end(self, request_id: int) -> None:
        self.requests.pop(request_id, None)

    def decide(self, state: DecodeState) -> StepConfig:
        if state.request_id not in self.requests:
            self.begin(state.request_id, state.context_len)
        r = self.requests[state.request_id]
        phase = r.step % self.period
        test_len = len(self.config.ks) * self.config.test_steps
        if phase < test_len:
            if phase == 0:
                r.tokens[:] = 0.0
                r.time[:] = 0.0
            r.arm = phase // self.config.test_steps
        else:
            if phase == test_len:
                r.best = self.choose(r)
            r.arm = r.best
        r.step += 1
        return self.configs[r.arm]

    def choose(self, r: _Request) -> int:
        """The K with the best measured tokens/s; plain (utility 1) unless some K beats it."""
        rate = r.tokens / np.maximum(r.time, 1e-12)
        plain = self.config.ks.index(0)
        utility = rate / max(rate[plain], 1e-12)
        best = int(np.argmax(utility))
        return best if utility[best] > 1.0 else plain

    def observe(self, stats: StepStats) -> None:
        r = self.requests.get(stats.request_id)
        if r is None:
            return
        r.tokens[r.arm] += stats.emitted
        r.time[r.arm] += stats.step_time
