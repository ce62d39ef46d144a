"""Turns a batch of logits into next tokens, one row per request.

Pipeline per row (vLLM / OpenAI semantics):

    raw logits ──► logit_bias, allowed_token_ids, min_tokens ──► penalties ──► grammar mask (structured output)
        │      ──► /temperature ──► top-k ──► top-p ──► min-p ──► sample (or the token a thinking budget forces)
        │
        └──► log_softmax ──► logprobs (always of the *raw* distribution, as vLLM's default)

``allowed_token_ids`` sets every other token to -inf. ``min_tokens`` sets EOS and ``stop_token_ids`` to -inf while
fewer than ``min_tokens`` tokens are generated; ``bad_words`` sets the last token of a word to -inf where the tokens
generated so far end with the rest of it. Masks only remove tokens: each row that has one is left with a token
to sample (``held_back_by_min_tokens`` lets the engine refuse a request whose masks could leave none; a grammar that
allows none of ``allowed_token_ids`` fails the request rather than sample a forbidden token).

Sampling uses the exponential-race trick: ``argmax(probs / E)`` with ``E ~ Exp(1)`` i.i.d. is an
exact draw from ``probs``. Each seeded row draws its own noise from its own generator, so its
tokens do not depend on what else is in the batch; unseeded rows share the sampler's generator.

A reasoning model's output (``params.thinking``) is followed token by token (engine/thinking.py): the grammar masks
its answer, not its thinking (at the output's start it also allows the ``<think>`` that would open the thinking), and
once the thinking holds ``thinking_token_budget`` tokens its closing tag is the next token.

Stop tokens, EOS and ``max_tokens`` are the engine's business, not the sampler's.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from contract.sampling import SamplingParams
from engine.errors import InvalidRequestError
from engine.grammar import GrammarMatcher
from engine.native_kernels import elementwise_for
from engine.thinking import Thoughts

# Temperatures below this are treated as greedy: dividing by them overflows float32 logits.
_SAMPLING_EPS = 1e-5

_UINT64 = (1 << 64) - 1


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float  # log-prob of the sampled token under log_softmax of the unprocessed logits
    top: tuple[tuple[int, float], ...]  # params.logprobs most likely (token_id, logprob), most likely first
    rank: int = 0  # a prompt token's: 1 + how many tokens the model found more likely; 0 for a sampled token's


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None for rows whose params.logprobs is None


class SamplingState:
    """Per-request sampling state, created when the request is added and kept across preemption.

    Holds the request's ``torch.Generator`` when ``params.seed`` is set, and the output history the
    penalties need. The engine calls ``record`` exactly once per generated token, after sampling.

    A seeded generator is reseeded from ``(seed, num_generated)`` before every draw, so the token
    for step *n* is a pure function of the seed, the history and the logits: re-running a step
    (or running it in a different batch) gives the same token. ``Sampler.sample`` never changes
    what ``record`` tracks. Not thread-safe; owned by the engine thread.
    """

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        eos_token_ids: Sequence[int] = (),
        grammar: GrammarMatcher | None = None,
        bad_words: Sequence[Sequence[int]] = (),
        thoughts: Thoughts | None = None,
    ):
        """``bad_words``: the token sequences of ``params.bad_words`` (``bad_word_token_ids``); ``thoughts``: where a
        reasoning model's output stands (``params.thinking``)."""
        self.params = params
        self.num_generated = 0
        self.grammar = grammar  # structured output: masks the logits, advanced by every recorded token of the answer
        self.thoughts = thoughts
        self._min_tokens_suppressed = tuple(sorted(held_back_by_min_tokens(params, eos_token_ids)))
        # Penalty inputs are kept only for requests that use them.
        self._output_token_ids: list[int] = []
        self._prompt_token_set = _unique_ids(prompt_token_ids) if params.repetition_penalty != 1.0 else None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._allowed_ids: dict[torch.device, torch.Tensor] = {}
        self._bad_words = tuple(tuple(word) for word in bad_words if word)
        # The last tokens generated, as many as the longest bad word could need to end with.
        self._recent: deque[int] = deque(maxlen=max((len(w) - 1 for w in self._bad_words), default=0))

    def record(self, token_id: int) -> None:
        self.num_generated += 1
        answering = self.thoughts is None or self.thoughts.record(token_id)
        if self.grammar is not None and answering:
            self.grammar.accept(token_id)
        if self.params.has_penalties:
            self._output_token_ids.append(int(token_id))
        if self._recent.maxlen:
            self._recent.append(int(token_id))

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens so far; empty unless the request has penalties. Do not mutate."""
        return self._output_token_ids

    @property
    def suppressed_token_ids(self) -> tuple[int, ...]:
        """Token ids that may not be sampled at this step: stop and EOS ids until min_tokens are generated, and the
        last token of each bad word whose other tokens the output ends with."""
        held = self._min_tokens_suppressed if self.num_generated < self.params.min_tokens else ()
        return held + self.banned_token_ids if self._bad_words else held

    @property
    def banned_token_ids(self) -> tuple[int, ...]:
        """The bad words' tokens that may not be sampled at this step."""
        recent = tuple(self._recent)
        return tuple(
            word[-1]
            for word in self._bad_words
            if len(word) - 1 <= len(recent) and recent[len(recent) - len(word) + 1 :] == word[:-1]
        )

    @property
    def grammar_applies(self) -> bool:
        """Whether the grammar masks this step: it holds the answer, not a reasoning model's thinking."""
        return self.grammar is not None and (self.thoughts is None or not self.thoughts.inside)

    @property
    def forced_token(self) -> int | None:
        """The token this step must be: a thinking's closing tag once its budget is spent; else None."""
        return None if self.thoughts is None else self.thoughts.forced

    @property
    def adjusts_logits(self) -> bool:
        """Whether logit_bias, allowed_token_ids or min_tokens changes this step's logits."""
        params = self.params
        return bool(params.logit_bias) or bool(params.allowed_token_ids) or bool(self.suppressed_token_ids)

    def allowed_ids(self, device: torch.device) -> torch.Tensor:
        """``params.allowed_token_ids`` as a long tensor on ``device`` (made once per device)."""
        ids = self._allowed_ids.get(device)
        if ids is None:
            ids = torch.tensor(self.params.allowed_token_ids, dtype=torch.long, device=device)
            self._allowed_ids[device] = ids
        return ids

    @property
    def prompt_token_set(self) -> torch.Tensor | None:
        """Unique prompt ids (CPU, int64); only kept when repetition_penalty != 1."""
        return self._prompt_token_set

    def step_generator(self, device: torch.device) -> torch.Generator:
        """The request's generator on ``device``, seeded for the current step. Seeded requests only."""
        assert self.params.seed is not None, "step_generator needs params.seed"
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device)
        generator.manual_seed(_step_seed(self.params.seed, self.num_generated))
        return generator


class Sampler:
    """Samples one token per row. Stateless across calls except for the shared generator.

    Logit columns at or beyond ``vocab_size`` (padding some models add) are ignored.
    """

    def __init__(self, vocab_size: int, seed: int = 0):
        self.vocab_size = vocab_size
        self._seed = seed
        self._shared_generators: dict[torch.device, torch.Generator] = {}

    def sample(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> SampleResult:
        """logits: [B, V] in any float dtype (on any device), row i belongs to states[i]; processed in
        float32. Does not mutate states."""
        if logits.dim() != 2 or logits.size(0) != len(states) or logits.size(1) < self.vocab_size:
            raise ValueError(f"logits of shape {tuple(logits.shape)} do not match {len(states)} states")
        logits = logits[:, : self.vocab_size]
        if all(_plain_greedy(s) and s.params.logprobs is None for s in states):
            # The decode loop's fast path: no float32 copy, no softmax. Widening to float32 is exact
            # and keeps the order, so the first maximum is the same token; max(dim) finds it faster
            # than argmax on CPU.
            kernels = elementwise_for(logits, row_multiple=1)
            token_ids = kernels.argmax(logits) if kernels is not None else logits.max(dim=-1).indices.tolist()
            return SampleResult(token_ids=token_ids, logprobs=[None] * len(states))
        raw = logits.float()
        tokens = self._choose_tokens(raw, states)
        token_ids = tokens.tolist()
        return SampleResult(token_ids=token_ids, logprobs=_gather_logprobs(raw, states, tokens, token_ids))

    def prompt_logprobs(self, logits: torch.Tensor, targets: Sequence[int], num_top: int) -> list[TokenLogprobs]:
        """Logprobs of prompt tokens: row j of ``logits`` [R, V] is the model's prediction of ``targets[j]``.

        Each entry holds the target's logprob and rank and the ``num_top`` most likely tokens, of the raw
        distribution."""
        logprobs = logits[:, : self.vocab_size].float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])
        ranks = ((logprobs > chosen).sum(dim=-1) + 1).tolist()
        top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (logprobs[:, :0], logprobs[:, :0].long())
        return [
            TokenLogprobs(token_id=t, logprob=lp, top=tuple(zip(ids, values)), rank=rank)
            for t, lp, rank, ids, values in zip(
                targets, chosen.squeeze(1).tolist(), ranks, top_ids.tolist(), top_values.tolist()
            )
        ]

    def _choose_tokens(self, raw: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        if all(_plain_greedy(s) for s in states):
            return raw.argmax(dim=-1)  # no sort, no softmax
        processed = _apply_grammar(_apply_penalties(_apply_bias_and_suppression(raw, states), states), raw, states)
        tokens = processed.argmax(dim=-1)
        sampled_rows = [i for i, s in enumerate(states) if not _is_greedy(s.params)]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=raw.device)
            sampled_states = [states[i] for i in sampled_rows]
            tokens[rows] = self._sample_rows(processed[rows], sampled_states)
        for i, state in enumerate(states):
            if state.forced_token is not None:
                tokens[i] = state.forced_token
        return tokens

    def _sample_rows(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        params = [s.params for s in states]
        temperatures = _column([p.temperature for p in params], logits)
        scaled = _mask_filtered(logits / temperatures, params)
        probs = scaled.softmax(dim=-1)
        noise = self._exponential_noise(probs.shape, states, probs.device)
        return probs.div_(noise).argmax(dim=-1)

    def _exponential_noise(
        self, shape: torch.Size, states: Sequence[SamplingState], device: torch.device
    ) -> torch.Tensor:
        noise = torch.empty(shape, device=device)
        unseeded = [j for j, s in enumerate(states) if s.params.seed is None]
        if unseeded:
            draws = torch.empty(len(unseeded), shape[1], device=device)
            draws.exponential_(generator=self._shared_generator(device))
            noise[torch.tensor(unseeded, device=device)] = draws
        for j, state in enumerate(states):
            if state.params.seed is not None:
                # A fresh [V] tensor per row keeps the draw identical to sampling the row alone.
                noise[j] = torch.empty(shape[1], device=device).exponential_(generator=state.step_generator(device))
        # Exp(1) can return exactly 0; 0/0 would be NaN, which argmax treats as the maximum.
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared_generators.get(device)
        if generator is None:
            generator = self._shared_generators[device] = torch.Generator(device=device)
            generator.manual_seed(self._seed)
        return generator


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < _SAMPLING_EPS


def _plain_greedy(state: SamplingState) -> bool:
    """Greedy over the raw logits: nothing adjusts them first."""
    params = state.params
    return (
        _is_greedy(params)
        and not params.has_penalties
        and not state.adjusts_logits
        and not state.grammar_applies
        and state.forced_token is None
    )


def _apply_bias_and_suppression(raw: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """``raw`` plus each row's logit_bias, with the ids outside its allowed_token_ids and its suppressed ids at -inf
    (a new tensor if any row asks; the other rows are copied unchanged)."""
    rows = [i for i, s in enumerate(states) if s.adjusts_logits]
    if not rows:
        return raw
    out = raw.clone()
    for i in rows:
        bias = states[i].params.logit_bias
        if bias:
            ids = torch.tensor([t for t, _ in bias], dtype=torch.long, device=raw.device)
            out[i].index_add_(0, ids, torch.tensor([b for _, b in bias], dtype=raw.dtype, device=raw.device))
        if states[i].params.allowed_token_ids:
            allowed = states[i].allowed_ids(raw.device)
            kept = out[i, allowed]
            out[i] = -math.inf
            out[i, allowed] = kept
        suppressed = states[i].suppressed_token_ids
        if suppressed:
            out[i, torch.tensor(suppressed, dtype=torch.long, device=raw.device)] = -math.inf
            if states[i].params.allowed_token_ids and out[i, states[i].allowed_ids(raw.device)].isneginf().all():
                raise InvalidRequestError(
                    "bad_words or min_tokens hold back every one of allowed_token_ids: nothing to sample"
                )
    return out


def _apply_grammar(logits: torch.Tensor, raw: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """``logits`` with the tokens each row's grammar forbids at -inf (never writing into ``raw``)."""
    rows = [i for i, s in enumerate(states) if s.grammar_applies]
    if not rows:
        return logits
    allowed = torch.stack([_grammar_allows(states[i]) for i in rows]).to(logits.device)
    out = logits.clone() if logits is raw else logits
    row_index = torch.tensor(rows, device=logits.device)
    out[row_index] = out[row_index].masked_fill(~allowed[:, : out.size(1)], -math.inf)
    # The grammar may allow only what the other masks took away (EOS, while min_tokens holds it back; ids outside
    # allowed_token_ids; a bad word's token): no token is left, and the argmax of nothing would be token 0. A grammar
    # alone always leaves one, so only rows with another mask pay for the look.
    masked = [j for j, i in enumerate(rows) if states[i].adjusts_logits]
    if masked and bool(out[row_index[masked]].isneginf().all(dim=-1).any()):
        raise InvalidRequestError(  # the request's own fields contradict each other: the client's error
            "the grammar allows none of the tokens that min_tokens, allowed_token_ids and bad_words leave here: "
            "there is no token to sample"
        )
    return out


def _grammar_allows(state: SamplingState) -> torch.Tensor:
    """The tokens the row's grammar allows next, and at a reasoning model's output's start the one opening its
    thinking."""
    allowed = state.grammar.allowed()
    thoughts = state.thoughts
    if thoughts is not None and thoughts.at_start and thoughts.tags.open_id < allowed.numel():
        allowed[thoughts.tags.open_id] = True
    return allowed


def _apply_penalties(raw: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
    """Returns penalised logits (a new tensor for penalised batches; ``raw`` itself otherwise)."""
    rows = [i for i, s in enumerate(states) if s.params.has_penalties]
    if not rows:
        return raw
    penalised_states = [states[i] for i in rows]
    params = [s.params for s in penalised_states]
    row_index = torch.tensor(rows, device=raw.device)
    logits = raw[row_index]
    counts = _output_counts(penalised_states, logits)
    output_seen = counts > 0
    seen = output_seen | _prompt_mask(penalised_states, logits)

    repetition = _column([p.repetition_penalty for p in params], logits)
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, repeated, logits)
    logits -= _column([p.frequency_penalty for p in params], logits) * counts
    logits -= _column([p.presence_penalty for p in params], logits) * output_seen

    out = raw.clone()
    out[row_index] = logits
    return out


def _output_counts(states: Sequence[SamplingState], like: torch.Tensor) -> torch.Tensor:
    """[R, V] float counts of each row's generated tokens, built by one scatter-add."""
    ids = [s.output_token_ids for s in states]
    return _scatter_rows(like, [torch.tensor(x, dtype=torch.long) for x in ids], accumulate=True)


def _prompt_mask(states: Sequence[SamplingState], like: torch.Tensor) -> torch.Tensor:
    """[R, V] bool: token occurs in the row's prompt (only filled for repetition-penalised rows)."""
    empty = torch.empty(0, dtype=torch.long)
    sets = [s.prompt_token_set if s.prompt_token_set is not None else empty for s in states]
    return _scatter_rows(like, sets, accumulate=False) > 0


def _scatter_rows(like: torch.Tensor, ids_per_row: list[torch.Tensor], accumulate: bool) -> torch.Tensor:
    out = torch.zeros_like(like)
    lengths = torch.tensor([len(x) for x in ids_per_row])
    if int(lengths.sum()) == 0:
        return out
    row_index = torch.repeat_interleave(torch.arange(len(ids_per_row)), lengths).to(like.device)
    col_index = torch.cat(ids_per_row).to(like.device)
    ones = torch.ones(col_index.numel(), dtype=like.dtype, device=like.device)
    return out.index_put_((row_index, col_index), ones, accumulate=accumulate)


def _mask_filtered(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Sets tokens removed by top-k, then top-p, then min-p to -inf, with one sort for the batch.

    In sorted order (most likely first) a row keeps position j iff
        j < top_k  and  mass_before[j] < top_p  and  logit[j] >= logit[0] + log(min_p)
    where mass_before is the probability of the kept tokens ahead of j after top-k. The min-p test
    is the ratio p_j >= min_p * p_max, which renormalising after top-k/top-p does not change.
    """
    vocab = logits.size(1)
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    uses_top_p = any(p.top_p < 1.0 for p in params)
    uses_min_p = any(p.min_p > 0.0 for p in params)
    if all(k == vocab for k in top_k) and not uses_top_p and not uses_min_p:
        return logits

    # Stable sort: ties break the same way whatever the batch, which seeded rows rely on.
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)
    positions = torch.arange(vocab, device=logits.device)
    remove = positions >= torch.tensor(top_k, device=logits.device)[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, -math.inf)
    if uses_top_p:
        # Disabled rows get 2.0 so float rounding in the cumsum never trims their tail.
        top_p = _column([p.top_p if p.top_p < 1.0 else 2.0 for p in params], logits)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        remove |= mass_before >= top_p
    if uses_min_p:
        log_min_p = _column([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], logits)
        remove |= sorted_logits < sorted_logits[:, :1] + log_min_p
    mask = torch.empty_like(remove).scatter_(1, order, remove)
    return logits.masked_fill(mask, -math.inf)


def _gather_logprobs(
    raw: torch.Tensor, states: Sequence[SamplingState], tokens: torch.Tensor, token_ids: list[int]
) -> list[TokenLogprobs | None]:
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(states)
    if not rows:
        return result
    row_index = torch.tensor(rows, device=raw.device)
    logprobs = raw[row_index].log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[row_index][:, None]).squeeze(1).tolist()
    n_top = min(max(states[i].params.logprobs for i in rows), raw.size(1))
    top_values, top_ids = logprobs.topk(n_top, dim=-1) if n_top else (logprobs[:, :0], logprobs[:, :0].long())
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(rows):
        n = states[i].params.logprobs
        top = tuple(zip(top_ids[j][:n], top_values[j][:n]))
        result[i] = TokenLogprobs(token_id=token_ids[i], logprob=chosen[j], top=top)
    return result


def bad_word_token_ids(encode: Callable[[str], list[int]], words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token sequences that spell ``words`` (``encode``: text to ids, no special tokens), as vLLM finds them:
    each word spelled as it would start the text, and again after a space where that spelling is as many tokens
    but starts with another (a BPE's word-initial token, " word"), so that both places are banned."""
    sequences = []
    for word in words:
        alone = tuple(encode(word.lstrip()))
        sequences.append(alone)
        spaced = tuple(encode(" " + word.lstrip()))
        if spaced and alone and spaced[0] != alone[0] and len(spaced) == len(alone):
            sequences.append(spaced)
    return tuple(s for s in sequences if s)


def held_back_by_min_tokens(params: SamplingParams, eos_token_ids: Sequence[int]) -> frozenset[int]:
    """The ids min_tokens keeps from being sampled: the stop token ids, and EOS unless it is ignored (vLLM's rule)."""
    if not params.min_tokens:
        return frozenset()
    return frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos_token_ids))


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def _unique_ids(token_ids: Sequence[int]) -> torch.Tensor:
    return torch.unique(torch.as_tensor(list(token_ids), dtype=torch.long))


def _step_seed(seed: int, step: int) -> int:
    """Mixes (seed, step) into a 64-bit seed (splitmix64 finaliser) so nearby pairs don't correlate."""
    z = (seed * 0x9E3779B97F4A7C15 + step) & _UINT64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _UINT64
    return z ^ (z >> 31)
