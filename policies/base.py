"""The one policy interface: decide(state) -> StepConfig, observe(StepStats).

Policies see plain numbers only (no torch), so the same object drives a live run and an offline replay
(both through moetune.driver). A policy instance may serve many requests in turn: `begin` and `end`
bracket each request, and what it learns across requests (shared models) lives on the instance,
per-request state in a dict keyed by request id. Every DecodeState and StepStats carries that id, so a
policy never needs to remember which request it decided for last.

`Policy` is a typing.Protocol: the driver accepts any object with these members (an object that leaves
out `passive_draft`, `wants_routing`, `routing_now` or `drafters` gets the defaults below). Implementations may also
subclass it, as the policies in this package do, to inherit the defaults.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Protocol, runtime_checkable

from moetune.step import DecodeState, ModelShape, StepConfig, StepStats


@runtime_checkable
class Policy(Protocol):
    """What decides each decode step. Subclasses implement `decide`; the rest is optional."""

    name: str = "policy"
    # a draft to run passively beside every step (a chain of a drafter whose DrafterTraits.passive is set):
    # the engine and replay show its Lookahead before each decision and report its outcome, a
    # moetune.step.Probe, in StepStats.probe under greedy decoding
    passive_draft: StepConfig | None = None
    # whether `observe` needs per-layer routing in StepStats (unique experts, mass kept); capturing it
    # costs every step a hook per layer and a host transfer, so policies that ignore it say False
    wants_routing: bool = True
    # the drafters `decide` may ask for (None: any): a drafter with its own cache reads each prompt in the
    # prefill only when listed, else at its first draft, so plain decoding with a draft model at hand runs
    # no draft forward
    drafters: tuple[str, ...] | None = None

    def setup(self, shape: ModelShape) -> None:
        """Called once with the target's MoE shape before the first request."""
        self.shape = shape

    def begin(self, request_id: int, prompt_len: int) -> None:
        """A new request starts."""

    @abstractmethod
    def decide(self, state: DecodeState) -> StepConfig:
        """The configuration of the next decode step."""

    def routing_now(self) -> bool:
        """Whether the next verify should capture routing, asked before each verify of a request decoded on
        its own (a batch captures it on every step when `wants_routing`). Default: `wants_routing`; a policy
        that learns from a sample of steps says False on the others."""
        return self.wants_routing

    def observe(self, stats: StepStats) -> None:
        """What the step that `decide` configured did and cost (stats.request_id says for which request).
        A policy that keeps this no-op learns nothing, and replay then skips building its StepStats."""

    def end(self, request_id: int) -> None:
        """The request finished."""

    def decision_log(self) -> list[tuple]:
        """What the policy chose and why, for people: rows (request_id, step, config label, message), the
        message empty for a plain switch of configuration. `moetune run` and the live benchmark print it.
        Default: nothing to report."""
        return []
