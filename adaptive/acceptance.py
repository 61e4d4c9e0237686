"""Per-request acceptance by draft depth, with a Beta prior shared across requests.

Why per depth: a chain of depth d is worth 1 + sum_{i<=d} prod_{j<=i} p_j emitted tokens, where p_j is
the chance that depth j is accepted given depth j-1 was. Why per request: acceptance differs a lot
between requests (code vs chat) and within one (phases). Why a shared prior: a new request should start
from what earlier requests taught, not from ignorance. Per-request counts (the prior's share included)
decay every step, so after a phase change the request's own evidence dominates within a few dozen
steps, and while speculation is off the posterior widens and Thompson sampling explores again.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .health import report_reset


@dataclass(frozen=True)
class AcceptanceConfig:
    """How strongly the shared prior speaks, and how fast evidence is forgotten."""

    max_depth: int = 8
    families: int = 1  # drafter/shape families, each with its own per-depth curve
    prior_strength: float = 4.0  # pseudo-observations the shared prior is worth in a new request (decaying)
    floor_strength: float = 0.2  # pseudo-observations of the shared prior that never decay
    request_decay: float = 0.94  # per step: effective window of ~1/(1-decay) steps
    global_decay: float = 0.998  # per update of the shared counts
    # the shared prior's own prior at depth 1 (before any request); each deeper level's is centred on the
    # level above's mean, with the same strength (see AcceptanceModel.refresh)
    base_alpha: float = 1.0
    base_beta: float = 1.0

    def __post_init__(self):
        if self.max_depth < 1:
            raise ValueError(f"AcceptanceConfig.max_depth must be >= 1, got {self.max_depth}")
        if self.families < 1:
            raise ValueError(f"AcceptanceConfig.families must be >= 1, got {self.families}")
        if self.prior_strength < 0 or self.floor_strength <= 0:
            raise ValueError(f"AcceptanceConfig.prior_strength must be >= 0 and floor_strength > 0, "
                             f"got {self.prior_strength}, {self.floor_strength}")
        for name in ("request_decay", "global_decay"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"AcceptanceConfig.{name} must be in (0, 1], got {v}")
        if self.base_alpha <= 0 or self.base_beta <= 0:
            raise ValueError(f"AcceptanceConfig.base_alpha and base_beta must be > 0, "
                             f"got {self.base_alpha}, {self.base_beta}")


class AcceptanceModel:
    """Beta posteriors over per-depth conditional acceptance, shape (families, max_depth).

    Why lazy: observe runs every decode step, so per-request decay is one scalar (counts are stored
    divided by a running scale, in plain lists: a step touches a few of them, and numpy calls cost more
    than Python arithmetic at this size) and updates of the shared counts are queued and folded in by `refresh`
    (the controller calls it when it replans), `begin` and `prior_mean`. A posterior's small fixed share
    of the shared prior uses the prior as of the last fold.
    """

    def __init__(self, config: AcceptanceConfig = AcceptanceConfig()):
        self.config = config
        shape = (config.families, config.max_depth)
        self.global_s = np.zeros(shape)
        self.global_f = np.zeros(shape)
        self._requests: dict[int, list] = {}  # id -> [successes / scale, failures / scale (nested lists), scale]
        self._queue: list[tuple[int, int, int, float]] = []
        self.resets = 0
        self.refresh()

    def begin(self, request_id: int) -> None:
        """A new request starts from the shared prior, worth prior_strength observations that then decay
        like its own evidence (so a phase change is not held back by a prior that keeps coming back)."""
        mu = self.prior_mean()
        k = self.config.prior_strength
        self._requests[request_id] = [(k * mu).tolist(), (k * (1.0 - mu)).tolist(), 1.0]

    def end(self, request_id: int) -> None:
        self._requests.pop(request_id, None)

    def refresh(self) -> None:
        """Fold the queued shared-count updates in, in order, and cache the shared prior's means and floor
        share. A level's mean shrinks toward the level above's, not toward 1/2: a level no request drafted
        yet is expected to accept as the one above it does (the usual constant-rate model of speculation).
        Why: deep levels sat at 1/2 until some request drafted them, so early requests priced a deep chain
        as worth little and drafted 1-2 levels (Qwen3-shape replay, batch 1..64: auto 0.949 / 0.957 of the
        per-batch-size table, geometric mean, serial / batched drafting, with 1/2; 0.956 / 0.963 so)."""
        c = self.config
        if self._queue:
            # in closed form: a step's counts decay by global_decay once per later step of its family
            family, accepted, depth, fail_weight = (np.array(x) for x in zip(*self._queue))
            self._queue.clear()
            g = c.global_decay
            same = family[:, None] == family[None, :]
            later = np.triu(same, 1).sum(axis=1)
            w = g ** later.astype(float)
            levels = np.arange(c.max_depth)
            succ = (levels < accepted[:, None]) * w[:, None]
            fail = ((levels == accepted[:, None]) & (accepted < depth)[:, None]) * (fail_weight * w)[:, None]
            shrink = g ** np.bincount(family, minlength=c.families).astype(float)[:, None]
            self.global_s *= shrink
            self.global_f *= shrink
            np.add.at(self.global_s, family, succ)
            np.add.at(self.global_f, family, fail)
        mu = np.empty_like(self.global_s)
        prior, strength = c.base_alpha / (c.base_alpha + c.base_beta), c.base_alpha + c.base_beta
        for k in range(c.max_depth):
            s, f = self.global_s[:, k], self.global_f[:, k]
            mu[:, k] = prior = (s + strength * prior) / (s + f + strength)
        self._mu = mu
        self._floor = c.floor_strength * np.stack([mu, 1.0 - mu])  # (2, families, max_depth)
        self._floor_rows = self._floor.tolist()

    def prior_mean(self) -> np.ndarray:
        self.refresh()
        return self._mu

    def posterior(self, request_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Beta parameters (alpha, beta) for this request: a small fixed share of the shared prior plus
        its own decayed counts. While speculation is off the counts decay, the posterior widens toward
        the shared prior, and Thompson sampling tries speculating again."""
        a, b = self.posterior_stacked(request_id)
        return a, b

    def posterior_stacked(self, request_id: int) -> np.ndarray:
        """posterior() as one (2, families, max_depth) array: fewer array operations per decision."""
        s, f, scale = self._request(request_id)
        out = np.array((s, f))
        out *= scale
        out += self._floor
        return out

    def posterior_rows(self, request_id: int, rows: list[int]) -> tuple[list, list]:
        """posterior_stacked's alpha and beta for the given family rows, as lists of lists: a decision
        works on them in plain Python (numpy calls cost ~5 us each right after a forward pass)."""
        s, f, scale = self._request(request_id)
        floor_a, floor_b = self._floor_rows
        return ([[x * scale + y for x, y in zip(s[r], floor_a[r])] for r in rows],
                [[x * scale + y for x, y in zip(f[r], floor_b[r])] for r in rows])

    def mean(self, request_id: int) -> np.ndarray:
        a, b = self.posterior(request_id)
        return a / (a + b)

    def decay(self, request_id: int, factor: float | None = None) -> None:
        """Forget a little of this request's evidence (once per step; `factor` overrides request_decay)."""
        r = self._request(request_id)
        r[2] *= self.config.request_decay if factor is None else factor
        if r[2] < 1e-100:  # fold the scale into the counts before it underflows
            r[0], r[1], r[2] = (np.array(r[0]) * r[2]).tolist(), (np.array(r[1]) * r[2]).tolist(), 1.0

    def observe(self, request_id: int, family: int, accepted: int, depth: int, fail_weight: float = 1.0) -> None:
        """A step drafted `depth` levels of `family` and `accepted` of them were accepted.

        Depths 1..accepted succeeded; depth accepted+1 (if drafted) failed. `fail_weight` < 1 discounts a
        failure that an expert budget, not the drafter, may have caused.
        """
        depth = min(depth, self.config.max_depth)
        accepted = min(accepted, depth)
        s, f, scale = self._request(request_id)
        row = s[family]
        for i in range(accepted):
            row[i] += 1.0 / scale
        if accepted < depth:
            f[family][accepted] += fail_weight / scale
        self._queue.append((family, accepted, depth, fail_weight))

    def check(self) -> bool:
        """True when healthy (finite, non-negative counts); otherwise the shared counts and every request
        are reset to the prior (warning once). Called when the controller replans."""
        self.refresh()
        problem = ""
        if not (np.all(np.isfinite(self._mu)) and min(self.global_s.min(), self.global_f.min()) >= 0.0):
            problem = "non-finite or negative shared counts"
        for s, f, scale in self._requests.values():
            counts = np.array((s, f))
            if not (np.all(np.isfinite(counts)) and counts.min() >= 0.0 and 0.0 < scale < np.inf):
                problem = problem or "non-finite or negative counts of a request"
        if problem:
            report_reset(self, "acceptance model", problem)
            self.global_s[:], self.global_f[:] = 0.0, 0.0
            self.refresh()
            for request_id in self._requests:
                self.begin(request_id)
        return not problem

    def _request(self, request_id: int) -> list:
        if request_id not in self._requests:
            self.begin(request_id)
        return self._requests[request_id]


def expected_accepted(p: np.ndarray) -> np.ndarray:
    """Expected accepted length for every depth 1..D from per-depth conditional acceptance p (..., D)."""
    return np.cumsum(np.cumprod(p, axis=-1), axis=-1)
