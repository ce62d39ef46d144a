"""Real worker processes on 127.0.0.1, one set per transport.

Two checkpoints, written by transformers into a temp dir:
- ``tiny``: 2 layers, fast; the main P+D pair runs it (correctness, reuse, events, most failures).
- ``slow``: 12 wider layers, prefilled in small chunks, so a 1,500-token prompt takes about a
  second — long enough for a kill or a cancel to land while its KV is on the wire.

All processes of one transport start together (start-up is mostly imports) and stop when pytest
moves on to the other transport.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.checkpoints import write_checkpoint
from tests.workers.harness import WorkerProcess, abort_leftover_reservations, start_workers, stop_workers

TRANSPORTS = ("grpc", "nixl")
SLOW_SHAPE = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=12,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
)
SLOW_CHUNK = ("--max-num-batched-tokens", "128")
SLOW_DECODE_LEASE_MS = 4000
SLOW_DECODE_POOL_MB = 20  # 106 blocks of the slow model: one 1,500-token prompt fits, two do not
LONG_PROMPT_LEN = 1500


@dataclass(frozen=True)
class Checkpoints:
    tiny: Path
    slow: Path
    tiny_model: object  # the transformers model the tiny checkpoint was written from (the oracle)


@dataclass
class Cluster:
    transport: str
    prefill: WorkerProcess  # tiny
    decode: WorkerProcess  # tiny
    slow_prefill: WorkerProcess
    slow_decode: WorkerProcess  # short lease, small pool
    doomed_prefill: WorkerProcess  # slow; killed by one test
    doomed_decode: WorkerProcess  # slow; killed by one test
    odd_prefill: WorkerProcess  # tiny, but bfloat16 with 32-token blocks

    @property
    def workers(self) -> list[WorkerProcess]:
        return [
            self.prefill,
            self.decode,
            self.slow_prefill,
            self.slow_decode,
            self.doomed_prefill,
            self.doomed_decode,
            self.odd_prefill,
        ]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    root = tmp_path_factory.mktemp("checkpoints")
    tiny_model = write_checkpoint(root / "tiny", "LlamaForCausalLM", seed=11)
    write_checkpoint(root / "slow", "LlamaForCausalLM", seed=12, **SLOW_SHAPE)
    return Checkpoints(root / "tiny", root / "slow", tiny_model)


@pytest.fixture(scope="session", params=TRANSPORTS)
def cluster(request, checkpoints: Checkpoints):
    transport = request.param
    tiny, slow = str(checkpoints.tiny), str(checkpoints.slow)
    workers = start_workers(
        ("prefill", tiny, transport),
        ("decode", tiny, transport),
        ("prefill", slow, transport, *SLOW_CHUNK),
        ("decode", slow, transport, "--lease-ms", str(SLOW_DECODE_LEASE_MS), "--kv-cache-mb", str(SLOW_DECODE_POOL_MB)),
        ("prefill", slow, transport, *SLOW_CHUNK),
        ("decode", slow, transport),
        ("prefill", tiny, transport, "--dtype", "bfloat16", "--block-size", "32"),
    )
    cluster = Cluster(transport, *workers)
    yield cluster
    stop_workers(cluster.workers)


@pytest.fixture(autouse=True)
def _no_leftover_reservations():
    """A failed test's reservations must not make the next test's pool checks fail too."""
    yield
    abort_leftover_reservations()


@pytest.fixture
def rng(request) -> random.Random:
    """Prompts unique to each test (and transport), so prefix caches never leak between tests."""
    return random.Random(request.node.nodeid)


def random_prompt(rng: random.Random, length: int, vocab: int = 320) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(length)]
