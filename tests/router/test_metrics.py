"""/metrics after a known amount of traffic: counters and histogram counts match it exactly; label sets stay
bounded; the KV pool's states partition it on a live worker; the vLLM-named families carry the same facts."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench import processes
from protos import common_pb2, decode_pb2, generate_pb2, generate_pb2_grpc
from router.config import RouterConfig
from router.server import Router
from tests.router.conftest import metric_sum
from tests.workers.harness import WorkerProcess

PROMPT = list(range(3, 60))  # 57 tokens: above the threshold below, so prefill is remote


@pytest.fixture(scope="module")
def cluster():
    decode_metrics = processes.free_port()
    decode, decode_address = processes.start_worker(
        "decode", "--model", "demo", "--threads", "1", "--kv-cache-mb", "32", "--metrics-port", str(decode_metrics)
    )
    prefill, prefill_address = processes.start_worker(
        "prefill", "--model", "demo", "--threads", "1", "--kv-cache-mb", "32"
    )
    port, grpc_port = processes.free_port(), processes.free_port()
    router = processes.start_router(
        port, grpc_port, [prefill_address], [decode_address], "--local-prefill-threshold", "16"
    )
    with processes.running(router, prefill, decode):
        yield SimpleNamespace(
            router=f"http://127.0.0.1:{port}",
            grpc=f"127.0.0.1:{grpc_port}",
            decode_metrics=f"http://127.0.0.1:{decode_metrics}",
        )


@pytest.fixture(scope="module")
def router_url(cluster):
    return cluster.router


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_and_histograms_match_the_traffic(router_url):
    before = _samples(router_url)
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        for _ in range(3):
            assert client.post(f"{router_url}/v1/completions", json=body).status_code == 200
        for _ in range(2):
            with client.stream("POST", f"{router_url}/v1/completions", json={**body, "stream": True}) as response:
                assert response.status_code == 200
                assert any(line == "data: [DONE]" for line in response.iter_lines())
        assert client.post(f"{router_url}/v1/completions", json={**body, "temperature": 9}).status_code == 400
    after = _samples(router_url)

    def delta(name: str, **labels) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    def workers_caught_up() -> bool:
        """Each worker's Stats are polled on their own: wait until both reflect all the traffic."""
        remote = delta("splitserve_routing_decisions_total", decision="remote_prefill")
        return (
            delta("splitserve_worker_requests_finished_total", role="decode") >= 5
            and delta("splitserve_kv_transfers_total", role="prefill", outcome="completed") >= remote
            and delta("splitserve_kv_transfers_total", role="decode", outcome="completed") >= remote
        )

    deadline = time.monotonic() + 15  # the router polls worker Stats every 0.5 s
    while not workers_caught_up() and time.monotonic() < deadline:
        time.sleep(0.25)
        after = _samples(router_url)

    assert delta("splitserve_requests_total", endpoint="/v1/completions", status="200") == 5
    assert delta("splitserve_requests_total", endpoint="/v1/completions", status="400") == 1
    assert delta("splitserve_time_to_first_token_seconds_count") == 5
    assert delta("splitserve_e2e_request_latency_seconds_count") == 5
    assert delta("splitserve_time_per_output_token_seconds_count") == 5
    assert delta("splitserve_inter_token_latency_seconds_count") == 5 * 4
    assert delta("splitserve_generation_tokens_total") == 25
    assert delta("splitserve_prompt_tokens_total") == 5 * len(PROMPT)
    assert delta("splitserve_routing_decisions_total") == 5
    assert delta("splitserve_kv_transfer_exposed_seconds_count", transport="grpc") == delta(
        "splitserve_routing_decisions_total", decision="remote_prefill"
    )
    assert _value(after, "splitserve_workers", role="prefill", state="ready") == 1
    assert _value(after, "splitserve_workers", role="decode", state="ready") == 1
    assert metric_sum(after, "splitserve_workers") == 2, "the states partition the pool"
    # the workers' own counters, aggregated by the router from their Stats
    assert delta("splitserve_worker_requests_finished_total", role="decode") == 5
    assert delta("splitserve_worker_generated_tokens_total", role="decode") == 25
    remote = delta("splitserve_routing_decisions_total", decision="remote_prefill")
    assert delta("splitserve_kv_transfers_total", role="prefill", outcome="completed") == remote
    assert delta("splitserve_kv_transfers_total", role="decode", outcome="completed") == remote
    assert (
        delta("splitserve_kv_transfer_bytes_total", role="prefill")
        == delta("splitserve_kv_transfer_bytes_total", role="decode")
        > 0
    )


def test_a_client_that_leaves_before_its_answer_is_whole_is_counted_499(router_url):
    """A stream whose client left before its first byte began 200 to nobody: it counted as a success the client never
    saw. It is 499 (nginx's client closed request), and so is one cut mid-stream; a whole answer stays 200."""
    before = _samples(router_url)
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}
    url = urllib.parse.urlparse(router_url)
    payload = json.dumps(body).encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:  # sends the request, then leaves
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{router_url}/v1/completions", json=body) as response:  # leaves mid-stream
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
        short = {**body, "max_tokens": 3}
        assert client.post(f"{router_url}/v1/completions", json=short).status_code == 200

    def delta(status: str) -> float:
        after = _samples(router_url)
        labels = {"endpoint": "/v1/completions", "status": status}
        return metric_sum(after, "splitserve_requests_total", **labels) - metric_sum(
            before, "splitserve_requests_total", **labels
        )

    deadline = time.monotonic() + 15
    while delta("499") < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (delta("499"), delta("200")) == (2, 1)


def test_public_grpc_calls_are_counted_by_method_and_code(cluster):
    before = _samples(cluster.router)
    ids = generate_pb2.TokenIds(ids=PROMPT)
    with grpc.insecure_channel(cluster.grpc) as channel:
        generate = generate_pb2_grpc.GenerateStub(channel).Generate
        request = generate_pb2.CompletionRequest(token_ids=ids, params=common_pb2.SamplingParams(max_tokens=2))
        assert list(generate(request, timeout=60))[-1].usage.completion_tokens == 2
        bad = generate_pb2.CompletionRequest(token_ids=ids, params=common_pb2.SamplingParams(temperature=9))
        with pytest.raises(grpc.RpcError):
            list(generate(bad, timeout=60))
    after = _samples(cluster.router)
    method = "splitserve.Generate/Generate"
    for code in ("OK", "INVALID_ARGUMENT"):
        counted = metric_sum(after, "splitserve_grpc_requests_total", method=method, code=code)
        assert counted - metric_sum(before, "splitserve_grpc_requests_total", method=method, code=code) == 1, code


def test_worker_serves_its_own_metrics():
    process, line = processes.start(
        ["worker", "decode", "--model", "demo", "--port", "0", "--kv-cache-mb", "16", "--metrics-port", "0"],
        "metrics on port",
    )
    with processes.running(process):
        port = int(line.rsplit(" ", 1)[1])
        families = {
            f.name
            for f in text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        }
    assert {"splitserve_worker_kv_blocks", "splitserve_worker_sequences", "splitserve_kv_transfers"} <= families


def _pool(samples, **labels) -> dict[str, float]:
    return {
        "used": metric_sum(samples, "splitserve_worker_kv_blocks", state="used", **labels),
        "free": metric_sum(samples, "splitserve_worker_kv_blocks", state="free", **labels),
        "pool": metric_sum(samples, "splitserve_worker_kv_pool_blocks", **labels),
        "cached": metric_sum(samples, "splitserve_worker_kv_cached_blocks", **labels),
        "usage": metric_sum(samples, "vllm:kv_cache_usage_perc", **labels),
        "capacity": metric_sum(samples, "splitserve_worker_token_capacity", **labels),
    }


def _assert_partition(pool: dict[str, float]) -> None:
    assert pool["pool"] > 0
    assert pool["used"] + pool["free"] == pool["pool"], pool
    assert 0 <= pool["cached"] <= pool["pool"], pool
    assert pool["usage"] == pytest.approx(pool["used"] / pool["pool"]), pool


def test_kv_pool_states_partition_the_pool_on_a_live_worker(cluster):
    body = {"model": "demo", "prompt": PROMPT, "max_tokens": 2000, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{cluster.router}/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            for _ in range(3):
                next(lines)
            busy = _samples(cluster.decode_metrics)  # the worker's own /metrics, mid-stream
        # closing the stream aborts the request: its blocks go back to the pool, its full prompt blocks stay cached
    _assert_partition(_pool(busy))
    assert _pool(busy)["used"] > 0
    assert metric_sum(busy, "vllm:num_requests_running") >= 1

    deadline = time.monotonic() + 15
    idle = _pool(_samples(cluster.decode_metrics))
    while idle["used"] and time.monotonic() < deadline:
        time.sleep(0.2)
        idle = _pool(_samples(cluster.decode_metrics))
    _assert_partition(idle)
    assert idle["used"] == 0 and idle["free"] == idle["pool"]
    assert idle["cached"] > 0, "the prompt's full blocks stay in the prefix cache, inside free"
    info = [
        dict(labels)
        for (name, labels), _ in _samples(cluster.decode_metrics).items()
        if name == "vllm:cache_config_info"
    ]
    assert [int(i["num_gpu_blocks"]) for i in info] == [idle["pool"]] and int(info[0]["block_size"]) > 0
    # what one request may hold: the context, or the pool if smaller
    assert 0 < idle["capacity"] <= idle["pool"] * int(info[0]["block_size"]), idle

    aggregated = _samples(cluster.router)  # the router's view, from every worker's Stats
    for role in ("prefill", "decode"):
        _assert_partition(_pool(aggregated, role=role))
        assert _pool(aggregated, role=role)["capacity"] > 0


def test_unmatched_paths_share_one_series(router_url):
    with httpx.Client(timeout=10) as client:
        for index in range(21):
            assert client.get(f"{router_url}/v1/no-such-path-{index}").status_code == 404
            assert client.post(f"{router_url}/junk/{index}", json={}).status_code == 404
            assert client.get(f"{router_url}/v1/models/no-such-model-{index}").status_code == 404
    series = [dict(labels) for (name, labels) in _samples(router_url) if name == "splitserve_requests_total"]
    endpoints = {s["endpoint"] for s in series}
    assert not [e for e in endpoints if "no-such" in e or "junk" in e], endpoints
    assert "/v1/models/{model_id:path}" in endpoints, "a matched route counts under its template"
    assert [s["status"] for s in series if s["endpoint"] == "other"] == ["404"]


def test_served_model_label_and_vllm_names(router_url):
    model = httpx.get(f"{router_url}/v1/models", timeout=10).json()["data"][0]["id"]
    before = _samples(router_url)
    body = {"model": model, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    with httpx.Client(timeout=60) as client:
        for _ in range(2):
            assert client.post(f"{router_url}/v1/completions", json=body).status_code == 200
    after = _samples(router_url)

    def delta(name: str, **labels) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("splitserve_requests_total", model=model, endpoint="/v1/completions", status="200") == 2
    assert delta("splitserve_time_to_first_token_seconds_count", model=model) == 2
    assert delta("vllm:time_to_first_token_seconds_count", model_name=model) == 2
    assert delta("vllm:e2e_request_latency_seconds_count", model_name=model) == 2
    assert delta("vllm:request_time_per_output_token_seconds_count", model_name=model) == 2
    assert delta("vllm:inter_token_latency_seconds_count", model_name=model) == 2 * 4
    assert delta("vllm:time_per_output_token_seconds_count", model_name=model) == 2 * 4
    assert delta("vllm:prompt_tokens_total", model_name=model) == 2 * len(PROMPT)
    assert delta("vllm:generation_tokens_total", model_name=model) == 2 * 5
    assert delta("vllm:request_success_total", model_name=model, finished_reason="length") == 2
    for splitserve, vllm in (
        ("splitserve_generation_tokens_total", "vllm:generation_tokens_total"),
        ("splitserve_e2e_request_latency_seconds_sum", "vllm:e2e_request_latency_seconds_sum"),
    ):
        assert metric_sum(after, splitserve) == metric_sum(after, vllm), "one observation, two names"
    # engine gauges come from the workers' Stats only (one per worker), never from the router's own admission
    running = [dict(labels) for (name, labels) in after if name == "vllm:num_requests_running"]
    assert sorted(r["role"] for r in running) == ["decode", "prefill"]
    assert {r["model_name"] for r in running} == {model}


class PlannerControl:
    """A control plane whose status carries the planner section as the controller reports it
    (cluster/controller.py: enabled, ttft_target_s, tpot_target_s from the cluster config's planner spec)."""

    def __init__(
        self, enabled: bool, ttft_target_s: float = 1.0, tpot_target_s: float = 0.1, desired: dict | None = None
    ) -> None:
        self.planner = {
            "enabled": enabled,
            "decisions": [],
            "ttft_target_s": ttft_target_s,
            "tpot_target_s": tpot_target_s,
        }
        self.pools = {role: {"desired": n, "min": 0, "max": n} for role, n in (desired or {}).items()}
        self.reachable = True

    async def status(self) -> dict:
        if not self.reachable:
            raise ConnectionError("control plane unreachable")
        return {"pools": self.pools, "workers": [], "planner": self.planner}


def _slo_targets(control: PlannerControl | None, then_unreachable: bool = False) -> dict[str, float]:
    return _exported(control, "splitserve_slo_target_seconds", "slo", then_unreachable)


def _exported(control: PlannerControl | None, name: str, label: str, then_unreachable: bool = False) -> dict:
    """Family ``name`` by ``label`` on the /metrics of a router (no workers) given ``control``, after its dashboard
    has asked the control plane once (and, ``then_unreachable``, once more in vain)."""

    async def scrape() -> str:
        router = Router(RouterConfig(model="demo", port=0, grpc_port=0), control)
        await router.start()
        try:
            await router.dashboard.snapshot()
            if then_unreachable:
                control.reachable = False
                router.dashboard._taken_at = float("-inf")  # the next snapshot asks again
                assert (await router.dashboard.snapshot())["control_error"]
            async with httpx.AsyncClient(timeout=10) as client:
                return (await client.get(f"{router.urls['http']}/metrics")).text
        finally:
            await router.stop()

    return {
        s.labels[label]: s.value
        for family in text_string_to_metric_families(asyncio.run(scrape()))
        for s in family.samples
        if s.name == name
    }


def test_the_pools_desired_sizes_are_exported_as_last_learnt():
    """Beside the ready workers: a pool short of its size has workers starting, dead or never placed, which the
    router cannot count (a killed worker left splitserve_workers altogether)."""
    desired = {"prefill": 2, "decode": 3}
    family = ("splitserve_pool_desired_workers", "role")
    assert _exported(PlannerControl(False, desired=desired), *family) == desired
    assert _exported(PlannerControl(False, desired=desired), *family, then_unreachable=True) == desired
    assert _exported(None, *family) == {}  # a router given its workers aims at no size


@pytest.mark.parametrize(("ttft", "tpot"), [(0.25, 0.04), (2.0, 0.3)])
def test_the_configured_slo_targets_are_exported(ttft, tpot):
    assert _slo_targets(PlannerControl(True, ttft, tpot)) == {"ttft": ttft, "tpot": tpot}


@pytest.mark.parametrize(("ttft", "tpot"), [(0.5, None), (None, 0.05)], ids=["ttft-only", "tpot-only"])
def test_one_slo_set_exports_that_target_alone(ttft, tpot):
    """The planner plans only the pool whose target is set (cluster/planner.py): the other is None, not exported."""
    set_ = {name: seconds for name, seconds in (("ttft", ttft), ("tpot", tpot)) if seconds is not None}
    assert _slo_targets(PlannerControl(True, ttft, tpot)) == set_


def test_an_unreachable_control_plane_leaves_the_slo_target_as_last_learnt():
    """An outage of the control plane must not unset the target, or the SLO alerts' ``for:`` would restart."""
    assert _slo_targets(PlannerControl(True, 0.5, 0.05), then_unreachable=True) == {"ttft": 0.5, "tpot": 0.05}


@pytest.mark.parametrize("control", [PlannerControl(False), None], ids=["planner-off", "no-control-plane"])
def test_no_slo_target_without_an_slo(control):
    assert _slo_targets(control) == {}


def test_a_static_router_exports_no_slo_target(router_url):
    assert not [name for name, _ in _samples(router_url) if name == "splitserve_slo_target_seconds"]


def test_a_worker_counts_the_requests_it_preempts():
    """A decode worker whose pool cannot hold every running request to its end preempts some (their blocks freed,
    their tokens recomputed later): Stats.preemptions, splitserve_worker_preemptions_total and vLLM's
    vllm:num_preemptions_total say how often, where docs/metrics.md had said the count meant nothing here."""
    metrics_port = processes.free_port()
    process, address = processes.start_worker(
        "decode", "--model", "demo", "--threads", "1", "--kv-cache-mb", "1", "--metrics-port", str(metrics_port)
    )
    with processes.running(process):
        worker = WorkerProcess("decode", address, process)
        capacity = worker.stats().token_capacity
        params = common_pb2.SamplingParams(max_tokens=capacity - 8, temperature=0, ignore_eos=True)

        def generate(index: int) -> int:
            request = decode_pb2.GenerateRequest(
                request_id=f"p{index}", prompt_token_ids=[5, 6, 7, index], params=params
            )
            return sum(len(r.token_ids) for r in worker.stub.Generate(request, timeout=300))

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(generate, range(4))) == [capacity - 8] * 4  # each ran to its end regardless
        preempted = worker.stats().preemptions
        samples = _samples(f"http://127.0.0.1:{metrics_port}")
    assert preempted > 0, "four requests, each as long as the pool, must take turns"
    assert metric_sum(samples, "splitserve_worker_preemptions_total") == preempted
    assert metric_sum(samples, "vllm:num_preemptions_total") == preempted
