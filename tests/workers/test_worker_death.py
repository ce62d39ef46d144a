"""A worker killed (SIGKILL) while a long prompt's KV is on the wire: the survivor fails the request
with a status, returns every block, and keeps serving."""

from __future__ import annotations

import contextlib
import time

import grpc

from contract.errors import UNREACHABLE_PEER
from tests.workers.conftest import LONG_PROMPT_LEN, SLOW_DECODE_LEASE_MS, random_prompt
from tests.workers.harness import (
    claim,
    disaggregated,
    frozen,
    new_id,
    prefill_future,
    reserve,
    rpc_error,
    wait_idle,
    wait_until,
    wire_params,
)
from tests.workers.test_failures import assert_still_serves


@contextlib.contextmanager
def _long_prefill(prefill, decode, rng):
    """A long prompt's prefill, started; the block runs with the prefill worker frozen, so the prefill stays under
    way, however fast the machine, until the block has killed a worker."""
    prompt = random_prompt(rng, LONG_PROMPT_LEN)
    request_id = new_id("doomed")
    ticket = reserve(decode, request_id, prompt)
    stream = claim(decode, request_id)
    future = prefill_future(prefill, request_id, prompt, ticket, timeout=60)
    wait_until(lambda: prefill.stats().running >= 1, 10, interval=0.02, what="the prefill to start")
    with frozen(prefill):
        yield request_id, stream, future


def test_decode_killed_mid_transfer(cluster, rng):
    prefill, victim = cluster.slow_prefill, cluster.doomed_decode
    with _long_prefill(prefill, victim, rng) as (_, _, future):
        assert not future.done(), "the prefill finished before the decode worker was killed"
        victim.kill()

    error = rpc_error(future.result)
    # The link's fault, however far the prefill had got when it was noticed: UNAVAILABLE naming the receiver, so a
    # router blames the link and not this prefill worker (an ABORTED from before the first token once hid it).
    assert error.code() == grpc.StatusCode.UNAVAILABLE, f"{error.code()}: {error.details()}"
    assert dict(error.trailing_metadata()).get(UNREACHABLE_PEER) == victim.address, error.trailing_metadata()
    wait_idle(prefill, timeout=15)

    assert_still_serves(prefill, cluster.slow_decode, rng)  # the next request, with another decode worker


def test_prefill_killed_mid_transfer(cluster, rng):
    victim, decode = cluster.doomed_prefill, cluster.slow_decode
    # First contact (handshake, NIXL metadata) before the timed part: the kill must land mid-prefill.
    assert (
        len(disaggregated(victim, decode, new_id("warm"), random_prompt(rng, 20), wire_params(2), timeout=30)[0]) == 2
    )
    expired_before = decode.stats().leases_expired
    with _long_prefill(victim, decode, rng) as (request_id, stream, future):
        assert not future.done(), "the prefill finished before the prefill worker was killed"
        victim.kill()
        killed_at = time.monotonic()

    assert rpc_error(future.result).code() == grpc.StatusCode.UNAVAILABLE
    if cluster.transport == "grpc":
        # The KV stream broke: the decode worker frees the blocks at once, no lease involved.
        after = wait_idle(decode, timeout=3)
        assert after.leases_expired == expired_before
    else:
        # A dead NIXL sender tells nobody; the blocks stay held (its writes could still land)
        # until the lease runs out, then return.
        held = decode.stats()
        assert held.kv_blocks_used > 0 and held.waiting_for_kv == 1
        after = wait_idle(decode, timeout=SLOW_DECODE_LEASE_MS / 1000 + 3)
        assert after.leases_expired == expired_before + 1
        assert time.monotonic() - killed_at < SLOW_DECODE_LEASE_MS / 1000 + 3

    error = rpc_error(lambda: stream)
    assert error.code() == grpc.StatusCode.ABORTED, error.details()
    late = rpc_error(claim, decode, request_id)
    assert late.code() == grpc.StatusCode.NOT_FOUND
    tokens, _ = disaggregated(
        cluster.slow_prefill, decode, new_id("after"), random_prompt(rng, 30), wire_params(4), timeout=30
    )
    assert len(tokens) == 4
    wait_idle(decode)
