"""The client side of tests/kv_transfer/test_bulk_across_hosts.py, run inside the prefill host's
network namespace (``ip netns exec``): it reaches the workers only over the shaped veth link.
Prints one JSON line (``RESULT {...}``).

    fill DECODE_ADDR PROMPT_TOKENS       reserve a prompt on the decode worker, push random KV of its
                                         exact size over the bulk path, commit; bytes and seconds
    requests PREFILL DECODE PROMPTS_JSON reserve -> prefill -> decode each prompt in turn; the tokens
    cut PREFILL DECODE PROMPT_TOKENS     reserve and prefill a prompt; once its KV moves, print CUT and wait
                                         for "down" on stdin (the test took the link down); print FAILED
                                         when the prefill worker answered, wait for "up", abort the
                                         reservation, wait for both workers to be idle; how long the
                                         answer took after the cut, and what it said
"""

from __future__ import annotations

import json
import random
import sys
import time
import uuid

import grpc
import torch

from contract.errors import UNREACHABLE_PEER
from engine.kv_cache import KVLayout, PagedKVCache
from kv_transfer.bulk_transport import BulkKVSender, BulkSession
from protos import common_pb2, decode_pb2, prefill_pb2
from protos.cluster_auth import ClusterAuth
from tests.workers.harness import WorkerProcess, run_disaggregated, wait_idle, wire_params


def fill(decode_address: str, prompt_tokens: int) -> dict:
    decode = WorkerProcess("decode", decode_address, None)
    request_id = f"fill-{uuid.uuid4().hex[:8]}"
    prompt = [random.randrange(3, 320) for _ in range(prompt_tokens)]
    ticket = decode.stub.Reserve(
        decode_pb2.ReserveRequest(
            request_id=request_id, prompt_token_ids=prompt, params=wire_params(1), lease_ms=120_000
        ),
        timeout=30,
    )
    outputs = decode.stub.Generate(
        decode_pb2.GenerateRequest(request_id=request_id, reserved=True, token=ticket.token), timeout=120
    )
    wire = ticket.layout
    layout = KVLayout(
        wire.num_layers, len(ticket.block_ids), wire.block_size, wire.num_kv_heads, wire.head_dim, wire.dtype
    )
    cache = PagedKVCache(layout)
    # Finite values, as real KV is: the blocks return to the decode worker's pool and are reused later.
    cache.data.copy_(torch.randn(cache.data.shape))
    sender = BulkKVSender(wire, "fill-driver", auth=ClusterAuth.from_env())
    try:
        session = sender.open(request_id, ticket)  # handshake and link set-up: not timed
        assert isinstance(session, BulkSession), "the decode worker did not offer the bulk path"
        blocks = list(range(len(ticket.block_ids)))
        begin = time.perf_counter()
        for layer in range(layout.num_layers):
            session.push_layer(cache, layer, blocks, ticket.block_ids)
        session.commit(5, None, 120.0)  # every frame acked (landed, verified), then committed
        seconds = time.perf_counter() - begin
        tokens = [t for response in outputs for t in response.token_ids]
    finally:
        sender.close()
    idle = wait_idle(decode, 30)
    return {"bytes": session.bytes_sent, "seconds": seconds, "tokens": tokens, "idle_blocks_used": idle.kv_blocks_used}


def requests(prefill_address: str, decode_address: str, prompts: list[list[int]], max_tokens: int) -> dict:
    prefill, decode = WorkerProcess("prefill", prefill_address, None), WorkerProcess("decode", decode_address, None)
    results = []
    for prompt in prompts:
        begin = time.perf_counter()
        result = run_disaggregated(
            prefill, decode, f"nn-{uuid.uuid4().hex[:8]}", prompt, wire_params(max_tokens), 0, 120
        )
        results.append(
            {"tokens": result.tokens, "seconds": time.perf_counter() - begin, "kv_bytes": result.prefill.kv_bytes_sent}
        )
    wait_idle(prefill, 30)
    wait_idle(decode, 30)
    return {"results": results}


def cut(prefill_address: str, decode_address: str, prompt_tokens: int) -> dict:
    prefill, decode = WorkerProcess("prefill", prefill_address, None), WorkerProcess("decode", decode_address, None)
    request_id = f"cut-{uuid.uuid4().hex[:8]}"
    prompt = [random.randrange(3, 320) for _ in range(prompt_tokens)]
    params = wire_params(1)
    ticket = decode.stub.Reserve(
        decode_pb2.ReserveRequest(request_id=request_id, prompt_token_ids=prompt, params=params), timeout=30
    )
    answer = prefill.stub.Prefill.future(
        prefill_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt, params=params, ticket=ticket),
        timeout=120,
    )
    deadline = time.monotonic() + 60
    while prefill.stats().transfers_in_flight == 0:  # the session is open: layers go out as they are computed
        assert time.monotonic() < deadline and not answer.done(), "the prefill never started its transfer"
        time.sleep(0.05)
    time.sleep(2.0)  # well inside a transfer that takes tens of seconds on the test's link
    assert not answer.done(), "the transfer ended before the link was cut"
    print("CUT", flush=True)
    assert sys.stdin.readline().strip() == "down"
    cut_at = time.monotonic()
    error, unreachable = None, None
    try:
        answer.result()
    except grpc.RpcError as exc:
        error = f"{exc.code().name}: {exc.details()}"
        unreachable = dict(exc.trailing_metadata() or ()).get(UNREACHABLE_PEER)
    seconds = time.monotonic() - cut_at
    print("FAILED", flush=True)
    assert sys.stdin.readline().strip() == "up"
    abort = common_pb2.AbortRequest(request_id=request_id, token=ticket.token)
    decode.stub.Abort(abort, timeout=30, wait_for_ready=True)
    return {
        "seconds": seconds,
        "error": error,
        "unreachable": unreachable,
        "ticket_address": ticket.address,
        "prefill_blocks_used": wait_idle(prefill, 30).kv_blocks_used,
        "decode_blocks_used": wait_idle(decode, 30).kv_blocks_used,
    }


def main(argv: list[str]) -> int:
    if argv[0] == "fill":
        result = fill(argv[1], int(argv[2]))
    elif argv[0] == "cut":
        result = cut(argv[1], argv[2], int(argv[3]))
    else:
        spec = json.loads(argv[3])
        result = requests(argv[1], argv[2], spec["prompts"], spec["max_tokens"])
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
