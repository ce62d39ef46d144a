"""The router process: HTTP (uvicorn) and gRPC servers on one event loop over one worker pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
from asyncio import FIRST_COMPLETED
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from contract.heap import freeze_startup_heap
from protos.cluster_auth import ClusterAuth, ListenError, bind_tcp, cannot_listen, unbindable
from router import tracing
from router.admin import install_admin
from router.config import RouterConfig, admin_token_from_env, api_keys_from_env
from router.control import ControlPlane
from router.dashboard import install_dashboard
from router.frontend import Frontend
from router.grpc_api import create_grpc_server, mark_stopping
from router.http_protocol import protocol_with_deadlines
from router.openai_api import create_app
from router.workers import WorkerPool

log = logging.getLogger(__name__)

T = TypeVar("T")
CUT_UNWIND_S = 2.0  # a request whose client was cut at the end of a stop's grace has this long to unwind
# After a second stop signal, what the stop still waits for (the requests cut unwinding, the listeners closing, the
# workers told to stop: a few seconds) may take this long before it is cancelled.
FORCED_STOP_S = 15.0


def on_stop_signals() -> tuple[asyncio.Event, asyncio.Event]:
    """(stop, cut), set by SIGINT and SIGTERM on the running loop, from inside the process's main coroutine: the
    first signal sets ``stop`` (a graceful stop: ``Router.stop``), the second ``cut`` (the requests in flight end
    now). Whatever the stop still waits for ``FORCED_STOP_S`` after the second signal, or at a third, is cancelled:
    the main coroutine's task is, so its ``finally`` blocks run and ``run_event_loop`` raises CancelledError. A
    second Ctrl-C always stops the process, whatever in the stop may hang."""
    stop, cut = asyncio.Event(), asyncio.Event()
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def force(why: str) -> None:
        if main is not None and not main.done():
            print(f"splitserve: {why}: stopping without waiting for the rest", file=sys.stderr, flush=True)
            main.cancel()

    def signalled() -> None:
        if not stop.is_set():
            stop.set()
        elif not cut.is_set():
            cut.set()
            loop.call_later(FORCED_STOP_S, force, f"the stop had not ended {FORCED_STOP_S:g} s after a second signal")
        else:
            force("a third stop signal")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, signalled)
    return stop, cut


class _HttpServer(uvicorn.Server):
    """uvicorn's server without its own signal handling: ``on_stop_signals`` and ``Router.stop`` decide. uvicorn's
    would take SIGINT and SIGTERM for itself while it serves and raise each one again as it exits, which reached ours
    as a second signal and cut the gRPC calls still in their grace."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The router's event loop: uvloop's, a base dependency except on Windows, whose turns cost less than asyncio's
    (0.14 ms of the TTFT the router adds at p50 on a Zen 1 vCPU, side by side); asyncio's own where uvloop is not
    installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Runs ``main`` on a new router event loop (``asyncio.run``'s, with its loop)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)


class Router:
    """Owns the pool, the frontend and both servers. ``start``/``stop`` run inside an event loop."""

    def __init__(self, config: RouterConfig, control: ControlPlane | None = None) -> None:
        self.config = config
        tracing.configure()  # OTEL_*: off unless asked for
        self.api_keys = api_keys_from_env(config.api_keys)
        self.admin_token = config.admin_token or admin_token_from_env()
        self.pool = WorkerPool(config.health_interval_s, auth=ClusterAuth.from_env(config.cluster_secret))
        self.frontend = Frontend(config, self.pool)
        self.app = create_app(self.frontend, self.api_keys)
        tracing.instrument_http(self.app)
        install_admin(self.app, self.frontend, control, self.admin_token, self.api_keys)
        self.dashboard = install_dashboard(
            self.app, self.frontend, control, admin_token=self.admin_token, api_keys=self.api_keys
        )
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task | None = None
        self._grpc = None
        self._health_task: asyncio.Task | None = None
        self.http_port = config.port
        self.grpc_port = config.grpc_port

    async def start(self) -> None:
        for address in self.config.prefill_addresses:
            self.pool.add(address, "prefill")
        for address in self.config.decode_addresses:
            self.pool.add(address, "decode")
        http_socket = listen_socket(self.config.host, self.config.port)
        address = f"{self.config.host}:{self.config.grpc_port}"
        try:
            self._grpc, self.grpc_port = create_grpc_server(
                self.frontend, address, self.api_keys, read_tls(self.config), _LISTENERS["grpc"]
            )
        except ListenError:
            http_socket.close()
            raise
        await self._grpc.start()
        self._health_task = asyncio.create_task(self._grpc.health_servicer.follow(self.config.health_interval_s))
        http_config = uvicorn.Config(
            self.app,
            host=self.config.host,
            port=self.config.port,
            log_level="warning",
            lifespan="off",
            # Our stop cuts what is left at the end of the grace (cut_in_flight); this ends what still runs after
            timeout_graceful_shutdown=self.config.shutdown_grace_s + 2 * CUT_UNWIND_S,
            http=protocol_with_deadlines(self.config.header_timeout_s, self.config.body_timeout_s),
            timeout_keep_alive=self.config.keep_alive_s,
            ssl_certfile=self.config.tls_certfile,
            ssl_keyfile=self.config.tls_keyfile,
        )
        self._http = _HttpServer(http_config)
        self._http_task = asyncio.create_task(self._http.serve(sockets=[http_socket]))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.02)
        self.http_port = http_socket.getsockname()[1]
        self.dashboard.start()  # recent history from now on, watched or not

    async def wait_ready(self, timeout: float = 30.0) -> bool:
        """Until the model is known, a compatible decode worker is healthy and every known worker has
        answered its health check."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.ready and all(w.healthy for w in self.pool.workers.values()):
                return True
            await asyncio.sleep(0.05)
        return self.ready

    @property
    def ready(self) -> bool:
        return self.frontend.ready

    def not_ready_reason(self) -> str:
        return self.frontend.not_ready_reason()

    async def stop(self, cut: asyncio.Event | None = None) -> None:
        """First ``shutdown_delay_s`` of serving on while /ready and gRPC health say the router is stopping; then
        both listeners close and the requests in flight have ``shutdown_grace_s`` to finish. At its end, or as soon
        as ``cut`` is set (a second stop signal), they are cut (``cut_in_flight``)."""
        cut = cut or asyncio.Event()
        routed_to = self.frontend.ready  # a router never ready is in no load balancer's rotation: no delay
        self.frontend.stopping = True
        if self._grpc is not None:
            await mark_stopping(self._grpc)
        delay = self.config.shutdown_delay_s
        if delay and routed_to and not cut.is_set():
            print(
                f"splitserve: stopping in {delay:g} s; until then /ready answers 503 and requests are still served "
                "(a second Ctrl-C or SIGTERM stops now)",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cut.wait(), delay)
        await self.dashboard.stop()
        in_flight = self.frontend.admission.running + self.frontend.admission.waiting
        if in_flight and not cut.is_set():
            print(
                f"splitserve: stopping; {in_flight} request(s) in flight have up to {self.config.shutdown_grace_s:g} s "
                "to finish (a second Ctrl-C or SIGTERM ends them now)",
                file=sys.stderr,
                flush=True,
            )
        stopping = [self.frontend.responses.background_done()]  # background responses run on as requests do
        if self._http is not None:
            self._http.should_exit = True  # uvicorn closes its listener and idle connections, then waits for the rest
            stopping.append(self._http_task)
        if self._grpc is not None:
            # gRPC aborts what is left at the end of its grace: after our cut, which tells each call why
            stopping.append(self._grpc.stop(self.config.shutdown_grace_s + CUT_UNWIND_S))
        stopped = asyncio.ensure_future(asyncio.gather(*stopping))
        cut_asked = asyncio.ensure_future(cut.wait())
        await asyncio.wait((stopped, cut_asked), timeout=self.config.shutdown_grace_s, return_when=FIRST_COMPLETED)
        cut_asked.cancel()
        if not stopped.done():
            when = "at once, as asked" if cut.is_set() else f"after its {self.config.shutdown_grace_s:g} s grace"
            await self.cut_in_flight(f"the router is stopping: this request was cut {when}", stopped)
        await stopped
        if self._health_task is not None:
            self._health_task.cancel()
        await self.pool.close()

    async def cut_in_flight(self, reason: str, stopped: asyncio.Future) -> None:
        """Ends every request in flight: each gets ``reason`` as its error (an SSE error event, a gRPC status) and
        unwinds as at its timeout (the decode stops, its KV returns to the pool). What has not ended when
        ``stopped`` is done or CUT_UNWIND_S has passed ends as if its client had gone: its HTTP connection closed,
        its gRPC call aborted."""
        self.frontend.cut(reason)
        await asyncio.wait((stopped,), timeout=CUT_UNWIND_S)
        if stopped.done():
            return
        if self._http is not None:
            for connection in list(self._http.server_state.connections):
                connection.transport.close()
        if self._grpc is not None:
            asyncio.ensure_future(self._grpc.stop(0))

    @property
    def urls(self) -> dict[str, str]:
        host = self.config.host
        scheme = "https" if self.config.tls_certfile else "http"
        return {
            "http": f"{scheme}://{host}:{self.http_port}",
            "grpc": f"{host}:{self.grpc_port}",
            "dashboard": f"{scheme}://{host}:{self.http_port}/dashboard",
        }


_LISTENERS = {"http": "the OpenAI API, --port", "grpc": "the gRPC API, --grpc-port"}  # what listens, the flag


def listen_socket(host: str, port: int) -> socket.socket:
    """The router's HTTP socket, bound here rather than by uvicorn (which logs a bind error and exits the process)."""
    try:
        return bind_tcp(host, port)
    except OSError as exc:
        raise cannot_listen(f"{host}:{port}", exc.strerror or str(exc), _LISTENERS["http"]) from None


def read_tls(config: RouterConfig) -> tuple[bytes, bytes] | None:
    """(certificate chain, key) PEM for the public endpoints, when TLS is configured; ValueError naming --tls-cert
    or --tls-key where a file cannot be read, or where the two are no certificate chain and its private key (which
    gRPC would report only as a port it "could not bind")."""
    if config.tls_certfile is None:
        return None
    read = []
    for flag, path in (("--tls-cert", config.tls_certfile), ("--tls-key", config.tls_keyfile)):
        try:
            read.append(Path(path).read_bytes())
        except OSError as exc:
            raise ValueError(f"{flag} {path}: {exc.strerror or exc}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(config.tls_certfile, config.tls_keyfile)
    except ssl.SSLError as exc:
        raise ValueError(
            f"--tls-cert {config.tls_certfile} and --tls-key {config.tls_keyfile} are not a PEM certificate chain "
            f"and its private key ({exc.reason or exc})"
        ) from None
    return read[0], read[1]


def check_ports(config: RouterConfig) -> None:
    """Before anything starts (`splitserve up` starts Ray and workers first): ListenError where the router could
    not listen on its configured ports now. A port 0 is any free one."""
    for listener, port in (("http", config.port), ("grpc", config.grpc_port)):
        reason = unbindable(config.host, port) if port else None
        if reason:
            raise cannot_listen(f"{config.host}:{port}", reason, _LISTENERS[listener])


class Stopped(Exception):
    """A stop (SIGINT, SIGTERM) was asked while waiting."""


async def unless_stopped(awaitable, stop: asyncio.Event):
    """``awaitable``'s result, or Stopped as soon as ``stop`` is set (the wait is then cancelled)."""
    waiting, stopping = asyncio.ensure_future(awaitable), asyncio.ensure_future(stop.wait())
    await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if not waiting.done():
        waiting.cancel()
        raise Stopped("asked to stop while the workers were starting")
    return waiting.result()


async def serve(config: RouterConfig, stop: asyncio.Event, cut: asyncio.Event | None = None) -> None:
    router = Router(config)
    await router.start()
    freeze_startup_heap()
    try:
        ready = await unless_stopped(router.wait_ready(), stop)
    except Stopped:  # SIGTERM while waiting for workers: stop now, not after the wait
        await router.stop(cut)
        return
    if not ready:
        print(f"splitserve router: not ready — {router.not_ready_reason()}", file=sys.stderr, flush=True)
    print(f"splitserve router: OpenAI API at {router.urls['http']}/v1, gRPC at {router.urls['grpc']}", flush=True)
    try:
        await stop.wait()
    finally:
        await router.stop(cut)
