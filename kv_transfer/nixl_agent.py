"""One NIXL agent with one worker's whole KV pool registered: the NIXL transport's moving part.

The pool is the worker's paged KV tensor (engine/kv_cache.py); every (layer, block) region is one
contiguous byte range, so a region size ``nbytes`` cuts the pool into a grid of slots::

    pool bytes:  | slot 0 | slot 1 | slot 2 | ...          slot i = [i*nbytes, (i+1)*nbytes)
    region (layer, block) = slot layer*num_blocks + block   when nbytes == region_bytes

A write names regions by byte offset (``KVLayout.region_offset``); offsets are multiples of
``nbytes``, so each becomes a slot index. Per region size we prepare the local grid once, and per
(peer, region size) the peer's grid once; posting a write of hundreds of regions is then one
``make_prepped_xfer`` over two int32 index arrays (~50 us), not a descriptor list built anew.

Wire contract between two workers:
- the receiver (decode) hands out ``metadata()`` (opaque NIXL bytes) and ``descriptor`` (msgpack
  via ``to_dict``); the sender loads the first with ``add_peer`` and addresses writes with the
  second. A peer that restarts has new metadata under possibly the same name: ``remove_peer`` the
  old one first (``add_peer`` refuses to overwrite a loaded name with different metadata).
- a write's notification reaches the receiver only after all of that write's regions landed.

Threading: every public method (here and on ``WriteHandle``) may be called from any thread. The
NIXL agent is created without internal locking, so one lock inside ``NixlPool`` serialises every
call into it; calls hold it for microseconds (a DRAM post for as long as its copy), and
``WriteHandle.wait`` sleeps without it.
Progress — the sender must poll every write to completion. NIXL sends a write's notification
from the post itself only if the write finished there; otherwise from the first status check that
sees it finished. A write nobody polls never notifies its peer. Poll each handle (``done()`` /
``wait()``) or call ``NixlPool.progress()`` for all of them. Without NIXL's progress thread (the
default, see ``NixlPool``) the data, too, moves only inside calls into the agent, and the receiver
gets notifications only inside ``poll_notifications()``. Nothing happens in the background.
The receiver's progress matters to the sender too: over UCX, a write posted while an earlier
notification to the same peer is not yet taken completes (and copies) only once the peer's worker
progressed, i.e. inside the peer's ``poll_notifications()``.

Handles: every NIXL transfer handle is released exactly once — by ``write()`` itself when the
post completes at once (usual for DRAM, where UCX copies with CMA inside the post), by
``done()``/``wait()`` on reaching a final state, by ``WriteHandle.release()`` (aborting a write in
flight), by ``remove_peer`` for that peer's writes, or by ``close()``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def nixl_build_name(cuda_version: str | None = torch.version.cuda) -> str:
    """The NIXL wheel's module for this process's torch: its UCX links the CUDA runtime of one major
    version, so a CUDA 13 torch needs ``nixl_cu13`` and a CUDA 12 one ``nixl_cu12``. A CPU build of
    torch moves DRAM only, which either build does: the one installed (``nixl-cu12`` by default)."""
    if cuda_version:
        return f"nixl_cu{cuda_version.split('.')[0]}"
    for name in ("nixl_cu12", "nixl_cu13"):
        if importlib.util.find_spec(name) is not None:
            return name
    return "nixl_cu12"


def _import_nixl(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"{name}._api")
    except ModuleNotFoundError as error:
        if error.name not in (name, f"{name}._api"):
            raise
        wanted = name.replace("_", "-")
        raise ImportError(
            f"NIXL: torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}) needs the {wanted} "
            f"package, which is not installed: pip install {wanted}"
        ) from error


_nixl = _import_nixl(nixl_build_name())
nixl_agent, nixl_agent_config = _nixl.nixl_agent, _nixl.nixl_agent_config
nixlNotAllowedError = importlib.import_module(f"{_nixl.__package__}._bindings").nixlNotAllowedError

DESCRIPTOR_VERSION = 1
DRAM = "DRAM"
VRAM = "VRAM"
_LOCAL = "NIXL_INIT_AGENT"  # NIXL's name for "the initiator's own memory" when preparing lists
_POLL_INTERVAL_S = 100e-6
_TEARDOWN_PROGRESS_ROUNDS = 3

# NIXL status strings returned by transfer() / check_xfer_state().
_DONE, _IN_PROGRESS = "DONE", "PROC"


class NixlError(Exception):
    """NIXL could not move the data: unknown or vanished peer, a failed or timed-out write,
    or a pool that is closed. The message says which; ``peer_lost``: NIXL said the peer
    disconnected (the link's fault, as a lost gRPC connection is, not a refusal)."""

    def __init__(self, message: str, peer_lost: bool = False) -> None:
        super().__init__(message)
        self.peer_lost = peer_lost


def _peer_lost(error: Exception) -> bool:
    """Whether a NIXL binding's error is NIXL_ERR_REMOTE_DISCONNECT (the bindings raise one class per status)."""
    return type(error).__name__ == "nixlRemoteDisconnectError"


@dataclass(frozen=True)
class PoolDescriptor:
    """What a peer needs to address our registered pool. Small; crosses processes as msgpack."""

    agent_name: str
    base_address: int
    nbytes: int
    device_id: int
    memory: str  # DRAM or VRAM

    def to_dict(self) -> dict[str, Any]:
        return {"version": DESCRIPTOR_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PoolDescriptor:
        version = data.get("version")
        if version != DESCRIPTOR_VERSION:
            raise ValueError(f"pool descriptor version {version!r}, expected {DESCRIPTOR_VERSION}")
        descriptor = cls(
            agent_name=str(data["agent_name"]),
            base_address=int(data["base_address"]),
            nbytes=int(data["nbytes"]),
            device_id=int(data["device_id"]),
            memory=str(data["memory"]),
        )
        if descriptor.memory not in (DRAM, VRAM):
            raise ValueError(f"pool memory {descriptor.memory!r}, expected {DRAM} or {VRAM}")
        return descriptor


def _pool_memory(pool: torch.Tensor) -> tuple[str, int]:
    """(NIXL memory type, device id) of the tensor's storage.

    The VRAM branch (pool on a GPU) is written for GPU hosts and untested on this CPU-only machine.
    """
    if pool.device.type == "cuda":
        return VRAM, pool.device.index if pool.device.index is not None else torch.cuda.current_device()
    if pool.device.type == "cpu":
        return DRAM, 0
    raise ValueError(f"cannot register a pool on device {pool.device}")


def _grid(base_address: int, pool_nbytes: int, nbytes: int, device_id: int) -> np.ndarray:
    """Nx3 uint64 (address, length, device id) rows, one per nbytes-sized slot of a pool."""
    count = pool_nbytes // nbytes
    rows = np.empty((count, 3), dtype=np.uint64)
    rows[:, 0] = base_address + np.arange(count, dtype=np.uint64) * np.uint64(nbytes)
    rows[:, 1] = nbytes
    rows[:, 2] = device_id
    return rows


def _slot_indices(offsets: Sequence[int], nbytes: int, side: str) -> np.ndarray:
    """Byte offsets -> int32 slot indices; each offset must be a multiple of ``nbytes`` (``write_slots``
    checks that the slots lie inside the pool)."""
    array = np.asarray(offsets, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"{side} offsets must be a flat sequence")
    if np.any(array % nbytes):
        raise ValueError(f"{side} offsets must be multiples of {nbytes}")
    return (array // nbytes).astype(np.int32)


def _check_slots(slots: np.ndarray, count: int, side: str) -> None:
    if slots.dtype != np.int32 or slots.ndim != 1:
        raise ValueError(f"{side} slots must be a flat int32 array, got {slots.dtype} with {slots.ndim} dims")
    if slots.size and (slots.min() < 0 or slots.max() >= count):
        raise ValueError(f"{side} slots must lie in [0, {count}) (regions inside the pool)")


class WriteHandle:
    """One posted WRITE. Poll ``done()`` or block in ``wait()``; either releases the NIXL handle
    once the write is final. ``release()`` is only needed to abandon a write early."""

    def __init__(self, owner: NixlPool, transfer: Any, peer_agent_name: str) -> None:
        self._owner = owner
        self._transfer = transfer  # nixl_xfer_handle while live, None once released
        self.peer_agent_name = peer_agent_name
        self._complete = False
        self._error: str | None = None
        self._peer_lost = False

    def done(self) -> bool:
        """True once every region (and the notification) went out; raises NixlError if NIXL
        reported an error, or the write was aborted."""
        if self._complete:  # final and released: no need to wait for the lock behind a post's copy
            return True
        with self._owner._lock:
            if self._transfer is not None:
                self._poll_locked()
        if self._error is not None:
            raise NixlError(self._error, self._peer_lost)
        return self._complete

    @property
    def settled(self) -> bool:
        """Final (complete or failed) when last polled; asks NIXL nothing and takes no lock, so it never
        waits behind a post (``NixlPool.progress`` polls every write in flight)."""
        return self._transfer is None

    def wait(self, timeout: float) -> None:
        """Block until done. On error raises NixlError; on timeout aborts the write (its
        destination regions are then undefined) and raises NixlError."""
        deadline = time.monotonic() + timeout
        while not self.done():
            if time.monotonic() >= deadline:
                self._abort(f"write to {self.peer_agent_name} not complete after {timeout:.3g} s")
                if self._error is not None:  # else it finished at the last moment
                    raise NixlError(self._error, self._peer_lost)
                return
            time.sleep(_POLL_INTERVAL_S)

    def release(self) -> None:
        """Release the NIXL handle; a write still in flight is aborted. Idempotent."""
        self._abort(f"write to {self.peer_agent_name} was released before it completed")

    def _poll_locked(self) -> None:
        try:
            status = self._owner._agent.check_xfer_state(self._transfer)
        except Exception as error:  # the bindings raise one class per NIXL status
            self._finish_locked(f"write to {self.peer_agent_name} failed: {error!r}", _peer_lost(error))
            return
        if status == _DONE:
            self._finish_locked(None)
        elif status != _IN_PROGRESS:
            self._finish_locked(f"write to {self.peer_agent_name} failed: NIXL status {status}")

    def _abort(self, reason: str) -> None:
        with self._owner._lock:
            if self._transfer is not None:
                self._poll_locked()  # a write that finished meanwhile is not an abort
            if self._transfer is not None:
                self._finish_locked(reason)

    def _finish_locked(self, error: str | None, peer_lost: bool = False) -> None:
        """Final state reached (or forced): record it and release the NIXL handle. Caller holds the lock."""
        transfer, self._transfer = self._transfer, None
        self._owner._live_writes.discard(self)
        if error is None:
            self._complete = True
        else:
            self._error, self._peer_lost = error, peer_lost
        try:
            transfer.release()
        except Exception:
            # NIXL could not cancel a write in flight; close() tries again before the agent goes.
            self._owner._unreleased.append(transfer)


class NixlPool:
    """One NIXL agent (UCX backend) with one KV pool registered once, for its whole life.

    ``name`` must be unique among the agents that talk to each other. ``progress_thread`` turns
    on NIXL's progress thread, which busy-polls a whole core — wanted on RDMA/GPU hosts when no
    one polls, wasteful here (DRAM over UCX's CMA copies within the post anyway).
    """

    def __init__(self, name: str, pool: torch.Tensor, *, progress_thread: bool = False) -> None:
        if not pool.is_contiguous():
            raise ValueError("the KV pool must be one contiguous tensor")
        memory, device_id = _pool_memory(pool)
        self.name = name
        self.descriptor = PoolDescriptor(
            agent_name=name,
            base_address=pool.data_ptr(),
            nbytes=pool.numel() * pool.element_size(),
            device_id=device_id,
            memory=memory,
        )
        self._pool = pool  # keeps the registered memory alive as long as the agent
        self._lock = threading.RLock()
        # VRAM: UCX registers GPU memory in the current CUDA context, so make the pool's device current.
        with torch.cuda.device(pool.device) if memory == VRAM else contextlib.nullcontext():
            config = nixl_agent_config(enable_prog_thread=progress_thread, backends=["UCX"])
            self._agent: Any = nixl_agent(name, config)
            row = np.array([[self.descriptor.base_address, self.descriptor.nbytes, device_id]], dtype=np.uint64)
            self._registration = self._agent.register_memory(row, memory)
        self._peers: dict[str, bytes] = {}  # agent name -> the metadata we loaded
        self._local_grids: dict[int, Any] = {}  # region size -> prepared list over our pool
        self._remote_grids: dict[tuple[PoolDescriptor, int], Any] = {}  # (peer, size) -> prepared list
        self._live_writes: set[WriteHandle] = set()
        self._unreleased: list[Any] = []
        self._inbox: list[tuple[str, bytes]] = []  # notifications taken from NIXL, not yet polled
        self._closed = False

    # -- peers -------------------------------------------------------------------------------

    def metadata(self) -> bytes:
        """This agent's metadata (connection info + registered pool), for peers' ``add_peer``."""
        with self._lock:
            self._check_open()
            return self._agent.get_agent_metadata()

    def add_peer(self, metadata: bytes) -> str:
        """Load a peer's metadata so we can write to it; returns its agent name. Loading the same
        metadata again is a no-op; a restarted peer with the same name needs ``remove_peer`` first."""
        with self._lock:
            self._check_open()
            try:
                loaded = self._agent.add_remote_agent(metadata)
            except nixlNotAllowedError as error:
                raise NixlError(
                    "a peer with this agent name is already loaded with other metadata "
                    "(did it restart?); remove_peer(name) first"
                ) from error
            except Exception as error:
                raise NixlError(f"cannot load peer metadata: {error!r}") from error
            name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
            self._peers[name] = metadata
            return name

    def remove_peer(self, agent_name: str) -> None:
        """Forget a peer (e.g. it restarted): its writes in flight are aborted (their handles raise
        NixlError), its prepared lists released, its metadata dropped. Unknown names are ignored."""
        with self._lock:
            if self._closed or agent_name not in self._peers:
                return
            self._drop_peer_locked(agent_name)

    def peers(self) -> list[str]:
        with self._lock:
            return list(self._peers)

    # -- data path ---------------------------------------------------------------------------

    def write(
        self,
        peer: PoolDescriptor,
        src_offsets: Sequence[int],
        dst_offsets: Sequence[int],
        nbytes: int,
        notification: bytes,
    ) -> WriteHandle:
        """Post one NIXL WRITE of len(src_offsets) regions (each nbytes) from our pool into the
        peer's pool, with ``notification`` delivered to the peer once all of them have landed (an
        empty one: none; the caller may ``notify`` once the handle is done, which orders the same).
        Offsets are byte offsets from each pool's start, multiples of ``nbytes``.

        Never waits for the peer, but on DRAM the copy itself usually runs inside this call (UCX's
        CMA transport writes into the peer's memory while posting), so the caller pays about one
        memcpy of the data. Raises ValueError for bad offsets, NixlError if the peer is unknown,
        gone, or NIXL refuses."""
        if nbytes <= 0:
            raise ValueError(f"region size must be positive, got {nbytes}")
        src = _slot_indices(src_offsets, nbytes, "source")
        dst = _slot_indices(dst_offsets, nbytes, "destination")
        return self.write_slots(peer, src, dst, nbytes, notification)

    def write_slots(
        self, peer: PoolDescriptor, src_slots: np.ndarray, dst_slots: np.ndarray, nbytes: int, notification: bytes
    ) -> WriteHandle:
        """``write`` addressed by slot (offset // nbytes, int32 arrays): what a caller that thinks
        in (layer, block) regions computes in one vector step, with no per-region Python."""
        if nbytes <= 0:
            raise ValueError(f"region size must be positive, got {nbytes}")
        if len(src_slots) != len(dst_slots) or len(src_slots) == 0:
            raise ValueError(
                f"need as many source as destination regions, at least one "
                f"(got {len(src_slots)} and {len(dst_slots)}); use notify() for a bare message"
            )
        _check_slots(src_slots, self.descriptor.nbytes // nbytes, "source")
        _check_slots(dst_slots, peer.nbytes // nbytes, "destination")
        with self._lock:
            self._check_open()
            self._check_peer(peer.agent_name)
            try:
                local, remote = self._local_grid(nbytes), self._remote_grid(peer, nbytes)
                transfer = self._agent.make_prepped_xfer("WRITE", local, src_slots, remote, dst_slots, notification)
            except Exception as error:
                raise NixlError(f"cannot create write to {peer.agent_name}: {error!r}", _peer_lost(error)) from error
            handle = WriteHandle(self, transfer, peer.agent_name)
            self._live_writes.add(handle)
            self._post_locked(handle)
            return handle

    def notify(self, peer_agent_name: str, message: bytes) -> None:
        """Send ``message`` to a loaded peer without data. Not ordered with respect to writes."""
        with self._lock:
            self._check_open()
            self._check_peer(peer_agent_name)
            try:
                self._agent.send_notif(peer_agent_name, message)
            except Exception as error:
                raise NixlError(f"cannot notify {peer_agent_name}: {error!r}", _peer_lost(error)) from error

    def poll_notifications(self) -> list[tuple[str, bytes]]:
        """Notifications that arrived since the last poll, as (sender agent name, message); each
        sender's in the order it sent them (no order is defined across senders). A sender sends a
        write's notification when it sees the write complete, which need not be posting order.
        Also drives progress on this agent. Senders need not be loaded peers."""
        with self._lock:
            self._check_open()
            self._progress_agent_locked()
            arrived, self._inbox = self._inbox, []
        return arrived

    def progress(self, wait: bool = True) -> bool:
        """Poll every write in flight once: finished ones are released and their notifications
        sent (see "Progress" above); failures are kept for their handle's ``done()`` to raise.
        ``wait=False``: skip (return False) if another thread is inside the agent, e.g. posting a
        write."""
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            self._check_open()
            for handle in list(self._live_writes):
                handle._poll_locked()
            return True
        finally:
            self._lock.release()

    @property
    def pending_writes(self) -> int:
        """Writes posted and not yet final (their NIXL handles are live)."""
        with self._lock:
            return len(self._live_writes)

    # -- teardown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Abort writes in flight, release prepared lists, drop peers, deregister the pool and
        destroy the agent. Idempotent; every other method raises NixlError afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for name in list(self._peers):
                self._drop_peer_locked(name)
            for handle in list(self._live_writes):
                handle._finish_locked(f"pool {self.name} was closed")
            for transfer in self._unreleased:
                _quietly(transfer.release, f"release of an aborted write on {self.name}")
            self._unreleased.clear()
            for prepared in self._local_grids.values():
                _quietly(prepared.release, f"release of a prepared list on {self.name}")
            self._local_grids.clear()
            # UCX aborts the process when a worker is destroyed with a failed request's cleanup
            # still queued (seen after a write to a killed peer); one progress round flushes it.
            for _ in range(_TEARDOWN_PROGRESS_ROUNDS):
                _quietly(self._progress_agent_locked, f"progress before teardown of {self.name}")
            self._inbox.clear()
            _quietly(lambda: self._agent.deregister_memory(self._registration), f"deregistration on {self.name}")
            self._agent = None  # the agent is destroyed with its last reference

    def __enter__(self) -> NixlPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals (caller holds the lock) ---------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise NixlError(f"NIXL pool {self.name} is closed")

    def _check_peer(self, agent_name: str) -> None:
        if agent_name not in self._peers:
            raise NixlError(f"unknown peer {agent_name!r}: load its metadata with add_peer() first")

    def _post_locked(self, handle: WriteHandle) -> None:
        try:
            status = self._agent.transfer(handle._transfer)
        except Exception as error:  # e.g. the peer disconnected since we loaded it
            handle._finish_locked(f"write to {handle.peer_agent_name} failed: {error!r}", _peer_lost(error))
        else:
            if status == _DONE:
                handle._finish_locked(None)
            elif status != _IN_PROGRESS:
                handle._finish_locked(f"write to {handle.peer_agent_name} failed: NIXL status {status}")
        if handle._error is not None:
            self._progress_agent_locked()  # let UCX clean up the failed request now (see close())
            raise NixlError(handle._error, handle._peer_lost)

    def _progress_agent_locked(self) -> None:
        """One round of NIXL/UCX progress; notifications it yields wait in the inbox."""
        arrived = self._agent.get_new_notifs()
        self._inbox += [(str(sender), bytes(message)) for sender, messages in arrived.items() for message in messages]

    def _local_grid(self, nbytes: int) -> Any:
        prepared = self._local_grids.get(nbytes)
        if prepared is None:
            ours = self.descriptor
            rows = _grid(ours.base_address, ours.nbytes, nbytes, ours.device_id)
            prepared = self._agent.prep_xfer_dlist(_LOCAL, rows, ours.memory)
            self._local_grids[nbytes] = prepared
        return prepared

    def _remote_grid(self, peer: PoolDescriptor, nbytes: int) -> Any:
        prepared = self._remote_grids.get((peer, nbytes))
        if prepared is None:
            rows = _grid(peer.base_address, peer.nbytes, nbytes, peer.device_id)
            prepared = self._agent.prep_xfer_dlist(peer.agent_name, rows, peer.memory)
            self._remote_grids[(peer, nbytes)] = prepared
        return prepared

    def _drop_peer_locked(self, agent_name: str) -> None:
        for handle in [h for h in self._live_writes if h.peer_agent_name == agent_name]:
            handle._finish_locked(f"peer {agent_name} was removed while the write was in flight")
        for key in [key for key in self._remote_grids if key[0].agent_name == agent_name]:
            _quietly(self._remote_grids.pop(key).release, f"release of {agent_name}'s prepared list")
        del self._peers[agent_name]
        # If NIXL keeps the old metadata, a later add_peer of the new one says so.
        _quietly(lambda: self._agent.remove_remote_agent(agent_name), f"removal of peer {agent_name}")


def _quietly(teardown_step: Callable[[], object], what: str) -> None:
    """Run one teardown step; a failure is logged, never stops the rest of the teardown."""
    try:
        teardown_step()
    except Exception:
        logger.warning("NIXL %s failed", what, exc_info=True)
