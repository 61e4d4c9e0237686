"""The controller's fixed menu of step configurations, laid out as numpy arrays once.

Why a fixed grid: decide() must cost microseconds, so everything that does not change per step (depths,
token counts, which acceptance curve a config uses) is an array computed at setup, and per-step work is
a handful of vectorised operations over (candidates x budget levels).
"""
from __future__ import annotations

import numpy as np

from moetune.step import DRAFTER_TRAITS, PLAIN, StepConfig


def label(config: StepConfig) -> str:
    """Short human-readable name of a config, for summaries and decision logs."""
    if not config.speculate:
        return "plain"
    shape = f"chain d{config.depth}" if config.topk == 1 and config.tree is None else (
        f"tree{len(config.tree)}" if config.tree is not None
        else f"tree d{config.depth} k{config.topk} n{config.max_nodes}")
    budget = "" if config.budgets is None else " B" + ",".join(map(str, config.budgets))
    return f"{config.drafter} {shape}{budget}"


class CandidateGrid:
    """Plain decoding plus every (drafter, width, depth); width 1 is a chain, width w > 1 a top-w tree
    capped at w * depth nodes (chains only for drafters whose DrafterTraits.chain_only is set). Family =
    (drafter, width): configs of one family share one per-depth acceptance curve."""

    def __init__(self, drafters: tuple[str, ...], widths: tuple[int, ...], max_depth: int):
        self.drafters = drafters
        self.widths = widths
        self.max_depth = max_depth
        configs, family, depth, drafter = [PLAIN], [0], [0], [-1]
        self.families: list[tuple[str, int]] = []
        for di, d in enumerate(drafters):
            for w in ((1,) if DRAFTER_TRAITS[d].chain_only else widths):
                self.families.append((d, w))
                for k in range(1, max_depth + 1):
                    configs.append(StepConfig(drafter=d, depth=k, topk=w, num_draft_tokens=None if w == 1 else w * k))
                    family.append(len(self.families) - 1)
                    depth.append(k)
                    drafter.append(di)
        self.configs = configs
        self.family = np.array(family)
        self.depth = np.array(depth)
        self.drafter = np.array(drafter)
        self.nodes = np.array([c.max_nodes for c in configs])
        self.tokens = self.nodes + 1
        # depth mask (C, D): depth i (0-based) counts toward expected acceptance iff i < depth[c]
        self.depth_mask = (np.arange(max_depth)[None, :] < self.depth[:, None]).astype(float)
        self._family_index = {f: i for i, f in enumerate(self.families)}

    def first(self, family: int) -> int:
        """Grid index of a family's depth-1 config (its depth-k config is first + k - 1)."""
        return 1 + family * self.max_depth

    def __len__(self) -> int:
        return len(self.configs)

    def family_of(self, config: StepConfig) -> int | None:
        """Acceptance family of an executed config (None when it is not on the grid's families)."""
        if not config.speculate:
            return None
        return self._family_index.get((config.drafter, config.topk))
