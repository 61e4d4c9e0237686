"""Per-request draft yield: the share of the requested draft nodes a drafter actually produced.

Why: a model drafter always drafts what it is asked for, but an n-gram (prompt lookup) drafter drafts
only when the context repeats itself: often nothing (no match: the step is a plain step plus a lookup)
or a short run. Pricing every n-gram step at its full tree size made n-gram look as costly as a full
verification of its requested tree, so new requests never tried it, though a step that drafts nothing
costs about a plain step. The controller prices a step by the nodes it is expected to draft
(requested nodes x yield), so trying n-gram is nearly free while it does not match, and it is kept as
soon as it matches. Why per request with a shared prior: whether the context repeats is a property of
the request (code and repetitive text do, prose not), and matches often appear partway through one; the
prior (the running mean over all requests, worth prior_strength steps) is where a new request starts.
Counts decay per speculative step like the acceptance evidence, so a request that stops matching is re-priced within a few dozen steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .health import report_reset


@dataclass(frozen=True)
class YieldConfig:
    """How strongly the shared prior speaks and how fast a request's evidence is forgotten."""

    families: int = 1
    prior_strength: float = 2.0  # pseudo-steps the shared mean is worth in every request's estimate
    request_decay: float = 0.94  # per step of the request
    global_decay: float = 0.995  # per observed step of the family, for the shared mean

    def __post_init__(self):
        if self.families < 1:
            raise ValueError(f"YieldConfig.families must be >= 1, got {self.families}")
        if not self.prior_strength > 0:
            raise ValueError(f"YieldConfig.prior_strength must be > 0, got {self.prior_strength}")
        for name in ("request_decay", "global_decay"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"YieldConfig.{name} must be in (0, 1], got {getattr(self, name)}")


class DraftYield:
    """Expected fraction (0..1) of requested draft nodes produced, per request and acceptance family.

    Plain Python lists: observe runs every step and touches one family (numpy calls cost more at this size).
    """

    def __init__(self, config: YieldConfig = YieldConfig()):
        self.config = config
        F = config.families
        self._global = [[1.0, 1.0] for _ in range(F)]  # (decayed yield sum, decayed steps): starts at full
        self._requests: dict[int, list] = {}  # id -> [[yield sum, steps] per family]
        self.resets = 0

    def begin(self, request_id: int) -> None:
        self._requests[request_id] = [[0.0, 0.0] for _ in self._global]

    def end(self, request_id: int) -> None:
        self._requests.pop(request_id, None)

    def observe(self, request_id: int, family: int, produced: int, requested: int, decay: bool = True) -> None:
        """A step of `family` asked for `requested` nodes and the drafter produced `produced`. decay=False
        for a second observation within one step (a passive probe): the request's evidence ages per step."""
        if request_id not in self._requests:
            self.begin(request_id)
        c, y = self.config, min(produced / max(requested, 1), 1.0)
        rows = self._requests[request_id]
        if decay:
            for row in rows:
                row[0] *= c.request_decay
                row[1] *= c.request_decay
        rows[family][0] += y
        rows[family][1] += 1.0
        g = self._global[family]
        g[0] = g[0] * c.global_decay + y
        g[1] = g[1] * c.global_decay + 1.0

    def fill(self, request_id: int) -> list[float]:
        """Per family, the expected yield of this request: its decayed mean, the shared mean as a prior."""
        if request_id not in self._requests:
            self.begin(request_id)
        k = self.config.prior_strength
        return [(s + k * gs / gn) / (n + k) for (s, n), (gs, gn) in zip(self._requests[request_id], self._global)]

    def check(self) -> bool:
        """True when healthy (finite, non-negative sums, the shared mean defined); otherwise the shared
        mean and every request are reset to the prior (warning once). Called when the controller replans."""
        rows = [row for rows in self._requests.values() for row in rows]
        healthy = all(math.isfinite(s) and math.isfinite(n) and s >= 0.0 and n >= 0.0 for s, n in rows) and \
            all(math.isfinite(s) and math.isfinite(n) and s >= 0.0 and n > 0.0 for s, n in self._global)
        if not healthy:
            report_reset(self, "draft-yield model", "non-finite or negative sums")
            self._global = [[1.0, 1.0] for _ in self._global]
            for request_id in self._requests:
                self.begin(request_id)
        return healthy
