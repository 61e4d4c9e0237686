"""Per-layer expert budgets of every candidate tree at every fidelity level: the slow half of a decision.

Why greedy by marginal loss: removing an expert from layer l saves the same time in every layer but loses
w_l * (router mass it carried), so experts are removed in order of least marginal fidelity loss (exact for
convex per-layer loss curves), giving one allocation per fidelity level.

Why per distinct token count: the allocation depends on a candidate only through the unique experts it
is predicted to touch, which depends only on how many tokens it verifies, and many candidates share a
count (one tree shape under several drafters). Allocating once per count and broadcasting keeps a plan
cheap enough to recompute often (it was the largest share of decide + observe with three drafters).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Allocation:
    """Per distinct token count (rows) and fidelity level (columns; column 0 = no budget)."""

    kept: np.ndarray  # (T, J) experts computed, summed over layers (column 0: the unrounded prediction)
    loss: np.ndarray  # (T, J) predicted agreement loss
    valid: np.ndarray  # (T, J) the level removes more experts than the one before (else a duplicate)
    budgets: np.ndarray  # (T, J, L) per-layer expert budgets


def allocate(U: np.ndarray, levels: np.ndarray, w: np.ndarray, gamma: np.ndarray, num_experts: int) -> Allocation:
    """Budgets for predicted unique experts U (L, T) at agreement-loss levels (J - 1,).

    w (L,): per-layer agreement loss per unit of router mass dropped; gamma (L,): mass dropped ~=
    (fraction of unique experts dropped) ** gamma.
    """
    L, T = U.shape
    J, E = 1 + len(levels), num_experts
    Ui = np.maximum(np.rint(U.T), 1)  # (T, L)
    kept = np.repeat(U.sum(axis=0)[:, None], J, axis=1)
    loss = np.zeros((T, J))
    valid = np.zeros((T, J), dtype=bool)
    valid[:, 0] = True
    removed = np.zeros((T, J, L), dtype=int)
    if J > 1 and E > 1:
        # marginal agreement loss of removing the k-th expert (k = 1..E-1) of layer l, inf past U - 1
        k = np.arange(1, E, dtype=float)
        x1, x0 = k / Ui[:, :, None], (k - 1) / Ui[:, :, None]
        g = gamma[None, :, None]
        marg = w[None, :, None] * (np.minimum(x1, 1.0) ** g - np.minimum(x0, 1.0) ** g)
        marg = np.where(k < Ui[:, :, None], marg, np.inf).reshape(T, -1)
        order = np.argsort(marg, axis=1, kind="stable")
        cum = np.cumsum(np.take_along_axis(marg, order, axis=1), axis=1)  # (T, L*(E-1))
        m = (cum[:, :, None] <= levels).sum(axis=1)  # removals per level (T, J-1)
        onehot = (order // (E - 1))[:, :, None] == np.arange(L)
        counts = np.cumsum(onehot, axis=1)  # removals per layer after the first i+1 (T, n, L)
        idx = np.maximum(m - 1, 0)
        removed[:, 1:] = np.take_along_axis(counts, idx[:, :, None], axis=1) * (m > 0)[:, :, None]
        loss[:, 1:] = np.where(m > 0, np.take_along_axis(cum, idx, axis=1), 0.0)
        valid[:, 1:] = (m > 0) & (m > np.concatenate([np.zeros((T, 1), dtype=int), m[:, :-1]], axis=1))
        kept[:, 1:] = Ui.sum(axis=1)[:, None] - removed[:, 1:].sum(axis=2)
    return Allocation(kept, loss, valid, Ui[:, None, :] - removed)
