"""The adaptive policy (ours): the online controller (moetune.adaptive.controller) behind base.Policy.

Why a wrapper: the engine and replay speak Policy; the controller speaks Decision (config plus why).
The wrapper keeps a short log of switches and infeasibility messages (`decision_log`) so `moetune run`
can show which configurations ran over time, and exposes `infeasible` / `messages` for latency-target mode.
"""
from __future__ import annotations

from moetune.adaptive.candidates import label
from moetune.adaptive.controller import Controller, ControllerConfig
from moetune.adaptive.decision import Decision
from moetune.step import DecodeState, ModelShape, StepConfig, StepStats

from .base import Policy

MAX_EVENTS = 10_000


class Adaptive(Policy):
    """Expected-goodput maximisation per step, with per-request acceptance and global cost models.

    `profile`: a hardware latency profile (traces.latency.LatencyModel, or a path to its JSON) that seeds
    the latency model; with a latency target it also lets setup prove a target infeasible
    (controller.InfeasibleTarget, a ValueError).
    """

    name = "adaptive"

    def __init__(self, config: ControllerConfig = ControllerConfig(), profile=None):
        if not isinstance(config, ControllerConfig):
            raise ValueError(f"Adaptive needs a ControllerConfig, got {type(config).__name__}")
        if isinstance(profile, str):
            from moetune.traces.latency import LatencyModel
            profile = LatencyModel.from_json(profile)
        self.config = config
        self.drafters = config.drafters
        self.controller = Controller(config, profile)
        self.events: list[tuple[int, int, str, str]] = []  # (request_id, step, config label, message)
        self.last: Decision | None = None

    def setup(self, shape: ModelShape) -> None:
        """Set up once per model shape: a policy reused across generate calls (one per prompt, as
        `moetune run` and the live benchmark do) keeps what earlier requests taught it."""
        if getattr(self, "shape", None) == shape:
            return
        super().setup(shape)
        self.controller.setup(shape)
        self.passive_draft = self.controller.probe

    def begin(self, request_id: int, prompt_len: int) -> None:
        self.controller.begin(request_id, prompt_len)

    def decide(self, state: DecodeState) -> StepConfig:
        d = self.controller.decide(state)
        self.last = d
        if (d.switched or d.message) and len(self.events) < MAX_EVENTS:
            self.events.append((state.request_id, state.step, label(d.config), d.message))
        return d.config

    def routing_now(self) -> bool:
        return self.controller.routing_now()

    def observe(self, stats: StepStats) -> None:
        self.controller.observe(stats)

    def end(self, request_id: int) -> None:
        self.controller.end(request_id)

    def decision_log(self) -> list[tuple[int, int, str, str]]:
        """Policy.decision_log: the switches and infeasibility messages so far (at most MAX_EVENTS rows of
        request_id, step, config label, message), oldest first."""
        return list(self.events)

    @property
    def infeasible(self) -> bool:
        """True while the latency target is predicted unreachable for the current request."""
        return bool(self.last is not None and self.last.infeasible)

    @property
    def messages(self) -> list[str]:
        return [e[3] for e in self.events if e[3]]
