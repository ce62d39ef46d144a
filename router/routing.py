"""Routing policy: which decode worker, whether to disaggregate, which prefill worker.

Pure decisions over the workers' known state; the orchestrator acts on them.

    decode   D = argmin  load(D) - prefix_hit_blocks(D)      (workers short of free blocks last)
    local    if uncached tokens on D < threshold, or no prefill worker, or the pool is saturated
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
    FALLBACK = "fallback"  # D prefills itself: no healthy or unsaturated prefill worker


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


def prefill_cost(worker: WorkerHandle, block_hashes: list[int], prompt_blocks: int, config: RouterConfig) -> float:
    if config.routing_policy == "load":
        return float(worker.load)
    uncached = prompt_blocks - worker.kv.prefix_blocks(block_hashes)
    return config.kv_weight * uncached + worker.load


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
    uncached = prompt_len - decode.kv.prefix_blocks(block_hashes) * block_size
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
