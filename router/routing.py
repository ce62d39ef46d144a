"""Routing policy: which decode worker, whether to disaggregate, which prefill worker.

Pure decisions over the workers' known state; the orchestrator acts on them.

    decode   D = argmin  load(D) - prefix_hit_blocks(D)      (workers short of free blocks last)
    local    if uncached tokens on D < threshold, or no prefill worker, or the pool is saturated, or the prompt
             would wait longer than max_prefill_wait_ms on P while D has less prefill queued
    prefill  P = argmin  w * uncached_blocks(P) + load(P)    (kv_aware; "load" drops the first term)
ties broken at random.
"""

from __future__ import annotations

import enum
import logging
import random
from dataclasses import dataclass

from router.config import RouterConfig
from router.workers import WorkerHandle

log = logging.getLogger(__name__)


class Decision(enum.Enum):
    REMOTE_PREFILL = "remote_prefill"  # prefill on P, KV to D
    LOCAL_PREFILL = "local_prefill"  # D prefills itself: short uncached prompt
    FALLBACK = "fallback"  # D prefills itself: no healthy or unsaturated prefill worker, or P's backlog is too long


@dataclass(frozen=True)
class Route:
    decision: Decision
    decode: WorkerHandle
    prefill: WorkerHandle | None
    uncached_tokens: int  # on the chosen decode worker
    reason: str


class NoWorkerError(Exception):
    """No healthy decode worker can take the request."""


def choose_decode(
    decodes: list[WorkerHandle], block_hashes: list[int], prompt_blocks: int, exclude: set[str] = frozenset()
) -> WorkerHandle:
    candidates = [w for w in decodes if w.address not in exclude]
    if not candidates:
        raise NoWorkerError("no healthy decode worker")

    def cost(worker: WorkerHandle) -> tuple:
        short_of_blocks = worker.stats.kv_blocks_total > 0 and worker.stats.kv_blocks_free < prompt_blocks
        return (short_of_blocks, worker.load - worker.kv.prefix_blocks(block_hashes), random.random())

    return min(candidates, key=cost)


def uncached_tokens(worker: WorkerHandle, block_hashes: list[int], prompt_len: int, block_size: int) -> int:
    """Tokens of a prompt of ``prompt_len`` (hashed as ``block_hashes``) that ``worker``'s prefix cache lacks."""
    return prompt_len - worker.kv.prefix_blocks(block_hashes) * block_size


def prefill_cost(worker: WorkerHandle, block_hashes: list[int], prompt_blocks: int, config: RouterConfig) -> float:
    if config.routing_policy == "load":
        return float(worker.load)
    uncached = prompt_blocks - worker.kv.prefix_blocks(block_hashes)
    return config.kv_weight * uncached + worker.load


PREFILL_SPEED_WEIGHT = 0.2  # of the newest sample in a worker's measured seconds per prefill token


def timed_prefill(previous: float | None, uncached_tokens: int, seconds: float) -> float | None:
    """A worker's seconds per prefill token after a prompt sent to it with no backlog came back after ``seconds``:
    an exponential average of such prompts' time to first token per uncached token (the router and the simulator)."""
    if uncached_tokens <= 0:
        return previous
    sample = seconds / uncached_tokens
    return sample if previous is None else previous + PREFILL_SPEED_WEIGHT * (sample - previous)


def overflows_to_decode(
    prefill_backlog: int, decode_backlog: int, prefill_s_per_token: float | None, max_wait_s: float
) -> bool:
    """Prefill on the decode worker instead: the prompt would wait over ``max_wait_s`` (0: never) behind the prefill
    worker's backlog of prompt tokens, and the decode worker has less queued. The router and the simulator ask this."""
    if max_wait_s <= 0 or prefill_s_per_token is None:
        return False
    return prefill_backlog * prefill_s_per_token > max_wait_s and decode_backlog < prefill_backlog


def route(
    decodes: list[WorkerHandle],
    prefills: list[WorkerHandle],
    prompt_len: int,
    block_hashes: list[int],
    block_size: int,
    config: RouterConfig,
    exclude: set[str] = frozenset(),
) -> Route:
    """``block_size``: the served model card's (the workers' own), which ``block_hashes`` were made with."""
    prompt_blocks = -(-prompt_len // block_size)
    decode = choose_decode(decodes, block_hashes, prompt_blocks, exclude)
    uncached = uncached_tokens(decode, block_hashes, prompt_len, block_size)
    candidates = [p for p in prefills if p.address not in exclude]
    if uncached < config.local_prefill_threshold:
        return _logged(
            Route(
                Decision.LOCAL_PREFILL,
                decode,
                None,
                uncached,
                f"uncached {uncached} < threshold {config.local_prefill_threshold}",
            )
        )
    if not candidates:
        return _logged(Route(Decision.FALLBACK, decode, None, uncached, "no healthy prefill worker"))
    unsaturated = [p for p in candidates if p.active < config.prefill_saturation]
    if not unsaturated:
        return _logged(Route(Decision.FALLBACK, decode, None, uncached, "prefill pool saturated"))
    costs = {p.address: prefill_cost(p, block_hashes, prompt_blocks, config) for p in unsaturated}
    best = min(costs.values())
    prefill = random.choice([p for p in unsaturated if costs[p.address] == best])
    max_wait_s = config.max_prefill_wait_ms / 1000.0
    if overflows_to_decode(prefill.prefill_backlog, decode.prefill_backlog, prefill.prefill_s_per_token, max_wait_s):
        reason = (
            f"prefill backlog {prefill.prefill_backlog} tokens on {prefill.address} "
            f"(~{prefill.prefill_backlog * prefill.prefill_s_per_token * 1000:.0f} ms) > max_prefill_wait_ms, "
            f"{decode.prefill_backlog} on the decode worker"
        )
        return _logged(Route(Decision.FALLBACK, decode, None, uncached, reason))
    return _logged(Route(Decision.REMOTE_PREFILL, decode, prefill, uncached, f"prefill costs {costs}"))


def _logged(chosen: Route) -> Route:
    log.debug(
        "route: %s decode=%s prefill=%s uncached_tokens=%d (%s)",
        chosen.decision.value,
        chosen.decode.address,
        chosen.prefill.address if chosen.prefill else "-",
        chosen.uncached_tokens,
        chosen.reason,
    )
    return chosen
