"""How a full decision ranks options: by a Thompson draw of acceptance, an upper confidence bound, or the
posterior mean (ControllerConfig.exploration); the posterior mean itself is kept beside the ranking curve.

Why plain Python on lists and random numbers drawn in blocks: a decision runs right after a forward pass
has evicted the CPU caches, where any numpy call costs ~5 us and a numpy random call ~100 us, while these
curves hold ~40 numbers. So normals and uniforms are drawn for 64 decisions at a time (one numpy call)
and a Beta draw is a few float operations (see `gamma`).
"""
from __future__ import annotations

import math

import numpy as np

BLOCK = 64  # decisions per block of random numbers
TINY = 1e-300  # far below any draw that matters, far above the smallest double


def gamma(k: float, z: float, u: float) -> float:
    """A Gamma(k) draw (k > 0) from a standard normal z and a uniform u, so a Thompson draw
    Beta(a, b) = Ga / (Ga + Gb) is arithmetic only.

    Gamma(k + 1) by the Wilson-Hilferty cube of a normal (close for shapes >= 1), times U ** (1 / k),
    which is exactly Gamma(k) for an independent uniform U; so weak posteriors keep Beta's U shape (a
    Gaussian draw explored them far less). For shapes near 0 both draws of a pair can underflow to 0:
    the tiny term k * TINY then makes their ratio the posterior mean instead of NaN (a NaN utility won
    the argmax)."""
    k1 = k + 1.0
    h = 1.0 / (9.0 * k1)
    c = 1.0 - h + z * math.sqrt(h)
    return k1 * (c ** 3 if c > 0.0 else 0.0) * u ** (1.0 / k) + TINY * k


class Ranking:
    """Ranking curves of per-depth acceptance from Beta posteriors, as F lists of D."""

    def __init__(self, exploration: str, ucb_c: float, rng: np.random.Generator, families: int, max_depth: int):
        self.exploration = exploration
        self.ucb_c = ucb_c
        self.rng = rng
        self.shape = (BLOCK, 2, 2, families, max_depth)  # [i, 0] normals, [i, 1] uniforms of decision i
        self.normals: list = []
        self.uniforms: list = []
        self.used = BLOCK

    def rank(self, alpha: list, beta: list) -> tuple[list, list]:
        """(ranking curves, posterior means) for Beta parameters alpha, beta (F lists of D each)."""
        mean = [[a / (a + b) for a, b in zip(ra, rb)] for ra, rb in zip(alpha, beta)]
        if self.exploration == "thompson":
            return self.thompson(alpha, beta), mean
        if self.exploration == "greedy":
            return mean, mean
        c = self.ucb_c
        return [[min(m + c * math.sqrt(m * (1.0 - m) / (a + b + 1.0)), 1.0) for m, a, b in zip(rm, ra, rb)]
                for rm, ra, rb in zip(mean, alpha, beta)], mean

    def thompson(self, alpha: list, beta: list) -> list:
        """One Beta draw per (family, depth), from this decision's block of random numbers."""
        if self.used == BLOCK:
            block = self.rng.random(self.shape)
            block[:, 0] = self.rng.standard_normal(block[:, 0].shape)
            self.normals, self.uniforms, self.used = block[:, 0].tolist(), block[:, 1].tolist(), 0
        (za, zb), (ua, ub) = self.normals[self.used], self.uniforms[self.used]
        self.used += 1
        out = []
        for ra, rb, rza, rzb, rua, rub in zip(alpha, beta, za, zb, ua, ub):
            row = []
            for a, b, z0, z1, u0, u1 in zip(ra, rb, rza, rzb, rua, rub):
                ga = gamma(a, z0, u0)
                row.append(ga / (ga + gamma(b, z1, u1)))
            out.append(row)
        return out
