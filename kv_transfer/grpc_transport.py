"""KV over a gRPC client stream: P → D messages of (layer, destination blocks, bytes, checksum).

A layer's regions are copied out of the pool into messages of at most ``chunk_bytes`` at push time,
so the engine may reuse its blocks immediately; a sender thread owned by gRPC drains the queue.

A *staged* session (the pool is on a GPU, or a layer's ``ready`` had not completed) never reads
the pool on the engine thread: on CUDA a side stream waits for ``ready`` and copies the regions
into a pinned host buffer; the gRPC sender thread waits for that copy before it builds the message.
Without CUDA the sender thread itself waits for ``ready``, then reads. Either way the pool is read
after ``push_layer`` returned, so a staged session has ``reads_after_push`` and ``release`` waits
for those reads (see kv_transfer/sender.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import grpc
import torch

from engine.kv_cache import PagedKVCache
from engine.layer_ready import COMPLETED, LayerReady
from kv_transfer.errors import TransferError
from kv_transfer.integrity import checksum
from kv_transfer.sender import KVSender, OutboundSession, Peer, block_pieces
from protos import common_pb2, decode_pb2, kv_transfer_pb2
from protos.cluster_auth import ClusterAuth

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
_END = object()


class GrpcSession(OutboundSession):
    def __init__(
        self,
        request_id: str,
        ticket: decode_pb2.Ticket,
        peer: Peer,
        chunk_bytes: int,
        verify: bool,
        staged: bool = False,
        copy_streams: dict | None = None,
        metadata=None,
    ) -> None:
        super().__init__(request_id, ticket, metadata)
        self._chunk_bytes = chunk_bytes
        self._verify = verify
        self.reads_after_push = staged
        self._copy_streams = copy_streams if copy_streams is not None else {}
        self._staged: list[_StagedRegions] = []  # every staged read of this session, for release()
        self._outbox: queue.Queue = queue.Queue()
        self._call = peer.stub.PushKV.future(self._messages(), metadata=metadata)
        self._call.add_done_callback(self._on_done)

    def _messages(self) -> Iterator[kv_transfer_pb2.KVChunk]:
        yield kv_transfer_pb2.KVChunk(
            request_id=self.request_id, instance_id=self.ticket.instance_id, token=self.ticket.token
        )
        while (message := self._outbox.get()) is not _END:
            if isinstance(message, _StagedRegions):
                message = self._staged_message(message)
                if message is None:
                    continue  # the session was released before this read: it is never sent
            yield message

    def _on_done(self, call: grpc.Future) -> None:
        if call.cancelled():
            self.fail("KV stream cancelled")
        elif (exc := call.exception()) is not None:
            self.fail_call(exc)

    def push_layer(
        self,
        cache: PagedKVCache,
        layer: int,
        src_blocks: Sequence[int],
        dst_blocks: Sequence[int],
        ready: LayerReady = COMPLETED,
    ) -> None:
        if self.closed or not self.lease_left():
            return
        if self.reads_after_push:
            self._push_staged(cache, layer, src_blocks, dst_blocks, ready)
            return
        ready.synchronize()  # unstaged sessions serve CPU pools, whose layers are complete already
        for src, dst in block_pieces(src_blocks, dst_blocks, cache.layout.region_bytes, self._chunk_bytes):
            data = _region_bytes(cache, layer, src)
            self._outbox.put(
                kv_transfer_pb2.KVChunk(
                    request_id=self.request_id,
                    layer=layer,
                    block_ids=dst,
                    data=data,
                    checksum=checksum(data) if self._verify else 0,
                )
            )
            self.bytes_sent += len(data)

    def _push_staged(self, cache, layer, src_blocks, dst_blocks, ready: LayerReady) -> None:
        for src, dst in block_pieces(src_blocks, dst_blocks, cache.layout.region_bytes, self._chunk_bytes):
            staged = stage_regions(cache, layer, src, dst, ready, self._copy_streams)
            self._staged.append(staged)
            self._outbox.put(staged)
            self.bytes_sent += len(src) * cache.layout.region_bytes

    def _staged_message(self, staged: _StagedRegions) -> kv_transfer_pb2.KVChunk | None:
        """Sender thread: wait for the regions (never the engine's business), then build the message."""
        data = staged.take()
        if data is None:
            return None
        return kv_transfer_pb2.KVChunk(
            request_id=self.request_id,
            layer=staged.layer,
            block_ids=staged.dst_blocks,
            data=data,
            checksum=checksum(data) if self._verify else 0,
        )

    def release(self, timeout: float) -> None:
        """Staged: returns once no staged read of this session touches the pool any more — each one
        either finished or will never start."""
        staged, self._staged = self._staged, []
        for item in staged:
            item.stop_reading()

    def commit(self, first_token_id: int, first_logprob: common_pb2.TokenLogprob | None, timeout: float) -> None:
        if self.failed is None and self.lease_left():
            message = kv_transfer_pb2.KVChunk(request_id=self.request_id, commit=True, first_token_id=first_token_id)
            if first_logprob is not None:
                message.first_logprob.CopyFrom(first_logprob)
            self._outbox.put(message)
        self._outbox.put(_END)
        try:
            self._call.result(timeout=timeout)
        except grpc.FutureTimeoutError as exc:
            self._call.cancel()
            raise TransferError("decode worker did not acknowledge the KV in time", "DEADLINE_EXCEEDED") from exc
        except grpc.RpcError:
            pass  # _on_done said why
        if self.failed is not None:
            raise self.failure()

    def abort(self, reason: str) -> None:
        self.fail(reason)
        self._outbox.put(kv_transfer_pb2.KVChunk(request_id=self.request_id, abort=True, abort_reason=reason))
        self._outbox.put(_END)


def _region_bytes(cache: PagedKVCache, layer: int, blocks: list[int]) -> bytes:
    return cache.read_regions(layer, blocks).cpu().numpy().tobytes()


def stage_regions(cache: PagedKVCache, layer: int, src_blocks, dst_blocks, ready: LayerReady, copy_streams: dict):
    """The regions of one message or frame, read off the engine thread (``_StagedRegions``): for a CUDA
    pool the copy into pinned host memory is queued now, on the device's side stream in ``copy_streams``."""
    staged = _StagedRegions(cache, layer, list(src_blocks), dst_blocks, ready)
    if cache.data.is_cuda:
        device = cache.data.device
        if device not in copy_streams:
            copy_streams[device] = torch.cuda.Stream(device)
        staged.copy_on_side_stream(copy_streams[device])
    return staged


class _StagedRegions:
    """One message's regions, read from the pool only after the layer's ``ready`` completed.

    CUDA: ``copy_on_side_stream`` queues, at push time, the gather and a copy into pinned host
    memory on a side stream that first waits for ``ready``; the pool is read by that copy.
    Otherwise: ``take`` (on the sender thread) waits for ``ready`` and reads the pool then.
    ``stop_reading`` returns once the pool is no longer read: it waits for a read under way and
    keeps one not yet started from ever starting.
    """

    def __init__(self, cache: PagedKVCache, layer: int, src_blocks: list[int], dst_blocks, ready: LayerReady):
        self.cache = cache
        self.layer = layer
        self.src_blocks = src_blocks
        self.dst_blocks = list(dst_blocks)
        self.ready = ready
        self._host: torch.Tensor | None = None
        self._copied = None  # torch.cuda.Event behind the side-stream copy
        self._lock = threading.Lock()
        self._stopped = False

    def copy_on_side_stream(self, stream) -> None:
        device = self.cache.data.device
        with torch.cuda.stream(stream):
            stream.wait_event(self.ready)  # the side stream waits; compute and this thread do not
            index = torch.tensor(self.src_blocks, dtype=torch.long).pin_memory().to(device, non_blocking=True)
            regions = self.cache.read_regions(self.layer, index)
            self._host = torch.empty(regions.shape, dtype=torch.uint8, pin_memory=True)
            self._host.copy_(regions, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(stream)

    def take(self) -> bytes | None:
        if self._copied is not None:
            return self.host_view().tobytes()
        self.ready.synchronize()  # outside the lock: stop_reading meanwhile need not wait for the layer
        with self._lock:
            if self._stopped:
                return None
            data = _region_bytes(self.cache, self.layer, self.src_blocks)
            self._stopped = True  # read once; the pool is not touched again
            return data

    def host_view(self) -> memoryview | bytes | None:
        """The regions in host memory, back to back, without another copy where they are staged
        (CUDA: the pinned buffer, once the side-stream copy finished); else as ``take``."""
        if self._copied is None:
            return self.take()
        self._copied.synchronize()
        return memoryview(self._host.numpy().reshape(-1))

    def stop_reading(self) -> None:
        with self._lock:
            self._stopped = True
            if self._copied is not None:
                self._copied.synchronize()


class GrpcKVSender(KVSender):
    def __init__(
        self,
        layout: common_pb2.KVLayout,
        sender_id: str,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        verify: bool = True,
        staged: bool = False,
        auth: ClusterAuth | None = None,
    ) -> None:
        """``staged``: read each layer off the engine thread once its ``ready`` completed (required
        for a CUDA pool; see the module docstring)."""
        super().__init__(layout, sender_id, auth)
        self.chunk_bytes = chunk_bytes
        self.verify = verify
        self.staged = staged
        self._copy_streams: dict = {}  # device -> the side stream staged copies run on

    def _session(self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer, metadata) -> OutboundSession:
        return GrpcSession(
            request_id, ticket, peer, self.chunk_bytes, self.verify, self.staged, self._copy_streams, metadata
        )
