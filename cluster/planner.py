"""The SLO planner: TTFT → prefill pool size, TPOT → decode pool size.

Only a pool whose own target is set is planned (PlannerSpec.planned_roles); the other keeps the size it was given
or scaled to by hand. Each planned pool follows its own signal, one step at a time, within its bounds::

    p90 > target                         → +1 (unless in the scale-up cooldown)
    p90 < (1 - hysteresis) * target and
    the pool has had no queue            → -1 (unless in the scale-down cooldown)
    otherwise, or too few samples        → hold

Pure bookkeeping: the controller feeds observations in and applies the decisions.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

from cluster.config import PlannerSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Observation:
    """The router's view over the last window."""

    ttft_p90_s: float | None
    tpot_p90_s: float | None
    ttft_samples: int
    tpot_samples: int
    queue_depth: int
    requests_in_window: int


@dataclass(frozen=True)
class PlannerDecision:
    at: float
    role: str
    current: int
    target: int
    reason: str
    inputs: dict

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Planner:
    spec: PlannerSpec
    bounds: dict[str, tuple[int, int]]  # role -> (min, max)
    _last_up: dict[str, float] = field(default_factory=dict)
    _last_down: dict[str, float] = field(default_factory=dict)

    def operator_set(self, role: str, now: float) -> None:
        """An operator sized ``role``'s pool: it holds for both cooldowns, as the planner's own change would."""
        self._last_up[role] = self._last_down[role] = now

    def decide(self, now: float, observation: Observation, current: dict[str, int]) -> list[PlannerDecision]:
        decisions = []
        signals = {
            "prefill": (observation.ttft_p90_s, observation.ttft_samples),
            "decode": (observation.tpot_p90_s, observation.tpot_samples),
        }
        for role in self.spec.planned_roles:
            p90, samples = signals[role]
            target = self.spec.targets[role]
            decision = self._decide_pool(now, role, p90, samples, target, current[role], observation)
            if decision is not None:
                log.info(
                    "planner: %s %d -> %d (%s) inputs=%s",
                    role,
                    decision.current,
                    decision.target,
                    decision.reason,
                    decision.inputs,
                )
                decisions.append(decision)
        return decisions

    def _decide_pool(self, now, role, p90, samples, target, count, observation) -> PlannerDecision | None:
        low, high = self.bounds[role]
        inputs = {
            "p90_s": p90,
            "samples": samples,
            "target_s": target,
            "queue_depth": observation.queue_depth,
            "requests_in_window": observation.requests_in_window,
        }
        if count < low or count > high:
            return PlannerDecision(now, role, count, min(max(count, low), high), "outside bounds", inputs)
        busy = p90 is not None and samples >= self.spec.min_samples
        if busy and p90 > target and count < high:
            if now - self._last_up.get(role, float("-inf")) < self.spec.scale_up_cooldown_s:
                return None
            self._last_up[role] = now
            return PlannerDecision(now, role, count, count + 1, f"p90 {p90:.3f}s above target {target:.3f}s", inputs)
        calm = (not busy or p90 < (1 - self.spec.hysteresis) * target) and observation.queue_depth == 0
        if calm and count > low:
            last_change = max(self._last_down.get(role, float("-inf")), self._last_up.get(role, float("-inf")))
            if now - last_change < self.spec.scale_down_cooldown_s:
                return None
            self._last_down[role] = now
            why = "idle" if not busy else f"p90 {p90:.3f}s well below target {target:.3f}s"
            return PlannerDecision(now, role, count, count - 1, why, inputs)
        return None
