"""The SLO planner's decisions: bounds, cooldowns, hysteresis, and only the pools whose own target is set."""

import pytest

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


# -- a pool is planned only by its own target -------------------------------------------


FAST_DECODE = _obs(ttft=0.45, tpot=0.03)  # decode far below any 0.1 s target; prefill within its own
IDLE = _obs()  # no samples at all: a planned pool would count as idle and shrink


def _only(**target) -> Planner:
    spec = PlannerSpec(enabled=True, scale_up_cooldown_s=0, scale_down_cooldown_s=0, min_samples=5, **target)
    return Planner(spec, {"prefill": (1, 4), "decode": (1, 4)})


def test_only_a_ttft_target_plans_prefill_and_leaves_decode_alone():
    planner = _only(ttft_target_s=0.5)
    assert planner.spec.tpot_target_s is None
    for observation in (FAST_DECODE, IDLE, _obs(ttft=0.45, tpot=5.0)):
        decisions = planner.decide(0.0, observation, {"prefill": 2, "decode": 4})
        assert "decode" not in {d.role for d in decisions}
    assert [(d.role, d.target) for d in planner.decide(1.0, IDLE, {"prefill": 2, "decode": 4})] == [("prefill", 1)]
    slow = planner.decide(2.0, _obs(ttft=2.0, tpot=5.0), {"prefill": 1, "decode": 9})  # decode even out of bounds
    assert [(d.role, d.target) for d in slow] == [("prefill", 2)]


def test_only_a_tpot_target_plans_decode_and_leaves_prefill_alone():
    planner = _only(tpot_target_s=0.05)
    for observation in (IDLE, _obs(ttft=9.0, tpot=0.045), _obs(ttft=0.01, tpot=0.045)):
        decisions = planner.decide(0.0, observation, {"prefill": 3, "decode": 2})
        assert "prefill" not in {d.role for d in decisions}
    slow = planner.decide(1.0, _obs(ttft=9.0, tpot=0.2), {"prefill": 3, "decode": 2})
    assert [(d.role, d.target) for d in slow] == [("decode", 3)]


def test_up_with_one_slo_gives_the_planner_that_target_alone():
    """`splitserve up --ttft-slo 0.5 --decode 4 --min-decode 1`: decode is not shrunk against a target nobody set."""
    from cluster.cli import build_parser, cluster_config_from_args

    args = build_parser().parse_args(["up", "--ttft-slo", "0.5", "--decode", "4", "--min-decode", "1"])
    config = cluster_config_from_args(args)
    assert (config.planner.enabled, config.planner.ttft_target_s, config.planner.tpot_target_s) == (True, 0.5, None)
    planner = Planner(config.planner, {role: (1, 4) for role in ("prefill", "decode")})
    for at, observation in enumerate((FAST_DECODE, IDLE, FAST_DECODE)):
        decisions = planner.decide(at * 100.0, observation, {"prefill": 1, "decode": 4})
        assert "decode" not in {d.role for d in decisions}
    tpot_only = cluster_config_from_args(build_parser().parse_args(["up", "--tpot-slo", "0.05"])).planner
    assert (tpot_only.enabled, tpot_only.ttft_target_s, tpot_only.tpot_target_s) == (True, None, 0.05)


def test_a_planner_enabled_without_any_target_is_refused_naming_both():
    from cluster.config import from_dict

    message = "enabled is true, but neither ttft_target_s nor tpot_target_s is set (--ttft-slo / --tpot-slo)"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict({"planner": {"enabled": True}})
    with pytest.raises(ValueError, match="^planner: enabled is true"):
        from_dict({"planner": {"enabled": True, "interval_s": 1}})
    assert PlannerSpec().ttft_target_s is None and PlannerSpec().tpot_target_s is None  # nobody set them
    assert PlannerSpec().enabled is False  # no target: off
