"""A KV receiver service behind a real gRPC server on loopback, as the transport tests set it up."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures

import grpc

from kv_transfer.receiver_service import KVReceiverService
from kv_transfer.sender import channel_options
from protos import common_pb2, decode_pb2, kv_transfer_pb2_grpc
from protos.cluster_auth import server_options


def serve_kv_receiver(
    service: KVReceiverService, interceptors=None, port: int = 0, host: str = "127.0.0.1"
) -> tuple[grpc.Server, str]:
    """Starts ``service`` on ``host`` (loopback by default), on ``port`` (a free one by default): the running server
    and its address."""
    options = [*channel_options(), *server_options()]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors, options=options)
    kv_transfer_pb2_grpc.add_KVReceiverServicer_to_server(service, server)
    address = f"{host}:{server.add_insecure_port(f'{host}:{port}')}"
    server.start()
    return server, address


def loopback_ticket(
    request_id: str,
    transport: str,
    address: str,
    layout: common_pb2.KVLayout,
    block_ids: Sequence[int],
    token: str = "",
) -> decode_pb2.Ticket:
    """The ticket a decode worker would hand out for ``block_ids`` of the receiver at ``address``, 60 s of lease."""
    return decode_pb2.Ticket(
        request_id=request_id,
        block_ids=block_ids,
        transport=transport,
        address=address,
        layout=layout,
        lease_ms=60_000,
        worker_id="decode",
        instance_id="instance-1",
        token=token,
    )
