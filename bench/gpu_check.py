"""``python -m bench.gpu_check``: what scripts/gpu_check.sh measures on a machine with one GPU, one
section per call so that one failing or hanging part costs only its own numbers:

- ``flex-probe``: a C compiler and Python.h (Triton builds its launcher with them), then the compiled
  FlexAttention kernel on a pool whose sequences sit on high block ids, against the unfused reference;
- ``parity``: the engine's greedy tokens against transformers on the same device — fp32 token for
  token (the attention backend the device selects, and on CUDA the torch path with CUDA graphs too),
  bf16 on the first token;
- ``disaggregated``: prefill -> decode in two worker processes over NIXL and over gRPC, tokens
  against transformers, with the bytes the prefill worker sent and the transfer time it could not hide;
- ``transfer``: NIXL WRITE bytes/s between two processes' buffers (VRAM -> VRAM on CUDA) against a
  device-to-device copy, with the transports UCX chose;
- ``kv-bench``: ``splitserve bench transfer --device`` (both pools in VRAM on CUDA): every transport as
  the workers run it, against raw TCP and a device copy;
- ``decode``: engine decode tok/s against transformers on the same device, and the step time as a
  fraction of the memory roofline (bytes a step must read / bandwidth of a large on-device copy).

``--device cpu --quick`` runs every section on this host (DRAM instead of VRAM): the script's self-test.
Each section prints its row as JSON and writes it to ``--json``; ``summary`` prints the table of a run.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import queue
import random
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.tiny_model import TINY_SHAPE, write_checkpoint

SECTIONS = ("flex-probe", "parity", "disaggregated", "transfer", "kv-bench", "decode")
START_TIMEOUT_S = 90.0  # a worker: import, CUDA context, weights; its first request compiles flex
RPC_TIMEOUT_S = 60.0
UCX_TRANSPORT_NAMES = ("cuda_ipc", "cuda_copy", "gdr_copy", "rc_mlx5", "rc_verbs", "dc_mlx5", "ud_mlx5", "tcp")
UCX_TRANSPORT_NAMES += ("posix", "sysv", "cma", "knem", "xpmem", "self")  # as UCX_PROTO_INFO names them


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("section", choices=SECTIONS + ("summary",), help="what to run (summary: print a run's table)")
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the script's own self-test)")
    parser.add_argument("--quick", action="store_true", help="small sizes (the CPU self-test)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the section's row here")
    parser.add_argument("--log-dir", default=None, help="worker logs go here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="summary: the run's output folder")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in _HELPERS:
        return _HELPERS[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.section == "summary":
        return summary(Path(args.out or "."))
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("FAIL: --device cuda but torch sees no CUDA device", flush=True)
        return 2
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="gpu-check-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    runners = {
        "flex-probe": lambda: flex_probe(args.device),
        "parity": lambda: parity(args.device, args.quick),
        "disaggregated": lambda: disaggregated(args.device, log_dir, args.quick),
        "transfer": lambda: transfer(args.device, log_dir, args.quick),
        "kv-bench": lambda: kv_bench(args.device, log_dir, args.quick),
        "decode": lambda: decode_throughput(args.device, args.quick),
    }
    began = time.monotonic()
    try:
        row = runners[args.section]()
    except Exception as error:  # the section's row says what broke; the script goes on with the next
        import traceback

        traceback.print_exc()
        row = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    row = {"section": args.section, "device": _device_name(args.device), "seconds": time.monotonic() - began, **row}
    print(json.dumps(row, indent=2), flush=True)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(row, indent=2))
    print(f"{args.section}: {'PASS' if row['ok'] else 'FAIL'}", flush=True)
    return 0 if row["ok"] else 1


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


# -- flex-probe ---------------------------------------------------------------------------------------


def toolchain() -> dict:
    """What Triton needs to build its launchers: a C compiler and the interpreter's headers."""
    compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return {"c_compiler": shutil.which(compiler) if compiler else None, "python_h": python_h.is_file()}


def flex_probe(device: str) -> dict:
    """The compiled FlexAttention backend (eager on CPU) on sequences at block ids up to 255 of 256,
    against flex's unfused reference. Run in its own process: a device-side assert poisons its context."""
    import torch

    from engine.attention_flex import FlexPagedAttention, flex_available

    row = toolchain()
    if device.startswith("cuda"):
        try:
            import triton

            row["triton"] = triton.__version__
        except ImportError as error:
            row["triton"] = f"missing: {error}"
    if not flex_available():
        return {**row, "ok": False, "error": "FlexAttention is off (SPLITSERVE_FLEX_ATTENTION=0) or missing"}
    compiled = device.startswith("cuda")
    reference, kernel = FlexPagedAttention(compiled=False), FlexPagedAttention(compiled=compiled)
    inputs = _probe_inputs(device)
    expected = _probe_attend(reference, *inputs)
    got = _probe_attend(kernel, *inputs)
    _sync(device)
    error = float((got - expected).abs().max())
    return {**row, "compiled": compiled, "max_abs_error": error, "ok": error < 1e-3 and bool(torch.isfinite(got).all())}


def _probe_inputs(device: str):
    import torch

    from engine.attention import StepSequences
    from engine.kv_cache import KVLayout

    bs = 16
    layout = KVLayout(num_layers=1, num_blocks=256, block_size=bs, num_kv_heads=2, head_dim=16, dtype="float32")
    tables = ((200, 230, 255), (3, 250))
    rows = [(0, p) for p in range(40)] + [(1, 20)]  # a 40-token prefill and one decode at position 20
    sequences = StepSequences(
        row_sequence=torch.tensor([s for s, _ in rows]),
        positions=torch.tensor([p for _, p in rows]),
        block_tables=tables,
        block_size=bs,
        num_blocks=layout.num_blocks,
    )
    slot_block = torch.tensor([tables[s][p // bs] for s, p in rows], device=device)
    slot_offset = torch.tensor([p % bs for _, p in rows], device=device)
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn((1, 256, 2, bs, 2, 16), generator=generator).to(device)
    q = torch.randn((len(rows), 4, 16), generator=generator).to(device)
    k, v = (torch.randn((len(rows), 2, 16), generator=generator).to(device) for _ in range(2))
    return layout, pool, sequences, slot_block, slot_offset, q, k, v


def _probe_attend(backend, layout, pool, sequences, slot_block, slot_offset, q, k, v):
    import torch

    from engine.attention import AttentionBatch
    from engine.kv_cache import PagedKVCache

    cache = PagedKVCache(layout, str(pool.device))
    cache.data.copy_(pool)
    plan = backend.plan(sequences, cache)
    batch = AttentionBatch(slot_block, slot_offset, (), q.shape[0], None, None, backend=backend, plan=plan)
    with torch.inference_mode():
        return backend.attend(q, k, v, cache, 0, batch, scale=0.25)


# -- parity -------------------------------------------------------------------------------------------


def parity_prompts(count: int, seed: int = 2) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY_SHAPE["vocab_size"]) for _ in range(rng.randint(3, 70))] for _ in range(count)]


def hf_greedy(directory: str, device: str, dtype, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy tokens, one prompt at a time (no padding); stops at EOS like the engine."""
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(directory, torch_dtype=dtype).to(device).eval()
    outputs = []
    for prompt in prompts:
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
        outputs.append(out[0, len(prompt) :].tolist())
    return outputs


def engine_greedy(directory: str, device: str, dtype: str, prompts, new_tokens: int, attention=None, **config):
    """(tokens per prompt, the engine) — ``attention``: a backend to use instead of the device's choice;
    ``config``: EngineConfig fields."""
    from contract.sampling import SamplingParams
    from engine.config import EngineConfig
    from engine.engine import Engine

    engine = Engine(EngineConfig(model=directory, dtype=dtype, device=device, num_kv_blocks=256, **config))
    if attention is not None:
        engine.runner.attention = attention
    completions = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0))
    return [list(c.token_ids) for c in completions], engine


def graph_use(engine) -> dict:
    """What CUDA graphs did, counted: replays, not whether they were switched on."""
    graphs = engine.runner.graphs
    if graphs is None:
        return {"enabled": False, "captures": 0, "replays": 0}
    return {"enabled": True, "captures": graphs.captures, "replays": graphs.replays}


def compare_tokens(got: list[list[int]], expected: list[list[int]]) -> dict:
    """Per prompt, where the engine's tokens first leave transformers' (None: identical)."""
    first_difference = []
    for a, b in zip(got, expected):
        index = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        first_difference.append(index if index is not None or len(a) == len(b) else min(len(a), len(b)))
    identical = sum(d is None for d in first_difference)
    return {"identical": identical, "prompts": len(got), "first_difference": first_difference}


def parity(device: str, quick: bool) -> dict:
    import torch

    from engine.attention import TorchPagedAttention

    prompts = parity_prompts(3 if quick else 6)
    new_tokens = 8 if quick else 16
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory)
        expected = hf_greedy(directory, device, torch.float32, prompts, new_tokens)
        cuda = device.startswith("cuda")
        # (label, attention backend, EngineConfig fields, whether decode steps must replay CUDA graphs)
        variants = [("device default", None, {}, cuda)]
        if cuda:
            variants.append(("device default, no CUDA graphs", None, {"cuda_graph_max_batch": 0}, False))
            variants.append(("torch path + CUDA graphs", TorchPagedAttention(), {}, True))
        for label, attention, config, replays in variants:
            got, engine = engine_greedy(directory, device, "float32", prompts, new_tokens, attention, **config)
            row = {"dtype": "float32", "variant": label, "attention": engine.runner.attention.name}
            row.update(compare_tokens(got, expected), graphs=graph_use(engine))
            row["ok"] = row["identical"] == len(prompts) and (row["graphs"]["replays"] > 0) == replays
            rows.append(row)
            del engine
        got, engine = engine_greedy(directory, device, "bfloat16", prompts, 3)
        expected_bf16 = hf_greedy(directory, device, torch.bfloat16, prompts, 3)
        first = sum(a[:1] == b[:1] for a, b in zip(got, expected_bf16))
        rows.append(
            {
                "dtype": "bfloat16",
                "variant": "device default, first token",
                "attention": engine.runner.attention.name,
                "first_token_agrees": first,
                "prompts": len(prompts),
                "three_tokens_agree": sum(a == b for a, b in zip(got, expected_bf16)),
                "ok": first >= len(prompts) - 1,  # bf16 rounding may flip one near-tie
            }
        )
    for row in rows:
        agree = row.get("identical", row.get("first_token_agrees"))
        print(f"parity {row['dtype']} {row['variant']} [{row['attention']}]: {agree}/{row['prompts']}", flush=True)
    return {"ok": all(r["ok"] for r in rows), "rows": rows}


# -- disaggregated ------------------------------------------------------------------------------------


def disaggregated(device: str, log_dir: Path, quick: bool) -> dict:
    import torch

    prompts = parity_prompts(3 if quick else 4, seed=3)
    new_tokens = 8 if quick else 12
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        write_checkpoint(directory)
        expected = hf_greedy(directory, device, torch.float32, prompts, new_tokens)
        for transport in ("nixl", "grpc"):
            try:
                row = _disaggregated_over(transport, directory, device, prompts, new_tokens, expected, log_dir)
            except Exception as error:
                row = {"transport": transport, "ok": False, "error": f"{type(error).__name__}: {error}"}
            rows.append(row)
            verdict = "identical" if row["ok"] else f"FAIL {row.get('error', '(tokens differ)')}"
            print(f"disaggregated over {transport}: {verdict}", flush=True)
    return {"ok": all(r["ok"] for r in rows), "rows": rows}


def _disaggregated_over(transport, directory, device, prompts, new_tokens, expected, log_dir: Path) -> dict:
    from protos import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

    logs = {role: log_dir / f"worker-{transport}-{role}.log" for role in ("decode", "prefill")}
    workers = {role: _Worker(role, directory, transport, device, logs[role]) for role in logs}
    try:
        decode = decode_pb2_grpc.DecodeWorkerStub(workers["decode"].channel())
        prefill = prefill_pb2_grpc.PrefillWorkerStub(workers["prefill"].channel())
        params = common_pb2.SamplingParams(max_tokens=new_tokens, temperature=0.0)
        results = [_one_request(decode, prefill, p, params) for p in prompts]
    finally:
        for worker in workers.values():
            worker.stop()
    got = [tokens for tokens, _ in results]
    row = {"transport": transport, **compare_tokens(got, expected)}
    row["ok"] = row["identical"] == len(prompts)
    row["requests"] = [response for _, response in results]
    row["kv_bytes_sent"] = sum(r["kv_bytes_sent"] for r in row["requests"])
    row["exposed_transfer_ms"] = [r["exposed_transfer_ms"] for r in row["requests"]]
    row["ucx"] = ucx_transports_in([logs["decode"], logs["prefill"]])
    return row


class _Worker:
    """One ``splitserve worker`` process; its output goes to ``log`` (read by a thread, so waiting for
    READY keeps its deadline even when the worker prints nothing)."""

    def __init__(self, role: str, model_dir: str, transport: str, device: str, log: Path) -> None:
        from protos.cluster_auth import ensure_secret_in_env

        ensure_secret_in_env()
        command = [sys.executable, "-m", "cluster.cli", "worker", role, "--model", model_dir, "--dtype", "float32"]
        command += ["--transport", transport, "--device", device, "--port", "0", "--kv-cache-mb", "64"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if transport == "nixl":
            env.setdefault("UCX_PROTO_INFO", "y")  # UCX prints the protocol and transport it picks
        self.log = log
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self._lines = _line_queue(self.process.stdout, log)

    def channel(self):
        from protos.cluster_auth import ClusterAuth

        line = _wait_for_prefix(self._lines, "READY ", START_TIMEOUT_S, self.log)
        return ClusterAuth.from_env().channel(json.loads(line[len("READY ") :])["address"])

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


def _line_queue(stream, log: Path | None) -> queue.Queue:
    """A thread copies ``stream``'s lines into the returned queue (and ``log``); None at its end."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        with open(log, "w") if log else contextlib.nullcontext() as sink:
            for line in stream:
                lines.put(line)
                if sink:
                    sink.write(line)
                    sink.flush()
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _wait_for_prefix(lines: queue.Queue, prefix: str, timeout: float, log: Path | None) -> str:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(left, 0.001)) if left > 0 else None
        except queue.Empty:
            line = None
        if line is None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            why = "exited" if left > 0 else f"not there after {timeout:.0f} s"
            raise RuntimeError(f"no {prefix.strip()} line: process {why}; output tail:\n{tail}")
        if line.startswith(prefix):
            return line.rstrip("\n")


def _one_request(decode, prefill, prompt, params) -> tuple[list[int], dict]:
    from protos import decode_pb2, prefill_pb2

    request_id = f"gpu-check-{uuid.uuid4().hex[:12]}"
    ticket = decode.Reserve(
        decode_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, params=params, lease_ms=60_000),
        timeout=RPC_TIMEOUT_S,
    )
    claim = decode_pb2.GenerateRequest(request_id=request_id, reserved=True, token=ticket.token)
    outputs = decode.Generate(claim, timeout=RPC_TIMEOUT_S)
    response = prefill.Prefill(
        prefill_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, params=params, ticket=ticket),
        timeout=RPC_TIMEOUT_S,
    )
    tokens = [t for output in outputs for t in output.token_ids]
    numbers = {
        "kv_bytes_sent": response.kv_bytes_sent,
        "prefill_ms": round(response.prefill_ms, 3),
        "exposed_transfer_ms": round(response.exposed_transfer_ms, 3),
    }
    return tokens, numbers


def ucx_transports_in(logs: list[Path]) -> dict:
    """What UCX_PROTO_INFO's tables say a remote write (NIXL's WRITE) goes over: one line per
    distinct (operation, size range, protocol, transport/device) row, and the transports named."""
    rows: list[str] = []
    for log in logs:
        operation = ""
        for line in log.read_text().splitlines() if log.exists() else []:
            cells = [c.strip() for c in line.partition("]   |")[2].split("|")][:-1] if "]   |" in line else []
            if len(cells) == 1:
                operation = cells[0]
            elif len(cells) == 3 and cells[0] != "Range" and "remote memory write" in operation:
                rows.append(f"{operation}: {cells[0]} {cells[1]} {cells[2]}")
    rows = list(dict.fromkeys(rows))
    named = sorted({name for name in UCX_TRANSPORT_NAMES for row in rows if f" {name}/" in row})
    return {"transports_named": named, "remote_write": rows[:20]}


# -- transfer -----------------------------------------------------------------------------------------


def transfer(device: str, log_dir: Path, quick: bool) -> dict:
    """Receiver and sender in two processes (the workers' setting: on one GPU, CUDA IPC if UCX picks it)."""
    nbytes = (32 << 20) if quick else (2 << 30)
    regions = (1 << 20, 8 << 20) if quick else (1 << 20, 256 << 20)
    env = dict(os.environ, PYTHONUNBUFFERED="1", UCX_PROTO_INFO=os.environ.get("UCX_PROTO_INFO", "y"))
    logs = [log_dir / "transfer-receiver.log", log_dir / "transfer-sender.log"]

    def spawn(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "bench.gpu_check", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    receiver = spawn("_transfer-receiver", device, str(nbytes))
    try:
        receiver_lines = _line_queue(receiver.stdout, logs[0])
        ready = _wait_for_prefix(receiver_lines, "READY ", START_TIMEOUT_S, logs[0])
        sender = spawn("_transfer-sender", device, str(nbytes), ",".join(map(str, regions)))
        try:
            sender.stdin.write(ready[len("READY ") :] + "\n")
            sender.stdin.flush()
            result = json.loads(_wait_for_prefix(_line_queue(sender.stdout, logs[1]), "RESULT ", 240, logs[1])[7:])
        finally:
            sender.kill()
            sender.wait(10)
        receiver.stdin.write("checksum\n")
        receiver.stdin.flush()
        landed = json.loads(_wait_for_prefix(receiver_lines, "CHECKSUM ", 120, logs[0])[len("CHECKSUM ") :])
    finally:
        receiver.kill()
        receiver.wait(10)
    sent = result.pop("checksum")
    row = {**result, "intact": landed == sent, "ucx": ucx_transports_in(logs)}
    row["ok"] = row["intact"]
    for write in row["writes"]:
        print(
            f"NIXL {write['region_bytes'] >> 20} MiB regions: {write['gb_s']:.1f} GB/s vs device copy "
            f"{row['device_copy_gb_s']:.1f} GB/s ({write['gb_s'] / row['device_copy_gb_s']:.2f}x)",
            flush=True,
        )
    print(
        f"device checksum: {row['device_checksum_gb_s']:.1f} GB/s "
        f"({row['device_checksum_gb_s'] / row['device_copy_gb_s']:.2f}x the device copy)",
        flush=True,
    )
    print(f"data intact: {row['intact']}; UCX transports named: {row['ucx']['transports_named']}", flush=True)
    return row


def _transfer_buffer(device: str, nbytes: int):
    import torch

    from kv_transfer.nixl_agent import NixlPool

    buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    return buffer, NixlPool(f"gpu-check-{uuid.uuid4().hex[:8]}", buffer)


def _chunk_checksums(buffer) -> list[int]:
    from kv_transfer.integrity import device_checksum

    return [device_checksum(chunk.view(1, -1)) for chunk in buffer.split(64 << 20)]


def _transfer_receiver(argv: list[str]) -> int:
    """Helper process: a NIXL pool that peers write into; prints READY, answers ``checksum`` on stdin."""
    device, nbytes = argv[0], int(argv[1])
    buffer, pool = _transfer_buffer(device, nbytes)
    stop = threading.Event()

    def progress() -> None:  # UCX moves data for transports that need the target's progress (tcp)
        while not stop.is_set():
            pool.poll_notifications()
            stop.wait(0.0002)

    poller = threading.Thread(target=progress, daemon=True)
    poller.start()
    peer = {"metadata": base64.b64encode(pool.metadata()).decode(), "descriptor": pool.descriptor.to_dict()}
    print("READY " + json.dumps(peer), flush=True)
    for command in sys.stdin:
        if command.strip() == "checksum":
            _sync(device)
            print("CHECKSUM " + json.dumps(_chunk_checksums(buffer)), flush=True)
    stop.set()
    poller.join(5)
    pool.close()
    return 0


def _transfer_sender(argv: list[str]) -> int:
    """Helper process: random bytes written into the receiver's pool, back to back, timed; prints RESULT."""
    import torch

    from kv_transfer.nixl_agent import PoolDescriptor

    device, nbytes, regions = argv[0], int(argv[1]), [int(r) for r in argv[2].split(",")]
    peer = json.loads(sys.stdin.readline())
    buffer, pool = _transfer_buffer(device, nbytes)
    buffer.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)))
    copy_s = _copy_seconds(buffer, device)
    pool.add_peer(base64.b64decode(peer["metadata"]))
    descriptor = PoolDescriptor.from_dict(peer["descriptor"])
    writes = []
    for region in regions:
        offsets = list(range(0, nbytes, region))
        pool.write(descriptor, offsets, offsets, region, b"").wait(60)  # warm-up: connection, registration
        repeats = 5
        begin = time.perf_counter()
        handles = [pool.write(descriptor, offsets, offsets, region, b"") for _ in range(repeats)]
        for handle in handles:
            handle.wait(120)
        seconds = time.perf_counter() - begin
        writes.append({"region_bytes": region, "writes": repeats, "gb_s": repeats * nbytes / seconds / 1e9})
    result = {"bytes": nbytes, "device_copy_gb_s": nbytes / copy_s / 1e9, "writes": writes}
    # What integrity costs a VRAM pool: the device checksum both ends run per layer (kv_transfer/integrity.py),
    # over 16 KiB regions as a KV layer has them.
    from kv_transfer.integrity import device_checksum

    hashed = buffer[: min(nbytes, 256 << 20)]
    checksum_s = _best_of(lambda: device_checksum(hashed.view(-1, 16 << 10)), device)
    result["device_checksum_gb_s"] = hashed.numel() / checksum_s / 1e9
    result["checksum"] = _chunk_checksums(buffer)
    pool.close()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _copy_seconds(buffer, device: str) -> float:
    """Best time of ``buffer`` copied into a fresh buffer on its device (freed on return)."""
    import torch

    target = torch.empty_like(buffer)
    return _best_of(lambda: target.copy_(buffer), device)


def _best_of(run, device: str, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        begin = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - begin)
    return best


# -- kv-bench -----------------------------------------------------------------------------------------


def kv_bench(device: str, log_dir: Path, quick: bool) -> dict:
    """``splitserve bench transfer`` with both ends' pools on ``device``: the gRPC transport's bulk links
    (VRAM staged through pinned host memory) against raw TCP, NIXL against a copy in the same memory."""
    report_path = log_dir / "kv-bench.json"
    sizes = ["--quick"] if quick else ["--sizes", "64,256", "--repeats", "3"]
    command = [sys.executable, "-m", "cluster.cli", "bench", "transfer", "--device", device, "--skip-exposure"]
    done = subprocess.run([*command, *sizes, "--json", str(report_path)], capture_output=True, text=True, timeout=600)
    (log_dir / "kv-bench.log").write_text(done.stdout + done.stderr)
    print(done.stdout[-6000:], flush=True)
    if done.returncode != 0:
        return {"ok": False, "error": f"bench transfer exited {done.returncode}: {done.stderr[-300:]}"}
    rows = json.loads(report_path.read_text())["bandwidth"]
    keep = ("path", "checksums", "size_mib", "gb_s", "vs_memcpy", "vs_tcp", "cpu_ms")
    rows = [{key: row[key] for key in keep} for row in rows]
    return {"rows": rows, "ok": all(row["gb_s"] > 0 for row in rows)}


# -- decode -------------------------------------------------------------------------------------------


def read_bandwidth(device: str, megabytes: int = 1024) -> float:
    """Bytes per second one large reduction reads: the memory roofline a decode step (which reads weights and
    KV, and writes next to nothing) is held to. A copy's rate would understate it: on a 2-core Xeon, a sum
    reads 25 GB/s where a copy moves 13.5 GB/s each way."""
    import torch

    src = torch.ones(megabytes << 18, dtype=torch.float32, device=device)
    return src.numel() * src.element_size() / _best_of(lambda: src.sum(), device)


def decode_throughput(device: str, quick: bool) -> dict:
    import torch

    from bench.engine_bench import hf_model_from_engine, make_prompts
    from engine.config import EngineConfig
    from engine.engine import Engine

    model, dtype = ("demo", "float32") if quick else ("bench-125m", "bfloat16")
    batch, prompt_len, steps = (4, 16, 4) if quick else (32, 128, 32)
    engine = Engine(
        EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            num_kv_blocks=4 * batch * (prompt_len + steps) // 16 + 8,
            max_num_seqs=batch + 1,  # the mixed step's prompt joins a full batch of decodes
            max_num_batched_tokens=max(2048, batch * prompt_len),
        )
    )
    hf = hf_model_from_engine(engine.runner.model, getattr(torch, dtype)).to(device)
    engine_s, hf_s = [], []
    for trial in range(3):  # the first trial compiles and warms up; the best of the others counts
        prompts = make_prompts(batch, prompt_len, engine.model_config.vocab_size, seed=f"gpu-check-{trial}")
        engine_s.append(_engine_decode_seconds(engine, prompts, steps, device))
        hf_s.append(_hf_decode_seconds(hf, prompts, steps, device))
    engine_tok_s, hf_tok_s = batch * steps / min(engine_s[1:]), batch * steps / min(hf_s[1:])
    mixed = mixed_step_ms(engine, batch, prompt_len, 2 * prompt_len, device)
    step_bytes = weight_bytes_per_step(engine.runner.model) + kv_bytes_per_step(engine, batch, prompt_len + steps / 2)
    bandwidth = read_bandwidth(device, 64 if quick else 1024)
    step_s = min(engine_s[1:]) / steps
    row = {
        "model": model,
        "dtype": dtype,
        "batch": batch,
        "engine_tok_s": engine_tok_s,
        "hf_tok_s": hf_tok_s,
        "ratio": engine_tok_s / hf_tok_s,
        "bytes_per_step": step_bytes,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "roofline_fraction": step_bytes / bandwidth / step_s,  # a step at the roofline reads its bytes once
        "graphs": graph_use(engine),
        "attention": engine.runner.attention.name,
        **mixed,
        "ok": True,
    }
    graphs = row["graphs"]
    print(
        f"decode@{batch} {model} {dtype} [{row['attention']}]: engine {engine_tok_s:.0f} tok/s vs transformers "
        f"{hf_tok_s:.0f} ({row['ratio']:.2f}x); {row['roofline_fraction']:.0%} of the memory roofline "
        f"({step_bytes / 1e6:.0f} MB/step at {bandwidth / 1e9:.0f} GB/s read); "
        f"cuda graphs: {graphs['replays']} replays" + ("" if graphs["replays"] else " (not used on this path)"),
        flush=True,
    )
    print(
        f"a {mixed['mixed_chunk_tokens']}-token prompt joining {batch} decodes: the step takes "
        f"{mixed['mixed_step_ms']:.2f} ms, against {mixed['prefill_step_ms']:.2f} ms for that prompt alone plus "
        f"{mixed['decode_step_ms']:.2f} ms for a decode step",
        flush=True,
    )
    return row


def mixed_step_ms(engine, batch: int, prompt_len: int, chunk: int, device: str) -> dict:
    """What a prompt joining running decodes costs them: the step that computes the ``chunk``-token prompt
    beside ``batch`` decodes (eager: graphs take decode-only steps), against a decode-only step and the
    same prompt's step on an idle engine. Each the best of two, after a warm-up of each shape."""
    from bench.engine_bench import make_prompts
    from contract.sampling import SamplingParams

    vocab = engine.model_config.vocab_size
    running = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)  # still decoding when it joins
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def timed_step() -> tuple[float, list]:
        _sync(device)
        begin = time.perf_counter()
        outputs = engine.step()
        _sync(device)
        return (time.perf_counter() - begin) * 1e3, outputs

    def drain() -> None:
        while engine.has_unfinished():
            engine.step()

    decode, mixed, alone = [], [], []
    for trial in range(3):
        (prompt,) = make_prompts(1, chunk, vocab, seed=f"gpu-check-mixed-alone-{trial}")
        engine.add_request(f"gpu-check-alone-{uuid.uuid4().hex[:8]}", prompt, one)
        alone.append(timed_step()[0])
        drain()
        for index, prompt in enumerate(make_prompts(batch, prompt_len, vocab, seed=f"gpu-check-mixed-{trial}")):
            engine.add_request(f"gpu-check-mixed-{uuid.uuid4().hex[:8]}-{index}", prompt, running)
        engine.step()  # their prefill
        engine.step()  # a decode step of each shape first: a graph captured, kernels compiled
        decode.append(timed_step()[0])
        (prompt,) = make_prompts(1, chunk, vocab, seed=f"gpu-check-mixed-join-{trial}")
        joining = f"gpu-check-join-{uuid.uuid4().hex[:8]}"
        engine.add_request(joining, prompt, one)
        elapsed, outputs = timed_step()
        stepped = {o.request_id for o in outputs if o.token_ids}
        if joining not in stepped or len(stepped) != batch + 1:
            raise RuntimeError(f"the joining prompt's step was not mixed: {len(stepped)} requests got a token")
        mixed.append(elapsed)
        drain()
    return {
        "mixed_chunk_tokens": chunk,
        "mixed_step_ms": min(mixed[1:]),
        "prefill_step_ms": min(alone[1:]),
        "decode_step_ms": min(decode[1:]),
    }


def weight_bytes_per_step(model) -> int:
    """Weights a decode step reads: every parameter but the embedding table (a few rows of it)."""
    embedding = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied table is counted once
    tied = model.lm_head.weight is embedding
    return total if tied else total - embedding.numel() * embedding.element_size()


def kv_bytes_per_step(engine, batch: int, mean_context: float) -> int:
    cfg = engine.model_config
    per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * engine.kv_cache.data.element_size()
    return int(batch * mean_context * per_token)


def _engine_decode_seconds(engine, prompts, steps: int, device: str) -> float:
    from contract.sampling import SamplingParams

    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"gpu-check-{uuid.uuid4().hex[:8]}-{index}", prompt, params)
    engine.step()  # the prefill step: every prompt gets its first token
    _sync(device)
    begin = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    _sync(device)
    return time.perf_counter() - begin


def _hf_decode_seconds(hf, prompts, steps: int, device: str) -> float:
    import torch
    from transformers import DynamicCache

    with torch.inference_mode():
        ids = torch.tensor(prompts, device=device)
        cache = DynamicCache()
        logits = hf(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        _sync(device)
        begin = time.perf_counter()
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            logits = hf(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
        logits.argmax(-1).tolist()
        return time.perf_counter() - begin


# -- summary ------------------------------------------------------------------------------------------


def summary(out: Path) -> int:
    """Merges the section rows of a run into gpu_check.json and prints their headline numbers."""
    rows = {}
    for section in SECTIONS:
        path = out / f"{section}.json"
        if path.exists():
            rows[section] = json.loads(path.read_text())
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=2))
    for section, row in rows.items():
        print(f"  {section:14s} {'PASS' if row.get('ok') else 'FAIL'}  {headline(section, row)}")
    return 0


def headline(section: str, row: dict) -> str:
    if "error" in row and section not in ("disaggregated",):
        return row["error"][:160]
    if section == "flex-probe":
        return f"compiled={row.get('compiled')} max |err| {row.get('max_abs_error', float('nan')):.2e}"
    if section == "parity":
        parts = []
        for r in row["rows"]:
            agree = r.get("identical", r.get("first_token_agrees"))
            extra = f", graphs {r['graphs']['replays']} replays" if "graphs" in r else ""
            parts.append(f"{r['dtype']} {r['attention']} {agree}/{r['prompts']}{extra}")
        return "; ".join(parts)
    if section == "disaggregated":
        parts = []
        for r in row["rows"]:
            if "error" in r:
                parts.append(f"{r['transport']}: {r['error'][:80]}")
            else:
                exposed = max(r["exposed_transfer_ms"], default=0.0)
                parts.append(
                    f"{r['transport']} {r['identical']}/{r['prompts']} identical, {r['kv_bytes_sent']} B, "
                    f"exposed <= {exposed:.1f} ms, ucx {','.join(r['ucx']['transports_named']) or '-'}"
                )
        return "; ".join(parts)
    if section == "transfer":
        writes = ", ".join(f"{w['region_bytes'] >> 20} MiB regions {w['gb_s']:.1f} GB/s" for w in row["writes"])
        return (
            f"{writes} vs copy {row['device_copy_gb_s']:.1f} GB/s; checksum {row['device_checksum_gb_s']:.1f} GB/s; "
            f"ucx {','.join(row['ucx']['transports_named'])}"
        )
    if section == "kv-bench":
        checked = [r for r in row["rows"] if r["checksums"] and r["path"] in ("bulk", "nixl")]
        return ", ".join(
            f"{r['path']} {r['size_mib']} MiB {r['gb_s']:.2f} GB/s "
            + (f"({r['vs_tcp']:.0%} of tcp)" if r["path"] == "bulk" else f"({r['vs_memcpy']:.0%} of copy)")
            for r in checked
        )
    if section == "decode":
        return (
            f"{row['engine_tok_s']:.0f} vs {row['hf_tok_s']:.0f} tok/s ({row['ratio']:.2f}x), "
            f"{row['roofline_fraction']:.0%} of roofline, {row['attention']}, "
            f"graphs {row['graphs']['replays']} replays; mixed step {row['mixed_step_ms']:.1f} ms "
            f"vs prefill {row['prefill_step_ms']:.1f} + decode {row['decode_step_ms']:.1f} ms"
        )
    return ""


_HELPERS = {"_transfer-receiver": _transfer_receiver, "_transfer-sender": _transfer_sender}


if __name__ == "__main__":
    sys.exit(main())
