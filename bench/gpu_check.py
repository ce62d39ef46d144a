"""``python -m bench.gpu_check``: what scripts/gpu_check.sh measures on a machine with one GPU.

1. prefill -> decode in two worker processes on the device, over NIXL and over gRPC: greedy fp32
   tokens identical to transformers on the same device;
2. KV bytes/s pool -> pool through NIXL (VRAM -> VRAM on CUDA) vs a plain device-to-device copy;
3. decode tok/s of the engine vs transformers on the same device, and as a fraction of the memory
   roofline: (weight bytes + KV bytes read) per step / bandwidth of a large on-device copy.

``--device cpu`` runs every part on this host (DRAM instead of VRAM): how CI proves the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import torch

from contract.sampling import SamplingParams

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
PROMPTS = ([5, 17, 99, 3, 250, 41, 7], list(range(10, 60)), [300] * 20)
NEW_TOKENS = 12
START_TIMEOUT_S = 180.0
RPC_TIMEOUT_S = 120.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the script's own self-test)")
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--skip-workers", action="store_true", help="leave out the two-process part")
    parser.add_argument("--json", dest="json_path", default=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("FAIL: --device cuda but torch sees no CUDA device", flush=True)
        return 2
    report: dict = {"device": _device_name(args.device), "torch": torch.__version__}
    ok = True
    if not args.skip_workers:
        report["disaggregated"] = disaggregated(args.device)
        ok &= all(row["identical"] for row in report["disaggregated"])
    report["transfer"] = transfer_bandwidth(args.device, 8 if args.quick else 256)
    report["decode"] = decode_throughput(args.device, quick=args.quick)
    print(json.dumps(report, indent=2), flush=True)
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump(report, handle, indent=2)
    print("gpu_check:", "PASS" if ok else "FAIL (tokens differ from transformers)", flush=True)
    return 0 if ok else 1


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"


# -- 1. prefill -> decode across two processes -------------------------------------------------------


def write_tiny_checkpoint(directory: str) -> None:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, torch_dtype="float32"))
    model.save_pretrained(directory)


def hf_greedy(directory: str, device: str, prompt: list[int], new_tokens: int) -> list[int]:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).to(device).eval()
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def disaggregated(device: str) -> list[dict]:
    from protos import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc

    rows = []
    with tempfile.TemporaryDirectory() as directory:
        write_tiny_checkpoint(directory)
        expected = [hf_greedy(directory, device, p, NEW_TOKENS) for p in PROMPTS]
        for transport in ("nixl", "grpc"):
            workers = [_spawn(role, directory, transport, device) for role in ("decode", "prefill")]
            try:
                decode, prefill = (
                    _channel(w, stub)
                    for w, stub in zip(workers, (decode_pb2_grpc.DecodeWorkerStub, prefill_pb2_grpc.PrefillWorkerStub))
                )
                params = common_pb2.SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
                got = [_one_request(decode, prefill, p, params, decode_pb2, prefill_pb2) for p in PROMPTS]
            finally:
                for worker in workers:
                    worker.kill()
                    worker.wait(10)
            rows.append({"transport": transport, "identical": got == expected, "engine": got, "transformers": expected})
            print(f"disaggregated over {transport}: {'identical' if got == expected else 'DIFFERENT'}", flush=True)
    return rows


def _spawn(role: str, model_dir: str, transport: str, device: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "cluster.cli",
        "worker",
        role,
        "--model",
        model_dir,
        "--dtype",
        "float32",
        "--transport",
        transport,
        "--device",
        device,
        "--port",
        "0",
        "--kv-cache-mb",
        "64",
    ]
    from protos.cluster_auth import ensure_secret_in_env

    ensure_secret_in_env()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _channel(process: subprocess.Popen, stub_class):
    from protos.cluster_auth import ClusterAuth

    lines: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("READY "):
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
            address = json.loads(line[len("READY ") :])["address"]
            return stub_class(ClusterAuth.from_env().channel(address))
    raise RuntimeError("worker did not start:\n" + "".join(lines[-30:]))


def _one_request(decode, prefill, prompt, params, decode_pb2, prefill_pb2) -> list[int]:
    request_id = f"gpu-check-{uuid.uuid4().hex[:12]}"
    ticket = decode.Reserve(
        decode_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, params=params, lease_ms=60_000),
        timeout=RPC_TIMEOUT_S,
    )
    claim = decode_pb2.GenerateRequest(request_id=request_id, reserved=True, token=ticket.token)
    outputs = decode.Generate(claim, timeout=RPC_TIMEOUT_S)
    prefill.Prefill(
        prefill_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, params=params, ticket=ticket),
        timeout=RPC_TIMEOUT_S,
    )
    return [t for output in outputs for t in output.token_ids]


# -- 2. pool -> pool bytes/s -------------------------------------------------------------------------


def transfer_bandwidth(device: str, megabytes: int) -> dict:
    """NIXL WRITE of one pool into another (both on ``device``) vs ``dst.copy_(src)``."""
    from kv_transfer.nixl_agent import NixlPool

    nbytes = megabytes << 20
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    copy_s = _best_of(lambda: dst.copy_(src), device)
    sender, receiver = NixlPool("gpu-check-sender", src), NixlPool("gpu-check-receiver", dst)
    stop = threading.Event()

    def progress_receiver() -> None:  # without a progress thread, UCX moves only inside calls into the agent
        while not stop.is_set():
            receiver.poll_notifications()
            stop.wait(0.0002)

    poller = threading.Thread(target=progress_receiver, daemon=True)
    poller.start()
    try:
        sender.add_peer(receiver.metadata())
        region = 1 << 20
        offsets = list(range(0, nbytes, region))

        def write() -> None:
            sender.write(receiver.descriptor, offsets, offsets, region, b"done").wait(60)

        dst.zero_()
        nixl_s = _best_of(write, device)
        intact = bool(torch.equal(src, dst))
    finally:
        stop.set()
        poller.join(5)
        sender.close()
        receiver.close()
    row = {
        "bytes": nbytes,
        "nixl_gb_s": nbytes / nixl_s / 1e9,
        "device_copy_gb_s": nbytes / copy_s / 1e9,
        "ratio": copy_s / nixl_s,
        "intact": intact,
    }
    print(
        f"pool -> pool over NIXL: {row['nixl_gb_s']:.1f} GB/s vs device copy {row['device_copy_gb_s']:.1f} GB/s "
        f"({row['ratio']:.2f}x), data intact: {intact}",
        flush=True,
    )
    return row


def _best_of(run, device: str, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        begin = time.perf_counter()
        run()
        _sync(device)
        best = min(best, time.perf_counter() - begin)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


# -- 3. decode tok/s and the memory roofline ----------------------------------------------------------


def copy_bandwidth(device: str, megabytes: int = 1024) -> float:
    """Bytes moved per second (read + write) by one large on-device copy."""
    src = torch.ones(megabytes << 20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _best_of(lambda: dst.copy_(src), device)


def decode_throughput(device: str, quick: bool) -> dict:
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
            max_num_seqs=batch,
            max_num_batched_tokens=max(2048, batch * prompt_len),
        )
    )
    hf = hf_model_from_engine(engine.runner.model, getattr(torch, dtype)).to(device)
    engine_s, hf_s = [], []
    for trial in range(3):
        prompts = make_prompts(batch, prompt_len, engine.model_config.vocab_size, seed=f"gpu-check-{trial}")
        engine_s.append(_engine_decode_seconds(engine, prompts, steps, device))
        hf_s.append(_hf_decode_seconds(hf, prompts, steps, device))
    engine_tok_s, hf_tok_s = batch * steps / min(engine_s[1:]), batch * steps / min(hf_s[1:])
    weight_bytes = weight_bytes_per_step(engine.runner.model)
    cfg = engine.model_config
    mean_context = prompt_len + steps / 2
    kv_bytes = (
        batch
        * mean_context
        * cfg.num_layers
        * 2
        * cfg.num_kv_heads
        * cfg.head_dim
        * engine.kv_cache.data.element_size()
    )
    bandwidth = copy_bandwidth(device, 64 if quick else 1024)
    roofline_step_s = (weight_bytes + kv_bytes) / (bandwidth / 2)  # a copy moves each byte twice (read + write)
    step_s = min(engine_s[1:]) / steps
    row = {
        "model": model,
        "dtype": dtype,
        "batch": batch,
        "engine_tok_s": engine_tok_s,
        "hf_tok_s": hf_tok_s,
        "ratio": engine_tok_s / hf_tok_s,
        "bytes_per_step": weight_bytes + kv_bytes,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "roofline_fraction": roofline_step_s / step_s,
        "graphs": engine.runner.graphs is not None,
        "attention": engine.runner.attention.name,
    }
    print(
        f"decode@{batch} {model} {dtype}: engine {engine_tok_s:.0f} tok/s vs transformers {hf_tok_s:.0f} "
        f"({row['ratio']:.2f}x); {row['roofline_fraction']:.0%} of the memory roofline "
        f"({row['bytes_per_step'] / 1e6:.0f} MB/step at {bandwidth / 2e9:.0f} GB/s read)",
        flush=True,
    )
    return row


def weight_bytes_per_step(model) -> int:
    """Weights a decode step reads: every parameter but the embedding table (a few rows of it)."""
    embedding = model.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied table is counted once
    tied = model.lm_head.weight is embedding
    return total if tied else total - embedding.numel() * embedding.element_size()


def _engine_decode_seconds(engine, prompts, steps: int, device: str) -> float:
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


@torch.inference_mode()
def _hf_decode_seconds(hf, prompts, steps: int, device: str) -> float:
    from transformers import DynamicCache

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


if __name__ == "__main__":
    sys.exit(main())
