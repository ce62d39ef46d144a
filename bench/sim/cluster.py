"""A discrete-event simulation of the router, a prefill pool and a decode pool.

    arrival ─> router ─┬─ local: short prompt, no prefill worker, all saturated, or the wait on P over
                       │         max_prefill_wait_s while D has less queued (the router's own rule)
                       │     └─> D waiting ─> D steps: chunked prefill beside the running decodes
                       └─ remote: reserve on D, queue on P ─> P steps (chunked prefill)
                             └─> KV pushed layer by layer over P's link ─> lands on D ─> D decode steps

Every worker runs the engine's loop, one step at a time, as ``engine.scheduler`` plans a step:
the token budget (max_num_batched_tokens) goes first to running requests in admission order
(one token per decode, the rest of an unfinished prefill), then to waiting prompts, FCFS, up to
max_num_seqs running. A step's duration is its latency model's ``step_s``.

On a CPU host (``Deployment.host``, see ``bench.sim.host``) the workers share its cores with each
other and with other work (router, client, anything else), and a KV push is CPU work too::

    step time = engine step x Host.slowdown(its threads, threads of every worker stepping now)
    prefill step on a CPU host: + its KV bytes / link bytes/s   (serialized, checksummed and sent by
                                                                 the worker itself: not overlapped)
    while other workers step on every other core: that time runs Host.crowding times slower

The slowdown is set when a step starts (a step is not slowed again by one that starts after it); the
crowding follows the workers stepping as they start and stop, each step's end moved to match.

Simplifications, on purpose: a decode worker reserves a request's whole KV (prompt + output) when
the router places it, so nothing is ever preempted (the router queues what fits nowhere); prefill
workers' KV is not limited; no prefix caching (random prompts share nothing); the network between
router, workers and clients adds ``request_overhead_s`` to every token the client sees.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from bench.serve_bench import RequestRecord
from bench.sim.host import Host
from bench.sim.latency import Chunk, LatencyModel, Step
from bench.sim.workload import TraceRequest
from engine.config import check_step_limits, step_prompt_budget
from router.prefill_clock import PrefillClock, SentPrompt
from router.routing import overflows_to_decode


@dataclass(frozen=True)
class Link:
    """Each prefill worker's link to the decode pool: layer pushes go out one after another."""

    bytes_per_s: float
    latency_s: float = 0.0


@dataclass(frozen=True)
class WorkerSpec:
    latency: LatencyModel
    kv_capacity_tokens: int
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    threads: int = 1  # torch threads (a CPU host's cores it keeps busy while stepping)
    prefill_chunk_beside_decodes: int | None = None  # as the engine's: prompt tokens a step that decodes may hold

    def __post_init__(self) -> None:
        check_step_limits(self)


@dataclass(frozen=True)
class Deployment:
    num_prefill: int
    num_decode: int
    prefill: WorkerSpec
    decode: WorkerSpec
    num_layers: int
    kv_bytes_per_token: int
    link: Link
    local_prefill_threshold: int = 0  # prompts shorter than this are prefilled on D
    prefill_saturation: int = 8  # in-flight prefills per worker at which the router falls back to local
    max_prefill_wait_s: float = 0.0  # the router's max_prefill_wait_ms, in seconds (0: off)
    request_overhead_s: float = 0.0
    gpus_per_worker: int = 1
    host: Host | None = None  # None: each worker on its own accelerator; pushes overlap compute

    def __post_init__(self) -> None:
        if self.num_decode < 1 or self.num_prefill < 0:
            raise ValueError(
                f"need at least one decode worker and no negative counts, got {self.num_prefill}P:{self.num_decode}D"
            )
        if not self.max_prefill_wait_s >= 0:
            raise ValueError(f"max_prefill_wait_s must be >= 0 (0: off), got {self.max_prefill_wait_s!r}")

    def with_counts(self, num_prefill: int, num_decode: int) -> Deployment:
        return replace(self, num_prefill=num_prefill, num_decode=num_decode)

    @property
    def gpus(self) -> int:
        return (self.num_prefill + self.num_decode) * self.gpus_per_worker

    def exposed_transfer_s(self, prefill_s: float, tokens: int) -> float:
        """Transfer time a lone prompt adds after its prefill: layer l's KV leaves when layer l is done
        (on a CPU host: all of it, after the prefill)."""
        if self.host:
            return tokens * self.kv_bytes_per_token / self.link.bytes_per_s + self.link.latency_s
        return _push_end(0.0, 0.0, prefill_s, tokens, self) - prefill_s + self.link.latency_s


@dataclass(frozen=True)
class SimResult:
    records: list[RequestRecord]  # in trace order; success=False for a request that never finished
    duration_s: float
    decisions: dict[str, int]  # local / remote / fallback counts


def simulate(deployment: Deployment, trace: list[TraceRequest], seed: int = 0) -> SimResult:
    return _Simulation(deployment, seed).run(trace)


def _push_end(link_free: float, start: float, duration: float, tokens: int, deployment: Deployment) -> float:
    """When the last layer of a step's KV has left: layer l is computed at start + (l + 1) * duration / L."""
    layers = deployment.num_layers
    per_layer_s = tokens * deployment.kv_bytes_per_token / layers / deployment.link.bytes_per_s
    for layer in range(layers):
        link_free = max(link_free, start + duration * (layer + 1) / layers) + per_layer_s
    return link_free


# -- state ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Request:
    index: int
    arrival: float
    input_len: int
    output_len: int
    computed: int = 0  # prompt tokens whose KV exists on the worker prefilling it
    generated: int = 0  # output tokens sampled
    first_token_at: float | None = None
    finished_at: float | None = None
    decode: _Worker | None = None
    sent: SentPrompt | None = None  # in its prefill worker's PrefillClock (the router's view)

    @property
    def kv_tokens(self) -> int:
        return self.input_len + self.output_len


@dataclass(eq=False)
class _Worker:
    role: str
    index: int
    spec: WorkerSpec
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)
    stepping: bool = False
    in_flight: int = 0  # requests the router has placed here and not seen finish
    kv_used: int = 0  # decode: tokens reserved
    # The router's view: a decode worker's prompt tokens sent to it to prefill with no first token yet; a prefill
    # worker's queue as its answers report it (router.prefill_clock)
    prefill_backlog: int = 0
    clock: PrefillClock = field(default_factory=PrefillClock)
    link_free: float = 0.0  # prefill: when the link has sent everything pushed so far
    # The step computing now (None between steps): its time left at its own pace, that pace (Host.crowding) and
    # since when, and the serial of its end event (an end moved by a new pace leaves the old event void)
    step: _Plan | None = None
    step_left: float = 0.0
    step_pace: float = 1.0
    step_since: float = 0.0
    step_serial: int = 0


@dataclass(frozen=True)
class _Plan:
    step: Step
    chunks: tuple[tuple[_Request, int], ...]
    decodes: tuple[_Request, ...]


class _Simulation:
    def __init__(self, deployment: Deployment, seed: int) -> None:
        self.deployment = deployment
        self.rng = random.Random(seed)
        self.prefills = [_Worker("prefill", i, deployment.prefill) for i in range(deployment.num_prefill)]
        self.decodes = [_Worker("decode", i, deployment.decode) for i in range(deployment.num_decode)]
        self.queue: deque[_Request] = deque()  # fits on no decode worker yet
        self.decisions: Counter = Counter()
        self.events: list = []
        self.sequence = itertools.count()
        self.now = 0.0

    def run(self, trace: list[TraceRequest]) -> SimResult:
        requests = [_Request(i, r.arrival_s, r.input_len, r.output_len) for i, r in enumerate(trace)]
        for request in requests:
            self.at(request.arrival, self.arrive, request)
        while self.events:
            self.now, _, action, argument = heapq.heappop(self.events)
            action(argument)
        return self._result(requests)

    def at(self, time: float, action: Callable, argument=None) -> None:
        heapq.heappush(self.events, (time, next(self.sequence), action, argument))

    # -- router ------------------------------------------------------------------------------------

    def arrive(self, request: _Request) -> None:
        if request.kv_tokens > self.deployment.decode.kv_capacity_tokens:
            return  # never fits: the router rejects it (it stays unfinished, counted as failed)
        self.queue.append(request)
        self.dispatch_queued()

    def dispatch_queued(self) -> None:
        while self.queue:
            decode = self.choose_decode(self.queue[0])
            if decode is None:
                return
            self.place(self.queue.popleft(), decode)

    def choose_decode(self, request: _Request) -> _Worker | None:
        room = [w for w in self.decodes if w.spec.kv_capacity_tokens - w.kv_used >= request.kv_tokens]
        return min(room, key=lambda w: (w.in_flight, self.rng.random())) if room else None

    def place(self, request: _Request, decode: _Worker) -> None:
        request.decode = decode
        decode.in_flight += 1
        decode.kv_used += request.kv_tokens
        prefill = self.choose_prefill(request)
        if prefill is None:
            decode.prefill_backlog += request.input_len
            decode.waiting.append(request)
            self.kick(decode)
            return
        request.sent = prefill.clock.send(request.input_len, self.now)
        prefill.in_flight += 1
        prefill.waiting.append(request)
        self.kick(prefill)

    def choose_prefill(self, request: _Request) -> _Worker | None:
        """None: prefill on the decode worker (conditional disaggregation)."""
        if request.input_len < self.deployment.local_prefill_threshold:
            self.decisions["local"] += 1
            return None
        open_workers = [p for p in self.prefills if p.in_flight < self.deployment.prefill_saturation]
        if not open_workers:
            self.decisions["fallback"] += 1
            return None
        prefill = min(open_workers, key=lambda w: (w.in_flight, self.rng.random()))
        wait_s = prefill.clock.wait_s(self.now)
        backlog = request.decode.prefill_backlog
        if overflows_to_decode(wait_s, backlog, prefill.clock.s_per_token, self.deployment.max_prefill_wait_s):
            self.decisions["fallback"] += 1
            return None
        self.decisions["remote"] += 1
        return prefill

    # -- a worker's step loop ----------------------------------------------------------------------

    def kick(self, worker: _Worker) -> None:
        if not worker.stepping:
            self.start_step(worker)

    def start_step(self, worker: _Worker) -> None:
        plan = self.schedule(worker)
        if plan.step.is_empty:
            worker.stepping = False
            return
        worker.stepping = True
        duration = worker.spec.latency.step_s(plan.step)
        host = self.deployment.host
        if host:
            busy = sum(w.spec.threads for w in (*self.prefills, *self.decodes) if w.stepping)
            duration *= host.slowdown(worker.spec.threads, busy)
        if worker.role == "prefill":
            tokens = sum(count for _, count in plan.chunks)
            if host:  # the push is the worker's own CPU work, after the step's compute (its end: end_step_at)
                duration += tokens * self.deployment.kv_bytes_per_token / self.deployment.link.bytes_per_s
            else:
                worker.link_free = _push_end(worker.link_free, self.now, duration, tokens, self.deployment)
        worker.step, worker.step_left, worker.step_pace, worker.step_since = plan, duration, 1.0, self.now
        self.end_step_at(worker)
        self.pace_steps()

    def end_step_at(self, worker: _Worker) -> None:
        """Schedules the end of ``worker``'s step from its time left and pace; an end scheduled before is void."""
        worker.step_serial += 1
        end = self.now + worker.step_left * worker.step_pace
        if worker.role == "prefill" and self.deployment.host:
            worker.link_free = end  # the push is the step's last part
        self.at(end, self.step_ended, (worker, worker.step_serial))

    def step_ended(self, ended: tuple[_Worker, int]) -> None:
        worker, serial = ended
        if serial != worker.step_serial:
            return  # moved by a change of pace
        plan, worker.step = worker.step, None
        self.step_done(worker, plan)
        self.pace_steps()

    def pace_steps(self) -> None:
        """On a host whose workers slow each other while they step on every core (``Host.co_step``): each step
        computing goes on at the pace the workers computing now allow, its end moved to match."""
        host = self.deployment.host
        if not host or not host.co_step:
            return
        computing = [w for w in (*self.prefills, *self.decodes) if w.step is not None]
        busy = sum(w.spec.threads for w in computing)
        for worker in computing:
            pace = host.crowding(worker.spec.threads, busy)
            if pace != worker.step_pace:
                worker.step_left -= (self.now - worker.step_since) / worker.step_pace
                worker.step_pace, worker.step_since = pace, self.now
                self.end_step_at(worker)

    def schedule(self, worker: _Worker) -> _Plan:
        """As ``engine.scheduler.Scheduler.schedule``: running first, then waiting, in one budget; prompt chunks
        in a step that decodes within ``prefill_chunk_beside_decodes``."""
        budget = worker.spec.max_num_batched_tokens
        cap = worker.spec.prefill_chunk_beside_decodes  # no cap: no need to look for decodes
        decodes = cap is not None and any(r.computed >= r.input_len for r in worker.running)
        prompt_budget = step_prompt_budget(budget, cap, decodes)
        chunks: list[tuple[_Request, int]] = []
        decodes: list[_Request] = []
        for request in worker.running:
            if budget <= 0:
                break
            if request.computed < request.input_len:
                count = min(request.input_len - request.computed, budget, prompt_budget)
                if count:
                    chunks.append((request, count))
                    budget -= count
                    prompt_budget -= count
            else:
                decodes.append(request)
                budget -= 1
        while worker.waiting and min(budget, prompt_budget) > 0 and len(worker.running) < worker.spec.max_num_seqs:
            request = worker.waiting.popleft()
            worker.running.append(request)
            count = min(request.input_len - request.computed, budget, prompt_budget)
            chunks.append((request, count))
            budget -= count
            prompt_budget -= count
        contexts = [r.input_len + r.generated for r in decodes]
        step = Step(
            tuple(Chunk(count, r.computed) for r, count in chunks),
            len(decodes),
            sum(contexts),
            max(contexts, default=0),
        )
        return _Plan(step, tuple(chunks), tuple(decodes))

    def step_done(self, worker: _Worker, plan: _Plan) -> None:
        released = self.now
        for request, count in plan.chunks:
            request.computed += count
            if request.computed < request.input_len:
                continue
            if worker.role == "prefill":
                worker.running.remove(request)
                worker.clock.computed(request.sent, self.now - request.sent.at)  # as its answer's prefill_ms says
                landed = worker.link_free + self.deployment.link.latency_s
                released = max(released, worker.link_free)
                self.at(landed, lambda r, p=worker: self.kv_landed(r, p), request)
            else:
                self.token(worker, request)
        for request in plan.decodes:
            self.token(worker, request)
        # A prefill worker reuses finished requests' blocks only once their pushes have left.
        if released > self.now:
            self.at(released, lambda _: self.start_step(worker))
        else:
            self.start_step(worker)

    def kv_landed(self, request: _Request, prefill: _Worker) -> None:
        """The commit: the first token reaches the client (the router sends it from the prefill worker's answer,
        not waiting for D's stream or its step), the request joins D's batch."""
        prefill.in_flight -= 1
        decode = request.decode
        self.token(decode, request, joins=True)

    def token(self, decode: _Worker, request: _Request, joins: bool = False) -> None:
        request.generated += 1
        seen = self.now + self.deployment.request_overhead_s
        if request.first_token_at is None:
            request.first_token_at = seen
            if not joins:  # prefilled here
                decode.prefill_backlog -= request.input_len
        if request.generated >= request.output_len:
            request.finished_at = seen
            if not joins:
                decode.running.remove(request)
            decode.in_flight -= 1
            decode.kv_used -= request.kv_tokens
            self.dispatch_queued()
        elif joins:
            decode.running.append(request)
            self.kick(decode)

    # -- results -----------------------------------------------------------------------------------

    def _result(self, requests: list[_Request]) -> SimResult:
        records = [_record(r) for r in requests]
        finished = [r.finished_at for r in requests if r.finished_at is not None]
        start = min((r.arrival for r in requests), default=0.0)
        return SimResult(records, max(finished, default=start) - start, dict(self.decisions))


def _record(request: _Request) -> RequestRecord:
    done = request.finished_at is not None
    record = RequestRecord(request.input_len, request.output_len, success=done, start=request.arrival)
    if done:
        record.ttft = request.first_token_at - request.arrival
        record.latency = request.finished_at - request.arrival
        record.output_tokens = request.generated
    else:
        record.error = "never finished"
    return record
