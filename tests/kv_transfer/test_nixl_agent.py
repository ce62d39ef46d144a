"""NixlPool over real NIXL/UCX between real processes (DRAM, CPU).

The test process plays the prefill worker P; each decode worker D is a spawned process that
serves its pool and answers commands (msgpack over a pipe, as the real handshake would be).
"""

from __future__ import annotations

import multiprocessing
import random
import time
import uuid

import msgpack
import pytest
import torch

from engine.kv_cache import KVLayout, PagedKVCache
from kv_transfer.nixl_agent import NixlError, NixlPool, PoolDescriptor

pytestmark = pytest.mark.timeout(120)  # a guard against hangs; the suite takes ~15 s on an idle machine

LAYOUT = KVLayout(num_layers=3, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")
REGION = LAYOUT.region_bytes
ANSWER_TIMEOUT_S = 45.0  # a spawned process imports torch and NIXL before it answers; slow under load


def _send(conn, message: dict) -> None:
    conn.send_bytes(msgpack.packb(message))


def _receive(conn, timeout: float) -> dict:
    if not conn.poll(timeout):
        raise AssertionError(f"no answer within {timeout} s")
    return msgpack.unpackb(conn.recv_bytes())


def _serve_pool(conn, name: str) -> None:
    """Body of a decode process: one zeroed pool behind a NixlPool, driven by the test's commands."""
    torch.set_num_threads(1)
    cache = PagedKVCache(LAYOUT)
    with NixlPool(name, cache.data) as pool:
        _send(conn, {"metadata": pool.metadata(), "descriptor": pool.descriptor.to_dict()})
        received: list[tuple[str, bytes]] = []
        while True:
            received += pool.poll_notifications()
            if not conn.poll(0.001):
                continue
            command = _receive(conn, 0)
            if command["op"] == "stop":
                return
            if command["op"] == "pool":
                _send(conn, {"pool": cache.data.numpy().tobytes()})
            elif command["op"] == "reset":
                cache.data.zero_()
                received = []
                _send(conn, {})
            elif command["op"] == "take_notifications":
                received = _collect(pool, received, command["count"], command["timeout"], command["grace"])
                _send(conn, {"notifications": [list(item) for item in received]})
                received = []


def _collect(
    pool: NixlPool, collected: list[tuple[str, bytes]], count: int, timeout: float, grace: float
) -> list[tuple[str, bytes]]:
    """Poll until `count` notifications arrived in all (or timeout), then `grace` more to catch duplicates."""
    collected = list(collected)
    deadline = time.monotonic() + timeout
    while len(collected) < count and time.monotonic() < deadline:
        collected += pool.poll_notifications()
        time.sleep(0.0005)
    grace_end = time.monotonic() + grace
    while time.monotonic() < grace_end:
        collected += pool.poll_notifications()
        time.sleep(0.001)
    return collected


class DecodeProcess:
    """A spawned decode process serving a NIXL-registered pool."""

    def __init__(self, name: str) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(target=_serve_pool, args=(child_conn, name), daemon=True)
        self._process.start()
        child_conn.close()
        try:
            hello = _receive(self._conn, ANSWER_TIMEOUT_S)
        except BaseException:
            self.kill()
            raise
        self.metadata: bytes = hello["metadata"]
        self.descriptor = PoolDescriptor.from_dict(hello["descriptor"])

    def take_notifications(self, count: int, grace: float = 0.2) -> list[tuple[str, bytes]]:
        _send(self._conn, {"op": "take_notifications", "count": count, "timeout": 10.0, "grace": grace})
        return [(sender, message) for sender, message in _receive(self._conn, ANSWER_TIMEOUT_S)["notifications"]]

    def reset(self) -> None:
        """Zero the pool and forget notifications: a fresh decode worker, minus the start-up."""
        _send(self._conn, {"op": "reset"})
        _receive(self._conn, ANSWER_TIMEOUT_S)

    def pool(self) -> torch.Tensor:
        _send(self._conn, {"op": "pool"})
        raw = bytearray(_receive(self._conn, ANSWER_TIMEOUT_S)["pool"])
        return torch.frombuffer(raw, dtype=torch.float32).view(PagedKVCache(LAYOUT).data.shape)

    def kill(self) -> None:
        self._process.kill()
        self._process.join(5)

    def stop(self) -> None:
        if self._process.is_alive():
            try:
                _send(self._conn, {"op": "stop"})
            except (BrokenPipeError, OSError):
                pass
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()

    def __enter__(self) -> DecodeProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@pytest.fixture
def prefill():
    """P: a pool of distinct random regions, in the test process."""
    cache = PagedKVCache(LAYOUT)
    cache.data.copy_(torch.randn(cache.data.shape, generator=torch.Generator().manual_seed(7)))
    with NixlPool(f"prefill-{uuid.uuid4().hex[:8]}", cache.data) as pool:
        yield pool, cache.data


@pytest.fixture(scope="module")
def shared_decode():
    with DecodeProcess(f"decode-{uuid.uuid4().hex[:8]}") as decode:
        yield decode


@pytest.fixture
def decode(shared_decode):
    shared_decode.reset()
    return shared_decode


def _offsets(pairs: list[tuple[int, int]]) -> list[int]:
    return [LAYOUT.region_offset(layer, block) for layer, block in pairs]


def _expected_pool(source: torch.Tensor, moves: list[tuple[int, int, int]]) -> torch.Tensor:
    """A zeroed pool holding source[layer, src_block] at [layer, dst_block] for each move."""
    expected = torch.zeros_like(source)
    for layer, src_block, dst_block in moves:
        expected[layer, dst_block] = source[layer, src_block]
    return expected


def _write(pool: NixlPool, peer: PoolDescriptor, moves: list[tuple[int, int, int]], notification: bytes):
    src = _offsets([(layer, src_block) for layer, src_block, _ in moves])
    dst = _offsets([(layer, dst_block) for layer, _, dst_block in moves])
    return pool.write(peer, src, dst, REGION, notification)


def test_write_lands_at_other_blocks_and_leaves_the_rest(prefill, decode):
    pool, source = prefill
    regions = source.reshape(LAYOUT.num_layers * LAYOUT.num_blocks, -1)
    assert len({tuple(region.tolist()) for region in regions}) == len(regions)  # all distinct

    moves = [(layer, src, dst) for layer in range(LAYOUT.num_layers) for src, dst in [(1, 7), (4, 0), (6, 3)]]
    assert pool.add_peer(decode.metadata) == decode.descriptor.agent_name
    _write(pool, decode.descriptor, moves, b"req-1/all-layers").wait(10)
    assert pool.pending_writes == 0

    assert decode.take_notifications(1) == [(pool.name, b"req-1/all-layers")]
    assert torch.equal(decode.pool(), _expected_pool(source, moves))

    pool.notify(decode.descriptor.agent_name, b"hello without data")
    assert decode.take_notifications(1) == [(pool.name, b"hello without data")]


def test_many_writes_each_notify_exactly_once(prefill, decode):
    pool, source = prefill
    rng = random.Random(3)
    # Every destination region once (in shuffled order), each from a random source block.
    destinations = [(layer, block) for layer in range(LAYOUT.num_layers) for block in range(LAYOUT.num_blocks)]
    rng.shuffle(destinations)
    moves = [(layer, rng.randrange(LAYOUT.num_blocks), dst_block) for layer, dst_block in destinations]
    pool.add_peer(decode.metadata)
    handles = [_write(pool, decode.descriptor, [move], f"write-{i}".encode()) for i, move in enumerate(moves)]
    deadline = time.monotonic() + 10
    while pool.pending_writes and time.monotonic() < deadline:
        pool.progress()  # one call drives every write (and sends its notification)
    assert pool.pending_writes == 0
    assert all(handle.done() for handle in handles)

    notifications = decode.take_notifications(len(moves), grace=0.3)
    assert sorted(message for _, message in notifications) == sorted(f"write-{i}".encode() for i in range(len(moves)))
    assert {sender for sender, _ in notifications} == {pool.name}
    assert torch.equal(decode.pool(), _expected_pool(source, moves))


@pytest.mark.parametrize("first_ends", ["exits", "is_killed"])
def test_restarted_peer_is_replaced_and_written(prefill, first_ends):
    pool, source = prefill
    name = f"decode-{uuid.uuid4().hex[:8]}"
    first_moves, second_moves = [(0, 2, 5)], [(2, 3, 1), (1, 0, 6)]

    with DecodeProcess(name) as first:
        pool.add_peer(first.metadata)
        _write(pool, first.descriptor, first_moves, b"to-first").wait(10)
        assert first.take_notifications(1) == [(pool.name, b"to-first")]
        if first_ends == "is_killed":
            first.kill()
    # The old incarnation is gone: an error, not a hang. (After a kill this used to leave UCX
    # state that aborted the process when the pool closed — the fixture's close checks that.)
    with pytest.raises(NixlError):
        _write(pool, first.descriptor, first_moves, b"to-the-dead").wait(10)
    assert pool.pending_writes == 0

    with DecodeProcess(name) as second:
        with pytest.raises(NixlError, match="remove_peer"):
            pool.add_peer(second.metadata)
        pool.remove_peer(name)
        assert pool.add_peer(second.metadata) == name
        _write(pool, second.descriptor, second_moves, b"to-second").wait(10)
        assert second.take_notifications(1) == [(pool.name, b"to-second")]
        assert torch.equal(second.pool(), _expected_pool(source, second_moves))


def test_write_to_a_peer_never_added_is_refused(prefill):
    pool, _ = prefill
    stranger = PoolDescriptor("never-added", base_address=1 << 20, nbytes=4 * REGION, device_id=0, memory="DRAM")
    with pytest.raises(NixlError, match="add_peer"):
        pool.write(stranger, [0], [REGION], REGION, b"x")
    with pytest.raises(NixlError, match="add_peer"):
        pool.notify("never-added", b"x")
    assert pool.pending_writes == 0


def test_offsets_are_checked_before_nixl_sees_them(prefill):
    pool, _ = prefill
    peer = PoolDescriptor("anyone", base_address=1 << 20, nbytes=4 * REGION, device_id=0, memory="DRAM")
    with pytest.raises(ValueError, match="multiples"):
        pool.write(peer, [1], [0], REGION, b"x")  # unaligned source
    with pytest.raises(ValueError, match="inside"):
        pool.write(peer, [0], [4 * REGION], REGION, b"x")  # past the peer's pool
    with pytest.raises(ValueError, match="as many"):
        pool.write(peer, [0, REGION], [0], REGION, b"x")


def test_descriptor_round_trips_through_msgpack_and_checks_version(prefill):
    pool, data = prefill
    descriptor = PoolDescriptor.from_dict(msgpack.unpackb(msgpack.packb(pool.descriptor.to_dict())))
    assert descriptor == pool.descriptor
    assert (descriptor.base_address, descriptor.nbytes, descriptor.memory) == (data.data_ptr(), data.nbytes, "DRAM")
    with pytest.raises(ValueError, match="version"):
        PoolDescriptor.from_dict({**pool.descriptor.to_dict(), "version": 99})


def test_close_is_idempotent_and_final(prefill):
    pool, _ = prefill
    pool.close()
    pool.close()
    with pytest.raises(NixlError, match="closed"):
        pool.metadata()
    with pytest.raises(NixlError, match="closed"):
        pool.poll_notifications()
