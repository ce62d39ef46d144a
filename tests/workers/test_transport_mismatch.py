"""A prefill worker and a decode worker started with different ``--transport``s cannot move KV: the handshake says so
by name, the failure blames the link (a router pairs the two no more for a while), and the decode worker's
reservation is freed at once, not when its lease runs out (a NIXL receiver holds blocks a peer may write until the
sender says it writes no more)."""

from __future__ import annotations

import grpc

from contract.errors import UNREACHABLE_PEER
from tests.workers.conftest import random_prompt
from tests.workers.harness import new_id, prefill_future, reserve, start_worker, wait_idle

LEASE_MS = 20_000  # far longer than the wait below: the reservation must go without it


def test_the_other_transport_is_refused_by_name_and_its_reservation_freed_at_once(cluster, checkpoints, rng):
    other = "grpc" if cluster.transport == "nixl" else "nixl"
    prefill = start_worker("prefill", str(checkpoints.tiny), other)
    try:
        expired_before = cluster.decode.stats().leases_expired
        prompt = random_prompt(rng, 40)
        request_id = new_id("mismatch")
        ticket = reserve(cluster.decode, request_id, prompt, lease_ms=LEASE_MS)
        assert cluster.decode.stats().waiting_for_kv == 1
        try:
            prefill_future(prefill, request_id, prompt, ticket).result()
            raise AssertionError("a prefill across transports succeeded")
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
            assert "transport mismatch" in error.details() and "--transport" in error.details()
            assert (UNREACHABLE_PEER, ticket.address) in tuple(error.trailing_metadata() or ())
        # Freed by the sender's word, long before the lease would have.
        assert wait_idle(cluster.decode, timeout=5).leases_expired == expired_before
    finally:
        prefill.stop()
