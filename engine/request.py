"""A request's life inside one engine, as an explicit state machine.

WAITING ──schedule──> RUNNING ──stop/eos──> FINISHED_STOPPED
   ^  └─reserve─> WAITING_FOR_KV            └─max_tokens──> FINISHED_LENGTH
   └────preempt──── RUNNING      KV landed ──> RUNNING
any unfinished state ──abort──> FINISHED_ABORTED
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from contract.sampling import SamplingParams
from engine.block_manager import hash_block_tokens
from engine.sampler import SamplingState, TokenLogprobs


class RequestState(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISHED = {RequestState.FINISHED_STOPPED, RequestState.FINISHED_LENGTH, RequestState.FINISHED_ABORTED}
_FINISH_REASONS = {
    RequestState.FINISHED_STOPPED: "stop",
    RequestState.FINISHED_LENGTH: "length",
    RequestState.FINISHED_ABORTED: "abort",
}
_serials = itertools.count(1)

_TRANSITIONS = {
    RequestState.WAITING: {RequestState.RUNNING, RequestState.WAITING_FOR_KV, RequestState.FINISHED_ABORTED},
    RequestState.WAITING_FOR_KV: {RequestState.RUNNING, *_FINISHED},
    RequestState.RUNNING: {RequestState.WAITING, *_FINISHED},
}


@dataclass
class Request:
    """Bookkeeping of one sequence. Owned by the engine thread; nothing here touches tensors."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sampling: SamplingState
    block_size: int
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower first: the place in the waiting queue, and the last to be preempted
    state: RequestState = RequestState.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # leading tokens served from a prefix cache (first admission only): a resumed request's earlier output too
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # of every full block of all_token_ids
    num_published_blocks: int = 0
    num_preemptions: int = 0
    pending_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # entry k scores prompt token k + 1
    prompt_logprobs_sent: bool = False
    stop_reason: str | int | None = None  # the stop string or stop token id that finished it (not EOS)
    # Unique per Request object in this process: a request id used again (after an abort, say) is
    # another sequence to everything that caches per sequence (the decode scratch).
    serial: int = field(default_factory=lambda: next(_serials))

    def __post_init__(self) -> None:
        self._extend_block_hashes()

    def transition(self, new_state: RequestState) -> None:
        if new_state not in _TRANSITIONS.get(self.state, set()):
            raise RuntimeError(f"request {self.request_id}: illegal transition {self.state.name} -> {new_state.name}")
        self.state = new_state

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def needs_prompt_scores(self) -> bool:
        """prompt_logprobs were asked for and some prompt token is not scored yet."""
        wanted = self.params.prompt_logprobs is not None
        return wanted and len(self.prompt_logprobs) < len(self.prompt_token_ids) - 1

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.sampling.record(token_id)
        self._extend_block_hashes()

    def _extend_block_hashes(self) -> None:
        full_blocks = self.num_tokens // self.block_size
        if len(self.block_hashes) == full_blocks:
            return
        tokens = self.all_token_ids
        parent = self.block_hashes[-1] if self.block_hashes else None
        for index in range(len(self.block_hashes), full_blocks):
            parent = hash_block_tokens(parent, tokens[index * self.block_size : (index + 1) * self.block_size])
            self.block_hashes.append(parent)
