"""``splitserve bench transfer``: KV bytes/s of both transports beside raw TCP and memcpy, and how
much transfer time a prefill leaves exposed, layer by layer vs the whole request after prefill.

Bandwidth: this process is the sender; each path's receiver is a child process
(``python -m bench.transfer_bench serve KIND``) on loopback::

    this process                                   child process
    PagedKVCache ── GrpcKVSender ──────────────>  KVInbox + KVReceiverService on a gRPC server
    (random bytes)  NixlKVSender ──────────────>  same + NixlReceiver (registered pool)
                    BulkKVSender ──── TCP ─────>  same (grpc child) + BulkReceiver: recv_into the blocks
    numpy view ──── plain sockets (sendall) ───>  recv_into a preallocated buffer, 1-byte acks
                    (as many, tuned as the bulk path's: each sends one contiguous part)
    torch copy_ on one thread, in this process: the same regions into a second pool of the same layout
    process_vm_writev on one thread ─────────────> the NIXL child's pool (cma: the copy UCX makes for NIXL)

One transfer = open a session, push every layer (all blocks), commit; timed until the commit
returned, i.e. the receiver adopted (and, with checksums, verified) the KV. The pool has LAYERS
layers of bench-125m's 16 KiB (layer, block) regions, as many blocks as the size needs; the child
opens a reservation before each transfer (untimed), as Reserve would. Paths alternate within
each repeat so machine noise hits all of them; rows report the median.

On DRAM, NIXL's UCX moves bytes between two processes with the kernel's cross-memory attach (CMA):
``process_vm_writev`` inside the post. The ``cma`` row makes that one call itself, for the same runs
(one per layer), so a NIXL row can be read against the copy it rides on as well as against memcpy. The
``cma+xxh3`` row runs that copy while this process hashes the same source runs and the child hashes the
same destination runs, all at once and with no transport around them: NIXL with checksums does that
work and more, so that row's ratio is the most its path can reach on this machine.

Each row also gives the CPU both ends spent inside the timed transfer (this process's clock and
the child's, every thread). However well a path overlaps its work, it cannot end before that CPU
time spread over every core, so a missed target prints the best ratio this machine allows the
path as it computes today: where that bound is below the target, more cores or less work per
byte (not better overlap) would be needed.

Exposure: real prefill and decode worker processes (``splitserve worker``), one prefill worker per
(transport, --push-mode) sharing the transport's decode worker. Each request is reserve → prefill
→ decode; PrefillResponse gives prefill_ms (until the last layer was computed) and
exposed_transfer_ms (from then until the decode worker accepted the commit: the first token's
wait). The rows are measured on an idle decode worker, then (layer push, shortest prompt) again
with --decode-load long decodes kept running on it, so each commit meets a decode step in progress
as it does in service.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import itertools
import json
import os
import platform
import random
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import asdict, dataclass, field

import torch

from bench.args import Given, Refused, refuse_beside_quick
from engine.config import check_device
from engine.kv_cache import KVLayout, PagedKVCache
from engine.layer_ready import record_layer_ready
from protos.cluster_auth import ClusterAuth, ensure_secret_in_env, server_options

MIB = 1024 * 1024
LAYERS = 16
BLOCK_SIZE, KV_HEADS, HEAD_DIM, DTYPE = 16, 4, 64, "bfloat16"  # bench-125m's region: 16 KiB
FINGERPRINT = "transfer-bench"
TRANSPORTS = ("grpc", "nixl")
PUSH_MODES = ("layer", "request")
TARGET_MIN_MIB = 16
NIXL_TARGET_VS_MEMCPY = 0.6
GRPC_TARGET_VS_TCP = 0.6
BULK_CONNECTIONS = 2
LONG_PROMPT_TOKENS = 4096
FIRST_REGULAR_TOKEN = 3  # ids below are pad/bos/eos in the presets' byte vocabulary
LEASE_MS = 600_000
RPC_TIMEOUT_S = 600.0
START_TIMEOUT_S = 180.0
COMMIT_TIMEOUT_S = 60.0
# A reservation precedes its first push by at least a layer of prefill; the NIXL receiver's poller
# sleeps 10 ms between polls while it has no reservation. Waiting this long after the (untimed)
# reservation keeps that idle sleep out of the timing, as in a real request.
RESERVE_GAP_S = 0.02
LOAD_PROMPT_TOKENS, LOAD_MAX_TOKENS = 32, 512  # a background decode: started again whenever it ends


@dataclass(frozen=True)
class BenchConfig:
    sizes_mib: tuple[int, ...]
    repeats: int
    model: str
    dtype: str
    prompt_lens: tuple[int, ...]
    exposure_repeats: int
    long_prompt_repeats: int
    worker_threads: int
    kv_cache_mb: int
    max_num_batched_tokens: int
    bandwidth: bool
    exposure: bool
    json_path: str | None
    decode_load: int = 0
    device: str = "cpu"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        sizes = QUICK if args.quick else {name: getattr(args, name) for name in QUICK}
        return cls(
            sizes_mib=sizes["sizes"],
            repeats=sizes["repeats"],
            model=args.model,
            dtype=args.dtype,
            prompt_lens=sizes["prompt_lens"],
            exposure_repeats=sizes["exposure_repeats"],
            long_prompt_repeats=sizes["long_prompt_repeats"],
            worker_threads=args.worker_threads,
            kv_cache_mb=args.kv_cache_mb,
            max_num_batched_tokens=args.max_num_batched_tokens,
            bandwidth=not args.skip_bandwidth,
            exposure=not args.skip_exposure,
            json_path=args.json_path,
            decode_load=args.decode_load,
            device=args.device,
        )

    def repeats_for(self, prompt_len: int) -> int:
        """Long prompts take tens of seconds per prefill on a CPU: they run fewer times."""
        return self.long_prompt_repeats if prompt_len >= LONG_PROMPT_TOKENS else self.exposure_repeats


QUICK = dict(sizes=(1, 4), repeats=2, prompt_lens=(64, 256), exposure_repeats=1, long_prompt_repeats=1)


def check_args(args: argparse.Namespace, given: Given) -> None:
    refuse_beside_quick(given, QUICK)
    if args.skip_bandwidth and args.skip_exposure:
        raise Refused("--skip-bandwidth with --skip-exposure leaves nothing to measure")
    if args.device != "cpu" and not args.skip_exposure:
        raise Refused(f"--device {args.device} measures the bandwidth rows only: add --skip-exposure")
    try:
        check_device(args.device)  # what the engine's workers accept: cpu, cuda, cuda:N of a device torch sees
    except ValueError as exc:
        raise Refused(str(exc)) from None


# -- entry point ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    config = BenchConfig.from_args(args)
    started = time.perf_counter()
    torch.set_num_threads(1)  # the memcpy baseline is single-threaded; the workers run 1 thread too
    bandwidth = measure_bandwidth(config) if config.bandwidth else []
    exposure = measure_exposure(config) if config.exposure else []
    report = build_report(config, bandwidth, exposure, time.perf_counter() - started)
    print_report(report)
    if config.json_path:
        with open(config.json_path, "w") as handle:
            json.dump(report, handle, indent=2)
        print(f"wrote {config.json_path}")
    return 0


# -- bandwidth ------------------------------------------------------------------------------------


def bench_layout(total_bytes: int) -> KVLayout:
    """A pool of LAYERS layers x as many 16 KiB regions per layer as ``total_bytes`` needs."""
    region = 2 * BLOCK_SIZE * KV_HEADS * HEAD_DIM * torch.empty((), dtype=getattr(torch, DTYPE)).element_size()
    if total_bytes % (LAYERS * region):
        raise SystemExit(f"transfer sizes must be multiples of {LAYERS * region // 1024} KiB")
    return KVLayout(LAYERS, total_bytes // (LAYERS * region), BLOCK_SIZE, KV_HEADS, HEAD_DIM, DTYPE)


@dataclass(frozen=True)
class BandwidthRow:
    path: str  # memcpy, tcp, cma, grpc (PushKV messages), bulk (the gRPC transport's TCP path), nixl
    checksums: bool | None  # None: the path has no such option
    size_bytes: int
    seconds: tuple[float, ...]
    cpu_seconds: tuple[float, ...]  # CPU both ends spent inside each timed transfer, all their threads

    @property
    def label(self) -> str:
        return self.path if self.checksums is None else f"{self.path} ({'xxh3' if self.checksums else 'no checksum'})"

    @property
    def gb_s(self) -> float:
        return self.size_bytes / statistics.median(self.seconds) / 1e9

    @property
    def cpu_ms(self) -> float:
        return statistics.median(self.cpu_seconds) * 1e3

    def to_json(self) -> dict:
        return dict(
            asdict(self),
            label=self.label,
            size_mib=self.size_bytes / MIB,
            median_ms=statistics.median(self.seconds) * 1e3,
            gb_s=self.gb_s,
            cpu_ms=self.cpu_ms,
        )


class Receiver:
    """A receiver child process; stdin/stdout lines are its control channel (never timed)."""

    def __init__(self, kind: str, pool_bytes: int, device: str = "cpu") -> None:
        command = [sys.executable, "-m", "bench.transfer_bench", "serve", kind, "--pool-bytes", str(pool_bytes)]
        command += ["--device", device]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.kind = kind
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info = json.loads(self._reply("READY"))

    def _reply(self, tag: str) -> str:
        """The next protocol line; libraries (NIXL) log to stdout too, those lines are skipped."""
        skipped = []
        while line := self.process.stdout.readline():
            if line.startswith(tag):
                return line[len(tag) :].strip()
            skipped.append(line)
        raise RuntimeError(f"{self.kind} receiver exited ({self.process.wait()}): {''.join(skipped)}")

    def cpu_seconds(self) -> float:
        """The child's CPU time so far, all threads (its process clock, read by the child itself)."""
        self.process.stdin.write("cpu\n")
        self.process.stdin.flush()
        return float(self._reply("cpu"))

    def open(self, request_id: str, num_blocks: int) -> None:
        self.process.stdin.write(f"open {request_id} {num_blocks}\n")
        self.process.stdin.flush()
        self._reply("ok")

    def start_hash(self, nbytes: int) -> None:
        """The NIXL child hashes its pool's runs of the first ``nbytes``, as it verifies them; returns once begun."""
        self.process.stdin.write(f"hash {nbytes}\n")
        self.process.stdin.flush()
        self._reply("started")

    def wait_hash(self) -> None:
        self._reply("hashed")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


Transfer = Callable[[int, str], tuple[float, float]]  # (bytes, request id) -> (seconds, CPU seconds of both ends)


def measure_bandwidth(config: BenchConfig) -> list[BandwidthRow]:
    largest = max(config.sizes_mib) * MIB
    layout = bench_layout(largest)
    cache = PagedKVCache(layout, config.device)
    source = cache.data.view(-1).view(torch.uint8)
    source.copy_(torch.randint(0, 256, (largest,), dtype=torch.uint8))
    receivers: dict[str, Receiver] = {}
    closers: list[Callable[[], None]] = []
    try:
        for kind in ("tcp", *TRANSPORTS):
            receivers[kind] = Receiver(kind, largest, "cpu" if kind == "tcp" else config.device)
            closers.append(receivers[kind].close)
        paths = _transfer_paths(cache, receivers, closers)
        rows = []
        for size_mib in config.sizes_mib:
            print(f"bandwidth: {size_mib} MiB x {config.repeats} ...", flush=True)
            rows += _measure_size(paths, size_mib * MIB, config.repeats)
        return rows
    finally:
        for close in reversed(closers):
            close()


def _transfer_paths(
    cache: PagedKVCache, receivers: dict[str, Receiver], closers: list
) -> dict[tuple[str, bool | None], Transfer]:
    from kv_transfer.bulk_transport import BulkKVSender
    from kv_transfer.grpc_transport import GrpcKVSender
    from kv_transfer.layout import layout_message
    from kv_transfer.nixl_transport import NixlKVSender

    message = layout_message(cache.layout, FINGERPRINT)
    source = cache.data.view(-1).view(torch.uint8).cpu()  # raw TCP sends from host memory (a copy, if VRAM)
    staged = cache.data.is_cuda  # the gRPC transport's senders stage VRAM through pinned host memory
    paths: dict[tuple[str, bool | None], Transfer] = {
        ("memcpy", None): _memcpy_transfer(cache),
        ("tcp", None): _tcp_transfer(source, receivers["tcp"], closers),
    }
    if not cache.data.is_cuda:  # on VRAM NIXL's UCX copies with cuda_ipc, not the kernel
        paths["cma", None] = _kernel_copy_transfer(cache, receivers["nixl"], closers)
        paths["cma+xxh3", None] = _kernel_copy_transfer(cache, receivers["nixl"], closers, hashed=True)
    for transport in TRANSPORTS:
        for verify in (True, False):
            if transport == "grpc":
                sender = GrpcKVSender(message, f"bench-grpc-{verify}", verify=verify, staged=staged)
            else:
                sender = NixlKVSender(
                    message, f"bench-nixl-{verify}", cache, f"bench-sender-{uuid.uuid4().hex[:8]}", verify=verify
                )
            closers.append(sender.close)
            paths[transport, verify] = _session_transfer(sender, cache, receivers[transport], message)
    for verify in (True, False):  # the gRPC transport as workers run it: bytes on its bulk TCP links
        sender = BulkKVSender(
            message, f"bench-bulk-{verify}", verify=verify, connections=BULK_CONNECTIONS, staged=staged
        )
        closers.append(sender.close)
        paths["bulk", verify] = _session_transfer(sender, cache, receivers["grpc"], message)
    return paths


def _measure_size(paths: dict[tuple[str, bool | None], Transfer], nbytes: int, repeats: int) -> list[BandwidthRow]:
    """One untimed warm-up per path, then ``repeats`` rounds over all paths (order rotated)."""
    keys = list(paths)
    seconds: dict[tuple[str, bool | None], list[float]] = {key: [] for key in keys}
    cpu: dict[tuple[str, bool | None], list[float]] = {key: [] for key in keys}
    for trial in range(repeats + 1):
        shift = trial % len(keys)
        for key in keys[shift:] + keys[:shift]:
            elapsed, cpu_seconds = paths[key](nbytes, f"bw-{key[0]}-{key[1]}-{nbytes}-{trial}")
            if trial > 0:
                seconds[key].append(elapsed)
                cpu[key].append(cpu_seconds)
    return [BandwidthRow(*key, nbytes, tuple(seconds[key]), tuple(cpu[key])) for key in keys]


def _memcpy_transfer(cache: PagedKVCache) -> Transfer:
    """The bytes a session moves, laid out as it finds them: blocks [0, n) of every layer, copied into
    the same blocks of a second pool of the same layout (one strided torch copy, one thread)."""
    destination = PagedKVCache(cache.layout, cache.data.device)  # zeroed: pages touched before any timing
    sync = torch.cuda.synchronize if cache.data.is_cuda else (lambda: None)

    def transfer(nbytes: int, request_id: str) -> tuple[float, float]:
        num_blocks = nbytes // (LAYERS * cache.layout.region_bytes)
        sync()
        cpu, begin = time.process_time(), time.perf_counter()
        destination.regions[:, :num_blocks].copy_(cache.regions[:, :num_blocks])
        sync()
        return time.perf_counter() - begin, time.process_time() - cpu

    return transfer


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def _kernel_copy_transfer(cache: PagedKVCache, receiver: Receiver, closers: list, hashed: bool = False) -> Transfer:
    """The copy NIXL's transport makes on DRAM: UCX's CMA transport writes into the peer process with one
    ``process_vm_writev`` per post, the WRITE's merged runs as its vectors. Here: the runs a session's WRITEs
    carry (blocks [0, n) of every layer), in one call from one thread, into the NIXL receiver child's pool.
    ``hashed``: the child starts hashing its runs and a thread here the source's, then the copy runs, and the
    transfer ends when all three have (the work of NIXL with checksums, overlapped as far as it can be)."""
    writev = ctypes.CDLL(None, use_errno=True).process_vm_writev
    writev.restype = ctypes.c_ssize_t
    writev.argtypes = [ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong]
    writev.argtypes += [ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong]
    pid, remote_base = receiver.info["pid"], receiver.info["pool_address"]
    local_base, region = cache.data.data_ptr(), cache.layout.region_bytes
    layer_bytes = cache.layout.num_blocks * region

    hashing = None
    if hashed:
        hashing = futures.ThreadPoolExecutor(1, thread_name_prefix="bench-hash")
        closers.append(hashing.shutdown)

    def runs(base: int, nbytes: int) -> ctypes.Array:
        return (_IOVec * LAYERS)(*[(base + layer * layer_bytes, nbytes // LAYERS) for layer in range(LAYERS)])

    def transfer(nbytes: int, request_id: str) -> tuple[float, float]:
        local, remote = runs(local_base, nbytes), runs(remote_base, nbytes)
        cpu = _both_ends_cpu(receiver)
        if hashing is not None:
            receiver.start_hash(nbytes)  # returns once the child's hash began: the timing starts after it
        begin = time.perf_counter()
        source_hashed = hashing.submit(_hash_runs, cache, nbytes) if hashing is not None else None
        moved = writev(pid, local, LAYERS, remote, LAYERS, 0)
        if hashing is not None:
            source_hashed.result()
            receiver.wait_hash()
        elapsed = time.perf_counter() - begin
        if moved != nbytes:
            error = ctypes.get_errno()
            raise RuntimeError(f"process_vm_writev moved {moved} of {nbytes} bytes: {os.strerror(error)}")
        return elapsed, _both_ends_cpu(receiver) - cpu

    return transfer


def _hash_runs(cache: PagedKVCache, nbytes: int) -> list[int]:
    """Each layer's checksum over the runs a transfer of ``nbytes`` moves (blocks [0, n)), as NIXL's ends hash."""
    from kv_transfer.integrity import region_checksum

    blocks = range(nbytes // (LAYERS * cache.layout.region_bytes))
    return [region_checksum(cache, layer, blocks) for layer in range(LAYERS)]


def _tcp_transfer(source: torch.Tensor, receiver: Receiver, closers: list) -> Transfer:
    """Raw TCP at its best here, as the bulk path runs it: as many connections, the same socket settings, each
    sending one contiguous part of the bytes (no framing, no checksum, no layout) from a thread of its own."""
    from kv_transfer.bulk_transport import tune_socket

    connections = []
    for _ in range(BULK_CONNECTIONS):
        connection = socket.socket()
        tune_socket(connection)  # before connect(): the window scale is agreed in the SYN
        connection.connect(("127.0.0.1", receiver.info["tcp_port"]))
        closers.append(connection.close)
        connections.append(connection)
    senders = futures.ThreadPoolExecutor(len(connections), thread_name_prefix="bench-tcp")
    closers.append(senders.shutdown)
    payload = memoryview(source.numpy())

    def send_part(connection: socket.socket, offset: int, nbytes: int) -> None:
        connection.sendall(struct.pack("!QQ", offset, nbytes))
        connection.sendall(payload[offset : offset + nbytes])
        if connection.recv(1) != b"k":
            raise RuntimeError("TCP receiver closed the connection")

    def transfer(nbytes: int, request_id: str) -> tuple[float, float]:
        part = -(-nbytes // len(connections))
        cpu = _both_ends_cpu(receiver)
        begin = time.perf_counter()
        sent = [
            senders.submit(send_part, connection, offset, min(part, nbytes - offset))
            for connection, offset in zip(connections, range(0, nbytes, part))
        ]
        for future in sent:
            future.result()
        elapsed = time.perf_counter() - begin
        return elapsed, _both_ends_cpu(receiver) - cpu

    return transfer


def _session_transfer(sender, cache: PagedKVCache, receiver: Receiver, layout_message) -> Transfer:
    """As a prefill worker sends: a session per request, every layer pushed, then commit."""
    from protos import decode_pb2

    def transfer(nbytes: int, request_id: str) -> tuple[float, float]:
        num_blocks = nbytes // (LAYERS * cache.layout.region_bytes)
        blocks = list(range(num_blocks))
        receiver.open(request_id, num_blocks)
        time.sleep(RESERVE_GAP_S)
        ticket = decode_pb2.Ticket(
            request_id=request_id,
            block_ids=blocks,
            transport=receiver.kind,
            address=receiver.info["address"],
            layout=layout_message,
            lease_ms=LEASE_MS,
            worker_id="bench-receiver",
            instance_id=receiver.info["instance_id"],
        )
        cpu = _both_ends_cpu(receiver)
        begin = time.perf_counter()
        session = sender.open(request_id, ticket)
        ready = record_layer_ready(cache.data.device)  # a CUDA pool's stagers wait for an event
        for layer in range(LAYERS):
            session.push_layer(cache, layer, blocks, blocks, ready)
        session.commit(0, None, COMMIT_TIMEOUT_S)
        elapsed = time.perf_counter() - begin
        cpu = _both_ends_cpu(receiver) - cpu
        if session.bytes_sent != nbytes:
            raise RuntimeError(f"{receiver.kind} session sent {session.bytes_sent} bytes, expected {nbytes}")
        return elapsed, cpu

    return transfer


def _both_ends_cpu(receiver: Receiver) -> float:
    """CPU seconds so far of this process (the sender side: every thread, the senders' idle ones
    included) plus the receiver child's, read outside the timed window."""
    return time.process_time() + receiver.cpu_seconds()


# -- the receiver child process ---------------------------------------------------------------------


def serve(argv: Sequence[str]) -> int:
    """``python -m bench.transfer_bench serve {tcp,grpc,nixl} --pool-bytes N``: one receiver."""
    parser = argparse.ArgumentParser(prog="bench.transfer_bench serve")
    parser.add_argument("kind", choices=["tcp", *TRANSPORTS])
    parser.add_argument("--pool-bytes", type=int, required=True)
    parser.add_argument("--device", default="cpu", help="where the receiving pool lives (not for tcp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.kind == "tcp":
        return _serve_tcp(args.pool_bytes)
    return _serve_transport(args.kind, args.pool_bytes, args.device)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _serve_tcp(pool_bytes: int) -> int:
    """Raw TCP's receiver: each connection, on a thread of its own, lands (offset, length) parts of a transfer
    straight into one preallocated buffer and acks each with a byte."""
    from kv_transfer.bulk_transport import tune_socket

    buffer = memoryview(bytearray(pool_bytes))  # bytearray() zero-fills: pages touched up front
    listener = socket.create_server(("127.0.0.1", 0))
    tune_socket(listener)  # buffer sizes set before accept() carry over to the accepted sockets
    _say("READY " + json.dumps({"tcp_port": listener.getsockname()[1]}))
    threading.Thread(target=_answer_until_closed, daemon=True).start()
    while True:
        connection, _ = listener.accept()
        tune_socket(connection)
        threading.Thread(target=_land_parts, args=(connection, buffer), daemon=True).start()


def _land_parts(connection: socket.socket, buffer: memoryview) -> None:
    while header := _recv_exactly(connection, memoryview(bytearray(16))):
        offset, nbytes = struct.unpack("!QQ", header)
        if not _recv_exactly(connection, buffer[offset : offset + nbytes]):
            break
        connection.sendall(b"k")


def _recv_exactly(connection: socket.socket, view: memoryview) -> memoryview | None:
    got = 0
    while got < len(view):
        count = connection.recv_into(view[got:])
        if count == 0:
            return None
        got += count
    return view


def _answer_until_closed() -> None:
    """The TCP receiver's control thread: its main thread is inside a blocking recv."""
    _answer_commands({})
    os._exit(0)  # the bench closed our stdin: it is done with us


def _answer_commands(commands: dict[str, Callable[..., None]]) -> None:
    """Answers the bench's lines on stdin until it closes it: ``cpu`` (``Receiver.cpu_seconds``: this
    process's CPU seconds, every thread) and ``commands``' own, each called with the line's arguments."""
    for line in sys.stdin:
        command, *args = line.split()
        if command == "cpu":
            _say(f"cpu {time.process_time()!r}")
        elif command in commands:
            commands[command](*args)
        else:
            raise SystemExit(f"unknown command {command!r}")


def _serve_transport(kind: str, pool_bytes: int, device: str = "cpu") -> int:
    import grpc

    from kv_transfer.inbox import KVInbox
    from kv_transfer.layout import layout_message
    from kv_transfer.receiver_service import KVReceiverService
    from kv_transfer.sender import channel_options
    from protos import kv_transfer_pb2_grpc

    cache = PagedKVCache(bench_layout(pool_bytes), device)
    # The bench is the landings' owner: a commit or an abort simply forgets the landing.
    inbox = KVInbox(
        cache,
        on_commit=lambda request_id, token, logprob: inbox.forget(request_id),
        on_abort=lambda request_id, reason, sender_stopped: inbox.forget(request_id),
    )
    instance_id = uuid.uuid4().hex[:12]
    nixl = bulk = None
    if kind == "grpc":
        from kv_transfer.bulk_transport import BulkReceiver

        bulk = BulkReceiver(inbox, "127.0.0.1")  # the bench's gRPC server is unauthenticated too
    if kind == "nixl":
        from kv_transfer.nixl_transport import NixlReceiver

        nixl = NixlReceiver(f"bench-receiver-{instance_id}", cache, inbox)
    service = KVReceiverService(
        inbox,
        layout_message(cache.layout, FINGERPRINT),
        instance_id,
        nixl,
        bulk,
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=[*channel_options(), *server_options()])
    kv_transfer_pb2_grpc.add_KVReceiverServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    info = {"address": f"127.0.0.1:{port}", "instance_id": instance_id}
    if nixl is not None:  # where the cma row writes
        info.update(pid=os.getpid(), pool_address=nixl.pool.descriptor.base_address)
    _say("READY " + json.dumps(info))

    def open_landing(request_id: str, num_blocks: str) -> None:
        inbox.open(request_id, range(int(num_blocks)))
        _say("ok")

    def hash_runs(nbytes: str) -> None:
        _say("started")
        _hash_runs(cache, int(nbytes))
        _say("hashed")

    _answer_commands({"open": open_landing, "hash": hash_runs})
    server.stop(1).wait(2)
    if nixl is not None:
        nixl.close()
    if bulk is not None:
        bulk.close()
    return 0


# -- exposure -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExposureRow:
    transport: str
    push_mode: str
    prompt_tokens: int
    prefill_ms: tuple[float, ...]
    exposed_ms: tuple[float, ...]
    kv_bytes: int
    decode_load: int = 0  # long decodes running on the decode worker meanwhile

    @property
    def exposed_share(self) -> float:
        """Median over runs of exposed / prefill time."""
        return statistics.median(e / p for e, p in zip(self.exposed_ms, self.prefill_ms))

    def to_json(self) -> dict:
        return dict(
            asdict(self),
            median_prefill_ms=statistics.median(self.prefill_ms),
            median_exposed_ms=statistics.median(self.exposed_ms),
            exposed_share=self.exposed_share,
        )


@dataclass
class WorkerProcess:
    role: str
    process: subprocess.Popen
    address: str = ""
    log_lines: list[str] = field(default_factory=list)
    stub: object = None
    channel: object = None


def start_workers(config: BenchConfig) -> dict[str, WorkerProcess]:
    """One decode worker per transport and one prefill worker per (transport, push mode), started together."""
    workers: dict[str, WorkerProcess] = {}
    for transport in TRANSPORTS:
        workers[f"decode-{transport}"] = _spawn_worker(config, "decode", transport, "--lease-ms", str(LEASE_MS))
        for mode in PUSH_MODES:
            workers[f"prefill-{transport}-{mode}"] = _spawn_worker(config, "prefill", transport, "--push-mode", mode)
    try:
        for worker in workers.values():
            _await_ready(worker)
    except BaseException:
        stop_workers(workers)
        raise
    return workers


def _spawn_worker(config: BenchConfig, role: str, transport: str, *extra: str) -> WorkerProcess:
    command = [
        sys.executable,
        "-m",
        "cluster.cli",
        "worker",
        role,
        "--model",
        config.model,
        "--dtype",
        config.dtype,
        "--transport",
        transport,
        "--port",
        "0",
        "--threads",
        str(config.worker_threads),
        "--kv-cache-mb",
        str(config.kv_cache_mb),
        "--max-num-batched-tokens",
        str(config.max_num_batched_tokens),
        *extra,
    ]
    ensure_secret_in_env()
    env = dict(os.environ, OMP_NUM_THREADS=str(config.worker_threads), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return WorkerProcess(role, process)


def _await_ready(worker: WorkerProcess) -> None:

    from protos import decode_pb2_grpc, prefill_pb2_grpc

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = worker.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{worker.role} worker exited: {''.join(worker.log_lines)}")
        worker.log_lines.append(line)
        if line.startswith("READY "):
            worker.address = json.loads(line[len("READY ") :])["address"]
            threading.Thread(target=lambda: worker.log_lines.extend(worker.process.stdout), daemon=True).start()
            worker.channel = ClusterAuth.from_env().channel(worker.address)
            stub_class = (
                decode_pb2_grpc.DecodeWorkerStub if worker.role == "decode" else prefill_pb2_grpc.PrefillWorkerStub
            )
            worker.stub = stub_class(worker.channel)
            return
    raise TimeoutError(f"{worker.role} worker did not start: {''.join(worker.log_lines)}")


def stop_workers(workers: dict[str, WorkerProcess]) -> None:
    for worker in workers.values():
        if worker.process.poll() is None:
            worker.process.terminate()
    for worker in workers.values():
        try:
            worker.process.wait(15)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait(10)
        if worker.channel is not None:
            worker.channel.close()


def measure_exposure(config: BenchConfig) -> list[ExposureRow]:
    from engine.presets import resolve_model_config

    vocab = resolve_model_config(config.model).vocab_size
    print(
        f"exposure: starting {len(TRANSPORTS) * (1 + len(PUSH_MODES))} worker processes ({config.model}) ...",
        flush=True,
    )
    workers = start_workers(config)
    try:
        pairs = [(transport, mode) for transport in TRANSPORTS for mode in PUSH_MODES]
        for transport, mode in pairs:  # warm-up: first-request costs, NIXL handshakes
            _one_request(workers, transport, mode, _prompt(vocab, min(config.prompt_lens), f"warm-{transport}-{mode}"))
        rows: list[ExposureRow] = []
        for length in config.prompt_lens:
            print(f"exposure: {length}-token prompts x {config.repeats_for(length)} per row ...", flush=True)
            rows += _measure_prompt_len(workers, pairs, vocab, length, config.repeats_for(length))
        if config.decode_load:
            length, repeats = min(config.prompt_lens), config.repeats_for(min(config.prompt_lens))
            print(f"exposure: {length}-token prompts beside {config.decode_load} running decodes ...", flush=True)
            for transport in TRANSPORTS:
                with DecodeLoad(workers[f"decode-{transport}"], vocab, config.decode_load):
                    (row,) = _measure_prompt_len(workers, [(transport, "layer")], vocab, length, repeats, "loaded")
                rows.append(dataclasses.replace(row, decode_load=config.decode_load))
        return rows
    finally:
        stop_workers(workers)


def _measure_prompt_len(
    workers: dict[str, WorkerProcess],
    pairs: list[tuple[str, str]],
    vocab: int,
    length: int,
    repeats: int,
    tag: str = "idle",
) -> list[ExposureRow]:
    """``repeats`` rounds over all (transport, mode) pairs, order rotated; new prompts every request
    (``tag`` tells one measurement's prompts from another's)."""
    results: dict[tuple[str, str], list] = {pair: [] for pair in pairs}
    for trial in range(repeats):
        shift = trial % len(pairs)
        for transport, mode in pairs[shift:] + pairs[:shift]:
            prompt = _prompt(vocab, length, f"{tag}-{transport}-{mode}-{length}-{trial}")
            results[transport, mode].append(_one_request(workers, transport, mode, prompt))
    return [
        ExposureRow(
            transport,
            mode,
            length,
            tuple(r.prefill_ms for r in results[transport, mode]),
            tuple(r.exposed_transfer_ms for r in results[transport, mode]),
            results[transport, mode][0].kv_bytes_sent,
        )
        for transport, mode in pairs
    ]


class DecodeLoad:
    """``count`` long decodes kept running on a decode worker while the block runs (each started again
    when it ends): the engine is inside a decode step whenever a commit comes, as in service."""

    def __init__(self, worker: WorkerProcess, vocab: int, count: int) -> None:
        self._worker, self._vocab = worker, vocab
        self._stopping = threading.Event()
        self._calls: dict[int, object] = {}
        self._decoding = [threading.Event() for _ in range(count)]
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def __enter__(self) -> DecodeLoad:
        for thread in self._threads:
            thread.start()
        for decoding in self._decoding:
            if not decoding.wait(START_TIMEOUT_S):
                self.__exit__(None, None, None)
                raise TimeoutError(f"the background decodes did not start: {''.join(self._worker.log_lines[-20:])}")
        return self

    def __exit__(self, *exc) -> None:
        self._stopping.set()
        for call in list(self._calls.values()):
            call.cancel()
        for thread in self._threads:
            thread.join(RPC_TIMEOUT_S)

    def _run(self, index: int) -> None:
        import grpc

        from protos import common_pb2, decode_pb2

        params = common_pb2.SamplingParams(max_tokens=LOAD_MAX_TOKENS, temperature=0.0, ignore_eos=True)
        for round_ in itertools.count():
            prompt = _prompt(self._vocab, LOAD_PROMPT_TOKENS, f"load-{index}-{round_}")
            request = decode_pb2.GenerateRequest(
                request_id=f"load-{index}-{round_}-{uuid.uuid4().hex[:8]}", prompt_token_ids=prompt, params=params
            )
            self._calls[index] = call = self._worker.stub.Generate(request, timeout=RPC_TIMEOUT_S)
            if self._stopping.is_set():  # stopped between two requests: this one was not cancelled
                call.cancel()
                return
            try:
                for response in call:
                    if response.token_ids:
                        self._decoding[index].set()
            except grpc.RpcError:
                if self._stopping.is_set():
                    return
                raise


def _prompt(vocab: int, length: int, seed: str) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(FIRST_REGULAR_TOKEN, vocab) for _ in range(length)]


def _one_request(workers: dict[str, WorkerProcess], transport: str, mode: str, prompt: list[int]):
    """Reserve on D, prefill on P with the ticket, then decode on D until done. Returns the PrefillResponse."""
    from protos import common_pb2, decode_pb2, prefill_pb2

    decode, prefill = workers[f"decode-{transport}"], workers[f"prefill-{transport}-{mode}"]
    request_id = f"exposure-{uuid.uuid4().hex[:12]}"
    params = common_pb2.SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    ticket = decode.stub.Reserve(
        decode_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, params=params, lease_ms=LEASE_MS),
        timeout=RPC_TIMEOUT_S,
    )
    if ticket.num_cached_tokens:
        raise RuntimeError(f"the decode worker had {ticket.num_cached_tokens} tokens of a fresh prompt cached")
    outputs = decode.stub.Generate(
        decode_pb2.GenerateRequest(request_id=request_id, reserved=True, token=ticket.token), timeout=RPC_TIMEOUT_S
    )  # a client waits from the start
    response = prefill.stub.Prefill(
        prefill_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, params=params, ticket=ticket),
        timeout=RPC_TIMEOUT_S,
    )
    for _ in outputs:
        pass
    if response.num_cached_tokens or response.prefill_ms <= 0:
        raise RuntimeError(f"prefill of a fresh prompt hit the prefix cache or was not timed: {response}")
    return response


# -- report ---------------------------------------------------------------------------------------


def build_report(
    config: BenchConfig, bandwidth: list[BandwidthRow], exposure: list[ExposureRow], seconds: float
) -> dict:
    return {
        "metadata": {
            "sizes_mib": config.sizes_mib,
            "repeats": config.repeats,
            "pool_layout": {
                "layers": LAYERS,
                "block_size": BLOCK_SIZE,
                "kv_heads": KV_HEADS,
                "head_dim": HEAD_DIM,
                "dtype": DTYPE,
            },
            "model": config.model,
            "dtype": config.dtype,
            "prompt_lens": config.prompt_lens,
            "exposure_repeats": [config.repeats_for(length) for length in config.prompt_lens],
            "worker_threads": config.worker_threads,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "wall_seconds": seconds,
        },
        "bandwidth": [_bandwidth_json(row, bandwidth) for row in bandwidth],
        "exposure": [row.to_json() for row in exposure],
        "targets": _targets(bandwidth),
    }


def _baseline(rows: list[BandwidthRow], path: str, size_bytes: int) -> BandwidthRow | None:
    return next((r for r in rows if r.path == path and r.size_bytes == size_bytes), None)


def _bandwidth_json(row: BandwidthRow, rows: list[BandwidthRow]) -> dict:
    memcpy, tcp = _baseline(rows, "memcpy", row.size_bytes), _baseline(rows, "tcp", row.size_bytes)
    return dict(
        row.to_json(), vs_memcpy=row.gb_s / memcpy.gb_s if memcpy else None, vs_tcp=row.gb_s / tcp.gb_s if tcp else None
    )


def _targets(rows: list[BandwidthRow]) -> list[dict]:
    """Judged on the transports as the system runs them by default: with checksums, the gRPC transport
    on its bulk path (``grpc`` rows are its PushKV fallback, shown for comparison)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    targets = []
    for row in rows:
        if row.checksums is not True or row.size_bytes < TARGET_MIN_MIB * MIB or row.path == "grpc":
            continue
        baseline, want = ("memcpy", NIXL_TARGET_VS_MEMCPY) if row.path == "nixl" else ("tcp", GRPC_TARGET_VS_TCP)
        reference = _baseline(rows, baseline, row.size_bytes)
        ratio = row.gb_s / reference.gb_s
        # However well the transfer overlapped its work, it cannot end before its CPU time spread
        # over every core it may run on: the best ratio this machine allows the path as it computes today.
        cpu_allows = statistics.median(reference.seconds) / (row.cpu_ms / 1e3 / cores)
        # NIXL on DRAM is the kernel's copy plus what NIXL adds: that copy's own ratio is its ceiling.
        copy = _baseline(rows, "cma", row.size_bytes) if row.path == "nixl" else None
        floor = _baseline(rows, "cma+xxh3", row.size_bytes) if row.path == "nixl" else None
        targets.append(
            {
                "path": row.path,
                "size_mib": row.size_bytes / MIB,
                "baseline": baseline,
                "ratio": ratio,
                "target": want,
                "met": ratio >= want,
                "cpu_ms": row.cpu_ms,
                "cores": cores,
                "cpu_allows": cpu_allows,
                "copy_ratio": copy.gb_s / reference.gb_s if copy else None,
                "vs_copy": row.gb_s / copy.gb_s if copy else None,
                "floor_ratio": floor.gb_s / reference.gb_s if floor else None,
            }
        )
    return targets


def print_report(report: dict) -> None:
    meta = report["metadata"]
    if report["bandwidth"]:
        print(f"\nKV bandwidth, loopback, median of {meta['repeats']} (pool: {LAYERS} layers x 16 KiB regions)")
        print(f"{'size':>8}  {'path':<24}{'median ms':>11}{'GB/s':>9}{'vs memcpy':>11}{'vs tcp':>9}{'cpu ms':>9}")
        for row in report["bandwidth"]:
            ratios = "".join(
                f"{row[key]:>{width}.0%}" if row[key] is not None else f"{'-':>{width}}"
                for key, width in (("vs_memcpy", 11), ("vs_tcp", 9))
            )
            print(
                f"{row['size_mib']:>4.0f} MiB  {row['label']:<24}{row['median_ms']:>11.2f}{row['gb_s']:>9.2f}{ratios}"
                f"{row['cpu_ms']:>9.2f}"
            )
        print("(cpu ms: CPU both ends spent inside the transfer, every thread; memcpy: its one thread)")
        if any(row["path"] == "cma" for row in report["bandwidth"]):
            print("(cma: the kernel's cross-process copy that NIXL's UCX makes on DRAM, the same runs, one thread;")
            print(" cma+xxh3: that copy while both ends hash the same runs, all at once, no transport)")
    if report["exposure"]:
        print(
            f"\nExposed transfer time, {meta['model']} {meta['dtype']}, {meta['worker_threads']} torch "
            "thread(s) per worker, median per row"
        )
        print(
            f"{'prompt':>7}  "
            f"{'transport':<10}{'push':<9}{'decoding':>9}{'runs':>5}{'prefill ms':>12}{'exposed ms':>12}"
            f"{'exposed/prefill':>17}{'KV MiB':>9}"
        )
        for row in report["exposure"]:
            print(
                f"{row['prompt_tokens']:>7}  {row['transport']:<10}{row['push_mode']:<9}{row['decode_load']:>9}"
                f"{len(row['prefill_ms']):>5}{row['median_prefill_ms']:>12.1f}{row['median_exposed_ms']:>12.2f}"
                f"{row['exposed_share']:>17.2%}{row['kv_bytes'] / MIB:>9.1f}"
            )
        print("(decoding: long decodes running on the decode worker meanwhile)")
    for target in report["targets"]:
        verdict = "met" if target["met"] else "MISSED"
        bound = ""
        if not target["met"]:
            bound = (
                f" ({target['cpu_ms']:.1f} ms of CPU on {target['cores']} cores allow at most "
                f"{target['cpu_allows']:.0%} here)"
            )
        copy = ""
        if target.get("vs_copy") is not None:
            copy = f" [{target['vs_copy']:.0%} of cma, its kernel copy, itself {target['copy_ratio']:.0%} of memcpy"
            if target.get("floor_ratio") is not None:
                copy += f"; that copy and both hashes at once reach {target['floor_ratio']:.0%}"
            copy += "]"
        print(
            f"target {target['path']} @ {target['size_mib']:.0f} MiB: {target['ratio']:.0%} of "
            f"{target['baseline']} vs >= {target['target']:.0%}: {verdict}{bound}{copy}"
        )
    print(f"({meta['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    if sys.argv[1:2] != ["serve"]:
        raise SystemExit(
            "usage: python -m bench.transfer_bench serve {tcp,grpc,nixl} --pool-bytes N (run `splitserve "
            "bench transfer` instead)"
        )
    sys.exit(serve(sys.argv[2:]))
