"""A worker listening on a wildcard (``--host 0.0.0.0``) names an address peers can dial: in its READY line and
in its tickets, which a prefill worker on another host pushes KV to.

The decode worker runs on a test host (a network namespace, tests/netns.py) and listens on every address there;
the prefill worker runs here. A ticket naming 0.0.0.0 would send the push to this host's own loopback.
"""

from __future__ import annotations

import pytest

from tests.checkpoints import hf_greedy
from tests.netns import NetnsHost, subnets
from tests.workers.conftest import random_prompt
from tests.workers.harness import (
    launch_worker,
    new_id,
    run_disaggregated,
    start_worker,
    stop_workers,
    wait_idle,
    wait_ready,
    wire_params,
)

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def hosts():
    """A test host with a default route (through this namespace) and one without."""
    routed, isolated = subnets(2)
    made = []
    try:
        made.append(NetnsHost(routed, default_route=True))
        made.append(NetnsHost(isolated))
        yield made
    finally:
        for host in made:
            host.close()


@pytest.fixture(scope="module")
def prefill(checkpoints):
    worker = start_worker("prefill", str(checkpoints.tiny))
    yield worker
    stop_workers([worker])


def _serves_disaggregated(prefill, decode, model, rng) -> None:
    prompt = random_prompt(rng, 40)
    result = run_disaggregated(prefill, decode, new_id("advertised"), prompt, wire_params(MAX_TOKENS))
    assert result.ticket.address == decode.address
    assert result.prefill.kv_bytes_sent > 0
    assert result.tokens == hf_greedy(model, prompt, MAX_TOKENS)
    wait_idle(decode)


def test_a_wildcard_worker_names_its_default_route_address(hosts, prefill, checkpoints, rng):
    host = hosts[0]
    decode = wait_ready(launch_worker("decode", str(checkpoints.tiny), "grpc", "--host", "0.0.0.0", prefix=host.prefix))
    try:
        assert decode.address.rsplit(":", 1)[0] == host.address, decode.address
        _serves_disaggregated(prefill, decode, checkpoints.tiny_model, rng)
    finally:
        stop_workers([decode])


def test_without_a_default_route_the_worker_asks_for_the_address(hosts, prefill, checkpoints, rng):
    host = hosts[1]
    model = str(checkpoints.tiny)
    refused = launch_worker("decode", model, "grpc", "--host", "0.0.0.0", prefix=host.prefix).process
    try:
        output, _ = refused.communicate(timeout=60)  # before the model loads; stderr comes with stdout
    finally:
        if refused.poll() is None:
            refused.kill()
    assert refused.returncode == 2, output[-2000:]
    assert "no default route" in output and "--advertise-host" in output, output[-2000:]

    advertised = ("--host", "0.0.0.0", "--advertise-host", host.address)
    decode = wait_ready(launch_worker("decode", model, "grpc", *advertised, prefix=host.prefix))
    try:
        assert decode.address.rsplit(":", 1)[0] == host.address, decode.address
        _serves_disaggregated(prefill, decode, checkpoints.tiny_model, rng)
    finally:
        stop_workers([decode])
