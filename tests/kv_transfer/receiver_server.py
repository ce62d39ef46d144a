"""A KV receiver service behind a real gRPC server on loopback, as the transport tests set it up."""

from __future__ import annotations

from concurrent import futures

import grpc

from kv_transfer.receiver_service import KVReceiverService
from kv_transfer.sender import channel_options
from protos import kv_transfer_pb2_grpc


def serve_kv_receiver(service: KVReceiverService, interceptors=None) -> tuple[grpc.Server, str]:
    """Starts ``service`` on a free loopback port: the running server and its address."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors, options=channel_options()
    )
    kv_transfer_pb2_grpc.add_KVReceiverServicer_to_server(service, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    return server, address
