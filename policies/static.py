"""Static policies: plain decoding, or one fixed chain / tree / budget for every step."""
from __future__ import annotations

from moetune.step import PLAIN, DecodeState, ModelShape, StepConfig

from .base import Policy


class Static(Policy):
    """Always the same StepConfig (a chain, a tree, a fixed MoE-Spec budget, or plain decoding)."""

    wants_routing = False  # it learns nothing; a budgeted step still reports its routing

    def __init__(self, config: StepConfig, name: str | None = None):
        if not isinstance(config, StepConfig):
            raise ValueError(f"Static needs a StepConfig, got {type(config).__name__}")
        self.config = config
        self.name = name or ("plain" if not config.speculate else "static")
        self.drafters = (config.drafter,) if config.speculate else ()

    def setup(self, shape: ModelShape) -> None:
        """Budgets that cannot apply to this model fail here, before the first step."""
        super().setup(shape)
        if self.config.budgets is not None:
            shape.check_budgets(self.config.budgets, f"{self.name} budgets")

    def decide(self, state: DecodeState) -> StepConfig:
        return self.config


class Plain(Static):
    """Plain autoregressive decoding: one target forward per token, no speculation."""

    def __init__(self):
        super().__init__(PLAIN, name="plain")
