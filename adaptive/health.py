"""The online estimators' health check: a degraded estimator is reset to its prior and says so once.

Why: the estimators are bounded by construction (decayed or prior-anchored statistics), so this should
never fire; if it ever does (a bug, or a non-finite measurement), decoding must go on with the prior
rather than with NaN coefficients, which made every later step run plain. Why once per estimator: a
cause that persists would otherwise warn every few steps; later resets are counted in `resets`.
"""
from __future__ import annotations

import warnings


class EstimatorReset(RuntimeWarning):
    """An online estimator of the adaptive controller degraded and was reset to its prior."""


def report_reset(estimator, name: str, problem: str) -> None:
    """Count a reset of `estimator` (which keeps a `resets` count) and warn the first time only."""
    estimator.resets += 1
    if estimator.resets == 1:
        warnings.warn(f"adaptive controller: the {name} degraded ({problem}) and was reset to its prior; decoding "
                      f"continues. This should not happen, please report it; later resets of this estimator are "
                      f"counted in its `resets` without a warning", EstimatorReset, stacklevel=3)
