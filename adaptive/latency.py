"""A global step-latency model, fitted online by least squares with forgetting and a ridge prior.

Why online: step time depends on the machine, the model, the load and the context length, and a
profile measured once drifts. The features are moetune.features' (verification: tokens, unique experts,
context; drafting, a separate fit per drafter: depth and nodes), as the hardware profile's. A
forgetting factor tracks drift; the prior (seeded from a hardware profile when one exists) is never
wholly forgotten, so the fit stays bounded where the data does not vary (class RLS).

Why buffered: decide + observe must stay a small share of a step (2% on the embedded CPU model), and a
refit per step is several numpy calls. Observations are queued and applied as one exact block
update (the same estimate the sequential updates give) when a prediction or `flush` asks for them; the
controller flushes when it replans, so its step-time predictions lag by at most refresh_every steps.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from moetune.features import DRAFT_FEATURES, VERIFY_FEATURES, draft_features, verify_features
from moetune.step import DRAFTER_TRAITS

from .health import report_reset

# The verify fit solves with context counted in thousands of tokens (tokens x context per token reaches
# 1e5 and more, which would leave its information matrix ill-conditioned). Features enter that scale in
# `fit_features` and a per-token profile's coefficients in `OnlineLatency.seed`; so the fit's theta, its
# prior (LatencyConfig.verify_prior) and what the controller's plan reads are per thousand tokens.
CONTEXT_SCALE = 1000.0
FIT_SCALE = np.array([1.0, 1.0, 1.0, CONTEXT_SCALE, CONTEXT_SCALE])  # per VERIFY_FEATURES: fit = feature / scale
ABSURD_STDS = 1e6  # a coefficient this many prior standard deviations from its prior means a broken fit
VERIFY_NAME, DRAFT_NAME = "latency fit of verification", "latency fit of drafter {!r}"


@dataclass(frozen=True)
class LatencyConfig:
    """Forgetting and prior confidence of the RLS fits. Default coefficients are seconds, CPU-ish; the
    verify prior's context terms are per thousand tokens (CONTEXT_SCALE)."""

    forgetting: float = 0.995
    noise_s: float = 1e-3  # typical step-time noise: prior strength is measured against it
    prior_scale: float = 2.0  # prior std of each coefficient, in units of its prior value
    seeded_scale: float = 0.3  # the same when a hardware profile seeds the prior
    # share of the prior's strength never forgotten: it keeps directions the data does not vary (n-gram
    # chains: depth == nodes) at their prior instead of winding up, and pulls little on the others
    prior_floor: float = 0.1
    verify_prior: tuple[float, ...] = (4e-3, 2e-4, 5e-5, 1e-4, 1e-5)
    draft_prior: tuple[float, ...] = (2e-4, 1e-3, 1e-4)
    # a model-free drafter (DrafterTraits.model_free: a lookup in the context) costs microseconds. Why its
    # own prior: at the model drafters' 1 ms per level an n-gram chain of 4 was priced at 4 ms until it was
    # tried with a match, and at batch 8 in replay it never was (auto ran plain throughout)
    model_free_draft_prior: tuple[float, ...] = (2e-5, 5e-6, 1e-6)
    # a request's own bookkeeping per step (accept, commit, decide + observe), outside the forwards
    overhead_prior: float = 1e-4
    # forgetting of a batched drafter's paid share (OnlineLatency.draft_share): faster than the fits', so a
    # few lone tries raise the price of the next
    share_forgetting: float = 0.98

    def __post_init__(self):
        for name in ("forgetting", "share_forgetting"):
            if not 0.9 <= getattr(self, name) <= 1.0:
                raise ValueError(f"LatencyConfig.{name} must be in [0.9, 1], got {getattr(self, name)}")
        if not 0.0 < self.prior_floor <= 1.0:
            raise ValueError(f"LatencyConfig.prior_floor must be in (0, 1] (1 = the prior is never forgotten), "
                             f"got {self.prior_floor}")
        if not 0.0 <= self.overhead_prior < 1.0:
            raise ValueError(f"LatencyConfig.overhead_prior must be seconds in [0, 1), got {self.overhead_prior}")
        for name in ("noise_s", "prior_scale", "seeded_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LatencyConfig.{name} must be > 0, got {getattr(self, name)}")
        if len(self.verify_prior) != len(VERIFY_FEATURES) or min(self.verify_prior) <= 0:
            raise ValueError(f"LatencyConfig.verify_prior needs {len(VERIFY_FEATURES)} positive coefficients "
                             f"{VERIFY_FEATURES}, got {self.verify_prior}")
        for name in ("draft_prior", "model_free_draft_prior"):
            prior = getattr(self, name)
            if len(prior) != len(DRAFT_FEATURES) or min(prior) <= 0:
                raise ValueError(f"LatencyConfig.{name} needs {len(DRAFT_FEATURES)} positive coefficients "
                                 f"{DRAFT_FEATURES}, got {prior}")


class RLS:
    """Exponentially weighted least squares anchored to a ridge prior; theta is the coefficient vector.

    Why not the covariance recursion of classic RLS: it divides the covariance by the forgetting factor
    every step, so in a direction the data never varies (n-gram chains: depth == nodes) it grows as
    forgetting^-n: it lost positive definiteness after ~7,000 steps and overflowed to NaN near 12,000.
    Here theta = (A + k Lambda0)^-1 (b + k Lambda0 theta0) is solved from sufficient statistics
    A = sum_i w_i x_i x_i^T, b = sum_i w_i x_i y_i (w_i = forgetting^age), with Lambda0 the prior precision
    (noise / prior_std)^2 in the units of one observation. The prior's weight k decays like the data's,
    as in classic RLS (whose estimate this is exactly while k > prior_floor), but never below prior_floor.
    So A + k Lambda0 >= prior_floor Lambda0 is positive definite by construction, A and b stay below
    max|x|^2 / (1 - forgetting), a direction the data leaves free keeps its prior, and the remaining
    prior barely pulls on what the data determines.
    """

    def __init__(self, theta, prior_std, noise: float, forgetting: float, name: str = "least-squares fit",
                 prior_floor: float = 1.0, nonnegative: bool = False):
        self.prior = np.array(theta, dtype=float)  # (p,) theta0
        self.nonnegative = nonnegative  # every coefficient >= 0 (each feature can only add time)
        std = np.broadcast_to(np.asarray(prior_std, dtype=float), self.prior.shape)
        self.precision = (noise / std) ** 2  # (p,) diagonal of Lambda0
        if not (np.all(np.isfinite(self.prior)) and np.all(np.isfinite(self.precision)) and np.all(self.precision > 0)):
            raise ValueError(f"{name}: the prior needs finite coefficients and finite positive standard deviations "
                             f"and noise, got theta {self.prior}, std {std}, noise {noise}")
        self.bound = ABSURD_STDS * std  # (p,) |theta - theta0| beyond this is absurd: reset
        self.forgetting = forgetting
        self.prior_floor = prior_floor
        self.name = name
        self.resets = 0
        self.reset()

    def reset(self) -> None:
        """Back to the prior: no data."""
        p = len(self.prior)
        self.A = np.zeros((p, p))  # (p, p) weighted sum of x x^T
        self.b = np.zeros(p)  # (p,) weighted sum of x y
        self.theta = self.prior.copy()
        self.n = 0

    def observe(self, x: np.ndarray, y: float, weight: float = 1.0) -> None:
        self.observe_many(np.asarray(x, dtype=float)[None], np.array([y], dtype=float), np.array([weight]))

    def observe_many(self, X: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> None:
        """The m observations (rows of X, oldest first) at once, exactly as m single ones: the statistics
        decay by forgetting^m and row i joins with weight forgetting^(m-1-i); then theta is refitted.
        weights (m,): what each row is worth, in observations (default 1 each); a row of weight w ages the
        older ones as w observations would. Why: a batched forward is seen once per request, each with
        weight its share, so a batch of 16 does not forget 16 times as fast (its verify fit then ran on the
        last dozen forwards, collinear in tokens, experts and context, and swung negative)."""
        m, lam = len(y), self.forgetting
        w = np.ones(m) if weights is None else np.asarray(weights, dtype=float)
        later = np.cumsum(w[::-1])[::-1] - w  # (m,) weight observed after each row
        Xw = X.T * (w * lam ** later)  # (p, m)
        decay = lam ** w.sum()
        self.A = decay * self.A + Xw @ X
        self.b = decay * self.b + Xw @ y
        self.n += float(w.sum())
        self.theta = self._solve(self._prior_weight() * self.precision)
        self.check()

    def _solve(self, k: np.ndarray) -> np.ndarray:
        """theta from the statistics and the prior's diagonal k Lambda0 (k (p,)); when nonnegative, the
        coefficients the unconstrained solution makes negative are held at 0 and the rest solved again
        (active set; at most p rounds of a p x p solve)."""
        M, v = self.A + np.diag(k), self.b + k * self.prior
        free = np.ones(len(v), dtype=bool)
        theta = np.zeros_like(v)
        try:
            while free.any():
                theta[:] = 0.0
                theta[free] = np.linalg.solve(M[np.ix_(free, free)], v[free])
                if not self.nonnegative or theta.min() >= 0:
                    return theta
                free &= theta > 0
        except np.linalg.LinAlgError:  # singular only with non-finite statistics: check() resets them
            return np.full_like(self.prior, np.nan)
        return theta

    def check(self) -> bool:
        """True when healthy; otherwise reset to the prior (warning once, see adaptive/health.py)."""
        problem = self._problem()
        if problem:
            report_reset(self, self.name, problem)
            self.reset()
        return not problem

    def _problem(self) -> str:
        if not (np.all(np.isfinite(self.A)) and np.all(np.isfinite(self.b))):
            return "non-finite statistics"
        if not np.all(np.isfinite(self.theta)):
            return "non-finite coefficients"
        if np.any(np.abs(self.theta - self.prior) > self.bound):
            return f"coefficients {self.theta} over {ABSURD_STDS:g} prior standard deviations from {self.prior}"
        try:
            np.linalg.cholesky(self.A + np.diag(self._prior_weight() * self.precision))
        except np.linalg.LinAlgError:
            return "information matrix not positive definite"
        return ""

    def _prior_weight(self) -> float:
        return max(self.forgetting ** self.n, self.prior_floor)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.theta


def fit_features(tokens, experts, context_len) -> np.ndarray:
    """moetune.features.verify_features (context_len in tokens) at the verify fit's scale (FIT_SCALE)."""
    return verify_features(tokens, experts, context_len) / FIT_SCALE


class RunningMean:
    """An exponentially weighted mean whose prior counts as one observation (OnlineLatency's per-request
    overhead and each batched drafter's paid share of its forward)."""

    def __init__(self, prior: float, forgetting: float, name: str):
        self.prior, self.forgetting, self.name = float(prior), forgetting, name
        self.resets = 0
        self.reset()

    def reset(self) -> None:
        self.total, self.weight = self.prior, 1.0

    @property
    def value(self) -> float:
        return self.total / self.weight

    def observe_many(self, values) -> None:
        """The observations (oldest first), one exponentially weighted update each. Plain Python: a few
        numbers per flush, where numpy calls right after a forward pass cost more than the arithmetic."""
        lam, total, weight = self.forgetting, self.total, self.weight
        for v in values:
            total, weight = lam * total + v, lam * weight + 1.0
        self.total, self.weight = total, weight

    def check(self) -> bool:
        healthy = bool(np.isfinite(self.total) and self.total >= 0.0 and self.weight > 0.0)
        if not healthy:
            report_reset(self, self.name, f"non-finite or negative mean {self.total} / {self.weight}")
            self.reset()
        return healthy


class OnlineLatency:
    """Step time = verify(tokens, experts, ctx) + draft[drafter](depth, nodes) + the request's overhead: the
    two fitted online, the last a running mean.

    Why the overhead apart from the verify fit: in a batch the forward is shared but each request's
    bookkeeping (accept, commit, decide + observe) is not; folded into the forward's constant and then shared
    by a batch of B, it was priced at 1/B of itself, plain decoding looked cheap and auto ran plain at large
    batches. Why a batched drafter's paid share (`draft_share`: the mean over drafting requests of 1 / the
    requests in their draft forward, starting at 0, as if the whole batch drafted): priced alone while few
    drafted with it, none started; priced as shared by the whole batch, a lone try looked B times cheaper
    than it was (adaptive/plan.py Plan.batch_times)."""

    def __init__(self, drafters: tuple[str, ...], config: LatencyConfig = LatencyConfig()):
        self.config = config
        c = config
        # the verify fit is held >= 0: its constant is the batch's shared cost, and a negative one (seen at
        # batch 16 before forwards were weighted) priced plain decoding above speculation. The draft fits are
        # not: a batched drafter's time is a share by nodes, and held >= 0 they drafted less in replay
        self.verify = RLS(c.verify_prior, np.array(c.verify_prior) * c.prior_scale, c.noise_s, c.forgetting,
                          VERIFY_NAME, c.prior_floor, nonnegative=True)
        self.draft = {d: self._draft_fit(d) for d in drafters}
        self.overhead = RunningMean(c.overhead_prior, c.forgetting, "step overhead mean")
        self.draft_share = {d: RunningMean(0.0, c.share_forgetting, f"draft forward share of {d!r}") for d in drafters}
        self.seeded = False
        self._pending: list[tuple] = []
        self._overheads: list[float] = []  # queued with _pending: each step's overhead
        self._shares: list[tuple[str, float]] = []  # ... and (drafter, paid share) of each batched draft

    def _draft_fit(self, drafter: str) -> RLS:
        """The unseeded draft fit: for a lookup drafter the model-free prior's coefficients, held as loosely
        as the model prior's (the same std), so the data weighs as much and a slow lookup is learned."""
        c = self.config
        traits = DRAFTER_TRAITS.get(drafter)
        if traits is None or not traits.model_free:
            return RLS(c.draft_prior, np.array(c.draft_prior) * c.prior_scale, c.noise_s, c.forgetting,
                       DRAFT_NAME.format(drafter), c.prior_floor)
        prior = np.array(c.model_free_draft_prior)
        return RLS(prior, np.array(c.draft_prior) * c.prior_scale, c.noise_s, c.forgetting, DRAFT_NAME.format(drafter),
                   c.prior_floor)

    def seed(self, profile) -> None:
        """Start from a hardware profile (a traces.latency.LatencyModel): its coefficients become the prior.

        The profile's coefficients are per token; the fit's context terms per CONTEXT_SCALE tokens.
        Its per-request accept + commit overhead seeds the overhead mean. A zero coefficient gets a small
        floor on its prior std so data can still move it.
        """
        c = self.config
        theta = np.array([float(x) for x in profile.verify]) * FIT_SCALE
        self.overhead = RunningMean(float(profile.step_overhead), c.forgetting, "step overhead mean")
        floor = 0.1 * np.array(c.verify_prior)
        self.verify = RLS(theta, np.hypot(theta * c.seeded_scale, floor), c.noise_s, c.forgetting, VERIFY_NAME,
                          c.prior_floor, nonnegative=True)
        for name, rls in self.draft.items():
            if name in profile.draft:
                d = np.array(profile.draft[name], dtype=float)
                self.draft[name] = RLS(d, np.hypot(d * c.seeded_scale, 0.1 * np.array(c.draft_prior)),
                                       c.noise_s, c.forgetting, DRAFT_NAME.format(name), c.prior_floor)
        self.seeded = True

    def observe(self, drafter: str | None, tokens: int, experts: float, context_len: int,
                t_verify: float, depth: int = 0, nodes: int = 0, t_draft: float = 0.0, weight: float = 1.0,
                draft_weight: float = 1.0, overhead: float = 0.0, draft_share: float | None = None) -> None:
        """Queue one step (applied by `flush`); drafter None or unknown: no drafting happened or is fitted.
        weight, draft_weight: what the verify and the draft observation are worth (a batched forward: each
        request's share of it, RLS.observe_many). overhead: the request's own seconds outside the forwards.
        draft_share: in a batched draft forward, 1 / the requests that drafted in it (None: none)."""
        drafter = drafter if drafter in self.draft else None
        self._pending.append((drafter, tokens, experts, context_len, t_verify, depth, nodes, t_draft, weight,
                              draft_weight))
        self._overheads.append(overhead)
        if draft_share is not None and drafter is not None:
            self._shares.append((drafter, draft_share))

    def flush(self) -> None:
        """Apply the queued steps as block updates of the verify fit and of each drafter's fit."""
        if not self._pending:
            return
        drafter, *cols = zip(*self._pending)
        self._pending.clear()
        tokens, experts, ctx, t_verify, depth, nodes, t_draft, weight, draft_weight = (
            np.array(c, dtype=float) for c in cols)
        self.verify.observe_many(fit_features(tokens, experts, ctx), t_verify, weight)
        self.overhead.observe_many(self._overheads)
        self._overheads.clear()
        for name, rls in self.draft.items():
            sel = np.array([d == name for d in drafter])
            if sel.any():
                rls.observe_many(draft_features(depth[sel], nodes[sel]), t_draft[sel], draft_weight[sel])
        for name, share in self._shares:
            self.draft_share[name].observe_many((share,))
        self._shares.clear()

    def check(self) -> bool:
        """Apply the queued steps and check every fit (each resets itself to its prior if degraded)."""
        self.flush()
        means = [self.overhead, *self.draft_share.values()]
        return all([self.verify.check(), *(m.check() for m in means), *(rls.check() for rls in self.draft.values())])

    def predict_verify(self, tokens, experts, context_len) -> np.ndarray:
        self.flush()
        return self.verify.predict(fit_features(tokens, experts, context_len))

    def predict_draft(self, drafter: str, features: np.ndarray) -> np.ndarray:
        """Draft seconds for rows of moetune.features.draft_features, built once by the caller."""
        self.flush()
        return np.maximum(self.draft[drafter].predict(features), 0.0)

    def predict_draft_shared(self, drafter: str, features: np.ndarray) -> np.ndarray:
        """The part of predict_draft a batched draft forward shares among its requests: its constant and its
        per-level forwards (DRAFT_FEATURES const and depth; the nodes are each request's own), within the
        whole prediction."""
        self.flush()
        theta = self.draft[drafter].theta
        shared = features[:, :2] @ theta[:2]
        return np.clip(shared, 0.0, np.maximum(features @ theta, 0.0))
