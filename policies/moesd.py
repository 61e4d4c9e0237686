"""MoESD-style speculation (arXiv 2505.19645): draft length from a fitted performance model.

The model: verifying t tokens loads N(t) = E(1 - (1 - K/E)^t) unique experts per layer (i.i.d. routing),
so verify time ~ a + b*t + c*L*N(t), fitted by least squares from a short calibration sweep over draft
lengths (the paper fits from ~21 measurements); draft time ~ d0 + d1*gamma. With a global acceptance
estimate alpha (i.i.d. per token, maximum likelihood from accepted lengths), expected tokens per step is
1 + alpha + ... + alpha^gamma (adaptive.acceptance.expected_accepted), and the chosen gamma
maximises tokens per second (gamma = 0: plain decoding). One model for all requests: no per-request or
per-phase adaptation beyond the slowly moving alpha, as in the paper's offline analysis.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moetune.adaptive.acceptance import expected_accepted
from moetune.adaptive.experts import iid_unique
from moetune.step import DRAFTERS, PLAIN, DecodeState, ModelShape, StepConfig, StepStats

from .base import Policy


@dataclass(frozen=True)
class MoESDConfig:
    max_depth: int = 8
    calibration_reps: int = 3  # calibration steps per draft length 0..max_depth
    alpha_prior: float = 0.6  # acceptance estimate before data
    alpha_decay: float = 0.995  # per step, on the acceptance counts
    drafter: str = "draft_model"

    def __post_init__(self):
        if not 1 <= self.max_depth <= 32:
            raise ValueError(f"MoESDConfig.max_depth must be in [1, 32], got {self.max_depth}")
        if self.calibration_reps < 1:
            raise ValueError(f"MoESDConfig.calibration_reps must be >= 1, got {self.calibration_reps}")
        if not 0.0 < self.alpha_prior < 1.0:
            raise ValueError(f"MoESDConfig.alpha_prior must be in (0, 1), got {self.alpha_prior}")
        if not 0.0 < self.alpha_decay <= 1.0:
            raise ValueError(f"MoESDConfig.alpha_decay must be in (0, 1], got {self.alpha_decay}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"MoESDConfig.drafter must be one of {DRAFTERS}, got {self.drafter!r}")


class MoESD(Policy):
    """Calibrate, fit the performance model, then pick gamma = argmax expected tokens per second."""

    name = "moesd"

    def __init__(self, config: MoESDConfig = MoESDConfig()):
        if not isinstance(config, MoESDConfig):
            raise ValueError(f"MoESD needs a MoESDConfig, got {type(config).__name__}")
        self.config = config
        self.drafters = (config.drafter,)
        c = config
        self.gammas = np.arange(c.max_depth + 1)
        self.configs = [PLAIN] + [StepConfig(drafter=c.drafter, depth=g) for g in range(1, c.max_depth + 1)]
        self.calibration = [g for _ in range(c.calibration_reps) for g in self.gammas.tolist()]
        self.samples: list[tuple[int, float, float]] = []  # (gamma, verify seconds, draft seconds)
        self.time: np.ndarray | None = None  # predicted step seconds per gamma, after calibration
        self.acc = 0.0
        self.fail = 0.0
        self.gamma = 0

    def setup(self, shape: ModelShape) -> None:
        super().setup(shape)
        self.n_iid = shape.num_layers * iid_unique(shape.num_experts, shape.top_k, self.gammas + 1)

    @property
    def alpha(self) -> float:
        prior = 4.0
        return (self.acc + prior * self.config.alpha_prior) / (self.acc + self.fail + prior)

    def decide(self, state: DecodeState) -> StepConfig:
        if self.time is None:
            self.gamma = self.calibration[len(self.samples) % len(self.calibration)]
        else:
            a = min(self.alpha, 0.999)
            tokens = 1.0 + np.concatenate(([0.0], expected_accepted(np.full(self.config.max_depth, a))))
            self.gamma = int(np.argmax(tokens / self.time))
        return self.configs[self.gamma]

    def observe(self, stats: StepStats) -> None:
        d = self.config.alpha_decay
        self.acc *= d
        self.fail *= d
        if stats.config.speculate and stats.tree_depth > 0:
            self.acc += stats.accepted
            self.fail += stats.accepted < stats.tree_depth
        if self.time is None:
            g = stats.tree_depth if stats.config.speculate else 0
            self.samples.append((g, stats.t_verify + stats.t_accept + stats.t_commit + stats.t_control,
                                 stats.t_draft))
            if len(self.samples) >= len(self.calibration):
                self.fit()

    def fit(self) -> None:
        """Least squares of the performance model on the calibration samples."""
        g, tv, td = (np.array(x, dtype=float) for x in zip(*self.samples))
        gi = g.astype(int)
        X = np.stack([np.ones_like(g), g + 1, self.n_iid[gi]], axis=1)
        theta, *_ = np.linalg.lstsq(X, tv, rcond=None)
        spec = g > 0
        draft = np.zeros(len(self.gammas))
        if spec.any():
            Xd = np.stack([np.ones(spec.sum()), g[spec]], axis=1)
            phi, *_ = np.linalg.lstsq(Xd, td[spec], rcond=None)
            draft[1:] = np.maximum(phi[0] + phi[1] * self.gammas[1:], 0.0)
        Xall = np.stack([np.ones(len(self.gammas)), self.gammas + 1, self.n_iid], axis=1)
        self.time = np.maximum(Xall @ theta, 1e-6) + draft
