"""Worker processes for data-path tests, and the reserve → prefill → decode flow in miniature."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc

from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

START_TIMEOUT_S = 90


@dataclass
class WorkerProcess:
    role: str
    address: str
    process: subprocess.Popen
    log_lines: list[str] = field(default_factory=list)

    @property
    def channel(self) -> grpc.Channel:
        if not hasattr(self, "_channel"):
            self._channel = grpc.insecure_channel(self.address)
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
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if hasattr(self, "_channel"):
            self._channel.close()


def start_worker(role: str, model: str, transport: str = "grpc", *extra: str) -> WorkerProcess:
    command = [sys.executable, "-m", "cluster.cli", "worker", role, "--model", model, "--transport", transport,
               "--port", "0", "--threads", "1", "--kv-cache-mb", "64", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    worker = WorkerProcess(role, "", process)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"{role} worker exited: {''.join(worker.log_lines)}")
        worker.log_lines.append(line)
        if line.startswith("READY "):
            worker.address = json.loads(line[len("READY "):])["address"]
            threading.Thread(target=_drain, args=(process, worker.log_lines), daemon=True).start()
            return worker
    process.kill()
    raise TimeoutError(f"{role} worker did not start: {''.join(worker.log_lines)}")


def _drain(process: subprocess.Popen, lines: list[str]) -> None:
    for line in process.stdout:
        lines.append(line)


def wire_params(max_tokens: int = 16, temperature: float = 0.0, **kwargs) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature, **kwargs)


def disaggregated(prefill: WorkerProcess, decode: WorkerProcess, request_id: str, prompt: list[int],
                  params: common_pb2.SamplingParams, lease_ms: int = 0, timeout: float = 60) -> tuple[list[int], decode_pb2.GenerateResponse]:
    """Reserve on D, prefill on P with the ticket, then stream the rest from D. Returns all tokens."""
    ticket = decode.stub.Reserve(decode_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, params=params, lease_ms=lease_ms), timeout=timeout)
    first = prefill.stub.Prefill(prefill_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, params=params, ticket=ticket), timeout=timeout)
    tokens: list[int] = []
    last = None
    for response in decode.stub.Generate(decode_pb2.GenerateRequest(request_id=request_id, reserved=True), timeout=timeout):
        tokens.extend(response.token_ids)
        last = response
    assert tokens and tokens[0] == first.first_token_id
    return tokens, last


def aggregated(decode: WorkerProcess, request_id: str, prompt: list[int], params, timeout: float = 60) -> list[int]:
    tokens: list[int] = []
    for response in decode.stub.Generate(decode_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, params=params), timeout=timeout):
        tokens.extend(response.token_ids)
    return tokens
