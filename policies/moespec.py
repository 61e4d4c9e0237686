"""MoE-Spec (arXiv 2602.16052): one fixed expert budget B for every MoE layer, on a fixed chain or tree.

The baseline our per-layer, online budgets must beat: B is tuned by hand per deployment and is the same
for all layers. Experts are ranked by `selection` over the tree's nodes; dropped experts are handled by
`substitution` (MoE-Spec's lossy mode; static:budgets=...,budget_mode=evict is the lossless one). B must lie in [top_k, num_experts] of the model (ModelShape.check_budgets), checked at setup.
"""
from __future__ import annotations

from dataclasses import dataclass

from moetune.step import DRAFTERS, SELECTIONS, SUBSTITUTIONS, DecodeState, ModelShape, StepConfig

from .base import Policy


@dataclass(frozen=True)
class MoESpecConfig:
    budget: int = 16  # B: unique experts each layer may compute in one verification pass
    depth: int = 4
    topk: int = 1
    num_draft_tokens: int | None = None
    drafter: str = "draft_model"
    selection: str = "prob_sum"
    substitution: str = "reselect"

    def __post_init__(self):
        if self.budget < 1:
            raise ValueError(f"MoESpecConfig.budget must be >= 1 expert per layer, got {self.budget}")
        if self.drafter not in DRAFTERS:
            raise ValueError(f"MoESpecConfig.drafter must be one of {DRAFTERS}, got {self.drafter!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"MoESpecConfig.selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.substitution not in SUBSTITUTIONS:
            raise ValueError(f"MoESpecConfig.substitution must be one of {SUBSTITUTIONS}, got {self.substitution!r}")
        self.step_config((self.budget,))  # depth / topk / num_draft_tokens checks live in StepConfig

    def step_config(self, budgets: tuple[int, ...]) -> StepConfig:
        return StepConfig(drafter=self.drafter, depth=self.depth, topk=self.topk,
                          num_draft_tokens=self.num_draft_tokens, budgets=budgets, selection=self.selection,
                          substitution=self.substitution, budget_mode="substitute")


class MoESpec(Policy):
    """The same budgeted config every step."""

    name = "moespec"

    def __init__(self, config: MoESpecConfig = MoESpecConfig()):
        if not isinstance(config, MoESpecConfig):
            raise ValueError(f"MoESpec needs a MoESpecConfig, got {type(config).__name__}")
        self.config = config
        self.drafters = (config.drafter,)
        self.step_config: StepConfig | None = None

    def setup(self, shape: ModelShape) -> None:
        super().setup(shape)
        shape.check_budgets((self.config.budget,), "moespec budget")
        self.step_config = self.config.step_config((self.config.budget,) * shape.num_layers)

    def decide(self, state: DecodeState) -> StepConfig:
        if self.step_config is None:
            raise ValueError("MoESpec.decide called before setup(shape): the budget needs the layer count")
        return self.step_config
