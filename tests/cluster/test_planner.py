"""The SLO planner's decisions: bounds, cooldowns, hysteresis."""

from cluster.config import PlannerSpec
from cluster.planner import Observation, Planner

SPEC = PlannerSpec(
    enabled=True,
    ttft_target_s=0.5,
    tpot_target_s=0.05,
    scale_up_cooldown_s=10,
    scale_down_cooldown_s=30,
    hysteresis=0.2,
    min_samples=5,
)


def _obs(ttft=None, tpot=None, samples=20, queue=0):
    return Observation(
        ttft, tpot, samples if ttft is not None else 0, samples if tpot is not None else 0, queue, samples
    )


def _planner():
    return Planner(SPEC, {"prefill": (1, 3), "decode": (1, 2)})


def test_slow_ttft_grows_prefill_only_and_respects_cooldown():
    planner = _planner()
    first = planner.decide(0.0, _obs(ttft=2.0, tpot=0.045), {"prefill": 1, "decode": 1})
    assert [(d.role, d.target) for d in first] == [("prefill", 2)]
    assert first[0].inputs["p90_s"] == 2.0 and "above target" in first[0].reason
    assert planner.decide(5.0, _obs(ttft=2.0, tpot=0.045), {"prefill": 2, "decode": 1}) == []  # cooling down
    again = planner.decide(11.0, _obs(ttft=2.0, tpot=0.045), {"prefill": 2, "decode": 1})
    assert [(d.role, d.target) for d in again] == [("prefill", 3)]
    assert planner.decide(30.0, _obs(ttft=2.0, tpot=0.045), {"prefill": 3, "decode": 1}) == []  # at max


def test_slow_tpot_grows_decode():
    decisions = _planner().decide(0.0, _obs(ttft=0.45, tpot=0.2), {"prefill": 1, "decode": 1})
    assert [(d.role, d.target) for d in decisions] == [("decode", 2)]


def test_idleness_shrinks_to_min_with_cooldown():
    planner = _planner()
    idle = _obs()
    assert [(d.role, d.target) for d in planner.decide(0.0, idle, {"prefill": 3, "decode": 1})] == [("prefill", 2)]
    assert planner.decide(10.0, idle, {"prefill": 2, "decode": 1}) == []
    assert [(d.role, d.target) for d in planner.decide(31.0, idle, {"prefill": 2, "decode": 1})] == [("prefill", 1)]
    assert planner.decide(100.0, idle, {"prefill": 1, "decode": 1}) == []  # at min


def test_hysteresis_and_queue_hold_the_pool():
    planner = _planner()
    # p90 just under target: neither up nor down
    assert planner.decide(0.0, _obs(ttft=0.45, tpot=0.045), {"prefill": 2, "decode": 2}) == []
    # fast, but requests are queueing: no shrink
    assert planner.decide(0.0, _obs(ttft=0.1, tpot=0.01, queue=3), {"prefill": 2, "decode": 2}) == []
    # too few samples to act on a slow p90
    assert planner.decide(0.0, _obs(ttft=5.0, tpot=0.045, samples=2), {"prefill": 1, "decode": 1}) == []


def test_out_of_bounds_is_corrected():
    decisions = _planner().decide(0.0, _obs(ttft=0.45, tpot=0.045), {"prefill": 5, "decode": 0})
    assert sorted((d.role, d.target) for d in decisions) == [("decode", 1), ("prefill", 3)]
