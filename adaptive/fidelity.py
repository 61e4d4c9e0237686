"""What an expert budget costs in fidelity: agreement and acceptance lost vs router mass dropped per layer.

Why per layer: layers are not equally sensitive; dropping 10% of the router mass in one layer may flip
more argmaxes than in another, which is what lets the controller spend experts where they matter.
Model: agreement loss A = sum_l w_l * drop_l (drop_l = router mass dropped in layer l), w_l >= 0 fitted
by RLS on eval-mode steps (StepStats.agreement), started at 1/L each. A flipped target token also
rejects a draft token that would have matched, so each depth's acceptance is multiplied by
exp(-lambda * A), lambda fitted from budgeted steps (observed vs expected acceptances).

Why queued: observe runs every decode step; agreement observations are folded into the weights' fit as
one block update when the weights are next read (the controller reads them when it replans).

Live learning: agreement is measured only in eval mode (StepConfig.eval_agreement), which verifies each
tree twice. EvalSampler picks which lossy budgeted steps the controller runs in eval mode (one in
`every`, on average), so the weights are fitted from the steps the controller actually takes.
"""
from __future__ import annotations

import random

import numpy as np

from moetune.step import StepConfig

from .health import report_reset
from .latency import RLS


class FidelityModel:
    """Per-layer sensitivity weights w (agreement) and the acceptance factor lambda."""

    def __init__(self, num_layers: int, prior_total: float = 1.0, prior_std: float = 2.0, noise: float = 0.3,
                 floor: float = 0.25, lambda_prior: float = 1.0, lambda_weight: float = 2.0):
        """prior_std is relative to the prior weight; floor keeps every layer's weight at least that
        fraction of the mean weight, because per-layer drops are strongly correlated and a weight fitted
        to ~0 would let the allocator cut that layer to one expert."""
        w0 = prior_total / num_layers
        self.weights = RLS(np.full(num_layers, w0), prior_std * w0, noise, 1.0, "fidelity model's layer weights")
        self.floor = floor
        self._lam_prior = (lambda_prior * lambda_weight, lambda_weight)  # (numerator, denominator) pseudo-counts
        self._lam_num, self._lam_den = self._lam_prior
        self._pending: list[tuple] = []  # (drop (L,), 1 - agreement) per eval-mode step
        self.resets = 0

    @property
    def w(self) -> np.ndarray:
        self._flush()
        theta = self.weights.theta
        return np.maximum(theta, self.floor * max(float(theta.mean()), 0.0))

    @property
    def lam(self) -> float:
        # Python, not np.clip: the learners read it on every budgeted step, right after a forward pass
        return min(max(self._lam_num / self._lam_den, 0.0), 20.0)

    def agreement_loss(self, drop: np.ndarray) -> np.ndarray:
        """Predicted 1 - agreement for per-layer mass dropped, drop shape (L, ...)."""
        return np.clip(np.tensordot(self.w, drop, axes=(0, 0)), 0.0, 1.0)

    def acceptance_factor(self, loss) -> np.ndarray:
        """Multiplier on each depth's acceptance probability at agreement loss `loss`."""
        return np.exp(-self.lam * np.asarray(loss))

    def observe_agreement(self, drop: np.ndarray, agreement: float) -> None:
        """Queue an eval-mode step: router mass dropped per layer (L,) and the agreement it measured."""
        self._pending.append((drop, 1.0 - agreement))

    def _flush(self) -> None:
        if self._pending:
            drop, loss = zip(*self._pending)
            self._pending.clear()
            self.weights.observe_many(np.array(drop, dtype=float), np.array(loss, dtype=float))

    def observe_acceptance(self, loss: float, successes: float, expected: float) -> None:
        """A budgeted step at predicted loss `loss` got `successes` where `expected` were due unbudgeted."""
        if loss <= 0.0 or expected <= 0.0:
            return
        self._lam_num += expected - successes
        self._lam_den += loss * expected

    def check(self) -> bool:
        """True when healthy; otherwise the degraded part is reset to its prior (warning once)."""
        self._flush()
        healthy = self.weights.check()
        if not (np.isfinite(self._lam_num) and np.isfinite(self._lam_den) and self._lam_den > 0):
            report_reset(self, "fidelity model's acceptance factor", f"lambda = {self._lam_num} / {self._lam_den}")
            self._lam_num, self._lam_den = self._lam_prior
            healthy = False
        return healthy


class EvalSampler:
    """Which lossy budgeted steps also verify unbudgeted (eval mode), so the fidelity model learns live.

    Why sampled: an eval step verifies the tree twice, so evaluating one lossy step in `every` costs about
    1/every of their verification time, carried by those steps' own times. Why random gaps (uniform in
    [1, 2 every - 1], mean `every`) rather than a fixed period: a controller that alternates budget
    levels with a period dividing `every` would otherwise be measured at one level only. The first lossy
    step is evaluated: the model starts from its prior. Eviction budgets are exact, so never evaluated.

    State: `countdown`, lossy budgeted steps to skip before the next eval; `rng`, which draws the gaps.
    """

    def __init__(self, every: int = 32, seed: int = 0):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"EvalSampler.every must be an int >= 1 (evaluate one lossy budgeted step in that many; "
                             f"1 = all), got {every!r}")
        self.every = every
        self.rng = random.Random(seed)
        self.countdown = 0

    def want(self, config: StepConfig) -> bool:
        """Whether the step about to run with `config` should set eval_agreement (advances on lossy steps only)."""
        if config.budgets is None or config.budget_mode != "substitute":
            return False
        if self.countdown:
            self.countdown -= 1
            return False
        self.countdown = self.rng.randint(1, 2 * self.every - 1) - 1
        return True
