"""The one policy interface: decide(state) -> StepConfig, observe(StepStats).

Policies see plain numbers only (no torch), so the same object drives a live run and an offline replay.
A policy instance may serve many requests in turn: `begin` and `end` bracket each request, and what it
learns across requests (shared models) lives on the instance, per-request state in a dict keyed by id.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from moetune.step import DecodeState, ModelShape, StepConfig, StepStats


class Policy(ABC):
    """Base class. Subclasses implement `decide`; the rest is optional."""

    name: str = "policy"
    # a passive draft to run beside every step whose drafter differs (a model-free drafter, chain only;
    # moetune.step.Probe): the engine and replay report its outcome in StepStats.probe under greedy decoding
    probe: StepConfig | None = None
    # whether `observe` needs per-layer routing in StepStats (unique experts, router mass); capturing it
    # costs every step a hook per layer and a host transfer, so policies that ignore it say False
    wants_routing: bool = True

    def setup(self, shape: ModelShape) -> None:
        """Called once with the target's MoE shape before the first request."""
        self.shape = shape

    def begin(self, request_id: int, prompt_len: int) -> None:
        """A new request starts."""

    @abstractmethod
    def decide(self, state: DecodeState) -> StepConfig:
        """The configuration of the next decode step."""

    def observe(self, stats: StepStats) -> None:
        """What the step that `decide` configured did and cost."""

    def end(self, request_id: int) -> None:
        """The request finished."""
