"""Per-request decision state: one slot per lookahead order, each with its own hold schedule.

Why slots: choices differ by the n-gram match order (after a long match a deep n-gram chain, after a short
one the draft model or plain decoding), and steps alternate between orders; holding and revising each
order's choice on its own keeps alternating steps from forcing full decisions. Why holds: on a CPU a full
decision costs a few hundred microseconds right after a forward pass, so a choice the posterior mean also
ranks first is held for several steps, longer each time a full decision confirms it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .decision import Decision


@dataclass
class Slot:
    """A request's choice in one situation (one lookahead order) and when to revisit it."""

    option: int = -1  # flat option index (adaptive.plan.Menu); -1: none yet
    dwell: int = 0  # steps the option has run since it was chosen
    last: Decision | None = None  # the last full decision, repeated while held
    hold: int = 0  # steps the last decision is still held
    interval: int = 1  # steps between full decisions now (decide_every .. decide_every_max)
    settled: tuple | None = None  # (option, Decision): the last choice that was not an experiment

    def held(self) -> Decision:
        """The last full decision again, as no switch and without its message (both were reported)."""
        self.hold -= 1
        self.dwell += 1
        if self.last.switched or self.last.message:
            self.last = replace(self.last, switched=False, message="")
        return self.last

    def commit(self, option: int, decision: Decision, settled: bool = True) -> Decision:
        """settled False: a calibration step or a forced try, which the next request must not inherit."""
        self.dwell = 1 if decision.switched else self.dwell + 1
        self.option = option
        self.last = decision
        if settled:
            self.settled = (option, decision)
        return decision

    def reschedule(self, confirmed: bool, explored: bool, every: int, every_max: int) -> None:
        """Hold a confirmed choice twice as long as before (up to every_max), a new one for `every` steps;
        an exploratory choice is tried for one step."""
        if explored:
            self.interval, self.hold = every, 0
            return
        self.interval = min(2 * self.interval, every_max) if confirmed else every
        self.hold = self.interval - 1

    def release(self) -> None:
        """Decide afresh at the next step of this slot (the evidence says the choice is clearly beaten)."""
        self.hold = 0

    def handed(self, hold: int, interval: int) -> Slot:
        """This slot's last settled choice as a new request's first, held for `hold` steps. Why not the
        last decision: a forced try or a calibration step handed on ran held in every request that began
        next (at a batch's tail a lone request force-tried self-speculation, and the 8 requests of the next
        batch each drafted with it for 3 steps while the batch waited)."""
        option, decision = self.settled
        return Slot(option, 0, decision, hold, interval, self.settled)


@dataclass
class RequestState:
    """One request's slots and running totals (latency-target mode compares its time per token so far)."""

    slots: dict = field(default_factory=dict)  # lookahead order (None: no lookahead) -> Slot
    slot: Slot = field(default_factory=Slot)  # this step's
    order: int | None = None  # the lookahead's n-gram order at this step (None: no lookahead)
    loss: float = 0.0  # predicted agreement loss of this step's decision
    time: float = 0.0  # seconds of the steps so far
    emitted: int = 0
    steps: int = 0
    infeasible: bool = False
    notes: list = field(default_factory=list)  # infeasibility messages reported (at most one)
    mean: list | None = None  # posterior mean acceptance (F lists of D) at the last full decision
    decision: object | None = None  # this step's Decision (held or new): observe judges its eviction
    share: float = 1.0  # this step's share of its forward: 1 / the requests in its batch (1 alone)
    miss: float = 1.0  # the share of its experts the rest of its batch does not load (1 alone)
    trying: bool = False  # this step's decision is a calibration step or a forced try

    def enter(self, order: int | None) -> Slot:
        """Make the slot of this lookahead order this step's (a new one when the order is new)."""
        self.order = order
        slot = self.slots.get(order)
        if slot is None:
            slot = self.slots[order] = Slot()
        self.slot = slot
        return slot

    def count(self, step_time: float, emitted: int) -> None:
        self.time += step_time
        self.emitted += emitted
        self.steps += 1
