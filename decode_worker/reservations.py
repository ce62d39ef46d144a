"""One state machine per decode reservation, owned by ``Reservations`` under its lock.

A reservation is a prompt's blocks held here while a prefill worker computes and sends their KV,
together with the output stream its client claims (outputs may come before the client does)::

                    commit (every layer landed)
    reserve ──> OPEN ──────────────────────────────> COMMITTED    the engine's request owns the blocks
                 │  client abort or gone, sender abort,
                 │  sender stream broke, bad data
                 ├─────────────────────────────────> ABORTED ──┐
                 │  lease deadline                             ├──> RELEASED    blocks freed, exactly once
                 └─────────────────────────────────> EXPIRED ──┘
                                 once no transport thread is pinned in the blocks and, when a peer
                                 writes our memory itself (NIXL), once the sender said it stopped
                                 (a commit or an abort from it) or the lease deadline passed

    client side:  stream unclaimed ──Generate──> claimed (once; a second claim is NOT_FOUND)
    the record goes once claimed and COMMITTED/RELEASED, or STREAM_TTL_S after its request ended
    unclaimed (a late claim then is NOT_FOUND).
"""

from __future__ import annotations

import enum
import functools
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from contract import tracing
from contract.sampling import SamplingParams
from engine.engine import Engine
from engine.engine import Reservation as HeldBlocks
from engine.errors import InvalidRequestError
from engine.loop import EngineLoop, RequestFailed, RequestStream
from engine.sampler import TokenLogprobs
from kv_transfer.errors import TransferError
from kv_transfer.inbox import KVInbox
from worker_server.base import WorkerCounters

log = logging.getLogger(__name__)


def _locked(method):
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


# A reservation's output stream waits this long for its client's Generate once the request ended.
STREAM_TTL_S = 60.0


class ReservationState(enum.Enum):
    OPEN = "open"
    COMMITTED = "committed"
    ABORTED = "aborted"
    EXPIRED = "expired"
    RELEASED = "released"

    @property
    def stopping(self) -> bool:
        """Stopped, blocks still held until it is safe to free them."""
        return self in (ReservationState.ABORTED, ReservationState.EXPIRED)


_TRANSITIONS = {
    ReservationState.OPEN: {ReservationState.COMMITTED, ReservationState.ABORTED, ReservationState.EXPIRED},
    ReservationState.ABORTED: {ReservationState.RELEASED},
    ReservationState.EXPIRED: {ReservationState.RELEASED},
}


@dataclass
class Reservation:
    """One reservation's record. Read and changed only under ``Reservations``' lock."""

    request_id: str
    deadline: float  # clock time by which the KV must have landed
    remote_writes: bool  # a peer writes our memory directly (NIXL): freeing waits for its word or the deadline
    stream: RequestStream
    opened_at: float
    token: str = field(default="", repr=False)  # the ticket's capability: senders and the client present it
    peer: str = ""  # who reserved it (per-peer limit)
    state: ReservationState = ReservationState.OPEN
    reason: str = ""  # why it stopped
    sender_stopped: bool = False  # the sender said it writes no more (its commit or abort)
    claimed: bool = False
    ended_at: float | None = None  # when its blocks were freed or its committed request finished
    trace: object = tracing.NO_SPAN  # its kv.reservation span (contract/tracing.py), ended when it leaves OPEN

    def transition(self, new_state: ReservationState) -> None:
        if new_state not in _TRANSITIONS.get(self.state, set()):
            raise RuntimeError(
                f"reservation {self.request_id}: illegal transition {self.state.name} -> {new_state.name}"
            )
        self.state = new_state


class Reservations:
    """Every reservation of one decode worker.

    Contract:
    - The records and their transitions are this object's, under its lock. Whatever touches the
      engine (reserve, adopt, free) runs on the decode engine thread: every method takes the
      engine and runs there, except ``commit_at_once``. RPC and transport threads enqueue events
      (``EngineLoop.submit`` / ``call``, which run between steps): an abort by the sender or its
      stream, an abort by the client or its leaving, a client's Generate claiming the stream, a
      commit the engine thread must refuse. ``tick`` runs after every loop iteration: leases
      expire and stopped reservations are released there.
    - A good commit is decided on the transport thread at once (``commit_at_once``), not after the
      engine's current step: the sender's first token reaches its client a decode step sooner under
      load. The record is COMMITTED from then on, and the engine thread adopts the KV at its next
      call boundary, before anything queued after the verdict.
    - A reservation's blocks are freed only by its transition to RELEASED (``engine.abort`` of its
      request, exactly once), or, after COMMITTED, by the engine when the request ends.
    - Transport threads touch the blocks only through the inbox, pinned, while the reservation is
      OPEN: every transition out of OPEN shuts the landing's gate first, and RELEASED waits for
      the pins to drop.
    - Events for a reservation that is gone, or in a state where they mean nothing, change nothing
      (a late commit is refused, a late abort ignored).
    - A reservation is a capability: ``reserve`` mints an unguessable token for its ticket and hands
      the landing its copy (the KV receiver checks senders against it before enqueueing anything);
      the client's abort and claim must present it too (``authorize``), for as long as the request
      lives, its record gone or not. A wrong token is PERMISSION_DENIED and changes nothing.
    - One peer holds at most ``max_per_peer`` OPEN reservations (RESOURCE_EXHAUSTED beyond), so it
      cannot hold every block until leases expire.
    """

    def __init__(
        self,
        inbox: KVInbox,
        streams: EngineLoop,
        counters: WorkerCounters,
        remote_writes: bool,
        clock: Callable[[], float] = time.monotonic,
        max_per_peer: int = 64,
    ) -> None:
        self.inbox = inbox
        self.max_per_peer = max_per_peer
        self.streams = streams
        self.counters = counters
        self.remote_writes = remote_writes
        self.clock = clock
        self._records: dict[str, Reservation] = {}
        # The token of each request that came through a reservation, until the engine has forgotten it: a claimed
        # reservation's record goes, and its request is still only its ticket's holder's to abort.
        self._owners: dict[str, str] = {}
        self._lock = threading.Lock()
        # Read by Stats from RPC threads (plain ints): reservations OPEN now, leases expired ever.
        self.in_flight = 0
        self.leases_expired = 0

    def get(self, request_id: str) -> Reservation | None:
        return self._records.get(request_id)

    def __len__(self) -> int:
        return len(self._records)

    # -- events -----------------------------------------------------------------------------------

    @_locked
    def reserve(
        self,
        engine: Engine,
        request_id: str,
        prompt: Sequence[int],
        params: SamplingParams,
        lease_s: float,
        resume_token_ids: Sequence[int] = (),
        peer: str = "",
        priority: int = 0,
    ) -> HeldBlocks:
        """Blocks, landing and output stream appear together. Raises (holding nothing) if the engine refuses.
        ``resume_token_ids``: output generated elsewhere before (``Engine.add_request``); its KV lands too.
        ``priority``: the request's, as ``Engine.add_request`` takes it.
        The ticket's token is then ``get(request_id).token``."""
        open_of_peer = sum(1 for r in self._records.values() if r.peer == peer and r.state is ReservationState.OPEN)
        if open_of_peer >= self.max_per_peer:
            raise TransferError(
                f"{peer or 'this peer'} holds {open_of_peer} open reservations already (at most {self.max_per_peer})",
                "RESOURCE_EXHAUSTED",
            )
        held = engine.reserve(request_id, list(prompt), params, resume_token_ids, priority)
        first_missing = held.num_cached_tokens // engine.config.block_size
        token = secrets.token_urlsafe(24)
        self._owners[request_id] = token
        self.inbox.open(request_id, held.block_ids[first_missing:], token)
        now = self.clock()
        self._records[request_id] = Reservation(
            request_id, now + lease_s, self.remote_writes, self.streams.watch(request_id), now, token, peer
        )
        self.in_flight += 1
        return held

    @_locked
    def commit_at_once(
        self, engine: Engine, request_id: str, first_token_id: int, first_logprob: TokenLogprobs | None
    ) -> bool:
        """Transport thread: the sender committed. True if the commit is good, decided now: COMMITTED,
        and the engine thread adopts the KV at its next call boundary. False, changing nothing, if it is
        to be refused: the engine thread's ``commit`` then refuses it and stops or releases what it must."""
        if self._refusal(engine, request_id, first_token_id, first_logprob) is not None:
            return False
        self._committed(self._records[request_id])
        self.streams.post(
            lambda engine: self._adopt(engine, request_id, first_token_id, first_logprob), f"adopting {request_id}'s KV"
        )
        return True

    @_locked
    def commit(self, engine: Engine, request_id: str, first_token_id: int, first_logprob: TokenLogprobs | None) -> None:
        """The sender committed: adopt the KV, or raise TransferError saying why not (a first token or
        logprob this model and request could not have produced: INVALID_ARGUMENT, and the reservation stops)."""
        refusal = self._refusal(engine, request_id, first_token_id, first_logprob)
        if refusal is None:
            self._committed(self._records[request_id])
            engine.complete_reservation(request_id, first_token_id, first_logprob)
            return
        record = self._records.get(request_id)
        if record is not None:
            record.sender_stopped = True  # a sender commits only once its writes are final
            if record.state is ReservationState.OPEN:
                self._stop(engine, record, ReservationState.ABORTED, str(refusal))
            else:
                self._try_release(engine, record)
        raise refusal

    @_locked
    def sender_aborted(self, engine: Engine, request_id: str, reason: str, sender_stopped: bool) -> None:
        """The sender aborted, its stream broke or ended without a commit, or it sent bad data."""
        record = self._records.get(request_id)
        if record is None:
            return
        if sender_stopped:
            record.sender_stopped = True
        if record.state is ReservationState.OPEN:
            self._stop(engine, record, ReservationState.ABORTED, reason)
        else:
            self._try_release(engine, record)

    @_locked
    def authorize(self, request_id: str, token: str) -> None:
        """A client's abort or claim of ``request_id``: raises PERMISSION_DENIED unless it presents the
        ticket's token. Nothing to check for a request that came through no reservation."""
        owner = self._owners.get(request_id)
        if owner is not None and not hmac.compare_digest(token.encode(), owner.encode()):
            raise TransferError(f"wrong ticket token for reservation {request_id!r}", "PERMISSION_DENIED")

    @_locked
    def client_aborted(self, engine: Engine, request_id: str, reason: str) -> bool | None:
        """The client aborted or left. True if that stopped an OPEN reservation, False if it had
        stopped already; None if there is nothing of ours to stop (no record, or COMMITTED: the
        engine's request is the client's to abort)."""
        record = self._records.get(request_id)
        if record is None or record.state is ReservationState.COMMITTED:
            return None
        if record.state is ReservationState.OPEN:
            self._stop(engine, record, ReservationState.ABORTED, reason, cancelled=True)
            return True
        return False

    @_locked
    def claim(self, request_id: str) -> RequestStream:
        """A client's Generate takes the reservation's output stream (once)."""
        record = self._records.get(request_id)
        if record is None or record.claimed:
            raise TransferError(f"no reservation {request_id!r} waiting for its client on this worker", "NOT_FOUND")
        record.claimed = True
        if record.state in (ReservationState.COMMITTED, ReservationState.RELEASED):
            del self._records[request_id]
        return record.stream

    @_locked
    def tick(self, engine: Engine) -> None:
        """After every loop iteration: expire leases, release what is safe, forget what is done."""
        now = self.clock()
        for record in list(self._records.values()):
            if record.state is ReservationState.OPEN and now >= record.deadline:
                self._stop(engine, record, ReservationState.EXPIRED, "lease expired before the KV landed")
            elif record.state.stopping:
                self._try_release(engine, record)
            elif (
                record.state is ReservationState.COMMITTED
                and record.ended_at is None
                and record.request_id not in engine.requests
            ):
                record.ended_at = now
            if self._done(record, now):
                del self._records[record.request_id]
        for request_id in [r for r in self._owners if r not in self._records and r not in engine.requests]:
            del self._owners[request_id]

    # -- transitions ------------------------------------------------------------------------------

    def _refusal(
        self, engine: Engine, request_id: str, first_token_id: int, first_logprob: TokenLogprobs | None
    ) -> TransferError | None:
        """Why a commit is refused, or None. Changes nothing: ``check_remote_token`` reads only the
        request's params, fixed at reserve, and the model's vocabulary, and the engine's request stays
        while the reservation is OPEN (only its release, under our lock, aborts it)."""
        record = self._records.get(request_id)
        if record is None:
            return TransferError(f"no reservation {request_id!r} on this worker", "NOT_FOUND")
        if record.state is not ReservationState.OPEN:
            return TransferError(f"reservation {request_id} is {record.state.value}: {record.reason}", "ABORTED")
        try:  # a token the model cannot read would fail every step it joins: refused here, where it enters
            engine.check_remote_token(request_id, first_token_id, first_logprob)
        except InvalidRequestError as exc:
            return TransferError(f"refused commit: {exc}", "INVALID_ARGUMENT")
        if not self.inbox.layers_complete(request_id):
            return TransferError("commit before every layer landed", "FAILED_PRECONDITION")
        return None

    def _committed(self, record: Reservation) -> None:
        """OPEN -> COMMITTED, every layer landed: the gate shuts and the landing goes. The sender commits
        only once its writes are final, so nothing writes the blocks any more."""
        request_id = record.request_id
        received = self.inbox.get(request_id).bytes_received
        record.sender_stopped = True
        self.inbox.close(request_id, "committed")
        record.transition(ReservationState.COMMITTED)
        waited = self.clock() - record.opened_at
        record.trace.end(state="committed", bytes_received=received, kv_wait_ms=waited * 1e3)
        self.in_flight -= 1
        self.inbox.forget(request_id)
        self.counters.add(kv_transfers_completed=1, kv_transfer_bytes=received, kv_transfer_seconds=waited)

    def _adopt(self, engine: Engine, request_id: str, first_token_id: int, first_logprob: TokenLogprobs | None):
        """Engine thread, after ``commit_at_once``: the request decodes from the next step. Its client may
        have aborted it since the verdict (the KV then has no taker); any other failure ends its stream
        (nobody waits on this call's result: an error left there would leave the request waiting)."""
        try:
            engine.complete_reservation(request_id, first_token_id, first_logprob)
        except Exception as exc:  # noqa: BLE001 - ends the request's stream, below
            if request_id in engine.requests:  # not the client's abort: a bug, said with its traceback
                log.exception("request %s: could not adopt its committed KV", request_id)
            self.streams.fail(engine, request_id, RequestFailed(f"the committed KV was not adopted: {exc}"))

    def _stop(
        self, engine: Engine, record: Reservation, state: ReservationState, reason: str, cancelled: bool = False
    ) -> None:
        """OPEN -> ABORTED / EXPIRED: shut the gate, fail the stream, release if already safe. ``cancelled``: the
        client left, which fails no transfer."""
        record.transition(state)
        record.reason = reason
        record.trace.fail(reason)
        record.trace.end(state=state.value)
        self.in_flight -= 1
        self.inbox.close(record.request_id, reason)
        if state is ReservationState.EXPIRED:
            self.leases_expired += 1
        self.counters.add(**{"kv_transfers_cancelled" if cancelled else "kv_transfers_failed": 1})
        self.streams.detach(record.request_id)
        record.stream.put(RequestFailed(reason))
        self._try_release(engine, record)

    def _try_release(self, engine: Engine, record: Reservation) -> None:
        """ABORTED / EXPIRED -> RELEASED once nothing can write the blocks any more; frees them."""
        if not record.state.stopping or self.inbox.pinned(record.request_id):
            return
        now = self.clock()
        if record.remote_writes and not record.sender_stopped and now < record.deadline:
            return
        record.transition(ReservationState.RELEASED)
        record.ended_at = now
        self.inbox.forget(record.request_id)
        engine.abort(record.request_id)

    @staticmethod
    def _done(record: Reservation, now: float) -> bool:
        if record.state not in (ReservationState.COMMITTED, ReservationState.RELEASED):
            return False
        return record.claimed or (record.ended_at is not None and now - record.ended_at > STREAM_TTL_S)
