"""Turning sampled tokens into streamed text, and deciding when a request stops."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.request import Request, RequestState
from engine.sampler import TokenLogprobs
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class RequestOutput:
    """What one request produced since its previous output (a streaming delta)."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprobs, ...]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    prompt_logprobs: tuple[TokenLogprobs, ...] = ()  # once, with the first output: entry k scores prompt token k + 1
    stop_reason: str | int | None = None  # with a "stop" finish: the stop string or stop token id (None for EOS)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class TextStream:
    """Detokenizes one request's tokens and finds stop strings; the text ends before the stop string found, or
    with it (``include_stop``), and never goes on past it.

    Text that could still be the start of a stop string is held back until it cannot be: the longest end of the
    text that some stop string begins with, no more (a text whose end begins no stop string holds nothing back)::

        stop "zzqx", text "I saw zz"   emitted "I saw "   held "zz"
        stop "zzqx", text "I saw a"    emitted "I saw a"  held ""

    What a stop string found may cut is never text already emitted: the search starts where emission stopped.
    (Held back with ``include_stop`` too.) The emitted length only grows with the text, so a worker that resumes
    another's output (migration) and replays its tokens emits from where that one stopped."""

    def __init__(
        self, tokenizer: Tokenizer, stop: tuple[str, ...], skip_special_tokens: bool = True, include_stop: bool = False
    ) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stop = stop
        self._include_stop = include_stop
        self._most_held = max((len(s) for s in stop), default=1) - 1
        self._text = ""
        self._emitted = 0
        self.stopped = False
        self.matched: str | None = None  # the stop string found

    def add_token(self, token_id: int, find_stops: bool = True) -> bool:
        """Appends one token's text; True if a stop string now appears (looked for only with ``find_stops``)."""
        return self._add_text(self._detokenizer.push(token_id), find_stops)

    def finish(self) -> None:
        if not self.stopped:
            self._add_text(self._detokenizer.flush())

    def take(self, final: bool) -> str:
        limit = len(self._text) if final or self.stopped else max(self._emitted, len(self._text) - self._held())
        piece = self._text[self._emitted : limit]
        self._emitted = limit
        return piece

    def _held(self) -> int:
        """How many of the text's last characters a stop string could begin with: the longest such end (shorter
        than the longest stop string; a whole one is found, not held). Only the text not yet emitted is looked at:
        such an end never starts before it (the emitted length only grows)."""
        for length in range(min(self._most_held, len(self._text) - self._emitted), 0, -1):
            end = self._text[-length:]
            if any(stop.startswith(end) for stop in self._stop):
                return length
        return 0

    def _add_text(self, piece: str, find_stops: bool = True) -> bool:
        if not piece or self.stopped:
            return self.stopped
        search_from = max(0, len(self._text) - self._most_held, self._emitted)
        self._text += piece
        found = _first_stop(self._text, self._stop, search_from) if find_stops else None
        if found is not None:
            where, matched = found
            self._text = self._text[: where + len(matched) if self._include_stop else where]
            self.stopped, self.matched = True, matched
        return self.stopped


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> tuple[int, str] | None:
    """(where, which) of the earliest stop string in ``text[start:]``."""
    found = [(i, s) for i, s in ((text.find(s, start), s) for s in stops) if i >= 0]
    return min(found, key=lambda hit: hit[0]) if found else None


class OutputProcessor:
    """Per-request text streams and stop rules, applied after each sampled token."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self._streams: dict[str, TextStream] = {}
        self._new_tokens: dict[str, list[int]] = {}

    def start(self, request: Request) -> None:
        params = request.params
        self._streams[request.request_id] = TextStream(
            self.tokenizer, params.stop, params.skip_special_tokens, params.include_stop_str_in_output
        )
        self._new_tokens[request.request_id] = []

    def resume(self, request: Request, token_ids: list[int]) -> None:
        """Continues a request after output another worker generated and streamed (migration).

        Each token goes through ``add_token`` as if sampled here, so the detokenizer, stop-string search,
        penalties, seed steps, grammar and token counts are where the other worker left them; its text counts
        as emitted, and what that worker held back (an unfinished character, a possible start of a stop
        string) comes out with the next token here. InvalidRequestError if that output had already finished
        the request (the other worker would have ended it), breaks its grammar or holds a token outside its
        allowed_token_ids."""
        allowed = request.params.allowed_token_ids
        if allowed and not set(token_ids) <= set(allowed):
            raise InvalidRequestError("resume_token_ids hold a token outside allowed_token_ids")
        for token_id in token_ids:
            if self.add_token(request, token_id, None) is not None:
                raise InvalidRequestError("resume_token_ids already finish the request")
        grammar = request.sampling.grammar
        if grammar is not None and grammar.error:
            raise InvalidRequestError(f"resume_token_ids do not follow the grammar: {grammar.error}")
        self._streams[request.request_id].take(final=False)  # the client has this text already
        self._new_tokens[request.request_id] = []

    def discard(self, request_id: str) -> None:
        """Forgets a request that never started (its admission failed)."""
        self._streams.pop(request_id, None)
        self._new_tokens.pop(request_id, None)

    def add_token(self, request: Request, token_id: int, logprobs: TokenLogprobs | None) -> RequestState | None:
        """Records a sampled token; returns the finished state it causes, if any."""
        request.append_token(token_id)
        self._new_tokens[request.request_id].append(token_id)
        if logprobs is not None:
            request.pending_logprobs.append(logprobs)
        params = request.params
        stream = self._streams[request.request_id]
        # Below min_tokens nothing stops the request but its length (the sampler keeps stop ids out).
        may_stop = len(request.output_token_ids) > params.min_tokens
        eos = not params.ignore_eos and token_id in self.eos_token_ids
        if may_stop and (eos or token_id in params.stop_token_ids):
            if params.include_stop_str_in_output:  # its text, as vLLM's; no stop string is looked for in it
                stream.add_token(token_id, find_stops=False)
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
            return RequestState.FINISHED_STOPPED
        if stream.add_token(token_id, find_stops=len(request.output_token_ids) >= params.min_tokens):
            request.stop_reason = stream.matched
            return RequestState.FINISHED_STOPPED
        grammar = request.sampling.grammar
        if grammar is not None and grammar.terminated:  # complete: nothing may follow (broken only by bad input)
            if len(request.output_token_ids) < params.min_tokens:
                raise InvalidRequestError(
                    f"the grammar's output is complete after {len(request.output_token_ids)} tokens, fewer than "
                    f"min_tokens ({params.min_tokens}): nothing may follow it"
                )
            return RequestState.FINISHED_STOPPED
        if len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestState.FINISHED_LENGTH
        return None

    def emit(self, request: Request) -> RequestOutput:
        """The delta since the last emit; drops the request's stream once it has finished."""
        stream = self._streams[request.request_id]
        final = request.state.finished
        if final and request.state is not RequestState.FINISHED_ABORTED:
            stream.finish()
        output = RequestOutput(
            request_id=request.request_id,
            token_ids=tuple(self._new_tokens[request.request_id]),
            text=stream.take(final),
            logprobs=tuple(request.pending_logprobs),
            finish_reason=request.state.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=len(request.output_token_ids),
            # the prompt's share: a resumed request's cache hits cover its earlier output too, which is no prompt
            num_cached_tokens=min(request.num_cached_tokens, request.num_prompt_tokens),
            prompt_logprobs=self._take_prompt_logprobs(request),
            stop_reason=request.stop_reason,
        )
        self._new_tokens[request.request_id] = []
        request.pending_logprobs.clear()
        if final:
            del self._streams[request.request_id], self._new_tokens[request.request_id]
        return output

    def _take_prompt_logprobs(self, request: Request) -> tuple[TokenLogprobs, ...]:
        """The prompt's logprobs, with the first output after they are complete (once)."""
        if request.params.prompt_logprobs is None or request.needs_prompt_scores or request.prompt_logprobs_sent:
            return ()
        request.prompt_logprobs_sent = True
        return tuple(request.prompt_logprobs)
