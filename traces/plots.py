"""PNG plots of replay results: goodput against fidelity, per-layer budgets over time, acceptance over
time. Matplotlib with the Agg backend, so it runs headless.

Shape legend: S logged steps, L MoE layers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .replay import LOG_COLUMNS, ReplayResult

COL = {name: i for i, name in enumerate(LOG_COLUMNS)}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def goodput_vs_fidelity(results: Sequence[ReplayResult], path: Path) -> Path:
    """One large marker per policy (overall), small ones per request."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(results):
        color = f"C{i % 10}"
        ax.scatter([q.fidelity for q in r.requests], [q.goodput for q in r.requests], s=12, alpha=0.4, color=color)
        t = r.total()
        ax.scatter([t.fidelity], [t.goodput], s=80, color=color, label=f"{r.policy} ({t.speedup:.2f}x)")
    ax.set_xlabel("fidelity (token agreement with unbudgeted greedy)")
    ax.set_ylabel("predicted goodput (tok/s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def budgets_over_time(results: Sequence[ReplayResult], path: Path, num_layers: int) -> Path | None:
    """Per-layer budget of every step (steps without a budget drawn at E, the unbudgeted ceiling)."""
    budgeted = [r for r in results if any(c.budgets for c in r.configs)]
    if not budgeted:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(budgeted), 1, figsize=(7, 2.2 * len(budgeted)), squeeze=False)
    for ax, r in zip(axes[:, 0], budgeted):
        idx = r.log[:, COL["config"]].astype(int)
        per_step = np.array([r.configs[i].budgets or (np.nan,) * num_layers for i in idx], dtype=float)  # [S, L]
        for layer in range(per_step.shape[1]):
            ax.plot(per_step[:, layer], lw=0.8, label=f"layer {layer}" if layer < 8 else None)
        ax.set_title(r.policy, fontsize=8)
        ax.set_ylabel("budget B_l")
    axes[-1, 0].set_xlabel("step (all requests in order)")
    axes[0, 0].legend(fontsize=6, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def acceptance_over_time(results: Sequence[ReplayResult], path: Path, window: int = 16) -> Path:
    """Rolling mean accepted length per step, against the output position (first request)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, r in enumerate(results):
        if not len(r.log):
            continue
        first = r.log[r.log[:, COL["request_id"]] == r.log[0, COL["request_id"]]]
        acc = first[:, COL["accepted"]]
        smooth = np.convolve(acc, np.ones(window) / window, mode="same") if len(acc) >= window else acc
        ax.plot(first[:, COL["position"]], smooth, color=f"C{i % 10}", label=r.policy)
    ax.set_xlabel("output position (first request)")
    ax.set_ylabel(f"accepted length (rolling {window})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
