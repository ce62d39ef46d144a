"""Who may talk to a worker, server side: the cluster-secret interceptor, mutual TLS, peer identity,
and the per-peer limits that keep one peer from holding every block or every RPC thread.

The secret is compared in constant time on every call except the standard health check
(``protos.cluster_auth.UNAUTHENTICATED_PREFIXES``): liveness reveals nothing, and Kubernetes probes
the router over HTTP, never a worker's gRPC. A refused call is UNAUTHENTICATED and never reaches a
servicer.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import threading

import grpc

from protos.cluster_auth import SECRET_METADATA, UNAUTHENTICATED_PREFIXES, ClusterAuth, add_port


class ClusterSecretInterceptor(grpc.ServerInterceptor):
    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        if method.startswith(UNAUTHENTICATED_PREFIXES):
            return continuation(handler_call_details)
        presented = ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == SECRET_METADATA:
                presented = value if isinstance(value, str) else value.decode(errors="replace")
        if hmac.compare_digest(presented.encode(), self._secret):
            return continuation(handler_call_details)
        return _refusal(continuation(handler_call_details))


def _refusal(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    """A handler of the same shape as ``handler`` that refuses the call before reading it."""
    if handler is None:
        return None  # unknown method: UNIMPLEMENTED, as without the interceptor

    def refuse(request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "this worker accepts calls from cluster members only")

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def server_interceptors(auth: ClusterAuth) -> list[grpc.ServerInterceptor]:
    return [ClusterSecretInterceptor(auth.secret)] if auth.secret else []


def bind(server: grpc.Server, address: str, auth: ClusterAuth, listener: str = "") -> int:
    """Listens on exactly ``address`` (TLS requiring a client certificate when configured); the port. ListenError
    (an OSError) where it cannot: its port in use by another process, a host that is not this machine's."""
    if auth.tls is None:
        return add_port(server, address, listener=listener)
    cert, key, ca = auth.tls.read()
    credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    return add_port(server, address, credentials, listener)


def advertised_host(host: str, advertise: str | None = None) -> str:
    """The host a worker names in its address (its tickets, its READY line, the controller's records): the one
    peers dial. ``advertise`` if given, else ``host`` — unless ``host`` is a wildcard (0.0.0.0, ::), which
    listens everywhere but names nowhere a peer can reach: then the address of the interface this host's default
    route leaves by (found without sending a packet). ValueError naming --advertise-host if there is none."""
    if advertise:
        return advertise
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False
    if not wildcard:
        return host
    family, probe = (socket.AF_INET6, "2001:db8::1") if ":" in host else (socket.AF_INET, "192.0.2.1")
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.connect((probe, 9))  # picks the route and source address; a UDP connect sends nothing
            return udp.getsockname()[0]
    except OSError as exc:
        raise ValueError(
            f"--host {host} listens on every address, but peers need one they can reach and this host has no "
            f"default route to pick it by ({exc.strerror}): give it with --advertise-host"
        ) from exc


def confine_listeners(host: str) -> None:
    """Before any NIXL agent exists: a worker bound to loopback keeps UCX's TCP listener on loopback
    too (UCX otherwise listens on every network device). A worker on a node address leaves UCX its
    devices (RDMA NICs are among them): constrain them with UCX_NET_DEVICES, which always wins."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        os.environ.setdefault("UCX_NET_DEVICES", "lo")


def peer_of(context: grpc.ServicerContext) -> str:
    """The calling peer for per-peer limits: its IP address (connections and ports are cheap to
    multiply, addresses are not)."""
    peer = context.peer() or "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer


class PeerLimit:
    """At most ``per_peer`` holds per peer and ``total`` in all; ``acquire`` says False beyond. Any thread."""

    def __init__(self, per_peer: int, total: int) -> None:
        self.per_peer = per_peer
        self.total = total
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, peer: str) -> bool:
        with self._lock:
            if self._held.get(peer, 0) >= self.per_peer or sum(self._held.values()) >= self.total:
                return False
            self._held[peer] = self._held.get(peer, 0) + 1
            return True

    def release(self, peer: str) -> None:
        with self._lock:
            left = self._held.get(peer, 0) - 1
            if left > 0:
                self._held[peer] = left
            else:
                self._held.pop(peer, None)
