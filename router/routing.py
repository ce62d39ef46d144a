"""Routing policy: which decode worker, whether to disaggregate, which prefill worker.

Pure decisions over the workers' known state; the orchestrator acts on them.

    decode   D = argmin  load(D) - prefix_hit_blocks(D)      (workers that cannot hold the request at all last, then
                                                          those short of free blocks)
    local    if uncached tokens on D < threshold, or no prefill worker, or the pool is saturated, or no prefill
             worker's KV pool holds the prompt, or the prompt would wait longer than max_prefill_wait_ms on P
             (router/prefill_clock.py) while D has less prefill queued
    prefill  P = argmin  w * uncached_blocks(P) + load(P)    (kv_aware; "load" drops the first term), among those
             that reached D's KV receiver at their last try (or longer than KV_LINK_RETRY_S ago)
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
    decodes: list[WorkerHandle],
    block_hashes: list[int],
    prompt_blocks: int,
    exclude: set[str] = frozenset(),
    *,
    tokens: int,
) -> WorkerHandle:
    """``tokens``: what the request holds at its end (prompt and output; ``tokens_held``). A worker whose
    ``token_capacity`` (its engine's: the context, or its KV pool if smaller) is below that goes last: its engine
    would refuse the request (a 400) where a worker with a larger pool takes it. When none can hold it, one of
    them refuses it, with its engine's own message."""
    candidates = [w for w in decodes if w.address not in exclude]
    if not candidates:
        raise NoWorkerError("no healthy decode worker")

    def cost(worker: WorkerHandle) -> tuple:
        short_of_blocks = worker.stats.kv_blocks_total > 0 and worker.stats.kv_blocks_free < prompt_blocks
        load = worker.load - worker.kv.prefix_blocks(block_hashes)
        return (not holds(worker, tokens), short_of_blocks, load, random.random())

    return min(candidates, key=cost)


def holds(worker: WorkerHandle, tokens: int) -> bool:
    """Whether ``worker``'s engine holds a request of ``tokens`` tokens (its ``token_capacity``; not said yet: yes)."""
    capacity = worker.stats.token_capacity
    return capacity == 0 or capacity >= tokens


def prompt_holders(prefills: list[WorkerHandle], prompt_len: int) -> list[WorkerHandle]:
    """The prefill workers whose pools hold a prompt (with any output resumed) and the one token sampled after it."""
    return [p for p in prefills if holds(p, prompt_len + 1)]


def paired_prefills(
    decode: WorkerHandle, prefills: list[WorkerHandle], exclude: set[str] = frozenset()
) -> list[WorkerHandle]:
    """The prefill workers that may push KV to ``decode``: not excluded, and none whose link to it is down."""
    return [p for p in prefills if p.address not in exclude and decode.reached_by(p.address)]


def uncached_tokens(worker: WorkerHandle, block_hashes: list[int], prompt_len: int, block_size: int) -> int:
    """Tokens of a prompt of ``prompt_len`` (hashed as ``block_hashes``) that ``worker``'s prefix cache lacks."""
    return prompt_len - worker.kv.prefix_blocks(block_hashes) * block_size


def prefill_cost(worker: WorkerHandle, block_hashes: list[int], prompt_blocks: int, config: RouterConfig) -> float:
    if config.routing_policy == "load":
        return float(worker.load)
    uncached = prompt_blocks - worker.kv.prefix_blocks(block_hashes)
    return config.kv_weight * uncached + worker.load


def overflows_to_decode(
    prefill_wait_s: float | None, decode_backlog: int, prefill_s_per_token: float | None, max_wait_s: float
) -> bool:
    """Prefill on the decode worker instead: the prompt would wait over ``max_wait_s`` (0: never) for the prefill
    worker (``router.prefill_clock.PrefillClock.wait_s``), and the decode worker has fewer prompt tokens queued than
    that wait's worth at the prefill worker's speed. The router and the simulator ask this."""
    if max_wait_s <= 0 or prefill_wait_s is None or prefill_s_per_token is None:
        return False
    return prefill_wait_s > max_wait_s and decode_backlog * prefill_s_per_token < prefill_wait_s


def tokens_held(prompt_len: int, generated: int, max_tokens: int, defaulted: bool) -> int:
    """The tokens a request holds at its end, as the engine counts them (``Engine._fitted``): its prompt and
    ``max_tokens`` (the output ``generated`` before a migration among them). A defaulted max_tokens the engine
    lowers to what fits: the request needs room for one more token after what it holds."""
    return prompt_len + (generated + 1 if defaulted else max_tokens)


def route(
    decodes: list[WorkerHandle],
    prefills: list[WorkerHandle],
    prompt_len: int,
    block_hashes: list[int],
    block_size: int,
    config: RouterConfig,
    exclude: set[str] = frozenset(),
    *,
    tokens: int,
) -> Route:
    """``block_size``: the served model card's (the workers' own), which ``block_hashes`` were made with.
    ``tokens``: what the request holds at its end (``tokens_held``)."""
    prompt_blocks = -(-prompt_len // block_size)
    decode = choose_decode(decodes, block_hashes, prompt_blocks, exclude, tokens=tokens)
    uncached = uncached_tokens(decode, block_hashes, prompt_len, block_size)
    candidates = paired_prefills(decode, prefills, exclude)
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
        reason = "no healthy prefill worker"
        if any(p.address not in exclude for p in prefills):
            reason = f"no prefill worker reached {decode.address}'s KV receiver lately"
        return _logged(Route(Decision.FALLBACK, decode, None, uncached, reason))
    unsaturated = [p for p in candidates if p.active < config.prefill_saturation]
    if not unsaturated:
        return _logged(Route(Decision.FALLBACK, decode, None, uncached, "prefill pool saturated"))
    holding = prompt_holders(unsaturated, prompt_len)  # one whose pool is smaller would refuse the prompt
    if not holding:
        return _logged(Route(Decision.FALLBACK, decode, None, uncached, "no prefill worker's KV pool holds the prompt"))
    costs = {p.address: prefill_cost(p, block_hashes, prompt_blocks, config) for p in holding}
    best = min(costs.values())
    prefill = random.choice([p for p in holding if costs[p.address] == best])
    max_wait_s = config.max_prefill_wait_ms / 1000.0
    wait_s = prefill.prefill_wait_s()
    if overflows_to_decode(wait_s, decode.prefill_backlog, prefill.prefill_s_per_token, max_wait_s):
        reason = (
            f"~{wait_s * 1000:.0f} ms of prefill queued on {prefill.address} > max_prefill_wait_ms, "
            f"{decode.prefill_backlog} tokens on the decode worker"
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
