"""KV over a gRPC client stream: P → D messages of (layer, destination blocks, bytes, checksum).

A layer's regions are copied out of the pool into messages of at most ``chunk_bytes`` at push time,
so the engine may reuse its blocks immediately; a sender thread owned by gRPC drains the queue.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence

import grpc

from engine.kv_cache import PagedKVCache
from kv_transfer.errors import TransferError
from kv_transfer.integrity import checksum
from kv_transfer.sender import KVSender, OutboundSession, Peer
from protos import common_pb2, decode_pb2, kv_transfer_pb2

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
_END = object()


class GrpcSession(OutboundSession):
    def __init__(self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer, chunk_bytes: int, verify: bool) -> None:
        super().__init__(request_id, ticket)
        self._chunk_bytes = chunk_bytes
        self._verify = verify
        self._outbox: queue.Queue = queue.Queue()
        self._call = peer.stub.PushKV.future(self._messages())
        self._call.add_done_callback(self._on_done)

    def _messages(self) -> Iterator[kv_transfer_pb2.KVChunk]:
        yield kv_transfer_pb2.KVChunk(request_id=self.request_id, instance_id=self.ticket.instance_id)
        while (message := self._outbox.get()) is not _END:
            yield message

    def _on_done(self, call: grpc.Future) -> None:
        if call.cancelled():
            self.fail("KV stream cancelled")
        elif call.exception() is not None:
            self.fail(f"decode worker refused the KV: {call.exception().details()}")

    def push_layer(self, cache: PagedKVCache, layer: int, src_blocks: Sequence[int], dst_blocks: Sequence[int]) -> None:
        if not self.lease_left():
            return
        per_message = max(1, self._chunk_bytes // cache.layout.region_bytes)
        for begin in range(0, len(src_blocks), per_message):
            src = list(src_blocks[begin : begin + per_message])
            data = _region_bytes(cache, layer, src)
            self._outbox.put(
                kv_transfer_pb2.KVChunk(
                    request_id=self.request_id,
                    layer=layer,
                    block_ids=dst_blocks[begin : begin + per_message],
                    data=data,
                    checksum=checksum(data) if self._verify else 0,
                )
            )
            self.bytes_sent += len(data)

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
            pass
        if self.failed is not None:
            raise TransferError(self.failed, "ABORTED")

    def abort(self, reason: str) -> None:
        self.fail(reason)
        self._outbox.put(kv_transfer_pb2.KVChunk(request_id=self.request_id, abort=True, abort_reason=reason))
        self._outbox.put(_END)


def _region_bytes(cache: PagedKVCache, layer: int, blocks: list[int]) -> bytes:
    return cache.read_regions(layer, blocks).cpu().numpy().tobytes()


class GrpcKVSender(KVSender):
    def __init__(
        self, layout: common_pb2.KVLayout, sender_id: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES, verify: bool = True
    ) -> None:
        super().__init__(layout, sender_id)
        self.chunk_bytes = chunk_bytes
        self.verify = verify

    def _session(self, request_id: str, ticket: decode_pb2.Ticket, peer: Peer) -> OutboundSession:
        return GrpcSession(request_id, ticket, peer, self.chunk_bytes, self.verify)
