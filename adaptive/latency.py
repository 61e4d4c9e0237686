"""A global step-latency model, updated online by recursive least squares (RLS).

Why online: step time depends on the machine, the model, the load and the context length, and a
profile measured once drifts. Why these features: a verification pass reads every unique expert it
computes (bandwidth, the MoE cost of speculation), processes every verified token (compute) and attends
over the context (KV reads grow with context, per token verified). Drafting is a separate linear model
per drafter (fixed cost + per draft step + per node). RLS with a forgetting factor tracks drift.
Seeded from a hardware profile when one exists.

Why buffered: decide + observe must stay a small share of a step (2% on the embedded CPU model), and a
sequential RLS update is a dozen numpy calls. Observations are queued and applied as one exact block
update (the same estimate the sequential updates give) when a prediction or `flush` asks for them; the
controller flushes when it replans, so its step-time predictions lag by at most refresh_every steps.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

VERIFY_FEATURES = ("const", "tokens", "experts", "ctx_k", "tokens_x_ctx_k")
DRAFT_FEATURES = ("const", "depth", "nodes")


@dataclass(frozen=True)
class LatencyConfig:
    """Forgetting and prior confidence of the RLS fits. Default coefficients are seconds, CPU-ish."""

    forgetting: float = 0.995
    noise_s: float = 1e-3  # typical step-time noise: prior strength is measured against it
    prior_scale: float = 2.0  # prior std of each coefficient, in units of its prior value
    seeded_scale: float = 0.3  # the same when a hardware profile seeds the prior
    verify_prior: tuple[float, ...] = (4e-3, 2e-4, 5e-5, 1e-4, 1e-5)
    draft_prior: tuple[float, ...] = (2e-4, 1e-3, 1e-4)

    def __post_init__(self):
        if not 0.9 <= self.forgetting <= 1.0:
            raise ValueError(f"LatencyConfig.forgetting must be in [0.9, 1], got {self.forgetting}")
        for name in ("noise_s", "prior_scale", "seeded_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LatencyConfig.{name} must be > 0, got {getattr(self, name)}")
        if len(self.verify_prior) != len(VERIFY_FEATURES) or min(self.verify_prior) <= 0:
            raise ValueError(f"LatencyConfig.verify_prior needs {len(VERIFY_FEATURES)} positive coefficients "
                             f"{VERIFY_FEATURES}, got {self.verify_prior}")
        if len(self.draft_prior) != len(DRAFT_FEATURES) or min(self.draft_prior) <= 0:
            raise ValueError(f"LatencyConfig.draft_prior needs {len(DRAFT_FEATURES)} positive coefficients "
                             f"{DRAFT_FEATURES}, got {self.draft_prior}")


class RLS:
    """Recursive least squares with exponential forgetting; theta is the coefficient vector.

    P starts as the prior covariance of theta divided by the noise variance, so the prior is as strong
    as it is confident relative to how noisy one observation is.
    """

    def __init__(self, theta, prior_std, noise: float, forgetting: float):
        self.theta = np.array(theta, dtype=float)
        self.P = np.diag((np.broadcast_to(np.asarray(prior_std, dtype=float), self.theta.shape) / noise) ** 2)
        self.forgetting = forgetting
        self.n = 0

    def observe(self, x: np.ndarray, y: float) -> None:
        Px = self.P @ x
        k = Px / (self.forgetting + x @ Px)
        self.theta += k * (y - x @ self.theta)
        self.P -= k[:, None] * Px
        self.P *= 1.0 / self.forgetting
        self.n += 1

    def observe_many(self, X: np.ndarray, y: np.ndarray) -> None:
        """The m observations (rows of X, oldest first) at once, exactly as m sequential `observe` calls:
        information form A' = lam^m A + X^T W X with W = diag(lam^(m-1-i)), applied through Woodbury."""
        m, lam = len(y), self.forgetting
        PXt = self.P @ X.T  # (p, m)
        S = np.diag(lam ** (1.0 + np.arange(m))) + X @ PXt
        K = np.linalg.solve(S, PXt.T).T  # P X^T S^-1
        self.P = (self.P - K @ PXt.T) * lam ** -m
        w = lam ** (m - 1.0 - np.arange(m))
        self.theta += self.P @ (X.T @ (w * (y - X @ self.theta)))
        self.n += m

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.theta


def verify_features(tokens, experts, context_len) -> np.ndarray:
    """Feature vector(s) of a verification pass: tokens verified, total unique experts computed, context."""
    tokens = np.asarray(tokens, dtype=float)
    ctx_k = np.asarray(context_len, dtype=float) / 1000.0
    return np.stack(np.broadcast_arrays(np.ones_like(tokens), tokens, np.asarray(experts, dtype=float),
                                        ctx_k, tokens * ctx_k), axis=-1)


class OnlineLatency:
    """Step time = verify(tokens, experts, ctx) + draft[drafter](depth, nodes), both fitted online."""

    def __init__(self, drafters: tuple[str, ...], config: LatencyConfig = LatencyConfig()):
        self.config = config
        c = config
        self.verify = RLS(c.verify_prior, np.array(c.verify_prior) * c.prior_scale, c.noise_s, c.forgetting)
        self.draft = {d: RLS(c.draft_prior, np.array(c.draft_prior) * c.prior_scale, c.noise_s, c.forgetting)
                      for d in drafters}
        self.seeded = False
        self._pending: list[tuple] = []

    def seed(self, profile) -> None:
        """Start from a hardware profile (a traces.latency.LatencyModel): its coefficients become the prior.

        The profile's context terms are per token; ours per thousand tokens. Accept + commit overhead
        joins the constant, as our verify target includes them. A zero coefficient gets a small floor on
        its prior std so data can still move it.
        """
        c = self.config
        c0, ct, ce, cc, cct = (float(x) for x in profile.verify)
        theta = np.array([c0 + float(profile.step_overhead), ct, ce, cc * 1e3, cct * 1e3])
        floor = 0.1 * np.array(c.verify_prior)
        self.verify = RLS(theta, np.hypot(theta * c.seeded_scale, floor), c.noise_s, c.forgetting)
        for name, rls in self.draft.items():
            if name in profile.draft:
                d = np.array(profile.draft[name], dtype=float)
                self.draft[name] = RLS(d, np.hypot(d * c.seeded_scale, 0.1 * np.array(c.draft_prior)),
                                       c.noise_s, c.forgetting)
        self.seeded = True

    def observe(self, drafter: str | None, tokens: int, experts: float, context_len: int,
                t_verify: float, depth: int = 0, nodes: int = 0, t_draft: float = 0.0) -> None:
        """Queue one step (applied by `flush`); drafter None or unknown: no drafting happened or is fitted."""
        self._pending.append((drafter if drafter in self.draft else None, tokens, experts, context_len, t_verify,
                              depth, nodes, t_draft))

    def flush(self) -> None:
        """Apply the queued steps as block updates of the verify fit and of each drafter's fit."""
        if not self._pending:
            return
        drafter, *cols = zip(*self._pending)
        self._pending.clear()
        tokens, experts, ctx, t_verify, depth, nodes, t_draft = (np.array(c, dtype=float) for c in cols)
        self.verify.observe_many(verify_features(tokens, experts, ctx), t_verify)
        for name, rls in self.draft.items():
            sel = np.array([d == name for d in drafter])
            if sel.any():
                X = np.stack([np.ones(int(sel.sum())), depth[sel], nodes[sel]], axis=1)
                rls.observe_many(X, t_draft[sel])

    def predict_verify(self, tokens, experts, context_len) -> np.ndarray:
        self.flush()
        return self.verify.predict(verify_features(tokens, experts, context_len))

    def predict_draft(self, drafter: str, features: np.ndarray) -> np.ndarray:
        """Draft seconds for rows of DRAFT_FEATURES (const, depth, nodes), built once by the caller."""
        self.flush()
        return np.maximum(self.draft[drafter].predict(features), 0.0)
