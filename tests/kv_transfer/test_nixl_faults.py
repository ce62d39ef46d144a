"""A NIXL sender beside decode workers that stall or die, real agents and gRPC receivers on loopback: a stalled
receiver holds up only its own KV, a dead one is forgotten (its agent, metadata and prepared lists) rather than
kept for ever, and one that comes back at the same address gets its KV exact.

A stall is the receiver's notification poller held (a decode worker under SIGSTOP, or a hung host, stops there
too): over UCX a WRITE to it completes, and is announced, only once it progresses again."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch

from engine.kv_cache import PagedKVCache
from kv_transfer import nixl_transport
from kv_transfer.errors import TransferError
from kv_transfer.nixl_agent import WriteHandle
from kv_transfer.nixl_transport import NixlKVSender
from tests.kv_transfer.nixl_receiver_process import start_receiver_process
from tests.kv_transfer.test_nixl_integrity import DST_BLOCKS, LAYOUT, SRC_BLOCKS, Receiver

pytestmark = pytest.mark.timeout(120)

COMMIT_BOUND_S = 2.0  # a commit whose layers landed at once; the receiver gives up on missing ones after 5 s
POLL_WINDOW_S = 0.5
MAX_STRAGGLER_POLLS_PER_S = 2000  # a WRITE long in flight is polled about every ms (it was every 0.1 ms)


@contextmanager
def stalled(receiver: Receiver):
    """The receiver takes no notification (and so lets no WRITE to it complete) until the block ends."""
    going = threading.Event()
    poll = receiver.nixl.pool.poll_notifications

    def held():
        going.wait()
        return poll()

    receiver.nixl.pool.poll_notifications = held
    time.sleep(0.05)  # the poller is inside its current poll no more
    try:
        yield
    finally:
        going.set()
        receiver.nixl.pool.poll_notifications = poll


@pytest.fixture
def source() -> PagedKVCache:
    cache = PagedKVCache(LAYOUT)
    cache.data.copy_(torch.randn(cache.data.shape, generator=torch.Generator().manual_seed(3)))
    return cache


@pytest.fixture
def receivers():
    made = [Receiver(name="stalling-receiver"), Receiver(name="healthy-receiver")]
    yield made
    for receiver in made:
        receiver.stop()


def _push_all(session, source: PagedKVCache) -> None:
    for layer in range(LAYOUT.num_layers):
        session.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)


def _wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


def _commits_at_once(session, receiver: Receiver, source: PagedKVCache) -> None:
    """``session``'s commit (its only one, to ``receiver``) is adopted within COMMIT_BOUND_S, its KV exact."""
    began = time.monotonic()
    session.commit(first_token_id=1, first_logprob=None, timeout=30)
    took = time.monotonic() - began
    session.close(10)
    assert receiver.committed == [session.request_id] and not receiver.aborts
    assert took < COMMIT_BOUND_S, f"the other receiver's commit took {took:.1f} s behind the stalled one's"
    assert torch.equal(receiver.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])


def _polls_within(sender: NixlKVSender, seconds: float) -> int:
    """How often the sender asks NIXL about its WRITEs in flight within ``seconds``."""
    counted = [0]
    poll = WriteHandle._poll_locked

    def counting(handle) -> None:
        counted[0] += 1
        poll(handle)

    WriteHandle._poll_locked = counting
    try:
        time.sleep(seconds)
    finally:
        WriteHandle._poll_locked = poll
    assert sender.pending_writes, "no WRITE was in flight"
    return counted[0]


def test_a_stalled_receiver_holds_up_no_other_receiver_s_kv(receivers, source):
    slow, healthy = receivers
    sender = NixlKVSender(slow.layout, "prefill", source, "stall-sender", verify=True)
    try:
        with stalled(slow):
            slow.inbox.open("stuck", DST_BLOCKS)
            stuck = sender.open("stuck", slow.ticket("stuck"))
            _push_all(stuck, source)
            _wait_until(lambda: sender.pending_writes > 0, 10, "a WRITE to the stalled receiver in flight")
            time.sleep(0.1)  # its announcement is waiting for it now
            with stalled(healthy):  # its WRITEs, too, move on only once it progresses, as they often do under load
                healthy.inbox.open("other", DST_BLOCKS)
                other = sender.open("other", healthy.ticket("other"))
                _push_all(other, source)
                _wait_until(lambda: not other._queued, 10, "the other request's layers posted")
            _commits_at_once(other, healthy, source)
            # Until the stalled receiver's lease ends, its WRITE is polled at a pace that costs little.
            polls = _polls_within(sender, POLL_WINDOW_S)
            assert polls < POLL_WINDOW_S * MAX_STRAGGLER_POLLS_PER_S, f"{polls} polls in {POLL_WINDOW_S} s"
        # The stalled receiver goes on: its KV lands, exact.
        stuck.commit(first_token_id=1, first_logprob=None, timeout=30)
        stuck.close(10)
        assert slow.committed == ["stuck"] and not slow.aborts
        assert torch.equal(slow.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
    finally:
        sender.close()


def test_a_stalled_receiver_s_commits_hold_no_thread_another_receiver_s_commit_needs(receivers, source, monkeypatch):
    """Commits to a stalled receiver wait for it on as many commit threads as the sender gives one receiver; a
    commit to another receiver goes out at once on threads of its own, and the stalled one's land exact later."""
    monkeypatch.setattr(nixl_transport, "COMMIT_THREADS", 2)
    slow, healthy = receivers
    sender = NixlKVSender(slow.layout, "prefill", source, "stall-commit-sender", verify=True)
    waiting: list[threading.Thread] = []
    outcomes: dict[str, BaseException | None] = {}

    def commit(session) -> None:
        try:
            session.commit(first_token_id=1, first_logprob=None, timeout=30)
            outcomes[session.request_id] = None
        except BaseException as exc:  # noqa: BLE001 - the assertion below names it
            outcomes[session.request_id] = exc

    try:
        with stalled(slow):
            stuck = []
            for index in range(nixl_transport.COMMIT_THREADS):
                slow.inbox.open(f"stuck-{index}", DST_BLOCKS)
                stuck.append(sender.open(f"stuck-{index}", slow.ticket(f"stuck-{index}")))
                _push_all(stuck[-1], source)
                waiting.append(threading.Thread(target=commit, args=(stuck[-1],)))
                waiting[-1].start()
            _wait_until(
                lambda: sum(t.name.startswith(f"nixl-commit-{slow.address}") for t in threading.enumerate()) == 2,
                10,
                "every commit thread of the stalled receiver taken",
            )
            healthy.inbox.open("other", DST_BLOCKS)
            other = sender.open("other", healthy.ticket("other"))
            _push_all(other, source)
            _commits_at_once(other, healthy, source)
            assert all(thread.is_alive() for thread in waiting), "the stalled receiver's commits ended while it stalled"
        for thread in waiting:
            thread.join(30)
        assert outcomes == {session.request_id: None for session in stuck}
        assert sorted(slow.committed) == sorted(session.request_id for session in stuck) and not slow.aborts
        assert torch.equal(slow.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
        for session in stuck:
            session.close(10)
    finally:
        sender.close()


def _peers(sender: NixlKVSender) -> list[list[str]]:
    """The receivers each of the sender's agents has loaded."""
    return [pool.peers() for pool in sender.pools]


def test_a_dead_receiver_is_forgotten_and_one_back_at_its_address_gets_its_kv(source):
    doomed = start_receiver_process("doomed-receiver", "first", ["before", "during"])
    sender = NixlKVSender(doomed.layout, "prefill", source, "bereaved-sender", verify=True)
    reborn = None
    try:
        before = sender.open("before", doomed.ticket("before"))
        _push_all(before, source)
        before.commit(first_token_id=1, first_logprob=None, timeout=30)
        before.close(10)
        assert _peers(sender) == [["doomed-receiver"]] * len(sender.pools)

        stale = sender.peer(doomed.ticket("late"))  # a session to the first instance, about to open
        during = sender.open("during", doomed.ticket("during"))
        during.push_layer(source, 0, SRC_BLOCKS, DST_BLOCKS)
        doomed.kill()
        for layer in range(1, LAYOUT.num_layers):
            during.push_layer(source, layer, SRC_BLOCKS, DST_BLOCKS)
        with pytest.raises(TransferError) as failed:
            during.commit(first_token_id=1, first_logprob=None, timeout=30)
        assert failed.value.unreachable == doomed.address, str(failed.value)
        during.close(10)
        # Its agent, metadata and prepared lists go, though nothing ever comes back at its address.
        # Forgetting runs on a thread of its own and drops the agent through NIXL, which under the full suite's
        # load on 2 cores once took more than 5 s: bounded, and not a latency this test is about.
        _wait_until(lambda: not any(_peers(sender)), 20, "the dead receiver's NIXL agent to be forgotten")

        reborn = Receiver(name="reborn-receiver", port=int(doomed.address.rsplit(":", 1)[1]), instance_id="second")
        reborn.inbox.open("after", DST_BLOCKS)
        after = sender.open("after", reborn.ticket("after"))
        # The session that was opening meanwhile never writes the first instance's ticket into the second's pool.
        with pytest.raises(TransferError) as gone:
            late = sender._session("late", doomed.ticket("late"), stale, None)
            _push_all(late, source)
            late.close(10)
        assert gone.value.code == "UNAVAILABLE", str(gone.value)
        assert not reborn.cache.data.any(), "KV of a ticket of the dead instance landed in the new one"
        _push_all(after, source)
        after.commit(first_token_id=1, first_logprob=None, timeout=30)
        after.close(10)
        assert reborn.committed == ["after"] and not reborn.aborts
        assert torch.equal(reborn.cache.data[:, DST_BLOCKS], source.data[:, SRC_BLOCKS])
        assert _peers(sender) == [["reborn-receiver"]] * len(sender.pools)
    finally:
        doomed.kill()
        sender.close()
        if reborn is not None:
            reborn.stop()


@pytest.mark.parametrize(
    "described", [b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa4name\xa1x"], ids=["not msgpack", "a list", "keys missing"]
)
def test_a_receiver_describing_its_pool_unreadably_is_refused_naming_it(source, described):
    """Bytes from a peer (another version, or a hostile member): a handshake whose pool description does not parse
    is a refusal naming the peer, not an INTERNAL error of the prefill worker's own."""
    receiver = Receiver(name="garbled-receiver")
    receiver.nixl.pool_descriptor_bytes = lambda: described
    sender = NixlKVSender(receiver.layout, "prefill", source, "garbled-sender", verify=True)
    try:
        with pytest.raises(TransferError) as refused:
            sender.open("r", receiver.ticket("r"))
        assert refused.value.code == "FAILED_PRECONDITION" and receiver.address in str(refused.value)
        assert refused.value.refused and "cannot read" in str(refused.value)
    finally:
        sender.close()
        receiver.stop()
