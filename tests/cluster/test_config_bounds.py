"""Every setting is honoured or refused when the config is built, naming it: the config file, the flags of `splitserve
up`, `router` and `worker`, and the controller's scale and drain share one check per setting (rule 15). No Ray."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import typing

import pytest

from cluster.cli import build_parser, main, router_config_from_args
from cluster.config import ClusterConfig, PlannerSpec, PoolSpec, from_dict
from cluster.controller import Controller, WorkerRecord
from cluster.planner import Observation
from contract.bounds import MAX_LEASE_MS
from router.config import BOUNDS, RouterConfig


@pytest.fixture(autouse=True)
def nothing_starts(monkeypatch):
    """A value wrongly accepted fails the test at once instead of starting a cluster or a router."""
    import cluster.up
    import router.server

    def started(*_, **__):
        raise AssertionError("accepted: the command went on to start")

    monkeypatch.setattr(cluster.up, "up", started)
    monkeypatch.setattr(router.server, "serve", started)


# -- worker settings are checked at load, not by each worker actor dying ----------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"dtype": "int8"}, "dtype must be one of float32, bfloat16, float16"),
        ({"device": "tpu"}, "device must be cpu or cuda, got 'tpu'"),
        ({"model": ""}, "model must name a preset or a model directory"),
    ],
)
def test_a_worker_setting_no_worker_can_use_is_refused_at_load(tmp_path, capsys, raw, message):
    with pytest.raises(ValueError, match=message):
        from_dict(raw)
    path = tmp_path / "cluster.yaml"
    path.write_text("".join(f"{key}: {value!r}\n" for key, value in raw.items()))
    assert main(["up", "--config", str(path)]) == 2  # refused before Ray or any worker starts
    assert message in capsys.readouterr().err


# -- a worker uses one device -----------------------------------------------------------


def test_more_than_one_gpu_per_worker_is_refused_naming_num_gpus(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"decode: num_gpus must be at most 1, got 2"):
        from_dict({"device": "cuda", "decode": {"num_gpus": 2}})
    path = tmp_path / "cluster.yaml"
    path.write_text("device: cuda\nprefill:\n  num_gpus: 4\n")
    assert main(["up", "--config", str(path)]) == 2
    assert "prefill: num_gpus must be at most 1, got 4" in capsys.readouterr().err
    assert PoolSpec(num_gpus=1).num_gpus == 1 and PoolSpec(num_gpus=0.5).num_gpus == 0.5  # one device, or a share


# -- the lease cap has one owner ---------------------------------------------------------


def test_the_decode_workers_lease_cap_is_the_one_the_router_checks_against():
    import decode_worker.worker

    assert decode_worker.worker.MAX_LEASE_MS is MAX_LEASE_MS
    assert BOUNDS["lease_ms"].high == MAX_LEASE_MS


@pytest.mark.parametrize("lease_ms", [0, -1, MAX_LEASE_MS + 1])
def test_a_lease_the_decode_workers_would_not_grant_is_refused_everywhere(tmp_path, capsys, lease_ms):
    message = f"lease_ms must be between 1 and {MAX_LEASE_MS}, got {lease_ms}"
    for argv in (["up", "--lease-ms", str(lease_ms)], ["router", "--decode", "d:1", "--lease-ms", str(lease_ms)]):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match=message):
        from_dict({"lease_ms": lease_ms})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "decode", "--lease-ms", str(lease_ms)])
    assert f"argument --lease-ms: must be between 1 and {MAX_LEASE_MS}" in capsys.readouterr().err
    assert RouterConfig(lease_ms=MAX_LEASE_MS).lease_ms == MAX_LEASE_MS


def test_the_decode_worker_refuses_a_default_lease_it_would_cap():
    from decode_worker.worker import DecodeWorker
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="default_lease_ms must be between 1 and"):
        DecodeWorker(EngineConfig(), default_lease_ms=MAX_LEASE_MS + 1)  # refused before the model loads


# -- no cluster without decode workers --------------------------------------------------


@pytest.mark.parametrize(("flag", "value"), [("--decode", "0"), ("--min-decode", "0"), ("--decode", "-1")])
def test_up_refuses_fewer_than_one_decode_worker_naming_the_flag(capsys, flag, value):
    with pytest.raises(SystemExit) as refused:
        main(["up", flag, value])
    assert refused.value.code == 2
    assert f"argument {flag}: must be >= 1, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("decode", [{"replicas": 0, "min_replicas": 0}, {"min_replicas": 0}])
def test_a_config_without_decode_workers_is_refused_naming_the_key(decode):
    with pytest.raises(ValueError, match="decode.min_replicas must be >= 1, got 0"):
        from_dict({"decode": decode})
    assert from_dict({"prefill": {"replicas": 0, "min_replicas": 0}}).prefill.replicas == 0  # decode-only is fine


# -- range checks where each setting is owned ------------------------------------------


ROUTER_CASES = [
    ("max_running", 0, "max_running must be >= 1, got 0"),
    ("max_queued", -1, "max_queued must be >= 0, got -1"),
    ("prefill_retries", -1, "prefill_retries must be >= 0, got -1"),
    ("migration_retries", -1, "migration_retries must be >= 0, got -1"),
    ("request_timeout_s", -1.0, "request_timeout_s must be > 0, got -1.0"),
    ("queue_timeout_s", -3.0, "queue_timeout_s must be > 0, got -3.0"),
    ("health_interval_s", 0.0, "health_interval_s must be > 0, got 0.0"),
    ("port", -5, "port must be between 0 and 65535, got -5"),
    ("grpc_port", 70000, "grpc_port must be between 0 and 65535, got 70000"),
    ("kv_weight", float("nan"), "kv_weight must be finite and >= 0, got nan"),
    ("header_timeout_s", float("inf"), "header_timeout_s must be finite and > 0, got inf"),
]


@pytest.mark.parametrize(("name", "value", "message"), ROUTER_CASES, ids=[c[0] for c in ROUTER_CASES])
def test_a_router_setting_out_of_range_is_refused_by_flag_and_file(capsys, name, value, message):
    from cluster.cli import router_flag

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        RouterConfig(**{name: value})
    flag = [router_flag(name), str(value)]
    for argv in (["router", "--decode", "d:1", *flag], ["up", *flag]):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    where = "config" if name == "health_interval_s" else "router"
    raw = {name: value} if where == "config" else {"router": {name: value}}
    with pytest.raises(ValueError, match=message):
        from_dict(raw)


def test_every_numeric_router_setting_has_a_bound():
    hints = typing.get_type_hints(RouterConfig)
    numeric = {
        f.name
        for f in dataclasses.fields(RouterConfig)
        if set(typing.get_args(hints[f.name]) or (hints[f.name],)) & {int, float} and hints[f.name] is not bool
    }
    assert numeric - set(BOUNDS) == set(), "a number RouterConfig accepts unchecked"


def test_zero_ports_still_mean_any_free_port():
    config = router_config_from_args(build_parser().parse_args(["router", "--decode", "d:1", "--port", "0"]))
    assert (config.port, RouterConfig(grpc_port=0).grpc_port) == (0, 0)


@pytest.mark.parametrize(
    ("planner", "message"),
    [
        ({"interval_s": 0}, "planner: interval_s must be > 0, got 0"),
        ({"ttft_target_s": -1}, "planner: ttft_target_s must be > 0, got -1"),
        ({"tpot_target_s": 0}, "planner: tpot_target_s must be > 0, got 0"),
        ({"hysteresis": 5}, "planner: hysteresis must be between 0 and 1, got 5"),
        ({"min_samples": -3}, "planner: min_samples must be >= 1, got -3"),
        ({"window_s": 0}, "planner: window_s must be > 0, got 0"),
    ],
)
def test_planner_keys_out_of_range_are_refused_as_the_helm_schema_does(planner, message):
    with pytest.raises(ValueError, match=message):
        from_dict({"planner": planner})


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ({"threads": 0}, "prefill: threads must be >= 1, got 0"),
        ({"kv_cache_mb": 0}, "prefill: kv_cache_mb must be >= 1, got 0"),
        ({"kv_cache_mb": -5}, "prefill: kv_cache_mb must be >= 1, got -5"),
        ({"num_cpus": -1}, "prefill: num_cpus must be >= 0, got -1"),
    ],
)
def test_pool_settings_out_of_range_are_refused(pool, message):
    with pytest.raises(ValueError, match=message):
        from_dict({"prefill": pool})


@pytest.mark.parametrize("command", [["worker", "decode"], ["generate"]])
@pytest.mark.parametrize(("flag", "value"), [("--threads", "0"), ("--kv-cache-mb", "0"), ("--kv-cache-mb", "-5")])
def test_engine_flags_out_of_range_are_refused_naming_the_flag(capsys, command, flag, value):
    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args([*command, flag, value])
    assert refused.value.code == 2
    assert f"argument {flag}: must be >= 1, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["worker", "prefill", "--lease-ms", "5"], "--lease-ms is a decode worker's setting"),
        (["worker", "decode", "--push-mode", "request"], "--push-mode is a prefill worker's setting"),
    ],
)
def test_a_worker_flag_of_the_other_role_is_refused(capsys, monkeypatch, argv, message):
    import decode_worker.worker
    import prefill_worker.worker

    def started(*_, **__):
        raise AssertionError("accepted: the worker went on to start")

    monkeypatch.setattr(prefill_worker.worker, "PrefillWorker", started)
    monkeypatch.setattr(decode_worker.worker, "DecodeWorker", started)
    assert main([*argv, "--insecure"]) == 2  # refused before any model loads
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [["up"], ["router", "--decode", "d:1"]])
def test_a_bad_log_level_is_refused_naming_the_flag(capsys, command):
    with pytest.raises(SystemExit) as refused:
        main([*command, "--log-level", "loud"])
    assert refused.value.code == 2
    assert "argument --log-level: invalid choice: 'LOUD'" in capsys.readouterr().err
    assert build_parser().parse_args([*command, "--log-level", "debug"]).log_level == "DEBUG"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"ray_num_cpus": 0}, "ray_num_cpus must be >= 1, got 0"),
        ({"ray_num_cpus": 4, "address": "auto"}, "ray_num_cpus sizes the embedded Ray only"),
        ({"max_restarts": -1}, "max_restarts must be >= 0, got -1"),
        ({"start_timeout_s": 0}, "start_timeout_s must be > 0, got 0"),
    ],
)
def test_ray_settings_that_would_be_ignored_are_refused(raw, message):
    with pytest.raises(ValueError, match=message):
        from_dict(raw)


# -- scale and drain respect min_replicas as they do max_replicas -----------------------


def _controller(**prefill) -> Controller:
    config = ClusterConfig(prefill=PoolSpec(**prefill))
    controller = Controller(config.to_json())
    controller._reconcile = lambda: None  # no Ray: only the bookkeeping runs
    controller._request_resources = lambda: None
    controller._cluster_resources = lambda: {"CPU": 64.0}
    return controller


def test_scale_below_a_pools_min_replicas_is_refused_naming_it():
    controller = _controller(replicas=3, min_replicas=2, max_replicas=4)
    with pytest.raises(ValueError, match="prefill replicas must be between the pool's min_replicas 2 and"):
        asyncio.run(controller.scale("prefill", 1))
    with pytest.raises(ValueError, match="max_replicas 4, got 5"):
        asyncio.run(controller.scale("prefill", 5))
    assert asyncio.run(controller.scale("prefill", 2)) == {"role": "prefill", "desired": 2}


def test_a_manual_scale_of_a_planned_pool_holds_for_the_planners_cooldowns_and_says_so():
    """The planner undid a `splitserve scale` at its next tick (2 s later), while the reply and the dashboard said
    done: an operator's size now holds as the planner's own change would, and the reply says for how long."""
    config = ClusterConfig(
        prefill=PoolSpec(replicas=1, min_replicas=1, max_replicas=3), planner=PlannerSpec(ttft_target_s=1.0)
    )
    controller = Controller(config.to_json())
    controller._reconcile = controller._request_resources = lambda: None
    controller._cluster_resources = lambda: {"CPU": 64.0}
    reply = asyncio.run(controller.scale("prefill", 2))
    assert "planner sizes the prefill pool" in reply["planner"] and "30 s before shrinking" in reply["planner"]
    idle = Observation(
        ttft_p90_s=None, tpot_p90_s=None, ttft_samples=0, tpot_samples=0, queue_depth=0, requests_in_window=0
    )
    now = time.time()
    assert controller.planner.decide(now + 2, idle, dict(controller.desired)) == []
    (later,) = controller.planner.decide(now + 31, idle, dict(controller.desired))
    assert (later.role, later.current, later.target) == ("prefill", 2, 1)
    assert "planner" not in asyncio.run(controller.scale("decode", 1))  # a pool the planner leaves alone


def test_a_scale_the_embedded_ray_cannot_place_is_refused_naming_what_it_lacks():
    """The embedded Ray has a fixed size (no autoscaler grows it): a scale past it was accepted and its new workers
    said "starting" for good; now it is refused, naming what is short. A Ray joined by address may grow: allowed."""
    controller = _controller(replicas=1, min_replicas=1, max_replicas=4, num_cpus=1.0)
    controller._cluster_resources = lambda: {"CPU": 2.0}  # the decode pool's one worker and one prefill worker
    with pytest.raises(
        ValueError, match=r"pools of prefill 3, decode 1 need more .*: CPU 4 \(it has 2\); ray_num_cpus"
    ):
        asyncio.run(controller.scale("prefill", 3))
    assert controller.desired["prefill"] == 1
    gpu = _controller(replicas=0, min_replicas=0, max_replicas=1, num_gpus=1.0)
    gpu._cluster_resources = lambda: {"CPU": 8.0}
    with pytest.raises(ValueError, match=r"GPU 1 \(it has 0\)"):
        asyncio.run(gpu.scale("prefill", 1))
    joined = Controller(ClusterConfig(address="ray://head:10001", prefill=PoolSpec(max_replicas=4)).to_json())
    joined._reconcile = joined._request_resources = lambda: None
    joined._cluster_resources = lambda: {"CPU": 1.0}
    assert asyncio.run(joined.scale("prefill", 4))["desired"] == 4


def test_drain_at_a_pools_min_replicas_replaces_the_worker():
    controller = _controller(replicas=2, min_replicas=2, max_replicas=4)

    async def drain() -> dict:
        controller.records["prefill-a"] = WorkerRecord("prefill-a", "prefill", state="ready")
        reply = await controller.drain("prefill-a")
        await asyncio.sleep(0)  # the drain finishes (no actor to wait for)
        return reply

    reply = asyncio.run(drain())
    assert controller.desired["prefill"] == 2, "drain took the pool below its min_replicas"
    assert "min_replicas 2" in reply["replaced"]
    above = _controller(replicas=3, min_replicas=2, max_replicas=4)
    above.records["prefill-b"] = WorkerRecord("prefill-b", "prefill", state="ready")
    assert "replaced" not in asyncio.run(above.drain("prefill-b"))
    assert above.desired["prefill"] == 2


# -- one owner for each default the commands share ----------------------------------------


_CHANGED_ENGINE_DEFAULTS = """
import dataclasses, json
import engine.config as ec

changed = dict(kv_cache_memory_bytes=96 * 1024 * 1024, block_size=32, max_num_seqs=7, max_num_batched_tokens=999)
fields = [
    (f.name, f.type, dataclasses.field(default=changed.get(f.name, f.default)))
    for f in dataclasses.fields(ec.EngineConfig)
]
namespace = {"__post_init__": ec.EngineConfig.__post_init__}
ec.EngineConfig = dataclasses.make_dataclass("EngineConfig", fields, frozen=True, namespace=namespace)
ec.EngineConfig.__module__ = "engine.config"

from cluster.cli import build_parser, engine_config_from_args
from cluster.config import ClusterConfig, PoolSpec
from cluster.worker_actor import engine_config_for

names = list(changed)
seen = {"pool": engine_config_for(ClusterConfig(), PoolSpec())}
for command in (["worker", "decode"], ["generate"]):
    seen[command[0]] = engine_config_from_args(build_parser().parse_args(command))
print(json.dumps({where: {name: getattr(config, name) for name in names} for where, config in seen.items()}))
"""


def test_a_default_changed_in_engineconfig_is_the_one_pools_and_engine_flags_use():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", _CHANGED_ENGINE_DEFAULTS], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    changed = {
        "kv_cache_memory_bytes": 96 * 1024 * 1024,
        "block_size": 32,
        "max_num_seqs": 7,
        "max_num_batched_tokens": 999,
    }
    assert seen["worker"] == seen["generate"] == changed
    # A pool has no block size or step-limit defaults of its own (None: the engine's); its KV budget is EngineConfig's.
    assert seen["pool"] == changed


def test_a_worker_has_the_same_thread_default_under_up_and_as_a_process(capsys):
    from cluster.config import WORKER_THREADS

    worker = build_parser().parse_args(["worker", "decode"])
    assert worker.threads == PoolSpec().threads == WORKER_THREADS
    # The engine alone (`generate`) takes every core, and says so.
    assert build_parser().parse_args(["generate"]).threads is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    assert "a thread per core" in " ".join(capsys.readouterr().out.split())


def test_every_serving_command_has_one_log_level_default():
    from cluster.cli import LOG_LEVEL

    commands = (["up"], ["router", "--decode", "d:1"], ["worker", "decode"])
    assert {build_parser().parse_args(command).log_level for command in commands} == {LOG_LEVEL}
    assert build_parser().parse_args(["worker", "decode", "--log-level", "debug"]).log_level == "DEBUG"


# -- a cuda worker has a GPU reserved -------------------------------------------------------


def test_device_cuda_without_a_gpu_per_worker_is_refused_naming_both(tmp_path, capsys):
    message = "device cuda (--device) needs a GPU reserved for each worker, but prefill.num_gpus is 0"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_dict({"device": "cuda"})
    assert main(["up", "--device", "cuda"]) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="but decode.num_gpus is 0"):
        from_dict({"device": "cuda", "prefill": {"num_gpus": 1}})
    path = tmp_path / "cluster.yaml"
    path.write_text("prefill:\n  num_gpus: 1\ndecode:\n  num_gpus: 0.5\n")
    with pytest.raises(AssertionError, match="accepted"):  # a GPU each, or a share: it goes on to start
        main(["up", "--config", str(path), "--device", "cuda"])
    decode_only = {"device": "cuda", "prefill": {"replicas": 0, "min_replicas": 0, "max_replicas": 0}}
    assert from_dict({**decode_only, "decode": {"num_gpus": 1}}).prefill.num_gpus == 0  # never starts a worker


# -- replica counts on `up` stay within the pool's bounds ---------------------------------


@pytest.mark.parametrize(
    ("argv", "file", "message"),
    [
        (["--decode", "3", "--max-decode", "2"], "", "--decode 3 is above --max-decode 2"),
        (["--prefill", "3", "--min-prefill", "4"], "", "--prefill 3 is below --min-prefill 4"),
        (
            ["--prefill", "1"],
            "prefill:\n  replicas: 3\n  min_replicas: 2\n",
            "--prefill 1 is below prefill.min_replicas 2",
        ),
        (["--max-decode", "2"], "decode:\n  replicas: 3\n", "decode.replicas 3 is above --max-decode 2"),
    ],
)
def test_a_replica_count_against_a_bound_that_was_set_is_refused_naming_both(tmp_path, capsys, argv, file, message):
    """Both set, by flags or the config file, and they disagree: neither is moved silently."""
    path = tmp_path / "cluster.yaml"
    path.write_text(file)
    assert main(["up", *(["--config", str(path)] if file else []), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "file", "role", "size"),
    [
        (["--prefill", "0"], "", "prefill", (0, 0, 4)),  # an aggregated cluster: the default minimum follows
        (["--decode", "6"], "", "decode", (6, 1, 6)),  # the default maximum follows
        (["--min-decode", "2"], "", "decode", (2, 2, 4)),  # the default count follows the minimum set
        (["--max-prefill", "0"], "", "prefill", (0, 0, 0)),
        (["--prefill", "0", "--min-prefill", "0"], "", "prefill", (0, 0, 4)),
        (["--decode", "6", "--max-decode", "8"], "", "decode", (6, 1, 8)),
        (["--prefill", "4"], "prefill:\n  replicas: 2\n  min_replicas: 2\n", "prefill", (4, 2, 4)),
    ],
)
def test_a_replica_count_or_bound_nobody_set_follows_the_one_given(tmp_path, argv, file, role, size):
    from cluster.cli import cluster_config_from_args

    path = tmp_path / "cluster.yaml"
    path.write_text(file)
    args = build_parser().parse_args(["up", *(["--config", str(path)] if file else []), *argv])
    pool = cluster_config_from_args(args).pool(role)
    assert (pool.replicas, pool.min_replicas, pool.max_replicas) == size
