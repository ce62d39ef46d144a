"""Worker processes for data-path tests, and the reserve → prefill → decode flow in miniature."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from cluster.cli import EXIT_WITH_PARENT_ENV
from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from protos.cluster_auth import ClusterAuth
from tests.workers.forked import ForkedProcess

START_TIMEOUT_S = 180  # several workers start at once on two shared cores


@dataclass
class WorkerProcess:
    role: str
    address: str
    process: subprocess.Popen | ForkedProcess
    log_lines: list[str] = field(default_factory=list)

    @property
    def channel(self) -> grpc.Channel:
        if not hasattr(self, "_channel"):
            self._channel = ClusterAuth.from_env().channel(self.address)
        return self._channel

    @property
    def stub(self):
        if self.role == "decode":
            return decode_pb2_grpc.DecodeWorkerStub(self.channel)
        return prefill_pb2_grpc.PrefillWorkerStub(self.channel)

    def stats(self) -> common_pb2.WorkerStats:
        return self.stub.Stats(common_pb2.StatsRequest(), timeout=10)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        stop_process(self.process, 10)
        if hasattr(self, "_channel"):
            self._channel.close()


@contextlib.contextmanager
def frozen(worker: WorkerProcess) -> Iterator[WorkerProcess]:
    """``worker``'s process stopped (SIGSTOP) for the block, resumed after it unless killed meanwhile: what it has
    under way stays under way while the test acts, however fast the machine; calls to it wait. Keep the block short:
    a router's health checks take a stopped worker out after two seconds or so."""
    worker.process.send_signal(signal.SIGSTOP)
    try:
        yield worker
    finally:
        worker.process.send_signal(signal.SIGCONT)  # a no-op once the process is reaped


def stop_process(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace_s``; returns once it has exited."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def start_worker(role: str, model: str, transport: str = "grpc", *extra: str) -> WorkerProcess:
    return wait_ready(launch_worker(role, model, transport, *extra))


def start_workers(*specs: tuple) -> list[WorkerProcess]:
    """Starts several workers at once (their start-up is mostly imports): specs are start_worker args."""
    launched = [launch_worker(*spec) for spec in specs]
    try:
        return [wait_ready(worker) for worker in launched]
    except BaseException:
        for worker in launched:
            worker.stop()
        raise


def stop_workers(workers: list[WorkerProcess]) -> None:
    """Asks every worker to stop at once, then waits for each (killing stragglers)."""
    for worker in workers:
        if worker.process.poll() is None:
            worker.process.terminate()
    for worker in workers:
        worker.stop()


def launch_worker(role: str, model: str, transport: str = "grpc", *extra: str, prefix: tuple = ()) -> WorkerProcess:
    """``prefix``: a command the worker runs under (``ip netns exec NAME``: on a test host of its own); without one,
    the worker is forked from a server that has its modules imported (tests/workers/forked.py)."""
    argv = [
        "worker",
        role,
        "--model",
        model,
        "--transport",
        transport,
        "--port",
        "0",
        "--threads",
        "1",
        "--kv-cache-mb",
        "64",
        "--shutdown-grace",  # tests stop idle workers often: no drain (tests/router/test_worker_shutdown.py has one)
        "0",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if prefix or EXIT_WITH_PARENT_ENV in env:
        command = [*prefix, sys.executable, "-m", "cluster.cli", *argv]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    else:
        process = ForkedProcess(argv, env)
    return WorkerProcess(role, "", process)


def wait_ready(worker: WorkerProcess) -> WorkerProcess:
    """Reads the worker's output until its READY line; then keeps draining it in the background."""
    process = worker.process
    result: dict = {}

    def read() -> None:
        for line in process.stdout:
            worker.log_lines.append(line)
            if line.startswith("READY ") and "address" not in result:
                result["address"] = json.loads(line[len("READY ") :])["address"]
                ready.set()
        ready.set()  # exited

    ready = threading.Event()
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(START_TIMEOUT_S) or "address" not in result:
        process.kill()
        raise RuntimeError(f"{worker.role} worker did not start: {''.join(worker.log_lines)}")
    worker.address = result["address"]
    return worker


def wire_params(max_tokens: int = 16, temperature: float = 0.0, **kwargs) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, **kwargs)


@dataclass
class Disaggregated:
    """Everything one reserve → prefill → decode flow returned."""

    ticket: decode_pb2.Ticket
    prefill: prefill_pb2.PrefillResponse
    tokens: list[int]
    last: decode_pb2.GenerateResponse


def run_disaggregated(
    prefill: WorkerProcess,
    decode: WorkerProcess,
    request_id: str,
    prompt: list[int],
    params: common_pb2.SamplingParams,
    lease_ms: int = 0,
    timeout: float = 60,
) -> Disaggregated:
    """Reserve on D, prefill on P with the ticket, then stream the rest from D."""
    ticket = decode.stub.Reserve(
        decode_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, params=params, lease_ms=lease_ms),
        timeout=timeout,
    )
    first = prefill.stub.Prefill(
        prefill_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, params=params, ticket=ticket),
        timeout=timeout,
    )
    tokens: list[int] = []
    last = None
    for response in decode.stub.Generate(
        decode_pb2.GenerateRequest(request_id=request_id, reserved=True, token=ticket.token), timeout=timeout
    ):
        tokens.extend(response.token_ids)
        last = response
    assert tokens and tokens[0] == first.first_token_id
    return Disaggregated(ticket, first, tokens, last)


def disaggregated(
    prefill: WorkerProcess,
    decode: WorkerProcess,
    request_id: str,
    prompt: list[int],
    params: common_pb2.SamplingParams,
    lease_ms: int = 0,
    timeout: float = 60,
) -> tuple[list[int], decode_pb2.GenerateResponse]:
    """Reserve on D, prefill on P with the ticket, then stream the rest from D. Returns all tokens."""
    result = run_disaggregated(prefill, decode, request_id, prompt, params, lease_ms, timeout)
    return result.tokens, result.last


def aggregated(decode: WorkerProcess, request_id: str, prompt: list[int], params, timeout: float = 60) -> list[int]:
    tokens: list[int] = []
    for response in decode.stub.Generate(
        decode_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, params=params), timeout=timeout
    ):
        tokens.extend(response.token_ids)
    return tokens


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls ``predicate`` until it returns something truthy; fails after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def is_idle(stats: common_pb2.WorkerStats) -> bool:
    return (
        stats.kv_blocks_used == 0
        and stats.waiting_for_kv == 0
        and stats.transfers_in_flight == 0
        and stats.running == 0
        and stats.waiting == 0
    )


def wait_idle(worker: WorkerProcess, timeout: float = 10.0) -> common_pb2.WorkerStats:
    """Every KV block back in the pool (none used, none waiting for KV, no transfer open), polled via Stats."""
    last: list[common_pb2.WorkerStats] = []

    def idle():
        last[:] = [worker.stats()]
        return is_idle(last[0])

    try:
        wait_until(idle, timeout, what=f"{worker.role} worker {worker.address} to return every KV block")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last stats: {last[0] if last else None}") from None
    return last[0]


def new_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


# Reservations made through reserve(), so a failed test's leftovers can be aborted after it.
_reserved: list[tuple[WorkerProcess, str]] = []
# Each reservation's ticket token: its claim and its abort present it.
_tokens: dict[str, str] = {}


def token_of(request_id: str) -> str:
    """The ticket token of a reservation made here ("" if none)."""
    return _tokens.get(request_id, "")


def reserve(
    decode: WorkerProcess,
    request_id: str,
    prompt: list[int],
    params: common_pb2.SamplingParams | None = None,
    lease_ms: int = 0,
) -> decode_pb2.Ticket:
    request = decode_pb2.ReserveRequest(
        request_id=request_id, prompt_token_ids=prompt, params=params or wire_params(4), lease_ms=lease_ms
    )
    _reserved.append((decode, request_id))
    ticket = decode.stub.Reserve(request, timeout=10)
    _tokens[request_id] = ticket.token
    return ticket


def abort_leftover_reservations() -> None:
    while _reserved:
        decode, request_id = _reserved.pop()
        if decode.process.poll() is None:
            try:
                decode.stub.Abort(common_pb2.AbortRequest(request_id=request_id, token=token_of(request_id)), timeout=5)
            except grpc.RpcError:
                pass


def prefill_future(
    prefill: WorkerProcess,
    request_id: str,
    prompt: list[int],
    ticket: decode_pb2.Ticket,
    params: common_pb2.SamplingParams | None = None,
    timeout: float = 30,
):
    request = prefill_pb2.PrefillRequest(
        request_id=request_id, prompt_token_ids=prompt, params=params or wire_params(4), ticket=ticket
    )
    return prefill.stub.Prefill.future(request, timeout=timeout)


def claim(decode: WorkerProcess, request_id: str, timeout: float = 30):
    """The client side of a reserved request's Generate stream (started at once; iterate to read)."""
    request = decode_pb2.GenerateRequest(request_id=request_id, reserved=True, token=token_of(request_id))
    return decode.stub.Generate(request, timeout=timeout)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """Runs ``call`` (or drains the stream it returns) and returns the gRPC error it must end with."""
    try:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{call} succeeded; expected a gRPC error status")
