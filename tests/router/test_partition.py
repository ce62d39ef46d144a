"""A network partition between a prefill worker and a decode worker that the router still reaches.

Test hosts: two network namespaces, each joined to this one by a veth pair on a /24 of its own, and no
route further. The router (this process) reaches both; the prefill worker on one cannot reach the decode
worker on the other, and its handshake fails at once (no route). A second prefill worker, on this host,
reaches both.

The prefill worker's answer names the peer it could not reach (``contract.errors.UNREACHABLE_PEER``), so
the router blames the link, not the worker: it keeps the prefill worker in routing, does not pair the two
for KV_LINK_RETRY_S, and the request is served exactly (by the other prefill worker, or by the decode
worker prefilling itself); the dashboard shows the link down. Health checks run every 30 s here, so a
worker the router took out would stay out.

A blackhole, where packets vanish rather than being refused: a prefill worker on a test host whose default route
leads to this namespace, which forwards nothing, so its packets to the decode worker on another test host are
dropped without a word. Its first handshake waits out HANDSHAKE_TIMEOUT_S; then it answers at
once for as long as the link stays down (its channel's connect attempts, each bounded by
cluster_auth.MIN_CONNECT_TIMEOUT_MS, keep failing, and gRPC fails calls on such a channel at once), so a request
paired with it after the router's KV_LINK_RETRY_S costs a quick refusal, not another timeout (gRPC's own 20 s
connect timeout made it wait again); once packets flow again, KV flows again within the channel's reconnect backoff.

A decode worker whose link goes down mid-stream (every packet vanishes; the router's connection is not told): the
router's channel pings it (cluster_auth.KEEPALIVE_TIME_MS), ends the connection when no answer comes, and the stream
moves to the other decode worker, token-identical to transformers, within ~10 s rather than at its deadline.

Needs root (namespaces, veth); everything is torn down at the end, also on failure.
"""

from __future__ import annotations

import time

import httpx
import pytest

from kv_transfer.sender import HANDSHAKE_TIMEOUT_S
from protos.cluster_auth import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS
from tests.netns import NetnsHost, subnets
from tests.router.conftest import (
    complete_ids,
    greedy_ignoring_eos,
    metric_sum,
    random_prompt,
    start_stream,
    wait_for,
)
from tests.workers.harness import launch_worker, stop_workers, wait_idle, wait_ready

MAX_TOKENS = 6
PROMPT_TOKENS = 48  # over the routers' local_prefill_threshold: prefilled remotely when a prefill worker may
SLOW_HEALTH_S = 30.0


@pytest.fixture(scope="module")
def partitioned(checkpoint):
    """(far prefill worker, near prefill worker, far decode worker): the far ones on two test hosts."""
    hosts = [NetnsHost(subnet) for subnet in subnets(2)]
    model = str(checkpoint.path)
    launched = []
    try:
        for role, host in (("prefill", hosts[0]), ("decode", hosts[1])):
            launched.append(launch_worker(role, model, "grpc", "--host", host.address, prefix=host.prefix))
        launched.append(launch_worker("prefill", model))
        workers = [wait_ready(worker) for worker in launched]
        yield workers[0], workers[2], workers[1]
    finally:
        stop_workers(launched)
        for host in hosts:
            host.close()


def _complete(router, prompt: list[int]) -> list[int]:
    return complete_ids(router, prompt, MAX_TOKENS)


def _state(router, prefill_address: str) -> tuple[bool, str]:
    """The router's view of a prefill worker: whether it is routed to, and its metrics label."""
    return router.call(lambda: (lambda w: (w.available, w.label))(router.router.pool.workers[prefill_address]))


def test_a_prefill_worker_cut_off_from_the_decode_worker_stays_in_routing(make_router, partitioned, checkpoint, rng):
    far_prefill, _, decode = partitioned
    router = make_router([far_prefill], [decode], health_interval_s=SLOW_HEALTH_S, local_prefill_threshold=16)
    failed_before = far_prefill.stats().kv_transfers_failed
    prompts = [random_prompt(rng, PROMPT_TOKENS) for _ in range(2)]

    for prompt in prompts:
        assert _complete(router, prompt) == greedy_ignoring_eos(checkpoint.model, prompt, MAX_TOKENS)

    routed, label = _state(router, far_prefill.address)
    assert routed, "the prefill worker was taken out of routing for its decode worker's unreachable receiver"
    decode_label = router.call(lambda: router.router.pool.workers[decode.address].label)
    samples = router.metrics()
    assert metric_sum(samples, "splitserve_router_kv_link_failures_total", prefill=label, decode=decode_label) == 1
    # The first request tried the far prefill worker, then fell back to the decode worker; the second was not
    # sent to the far prefill worker at all (the link is down for KV_LINK_RETRY_S).
    decisions = router.decisions()
    assert (decisions.get("remote_prefill"), decisions.get("fallback"), decisions.get("local_prefill")) == (1, 2, None)
    assert far_prefill.stats().kv_transfers_failed == failed_before + 1

    def unreached() -> dict[str, list[str]]:  # the dashboard's snapshot: taken anew about once a second
        workers = httpx.get(f"{router.http}/dashboard/api/snapshot", timeout=10).json()["workers"]
        return {w["address"]: w["kv_unreachable_from"] for w in workers}

    shown = {decode.address: [far_prefill.address], far_prefill.address: []}
    wait_for(lambda: unreached() == shown, 5, "the dashboard to show the link down")
    wait_idle(far_prefill)
    wait_idle(decode)


def test_the_other_prefill_worker_takes_the_prompts_it_cannot_push(make_router, partitioned, checkpoint, rng):
    far_prefill, near_prefill, decode = partitioned
    router = make_router(
        [far_prefill, near_prefill], [decode], health_interval_s=SLOW_HEALTH_S, local_prefill_threshold=16
    )
    served_before = near_prefill.stats().kv_transfers_completed
    # Prefill workers of equal cost are drawn at random: send prompts until the far one was tried (bounded).
    sent = 0
    while sent < 16:
        prompt = random_prompt(rng, PROMPT_TOKENS)
        assert _complete(router, prompt) == greedy_ignoring_eos(checkpoint.model, prompt, MAX_TOKENS)
        sent += 1
        if metric_sum(router.metrics(), "splitserve_router_kv_link_failures_total") > 0:
            break
    assert metric_sum(router.metrics(), "splitserve_router_kv_link_failures_total") == 1, f"after {sent} prompts"
    for _ in range(3):  # within KV_LINK_RETRY_S: the near prefill worker only
        prompt = random_prompt(rng, PROMPT_TOKENS)
        assert _complete(router, prompt) == greedy_ignoring_eos(checkpoint.model, prompt, MAX_TOKENS)
        sent += 1

    samples = router.metrics()
    assert metric_sum(samples, "splitserve_router_kv_link_failures_total") == 1
    assert metric_sum(samples, "splitserve_prefill_retries_total") == 1
    decisions = router.decisions()
    assert (decisions.get("remote_prefill"), decisions.get("fallback")) == (sent, None)
    assert near_prefill.stats().kv_transfers_completed == served_before + sent
    assert _state(router, far_prefill.address)[0], "the far prefill worker was taken out of routing"
    for worker in partitioned:
        wait_idle(worker)


@pytest.fixture(scope="module")
def blackholed(checkpoint):
    """(prefill host, decode host, prefill worker, decode worker): the prefill host's packets to the other vanish."""
    prefill_subnet, decode_subnet, link_subnet = subnets(3)
    hosts = [NetnsHost(prefill_subnet, default_route=True), NetnsHost(decode_subnet)]
    model = str(checkpoint.path)
    launched = []
    try:
        for role, host in zip(("prefill", "decode"), hosts, strict=True):
            launched.append(launch_worker(role, model, "grpc", "--host", host.address, prefix=host.prefix))
        prefill, decode = (wait_ready(worker) for worker in launched)
        yield *hosts, link_subnet, prefill, decode
    finally:
        stop_workers(launched)
        for host in hosts:
            host.close()


def test_a_blackholed_link_costs_one_handshake_timeout_then_quick_refusals(
    make_router, blackholed, checkpoint, rng, monkeypatch
):
    prefill_host, decode_host, link_subnet, prefill, decode = blackholed
    monkeypatch.setattr("router.workers.KV_LINK_RETRY_S", 1.0)
    router = make_router([prefill], [decode], health_interval_s=SLOW_HEALTH_S, local_prefill_threshold=16)
    before = prefill.stats()

    def timed(prompt: list[int]) -> float:
        began = time.monotonic()
        assert _complete(router, prompt) == greedy_ignoring_eos(checkpoint.model, prompt, MAX_TOKENS)
        return time.monotonic() - began

    def link_failures() -> float:
        return metric_sum(router.metrics(), "splitserve_router_kv_link_failures_total")

    first = timed(random_prompt(rng, PROMPT_TOKENS))
    assert HANDSHAKE_TIMEOUT_S - 0.5 < first < HANDSHAKE_TIMEOUT_S + 5, f"the first request took {first:.1f} s"
    assert link_failures() == 1
    # Each request from here is paired with the prefill worker again (the router's KV_LINK_RETRY_S has passed), over
    # a window longer than the prefill worker's channel takes per connect attempt (cluster_auth.MIN_CONNECT_TIMEOUT_MS):
    # however the channel stands, the prefill worker refuses at once rather than trying the link again.
    for _ in range(6):
        time.sleep(1.2)
        took = timed(random_prompt(rng, PROMPT_TOKENS))
        assert took < 3, f"a request paired with the blackholed link again waited {took:.1f} s"
    assert link_failures() == 7
    assert _state(router, prefill.address)[0], "the prefill worker was taken out of routing"
    decisions = router.decisions()
    assert (decisions.get("remote_prefill"), decisions.get("fallback")) == (7, 7), decisions

    # Packets flow again: within the channel's reconnect backoff (cluster_auth.MAX_RECONNECT_BACKOFF_MS), KV flows.
    prefill_host.link_to(decode_host, link_subnet)
    lifted = time.monotonic()
    while prefill.stats().kv_transfers_completed == before.kv_transfers_completed:
        assert time.monotonic() - lifted < 20, "KV never flowed again after the blackhole was lifted"
        time.sleep(1.2)
        timed(random_prompt(rng, PROMPT_TOKENS))
    print(f"KV flowed again {time.monotonic() - lifted:.1f} s after the blackhole was lifted")
    assert prefill.stats().kv_transfers_failed >= before.kv_transfers_failed + 2
    wait_idle(prefill)
    wait_idle(decode)


def test_a_decode_worker_whose_link_goes_down_mid_stream_is_migrated_from(make_router, checkpoint, rng):
    host = NetnsHost(subnets(1)[0])
    model = str(checkpoint.path)
    launched = [launch_worker("decode", model, "grpc", "--host", host.address, prefix=host.prefix)]
    launched.append(launch_worker("decode", model))
    try:
        far, near = (wait_ready(worker) for worker in launched)
        router = make_router([], [far, near], migration_policy="local")
        client, max_tokens = router.openai(), 400
        for _ in range(8):  # decode workers of equal load are drawn at random: until a stream lands on the far one
            prompt = random_prompt(rng, 24)
            stream = start_stream(client, prompt, max_tokens)
            wait_for(lambda: len(stream.ids) >= 5 or stream.done.is_set(), 30, "the stream to start")  # noqa: B023
            if router.worker_active()[far.address]:
                break
            assert stream.done.wait(60) and stream.error is None, stream.error
        else:
            raise AssertionError("no stream landed on the far decode worker in 8 tries")

        host.set_link(False)
        cut = time.monotonic()
        bound = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000 + 10
        assert stream.done.wait(bound), "the stream hung after its decode worker's link went down"
        print(f"the stream finished {time.monotonic() - cut:.1f} s after the link went down")
        assert stream.error is None, stream.error
        assert stream.finish_reason == "length"
        assert stream.ids == greedy_ignoring_eos(checkpoint.model, prompt, max_tokens), "migrated output differs"
        assert metric_sum(router.metrics(), "splitserve_migrations_total") == 1
        host.set_link(True)
        wait_idle(far)
        wait_idle(near)
    finally:
        stop_workers(launched)
        host.close()
