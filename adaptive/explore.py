"""When to try a drafter again although its posterior advises against it (issue 12.4).

Why: acceptance is learned only by drafting (the n-gram drafter also by its passive probe). A drafter
whose first steps accepted nothing, or whose shared prior turned pessimistic, ranks below plain decoding
under the posterior mean, and explore_slack then keeps Thompson draws from trying it: a new user saw plain
decoding for 500+ steps after the drafter had become good. Forgetting a request's evidence does not
help: each new request starts from the shared prior, which moves only when the drafter runs.

The schedule is a doubling trick, counted in the time of plain steps so a costly drafter is not tried
more often in time than a cheap one: drafter d is due once it was not observed for wait_d * cost_d
steps, cost_d the time of its try over a plain step's (at least 1; the larger of the latency model's
prediction and what its last try took: a rarely run drafter's fit lags its cost). wait_d starts at `every`,
doubles after each forced try, up to `every_max`, and is back at `every` after a try that paid (its
goodput reached the best option's predicted goodput). So while d does not pay, forced tries take at most
log2(every_max / every) + 1 tries plus 1 / every_max of the time; once it pays again it is tried within
every_max * cost_d steps, and then every `every` * cost_d steps while its tries keep paying, until the
posterior takes it up on its own.
"""
from __future__ import annotations


class ExplorationSchedule:
    """Per drafter: the step it was last observed at, how long it may go untried, what a try costs."""

    def __init__(self, drafters: tuple[str, ...], every: int, every_max: int):
        """every = 0: never force a try."""
        self.every = every
        self.every_max = every_max
        self.last_seen = dict.fromkeys(drafters, 0)  # controller step count
        self.wait = dict.fromkeys(drafters, every)
        self.cost = dict.fromkeys(drafters, 1.0)  # a try's time in plain steps, as last priced
        self.measured = dict.fromkeys(drafters, 1.0)  # ... as the last try took
        self.trial: tuple[str, float, float] | None = None  # in flight: (drafter, goodput to reach, plain step s)

    def due(self, step: int) -> str | None:
        """The drafter most overdue for a try at this step at its last known cost, if any."""
        if not self.every:
            return None
        drafter = max(self.wait, key=lambda d: (step - self.last_seen[d]) / (self.wait[d] * self.cost[d]))
        return drafter if step - self.last_seen[drafter] >= self.wait[drafter] * self.cost[drafter] else None

    def priced(self, drafter: str, step: int, cost: float) -> bool:
        """Record what the drafter's try is predicted to cost now (in plain steps); True when still due."""
        self.cost[drafter] = max(cost, self.measured[drafter], 1.0)
        return step - self.last_seen[drafter] >= self.wait[drafter] * self.cost[drafter]

    def tried(self, drafter: str, bar: float, plain_s: float) -> None:
        """A forced try was decided; it pays if its goodput reaches `bar` (tokens/s); a plain step is
        predicted to take plain_s seconds."""
        self.wait[drafter] = min(2 * self.wait[drafter], self.every_max)
        self.trial = (drafter, bar, plain_s)

    def observed(self, drafter: str, step: int) -> None:
        """A step of the drafter (or its passive probe) ran."""
        if drafter in self.last_seen:
            self.last_seen[drafter] = step

    def judge(self, drafter: str | None, emitted: int, seconds: float) -> None:
        """The outcome of the step after a forced try was decided (drafter None: a plain step)."""
        if self.trial is not None and self.trial[0] == drafter:
            _, bar, plain_s = self.trial
            self.measured[drafter] = seconds / plain_s
            if emitted >= bar * seconds:
                self.wait[drafter] = self.every
        self.trial = None
