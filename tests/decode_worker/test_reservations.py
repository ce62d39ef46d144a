"""The decode reservation state machine, driven directly: no processes, no gRPC, no model.

A fake engine over a real BlockAllocator stands in for the engine (it counts every free); the
inbox, its pool and the output streams are the real ones. Every path must free a reservation's
blocks exactly once, and never while a transport is pinned in them or a NIXL sender may write.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from decode_worker.reservations import STREAM_TTL_S, Reservations, ReservationState
from engine.block_manager import BlockAllocator
from engine.engine import Reservation as HeldBlocks
from engine.errors import InvalidRequestError
from engine.kv_cache import KVLayout, PagedKVCache
from engine.loop import EngineLoop, RequestFailed
from kv_transfer.errors import TransferError
from kv_transfer.inbox import KVInbox
from worker_server.base import WorkerCounters

NUM_LAYERS = 2
NUM_BLOCKS = 32
BLOCK_SIZE = 4
LEASE_S = 10.0
PROMPT = list(range(10))  # 3 blocks
VOCAB = 320


class FakeEngine:
    """The engine calls a reservation makes, over a real allocator; counts the frees an abort made, per request."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(block_size=BLOCK_SIZE)
        self.allocator = BlockAllocator(NUM_BLOCKS, BLOCK_SIZE)
        self.requests: dict[str, list[int]] = {}
        self.committed: set[str] = set()
        self.aborts: Counter[str] = Counter()

    def reserve(self, request_id, prompt, params, resume_token_ids=(), priority=0) -> HeldBlocks:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        blocks = self.allocator.allocate(-(-(len(prompt) + len(resume_token_ids)) // BLOCK_SIZE))
        self.requests[request_id] = blocks
        return HeldBlocks(request_id, tuple(blocks), 0)

    def check_remote_token(self, request_id, token_id, logprobs) -> None:
        if not 0 <= token_id < VOCAB:
            raise InvalidRequestError(f"first_token_id must hold token ids in [0, {VOCAB})")

    def complete_reservation(self, request_id, first_token_id, logprobs=None) -> None:
        if request_id not in self.requests:  # as the engine's: the request is gone
            raise KeyError(request_id)
        assert request_id not in self.committed
        self.committed.add(request_id)

    def abort(self, request_id) -> bool:
        freed = self.finish(request_id)
        self.aborts[request_id] += freed
        return freed

    def finish(self, request_id) -> bool:
        """The request ends (the engine frees its blocks)."""
        blocks = self.requests.pop(request_id, None)
        if blocks is None:
            return False
        self.committed.discard(request_id)
        self.allocator.free(blocks)
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, remote_writes: bool) -> None:
        self.engine = FakeEngine()
        self.clock = Clock()
        layout = KVLayout(NUM_LAYERS, NUM_BLOCKS, BLOCK_SIZE, 1, 2, "float32")
        self.inbox = KVInbox(PagedKVCache(layout), self._no_event, self._no_event)
        self.loop = EngineLoop(self.engine)  # never started: only its stream table is used
        self.counters = WorkerCounters()
        self.reservations = Reservations(self.inbox, self.loop, self.counters, remote_writes, clock=self.clock)
        self.blocks: dict[str, tuple[int, ...]] = {}

    @staticmethod
    def _no_event(*args) -> None:
        raise AssertionError("these tests hand events to the reservations themselves")

    def reserve(self, request_id: str = "r", lease_s: float = LEASE_S):
        held = self.reservations.reserve(self.engine, request_id, PROMPT, None, lease_s)
        self.blocks[request_id] = held.block_ids
        return held

    def land_everything(self, request_id: str = "r") -> None:
        """What a gRPC sender's chunks do: copy every layer into the reservation's blocks."""
        blocks = self.blocks.get(request_id, (0,))
        data = bytes(len(blocks) * self.inbox.cache.layout.region_bytes)
        for layer in range(NUM_LAYERS):
            self.inbox.write(request_id, layer, blocks, data, 0)

    def tick(self) -> None:
        self.reservations.tick(self.engine)

    def run_engine_calls(self) -> None:
        """What the engine thread does between steps: run the calls queued for it, in order."""
        self.loop._run_calls()

    @property
    def free(self) -> int:
        return self.engine.allocator.num_free_blocks

    def state(self, request_id: str = "r") -> ReservationState | None:
        record = self.reservations.get(request_id)
        return None if record is None else record.state


@pytest.fixture(params=["grpc", "nixl"])
def world(request) -> World:
    return World(remote_writes=request.param == "nixl")


def _error(stream) -> RequestFailed:
    with pytest.raises(RequestFailed) as caught:
        stream.get(timeout=0)
    return caught.value


# -- commit ----------------------------------------------------------------------------------------


def test_commit_of_a_token_the_model_cannot_read_stops_the_reservation(world):
    world.reserve()
    stream = world.reservations.get("r").stream
    world.land_everything()
    with pytest.raises(TransferError) as refused:
        world.reservations.commit(world.engine, "r", VOCAB, None)
    assert refused.value.code == "INVALID_ARGUMENT" and "first_token_id" in str(refused.value)
    assert "r" not in world.engine.committed and world.engine.aborts["r"] == 1
    assert world.state() is ReservationState.RELEASED and world.free == NUM_BLOCKS  # the sender said it stopped
    assert "refused commit" in str(_error(stream))
    world.reservations.sender_aborted(world.engine, "r", "its stream ended", True)  # the sender's word after
    assert world.engine.aborts["r"] == 1


def test_commit_hands_the_blocks_to_the_engine(world):
    world.reserve()
    assert world.free == NUM_BLOCKS - 3 and world.reservations.in_flight == 1
    world.land_everything()
    world.reservations.commit(world.engine, "r", 7, None)
    assert world.state() is ReservationState.COMMITTED and "r" in world.engine.committed
    assert world.reservations.in_flight == 0 and world.counters.kv_transfers_completed == 1
    with pytest.raises(TransferError) as late:  # the landing is gone: nothing can write the blocks any more
        world.land_everything()
    assert late.value.code == "NOT_FOUND"
    stream = world.reservations.claim("r")
    assert world.reservations.get("r") is None  # claimed and committed: the engine's request is all there is
    world.engine.finish("r")
    world.tick()
    assert world.free == NUM_BLOCKS and not world.engine.aborts
    with pytest.raises(Exception):  # nothing was put on the stream by the reservation
        stream.get(timeout=0)


def test_a_good_commit_is_accepted_at_once_and_adopted_between_steps(world):
    world.reserve()
    world.land_everything()
    assert world.reservations.commit_at_once(world.engine, "r", 7, None)
    assert world.state() is ReservationState.COMMITTED and world.reservations.in_flight == 0
    assert world.counters.kv_transfers_completed == 1
    assert "r" not in world.engine.committed  # the engine thread adopts between steps, not the transport thread
    with pytest.raises(TransferError):  # the landing is gone at the verdict
        world.land_everything()
    world.tick()  # a step boundary before the queued adoption changes nothing
    assert world.state() is ReservationState.COMMITTED and world.free == NUM_BLOCKS - 3
    world.run_engine_calls()
    assert "r" in world.engine.committed and not world.engine.aborts
    world.engine.finish("r")
    world.tick()
    assert world.free == NUM_BLOCKS


REFUSED_AT_ONCE = {
    "a token the model cannot read": lambda w: w.land_everything(),
    "layers missing": lambda w: None,
    "stopped by its client": lambda w: (w.land_everything(), w.reservations.client_aborted(w.engine, "r", "gone")),
}


@pytest.mark.parametrize("case", list(REFUSED_AT_ONCE))
def test_a_commit_to_refuse_is_left_to_the_engine_thread_unchanged(world, case):
    world.reserve()
    REFUSED_AT_ONCE[case](world)
    token = VOCAB if case == "a token the model cannot read" else 7
    state, free = world.state(), world.free
    assert not world.reservations.commit_at_once(world.engine, "r", token, None)
    assert world.state() is state and world.free == free and not world.engine.committed
    landing = world.inbox.get("r")
    assert landing is None or landing.accepting == (state is ReservationState.OPEN)
    with pytest.raises(TransferError):  # the engine thread's verdict refuses it, as before
        world.reservations.commit(world.engine, "r", token, None)
    world.clock.now += LEASE_S
    world.tick()
    assert world.free == NUM_BLOCKS and world.engine.aborts["r"] == 1
    assert not world.reservations.commit_at_once(world.engine, "unknown", 7, None)


def test_a_client_abort_queued_before_the_verdict_frees_the_blocks_once(world):
    """The client's abort was queued for the engine thread while the sender's commit was accepted: the
    abort ends the committed request, and the adoption queued after it finds nothing to adopt."""
    world.reserve()
    stream = world.reservations.claim("r")
    world.land_everything()
    abort_queued_first = world.loop.submit(
        lambda engine: world.reservations.client_aborted(engine, "r", "gone") is None and engine.abort("r")
    )
    assert world.reservations.commit_at_once(world.engine, "r", 7, None)
    world.run_engine_calls()
    assert abort_queued_first.result(0) is True
    assert world.free == NUM_BLOCKS and world.engine.aborts["r"] == 1 and not world.engine.committed
    assert "not adopted" in str(_error(stream))
    world.tick()
    assert world.free == NUM_BLOCKS and world.engine.aborts["r"] == 1


def test_an_adoption_that_fails_ends_the_stream_and_frees_the_blocks(world, monkeypatch, caplog):
    """Nobody waits on the queued adoption's result: a failure there must not leave the client waiting."""
    world.reserve()
    stream = world.reservations.claim("r")
    world.land_everything()
    assert world.reservations.commit_at_once(world.engine, "r", 7, None)

    def broken(*args):
        raise RuntimeError("the scheduler's books do not add up")

    monkeypatch.setattr(world.engine, "complete_reservation", broken)
    world.run_engine_calls()
    assert "books do not add up" in str(_error(stream))
    assert world.free == NUM_BLOCKS and world.engine.aborts["r"] == 1
    assert "could not adopt" in caplog.text


def test_commit_before_every_layer_landed_is_refused_and_frees(world):
    world.reserve()
    with pytest.raises(TransferError) as refused:
        world.reservations.commit(world.engine, "r", 7, None)
    assert refused.value.code == "FAILED_PRECONDITION"
    # A commit is the sender's word that it stopped: free at once on both transports.
    assert world.state() is ReservationState.RELEASED and world.free == NUM_BLOCKS
    assert world.engine.aborts["r"] == 1


# -- every way to stop ----------------------------------------------------------------------------

STOPS = {
    "client abort": lambda w: w.reservations.client_aborted(w.engine, "r", "aborted by the client"),
    "client gone": lambda w: w.reservations.client_aborted(w.engine, "r", "the client went away"),
    "sender abort": lambda w: w.reservations.sender_aborted(w.engine, "r", "aborted by the prefill worker", True),
    "stream broke": lambda w: w.reservations.sender_aborted(w.engine, "r", "the KV stream broke", True),
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_stopping_an_open_reservation_fails_the_stream_and_frees_once(world, stop):
    world.reserve()
    stream = world.reservations.claim("r")
    STOPS[stop](world)
    assert world.state() in (ReservationState.ABORTED, ReservationState.RELEASED)
    # A client that left failed no transfer: splitserve_kv_transfers_total counts it cancelled, a sender's as failed.
    cancelled = stop.startswith("client")
    assert world.reservations.in_flight == 0
    assert (world.counters.kv_transfers_cancelled, world.counters.kv_transfers_failed) == (
        int(cancelled),
        int(not cancelled),
    )
    with pytest.raises(TransferError) as refused:  # the gate is shut at the transition
        world.land_everything()
    assert refused.value.code in ("ABORTED", "NOT_FOUND")
    assert isinstance(_error(stream), RequestFailed)

    sender_said_so = stop in ("sender abort", "stream broke")
    if world.reservations.remote_writes and not sender_said_so:
        # NIXL: the sender may still be writing into the blocks; they wait for its word or the deadline.
        assert world.free == NUM_BLOCKS - 3 and world.state() is ReservationState.ABORTED
        world.clock.now += LEASE_S - 0.001
        world.tick()
        assert world.free == NUM_BLOCKS - 3
        world.clock.now += 0.001
        world.tick()
    assert world.free == NUM_BLOCKS and world.engine.aborts["r"] == 1
    assert world.reservations.leases_expired == 0


def test_nixl_sender_word_frees_at_once_after_a_client_abort():
    world = World(remote_writes=True)
    world.reserve()
    assert world.reservations.client_aborted(world.engine, "r", "aborted by the client") is True
    assert world.free == NUM_BLOCKS - 3
    world.reservations.sender_aborted(world.engine, "r", "the sender stopped", sender_stopped=True)
    assert world.free == NUM_BLOCKS and world.engine.aborts["r"] == 1


def test_nixl_late_commit_is_the_senders_word_too():
    world = World(remote_writes=True)
    world.reserve()
    world.reservations.client_aborted(world.engine, "r", "aborted by the client")
    with pytest.raises(TransferError) as refused:
        world.reservations.commit(world.engine, "r", 7, None)
    assert refused.value.code == "ABORTED" and "aborted by the client" in str(refused.value)
    assert world.free == NUM_BLOCKS and world.engine.aborts["r"] == 1


def test_nixl_bad_data_waits_for_the_deadline():
    world = World(remote_writes=True)
    world.reserve()
    world.reservations.sender_aborted(world.engine, "r", "checksum mismatch", sender_stopped=False)
    world.tick()
    assert world.free == NUM_BLOCKS - 3
    world.clock.now += LEASE_S
    world.tick()
    assert world.free == NUM_BLOCKS and world.engine.aborts["r"] == 1


def test_lease_expiry(world):
    world.reserve()
    world.clock.now += LEASE_S - 0.001
    world.tick()
    assert world.state() is ReservationState.OPEN
    world.clock.now += 0.001
    world.tick()
    assert world.state() is ReservationState.RELEASED and world.free == NUM_BLOCKS
    assert world.reservations.leases_expired == 1 and world.engine.aborts["r"] == 1
    assert "lease expired" in str(_error(world.reservations.claim("r")))
    with pytest.raises(TransferError) as late:
        world.reservations.claim("r")
    assert late.value.code == "NOT_FOUND"


def test_a_pinned_write_delays_the_release(world):
    world.reserve()
    landing = world.inbox.get("r")
    with world.inbox.pin(landing):  # a transport thread is copying into the blocks
        world.reservations.sender_aborted(world.engine, "r", "the KV stream broke", True)
        assert world.state() is ReservationState.ABORTED and world.free == NUM_BLOCKS - 3
        world.tick()
        assert world.free == NUM_BLOCKS - 3
        with pytest.raises(TransferError):  # nobody new gets in
            world.inbox.pin(landing).__enter__()
    world.tick()
    assert world.free == NUM_BLOCKS and world.engine.aborts["r"] == 1


# -- late and repeated events ------------------------------------------------------------------------


def test_late_events_after_release_change_nothing(world):
    world.reserve()
    world.reservations.sender_aborted(world.engine, "r", "aborted by the prefill worker", True)
    world.clock.now += LEASE_S
    world.tick()
    assert world.free == NUM_BLOCKS
    stream = world.reservations.claim("r")
    world.tick()  # claimed and released: the record goes
    for _ in range(2):
        assert world.reservations.client_aborted(world.engine, "r", "again") is None
        world.reservations.sender_aborted(world.engine, "r", "again", True)
        with pytest.raises(TransferError) as late:
            world.reservations.commit(world.engine, "r", 7, None)
        assert late.value.code == "NOT_FOUND"
        with pytest.raises(TransferError):
            world.land_everything()
        world.tick()
    assert world.engine.aborts["r"] == 1 and world.free == NUM_BLOCKS
    assert "aborted by the prefill worker" in str(_error(stream))


def test_unclaimed_streams_wait_for_their_client_then_go(world):
    world.reserve("committed")
    world.land_everything("committed")
    world.reservations.commit(world.engine, "committed", 7, None)
    world.reserve("stopped")
    world.reservations.client_aborted(world.engine, "stopped", "aborted by the client")
    world.clock.now += LEASE_S
    world.tick()
    world.engine.finish("committed")
    world.tick()
    assert world.reservations.get("committed") and world.reservations.get("stopped")
    world.clock.now += STREAM_TTL_S + 1
    world.tick()
    assert len(world.reservations) == 0 and world.free == NUM_BLOCKS
    for request_id in ("committed", "stopped"):
        with pytest.raises(TransferError):
            world.reservations.claim(request_id)


def test_a_stopping_reservation_keeps_its_id(world):
    world.reserve()
    world.reservations.client_aborted(world.engine, "r", "aborted by the client")
    if world.reservations.remote_writes:  # still held: the id is taken
        with pytest.raises(InvalidRequestError):
            world.reserve()
        assert world.reservations.client_aborted(world.engine, "r", "again") is False
    else:
        world.reserve()  # freed at once: the id is free again, a new record replaces the old
        assert world.state() is ReservationState.OPEN


# -- any order -------------------------------------------------------------------------------------

IDS = ("a", "b", "c")


class ReservationMachine(RuleBasedStateMachine):
    """Reservations and every event that can reach them, in any order, with pins and time passing.

    The model: a reservation's blocks are freed exactly when it reaches RELEASED (or its committed
    request ends), never twice, and never while pinned or while a NIXL sender may still write."""

    def __init__(self) -> None:
        super().__init__()
        self.world = World(remote_writes=self.remote_writes)
        self.pins: dict[str, list] = {}  # request id -> open pin contexts
        self.orphaned_pins: list = []  # pins of reservations whose id was reused since
        self.stopped_by_sender: set[str] = set()

    remote_writes = False

    @property
    def r(self) -> Reservations:
        return self.world.reservations

    @rule(request_id=st.sampled_from(IDS), lease=st.sampled_from([1.0, 5.0]))
    def reserve(self, request_id, lease):
        self.world.run_engine_calls()
        try:
            self.world.reserve(request_id, lease)
        except InvalidRequestError:
            assert request_id in self.world.engine.requests
            return
        self.world.engine.aborts[request_id] = 0  # a new reservation under a reused id
        self.stopped_by_sender.discard(request_id)
        # Pins still held belong to the old reservation's landing, not to this one.
        self.orphaned_pins += self.pins.pop(request_id, [])

    @rule(request_id=st.sampled_from(IDS))
    def land(self, request_id):
        try:
            self.world.land_everything(request_id)
        except TransferError:
            assert self.world.state(request_id) is not ReservationState.OPEN or self.pins.get(request_id) is None

    @rule(request_id=st.sampled_from(IDS))
    def commit(self, request_id):
        self.world.run_engine_calls()
        try:
            self.r.commit(self.world.engine, request_id, 1, None)
        except TransferError:
            pass
        if self.world.state(request_id) is not None:
            self.stopped_by_sender.add(request_id)

    @rule(request_id=st.sampled_from(IDS))
    def commit_at_once(self, request_id):
        """A transport thread's verdict. The adoption it queues runs before any event queued after it
        (every rule that is an engine-thread event runs the queue first); a tick may come before."""
        if self.r.commit_at_once(self.world.engine, request_id, 1, None):
            self.stopped_by_sender.add(request_id)

    @rule()
    def engine_runs_calls(self):
        self.world.run_engine_calls()

    @rule(request_id=st.sampled_from(IDS), stopped=st.booleans())
    def sender_abort(self, request_id, stopped):
        self.world.run_engine_calls()
        self.r.sender_aborted(self.world.engine, request_id, "sender", stopped)
        if stopped and self.world.state(request_id) is not None:
            self.stopped_by_sender.add(request_id)

    @rule(request_id=st.sampled_from(IDS))
    def client_abort(self, request_id):
        self.world.run_engine_calls()
        if self.r.client_aborted(self.world.engine, request_id, "client") is None:
            self.world.engine.abort(request_id)  # what the worker does: the engine's request is the client's

    @rule(request_id=st.sampled_from(IDS))
    def claim(self, request_id):
        self.world.run_engine_calls()
        try:
            self.r.claim(request_id)
        except TransferError:
            pass

    @rule(request_id=st.sampled_from(IDS))
    def pin(self, request_id):
        landing = self.world.inbox.get(request_id)
        if landing is None:
            return
        context = self.world.inbox.pin(landing)
        try:
            context.__enter__()
        except TransferError:
            assert not landing.accepting
            return
        self.pins.setdefault(request_id, []).append(context)

    @precondition(lambda self: any(self.pins.values()))
    @rule(data=st.data())
    def unpin(self, data):
        request_id = data.draw(st.sampled_from(sorted(k for k, v in self.pins.items() if v)))
        self.pins[request_id].pop().__exit__(None, None, None)

    @rule(request_id=st.sampled_from(IDS))
    def engine_finishes(self, request_id):
        if request_id in self.world.engine.committed:
            self.world.engine.finish(request_id)

    @rule(seconds=st.sampled_from([0.5, 2.0, 100.0]))
    def time_passes(self, seconds):
        self.world.clock.now += seconds
        self.world.tick()

    @invariant()
    def blocks_are_freed_once_and_only_when_safe(self):
        engine = self.world.engine
        assert all(count <= 1 for count in engine.aborts.values())
        held = sum(len(blocks) for blocks in engine.requests.values())
        assert engine.allocator.num_free_blocks == NUM_BLOCKS - held
        for request_id in IDS:
            record = self.r.get(request_id)
            if record is None or record.state is not ReservationState.RELEASED:
                continue
            assert not self.pins.get(request_id)
            if self.remote_writes and record.state is ReservationState.RELEASED:
                assert request_id in self.stopped_by_sender or self.world.clock.now >= record.deadline
        for request_id, blocks in engine.requests.items():
            record = self.r.get(request_id)
            if record is not None and record.state is ReservationState.RELEASED:
                raise AssertionError(f"{request_id} RELEASED but its blocks {blocks} are held")
        assert self.r.in_flight == sum(
            1 for i in IDS if self.r.get(i) is not None and self.r.get(i).state is ReservationState.OPEN
        )

    def teardown(self):
        self.world.run_engine_calls()
        for contexts in self.pins.values():
            for context in contexts:
                context.__exit__(None, None, None)
        self.world.clock.now += 1000.0
        self.world.tick()
        for request_id in list(self.world.engine.committed):
            self.world.engine.finish(request_id)
        assert self.world.engine.allocator.num_free_blocks == NUM_BLOCKS
        assert all(count <= 1 for count in self.world.engine.aborts.values())


@pytest.mark.parametrize("transport", ["grpc", "nixl"])
def test_events_in_any_order(transport):
    machine = type(f"ReservationMachine_{transport}", (ReservationMachine,), {"remote_writes": transport == "nixl"})
    run_state_machine_as_test(machine, settings=settings(max_examples=150, stateful_step_count=40, deadline=None))
