"""What the controller hands a policy each step (Decision), and the error for a latency target that cannot
be met (InfeasibleTarget)."""
from __future__ import annotations

from dataclasses import dataclass

from moetune.step import StepConfig


class InfeasibleTarget(ValueError):
    """The requested latency target cannot be met on this machine and model."""


@dataclass(frozen=True)
class Decision:
    """One step's choice and why: predicted goodput (tokens/s) and time per output token, target status. In a
    batch both are on the batch's scale (plan.at_rate): the best option's goodput is the batch's."""

    config: StepConfig
    goodput: float
    ms_per_token: float
    agreement_loss: float = 0.0
    switched: bool = False
    infeasible: bool = False
    message: str = ""
    # an eviction budget applied to the chosen option: (its acceptance family, level); None: not evicting
    eviction: tuple[int, int] | None = None
