"""Continuous batching with chunked prefill, prefix caching and preemption by recompute.

The scheduler decides *what* runs and returns plain data; the model runner owns the tensors.
One step's token budget is shared by everything scheduled in it::

    budget = max_num_batched_tokens
    [ running: decodes (1 token each) and unfinished prefill chunks ] -> then [ waiting, by priority ]

A step that decodes holds at most ``prefill_chunk_beside_decodes`` prompt tokens (if set): a prompt
then stalls the decodes beside it for a bounded time each step (Sarathi-Serve's stall-free batching),
while a step with no decode, a prefill worker's, still takes the whole budget.

The waiting queue is ordered by each request's priority (lower first), then by arrival: with every priority
equal (the router sends none unless its scheduling policy is priority), first come, first served.

A request that cannot get a block preempts a running request not yet scheduled in this step: the one of the
highest priority value, the most recently admitted among equals (its blocks are freed; it waits at the head of its
priority and recomputes later, mostly from the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockAllocator
from engine.config import step_prompt_budget
from engine.errors import NoFreeBlocksError
from engine.request import Request, RequestState


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens of one request to run this step: positions [start, start + len(token_ids))."""

    request_id: str
    token_ids: tuple[int, ...]
    start: int
    block_ids: tuple[int, ...]
    samples: bool  # the chunk reaches the last known token, so a new token is sampled
    serial: int  # the request incarnation (Request.serial): a reused request id is another sequence
    # prompt_logprobs: the prompt tokens predicted by positions [scored_from, scored_from + len(prompt_targets))
    #   prompt   t0 t1 t2 t3 t4        position p's logits score prompt token p + 1;
    #   chunk       [t1 t2 t3]         start=1: scores t2 t3 t4 (scored_from=1, prompt_targets=(t2, t3, t4))
    prompt_targets: tuple[int, ...] = ()
    scored_from: int = 0


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]  # multi-token chunks first, then single-token decodes
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    prefill_chunk_beside_decodes: int | None = None  # None: the whole budget


class Scheduler:
    """Owns the waiting and running queues and every block a request holds. Engine thread only."""

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.awaiting_kv: dict[str, Request] = {}
        self.preemptions = 0  # running requests preempted since start (their blocks freed, recomputed later)

    # -- admission ----------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queues a request behind every waiting one of its priority or lower (a scan from the tail that stops
        at once when all priorities are equal)."""
        index = len(self.waiting)
        while index and self.waiting[index - 1].priority > request.priority:
            index -= 1
        self.waiting.insert(index, request)

    def reserve(self, request: Request) -> None:
        """Hold blocks for every token known so far (the prompt, and output resumed from another worker),
        reusing prefix hits, while their KV is computed elsewhere.

        Raises NoFreeBlocksError with nothing allocated if the pool cannot hold it."""
        hits = self.allocator.match_prefix(request.block_hashes)
        needed = _blocks_for(request.num_tokens, self.config.block_size) - len(hits)
        if not self.allocator.can_allocate(needed):
            raise NoFreeBlocksError(
                f"need {needed} free KV blocks for a {request.num_tokens}-token prompt, "
                f"have {self.allocator.num_free_blocks}"
            )
        self._take_blocks(request, hits, needed)
        request.num_cached_tokens = len(hits) * self.config.block_size
        request.transition(RequestState.WAITING_FOR_KV)
        self.awaiting_kv[request.request_id] = request

    def kv_landed(self, request: Request) -> None:
        """Every reserved block has been written: publish them and let the request decode."""
        del self.awaiting_kv[request.request_id]
        request.num_computed_tokens = request.num_tokens
        full = min(request.num_tokens // self.config.block_size, len(request.block_hashes))
        new = range(request.num_published_blocks, full)
        self.allocator.adopt([request.block_ids[i] for i in new], [request.block_hashes[i] for i in new])
        request.num_published_blocks = full
        request.transition(RequestState.RUNNING)
        self.running.append(request)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        prompt_budget = self._prompt_budget()
        planned: dict[str, tuple[ScheduledChunk, bool]] = {}  # request id: its chunk, and whether a prompt chunk
        preempted: list[str] = []
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            remaining = request.num_tokens - request.num_computed_tokens
            prompt = remaining > 1  # else a decode (or nothing left): outside the prompt budget
            count = min(remaining, budget, prompt_budget if prompt else remaining)
            if prompt and count == 0:
                index += 1  # a prompt chunk waits for a step with prompt budget; the decodes after it still run
                continue
            while not self._grow(request, count):
                victim = max(reversed(self.running), key=lambda r: r.priority)  # the latest of the highest
                if self.running.index(victim) < index:  # planned already: its chunk goes, its tokens come back
                    index -= 1
                    chunk, was_prompt = planned.pop(victim.request_id)
                    budget += len(chunk.token_ids)
                    prompt_budget += len(chunk.token_ids) if was_prompt else 0
                self.running.remove(victim)
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                planned[request.request_id] = (self._chunk(request, count), prompt)
                budget -= count
                prompt_budget -= count if prompt else 0
                index += 1
        scheduled = [chunk for chunk, _ in planned.values()]
        if not preempted:
            scheduled.extend(self._admit_waiting(min(budget, prompt_budget)))
        scheduled.sort(key=lambda c: len(c.token_ids) == 1)  # stable: multi-token chunks first
        return SchedulerOutput(tuple(scheduled), tuple(preempted))

    def _prompt_budget(self) -> int:
        config = self.config
        cap = config.prefill_chunk_beside_decodes  # no cap: no need to look for decodes
        decodes = cap is not None and any(r.num_tokens - r.num_computed_tokens == 1 for r in self.running)
        return step_prompt_budget(config.max_num_batched_tokens, cap, decodes)

    def _admit_waiting(self, budget: int) -> list[ScheduledChunk]:
        admitted: list[ScheduledChunk] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            hits = self._prefix_hits(request)
            start = len(hits) * self.config.block_size
            count = min(request.num_tokens - start, budget)
            needed = _blocks_for(start + count, self.config.block_size) - len(hits)
            if not self.allocator.can_allocate(needed):
                break
            try:
                self._take_blocks(request, hits, needed)
            except NoFreeBlocksError:
                break  # hits that were free cached blocks left the free list when acquired
            self.waiting.popleft()
            request.num_computed_tokens = start
            if request.num_preemptions == 0:
                request.num_cached_tokens = start
            request.transition(RequestState.RUNNING)
            self.running.append(request)
            admitted.append(self._chunk(request, count))
            budget -= count
        return admitted

    def _prefix_hits(self, request: Request) -> list[int]:
        if request.needs_prompt_scores:
            return []  # prompt logprobs need the logits of every prompt position, which a cache hit skips
        # At least one token must be computed to produce logits, so a fully cached prompt
        # still recomputes its last block.
        usable = (request.num_tokens - 1) // self.config.block_size
        return self.allocator.match_prefix(request.block_hashes[:usable])

    def _take_blocks(self, request: Request, hits: list[int], needed: int) -> None:
        self.allocator.acquire(hits)
        try:
            fresh = self.allocator.allocate(needed)
        except NoFreeBlocksError:
            self.allocator.free(hits)
            raise
        request.block_ids = hits + fresh
        request.num_published_blocks = len(hits)

    def _grow(self, request: Request, count: int) -> bool:
        needed = _blocks_for(request.num_computed_tokens + count, self.config.block_size) - len(request.block_ids)
        if needed <= 0:
            return True
        if not self.allocator.can_allocate(needed):
            return False
        request.block_ids.extend(self.allocator.allocate(needed))
        return True

    def _chunk(self, request: Request, count: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        tokens = request.all_token_ids[start : start + count]
        scored_from = max(start, len(request.prompt_logprobs))
        targets = ()
        if request.needs_prompt_scores:
            targets = tuple(request.prompt_token_ids[scored_from + 1 : start + count + 1])
        return ScheduledChunk(
            request.request_id,
            tuple(tokens),
            start,
            tuple(request.block_ids),
            start + count == request.num_tokens,
            request.serial,
            targets,
            scored_from,
        )

    def _preempt(self, request: Request) -> None:
        self._release_blocks(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.preemptions += 1
        request.transition(RequestState.WAITING)
        index = 0  # ahead of every waiting request of its priority: it came before them
        while index < len(self.waiting) and self.waiting[index].priority < request.priority:
            index += 1
        self.waiting.insert(index, request)

    # -- after the step ------------------------------------------------------------------------

    def step_done(self, output: SchedulerOutput, requests: dict[str, Request]) -> None:
        """Advance computed counts and publish blocks that are now complete."""
        for chunk in output.chunks:
            request = requests[chunk.request_id]
            request.num_computed_tokens = chunk.start + len(chunk.token_ids)
            self.publish_complete_blocks(request)

    def publish_complete_blocks(self, request: Request) -> None:
        full = min(request.num_computed_tokens // self.config.block_size, len(request.block_hashes))
        for index in range(request.num_published_blocks, full):
            self.allocator.publish(request.block_ids[index], request.block_hashes[index])
        request.num_published_blocks = max(full, request.num_published_blocks)

    def finish(self, request: Request, state: RequestState) -> None:
        """Move a request to a finished state and return its blocks to the pool."""
        if request in self.running:
            self.running.remove(request)
        elif request.state is RequestState.WAITING:
            self.waiting.remove(request)
        self.awaiting_kv.pop(request.request_id, None)
        self._release_blocks(request)
        request.transition(state)

    def _release_blocks(self, request: Request) -> None:
        self.allocator.free(request.block_ids)
        request.block_ids = []
        request.num_published_blocks = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.awaiting_kv)


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)
