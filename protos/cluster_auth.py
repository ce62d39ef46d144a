"""Who may talk to a worker: the cluster secret and (optionally) mutual TLS, client side.

Every gRPC call to a worker carries the cluster secret in its metadata (``SECRET_METADATA``); the
worker's server interceptor (worker_server/security.py) refuses any other call with
UNAUTHENTICATED, except the standard health check. With TLS files configured the channel is also
mutual TLS: the worker presents its certificate and requires ours, both signed by the cluster CA.

Where it comes from — the environment or a file, never a command line (``ps`` shows those):

    SPLITSERVE_CLUSTER_SECRET        the secret itself
    SPLITSERVE_CLUSTER_SECRET_FILE   or a file holding it (a mounted Kubernetes Secret)
    SPLITSERVE_TLS_CERT / _KEY / _CA PEM paths: this process's certificate, its key, the cluster CA
    SPLITSERVE_TLS_SERVER_NAME       the name worker certificates carry (when it is not their address)

Everyone imports this module (router, workers, control plane, benchmarks): it lives in ``protos``
beside the stubs it wraps, and needs nothing but grpc.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

SECRET_ENV = "SPLITSERVE_CLUSTER_SECRET"
SECRET_FILE_ENV = "SPLITSERVE_CLUSTER_SECRET_FILE"
TLS_CERT_ENV = "SPLITSERVE_TLS_CERT"
TLS_KEY_ENV = "SPLITSERVE_TLS_KEY"
TLS_CA_ENV = "SPLITSERVE_TLS_CA"
TLS_SERVER_NAME_ENV = "SPLITSERVE_TLS_SERVER_NAME"
SECRET_METADATA = "x-splitserve-cluster-secret"
# Reconnecting to a member (gRPC's connection backoff, doc/connection-backoff.md): a connect attempt is given
# MIN_CONNECT_TIMEOUT_MS (gRPC's own is 20 s, through which a host that drops packets holds the channel in
# CONNECTING), and the next one starts 1 s later, growing 1.6x per failure up to MAX_RECONNECT_BACKOFF_MS
# (gRPC's own is 120 s). A member back from an outage of any length is reached within ~7 s of its return.
MIN_CONNECT_TIMEOUT_MS = 5000
MAX_RECONNECT_BACKOFF_MS = 2000
# While a call is in flight on a member's channel, the channel pings the member every KEEPALIVE_TIME_MS, and a
# ping not answered within KEEPALIVE_TIMEOUT_MS ends the connection and its calls (UNAVAILABLE): a host whose
# packets vanish mid-call (its link down, a switch failed) is lost within ~10 s, not when TCP gives up (~15 min)
# or the call's deadline passes. HTTP/2 pings are answered by gRPC's own threads, so a busy worker answers them.
# A member's server pings its callers the same way while their calls are in flight: a decode worker whose router
# vanished mid-stream stops that stream (and frees its blocks) within ~10 s, not after decoding it for nobody.
KEEPALIVE_TIME_MS = 5000
KEEPALIVE_TIMEOUT_MS = 5000
# gRPC (1.85) times an unanswered ping on a connection with calls in flight by its HTTP/2 ping timeout (default 60 s),
# not by keepalive_timeout_ms: both channels and servers of ours set it to the keepalive timeout.
_PING_TIMEOUT = (("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),)
# Plain TCP connections give a silent peer as long (end_silent_peers): bulk KV links, the router's HTTP clients.
PEER_SILENCE_S = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000
# Methods a worker answers without the secret: liveness tells nothing about the cluster.
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)
MISSING_SECRET_HELP = (
    f"no cluster secret: set {SECRET_ENV} (e.g. `export {SECRET_ENV}=$(openssl rand -hex 32)`) or "
    f"{SECRET_FILE_ENV} to a file holding it, the same for every worker and router of the cluster"
)


@dataclass(frozen=True)
class TLSFiles:
    """PEM paths for mutual TLS between cluster members."""

    cert: str
    key: str
    ca: str
    server_name: str | None = None  # override for the name checked in a worker's certificate

    def read(self) -> tuple[bytes, bytes, bytes]:
        return Path(self.cert).read_bytes(), Path(self.key).read_bytes(), Path(self.ca).read_bytes()


@dataclass(frozen=True)
class ClusterAuth:
    """One process's credentials as a cluster member. ``secret`` None: an insecure (by-hand, opted-in) cluster."""

    secret: str | None = field(default=None, repr=False)
    tls: TLSFiles | None = None

    @classmethod
    def from_env(cls, secret: str | None = None) -> ClusterAuth:
        """``secret`` given (a control plane handed it over) wins over the environment."""
        return cls(secret=secret or secret_from_env(), tls=tls_from_env())

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((SECRET_METADATA, self.secret),) if self.secret else ()

    def channel(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
        """A blocking channel to a worker that presents our credentials on every call."""
        options = [*options, *self._member_options()]
        if self.tls is not None:
            channel = grpc.secure_channel(address, self._channel_credentials(), options=options)
        else:
            channel = grpc.insecure_channel(address, options=options)
        return grpc.intercept_channel(channel, _SecretInterceptor(self.metadata())) if self.secret else channel

    def aio_channel(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
        """The asyncio flavour of ``channel`` (the router, the controller)."""
        options = [*options, *self._member_options()]
        interceptors = _aio_interceptors(self.metadata()) if self.secret else None
        if self.tls is not None:
            return grpc.aio.secure_channel(
                address, self._channel_credentials(), options=options, interceptors=interceptors
            )
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = self.tls.read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)

    def _member_options(self) -> list[tuple[str, object]]:
        """Options every channel between cluster members takes."""
        options: list[tuple[str, object]] = [
            ("grpc.min_reconnect_backoff_ms", MIN_CONNECT_TIMEOUT_MS),  # the connect timeout, despite its name
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            *_PING_TIMEOUT,
            ("grpc.http2.max_pings_without_data", 0),  # a call that only receives (a stream of tokens) pings too
        ]
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options


def end_silent_peers(sock: socket.socket, unacknowledged: bool = True) -> None:
    """A TCP socket (or a listener, whose accepted sockets inherit it) that ends its connection once the peer has
    been silent PEER_SILENCE_S: on an idle connection, keepalive probes it does not answer (the first after
    KEEPALIVE_TIME_MS of silence, then one a second); with ``unacknowledged``, also data it has not acknowledged for
    that long (TCP_USER_TIMEOUT). A peer whose host vanished (its link down, packets dropped, neither end told) is
    noticed as the cluster's gRPC channels notice it, not when TCP gives up (~15 min). A slow link still
    acknowledges; but TCP_USER_TIMEOUT also ends a peer that stops reading for that long (its window shut), so it is
    for peers of ours that always read (bulk KV links), not for clients (router/http_protocol.py watches theirs)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    probe_interval_s = 1
    options = [
        ("TCP_KEEPIDLE", KEEPALIVE_TIME_MS // 1000),
        ("TCP_KEEPINTVL", probe_interval_s),
        ("TCP_KEEPCNT", KEEPALIVE_TIMEOUT_MS // 1000 // probe_interval_s),  # unanswered for KEEPALIVE_TIMEOUT_MS
    ]
    if unacknowledged:
        options.append(("TCP_USER_TIMEOUT", int(PEER_SILENCE_S * 1000)))
    for name, value in options:
        if hasattr(socket, name):  # TCP_USER_TIMEOUT is Linux's: elsewhere TCP's own timeouts stand
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def server_options() -> list[tuple[str, object]]:
    """Every gRPC server of ours (a worker's, the router's public one) is made with these.

    - It takes its clients' keepalive pings, one every KEEPALIVE_TIME_MS / 2 at most while it sends nothing (gRPC's
      default counts a ping within 5 min of the last as a strike, and closes the connection after two: every call
      on it would fail, a long prefill's too), and pings them in turn while their calls are in flight, so a caller
      that vanished is let go within PEER_SILENCE_S.
    - It never shares its port (no SO_REUSEPORT, gRPC's default on Linux): a second router or worker told to listen
      where one already does fails to start (``add_port``), where the kernel would otherwise split the clients'
      connections between the two, each answering as itself."""
    return [
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        *_PING_TIMEOUT,
        ("grpc.so_reuseport", 0),
    ]


class ListenError(OSError):
    """A server of ours cannot listen where it was told to; the message names the address and why (``reason``)."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


def cannot_listen(address: str, reason: str, listener: str = "") -> ListenError:
    """The error naming the address, why, and (``listener``) what listens there and the flag that moves it."""
    return ListenError(f"cannot listen on {address}: {reason}" + (f" ({listener})" if listener else ""), reason)


def add_port(server, address: str, credentials: grpc.ServerCredentials | None = None, listener: str = "") -> int:
    """``server`` (made with ``server_options``) listens on ``address`` (``host:port``; port 0: a free one), with
    ``credentials`` if given; the port. ListenError (``cannot_listen``, naming ``listener``) gives the OS's reason
    when it cannot: asked of the OS first, so that gRPC's own error line is not printed above ours."""
    host, _, wanted = address.rpartition(":")
    reason = unbindable(host.strip("[]"), int(wanted)) if wanted.isdigit() and int(wanted) else None
    if reason is None:
        try:
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError:  # gRPC raises where older versions returned 0
            port = 0
        if port:
            return port
        reason = "gRPC could not bind it"
    raise cannot_listen(address, reason, listener)


def bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, not listening yet, as our listeners bind: IPv6 for an address with a
    colon, else IPv4 (a name such as ``localhost`` resolves to its IPv4 address, as uvicorn binds it); SO_REUSEADDR (a
    port a stopped server left in TIME_WAIT is taken again at once), never SO_REUSEPORT (a port another server
    listens on is refused). Raises OSError as the OS does."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def unbindable(host: str, port: int) -> str | None:
    """Why a listener could not bind ``host:port`` here now ("Address already in use", ...), or None."""
    try:
        bind_tcp(host, port).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def secret_from_env() -> str | None:
    secret = os.environ.get(SECRET_ENV, "").strip()
    if secret:
        return secret
    path = os.environ.get(SECRET_FILE_ENV, "").strip()
    if path:
        secret = Path(path).read_text().strip()
        if not secret:
            raise ValueError(f"{SECRET_FILE_ENV}={path} is empty")
        return secret
    return None


def ensure_secret_in_env() -> str:
    """For tools that start their own workers (benchmarks): this process's secret, made up and put in
    its environment (so its children inherit it) when there is none."""
    secret = secret_from_env()
    if secret is None:
        secret = os.environ[SECRET_ENV] = secrets.token_urlsafe(32)
    return secret


def tls_from_env() -> TLSFiles | None:
    paths = {name: os.environ.get(name, "").strip() for name in (TLS_CERT_ENV, TLS_KEY_ENV, TLS_CA_ENV)}
    if not any(paths.values()):
        return None
    missing = [name for name, value in paths.items() if not value]
    if missing:
        raise ValueError(f"mutual TLS needs {TLS_CERT_ENV}, {TLS_KEY_ENV} and {TLS_CA_ENV}; missing {missing}")
    server_name = os.environ.get(TLS_SERVER_NAME_ENV, "").strip() or None
    return TLSFiles(paths[TLS_CERT_ENV], paths[TLS_KEY_ENV], paths[TLS_CA_ENV], server_name)


def _with_metadata(details, extra: tuple[tuple[str, str], ...]):
    return details._replace(metadata=[*(details.metadata or ()), *extra])


class _SecretInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details):
        return _ClientCallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *self._metadata],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression) -> None:
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def _aio_interceptors(metadata: tuple[tuple[str, str], ...]) -> list:
    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation, details, request):
            return await continuation(_with_metadata(details, metadata), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation, details, request):
            return await continuation(_with_metadata(details, metadata), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation, details, request_iterator):
            return await continuation(_with_metadata(details, metadata), request_iterator)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation, details, request_iterator):
            return await continuation(_with_metadata(details, metadata), request_iterator)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
