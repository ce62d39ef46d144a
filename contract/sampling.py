"""The sampling record: every sampling field, its one set of limits, and its protobuf conversion.

The router builds it from the public APIs, the workers from the wire (``from_wire``), the engine
samples with it. A value that passes validation is one the wire can carry and the engine can run:
each limit is checked on the value and on the float32 the wire turns it into, integers against
their proto types, strings for UTF-8. Errors are ``FieldError``s naming the field.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields

from contract.errors import FieldError
from contract.grammar import Grammar
from protos import common_pb2

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
# A request's max_tokens where it names none and no room is computed for it (OpenAI's completions default; the
# gRPC API's, whose unset field is 0)
DEFAULT_MAX_TOKENS = 16
MAX_BAD_WORDS = 64
MAX_BAD_WORD_CHARS = 1000  # each is tokenized where the request is added, on the engine's thread
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2]; repetition_penalty in (0, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: each bias lies in [-100, 100]

_UINT32 = 1 << 32
_INT32 = 1 << 31
_INT64 = 1 << 63


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and when to stop. Validated at construction; frozen after.

    ``temperature == 0`` means greedy. ``top_k == 0`` (or -1, read as 0), ``top_p == 1`` and
    ``min_p == 0`` disable those filters. ``logprobs=None`` returns no logprobs; ``logprobs=n`` returns
    the sampled token's logprob plus the ``n`` most likely tokens; ``prompt_logprobs`` likewise for each
    prompt token after the first (computed where the prompt is prefilled, so never from a prefix cache).
    ``logit_bias`` holds (token id, bias) pairs, sorted by id, each bias as the float32 the wire carries; it is
    added to the logits before sampling. ``min_tokens`` suppresses EOS and ``stop_token_ids`` (and defers stop
    strings) until that many tokens are generated; it must not exceed ``max_tokens``.

    ``allowed_token_ids``: when not empty, only these ids may be sampled (a mask beside logit_bias, so greedy takes the
    likeliest allowed token and EOS ends the request only if allowed); logprobs stay those of the raw distribution.
    ``skip_special_tokens=False`` keeps special tokens' text (``<|im_end|>``, ``</s>``) in the output text.
    ``include_stop_str_in_output``: the text ends with what stopped it, the stop string (nothing after it), or the
    stop token's or EOS's text (empty for a special token unless kept); ``stop_reason`` names it all the same.
    ``bad_words``: words never generated, as vLLM bans them: where the tokens generated so far end with all but the
    last token of a word (spelled as it starts the text or, where that is as many tokens, after a space), that last
    token may not be sampled (``engine.sampler.bad_word_token_ids``).

    ``thinking``: the output is a reasoning model's, its thinking before its answer (engine/thinking.py): the grammar
    holds only the answer, and ``thinking_token_budget``, if set, is the most tokens the thinking may hold (its tags not
    counted) before its closing tag is forced.

    ``max_tokens_defaulted``: the client set no limit, so ``max_tokens`` is a default (the context's room, or
    16) that the engine lowers to what its KV pool holds after the prompt, ending there with "length"
    (``Engine``). A limit the client set is never lowered: one that does not fit is refused.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    prompt_logprobs: int | None = None
    grammar: Grammar | None = None
    max_tokens_defaulted: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: tuple[int, ...] = ()
    bad_words: tuple[str, ...] = ()
    thinking: bool = False
    thinking_token_budget: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "max_tokens", _integer("max_tokens", self.max_tokens, 1, _UINT32))
        set_(self, "temperature", _number("temperature", self.temperature, 0.0, MAX_TEMPERATURE))
        set_(self, "top_p", _number("top_p", self.top_p, 0.0, 1.0, open_low=True))
        set_(
            self,
            "top_k",
            max(_integer("top_k", self.top_k, -1, _INT32, f"-1 or 0 (off), or an integer in [1, {_INT32 - 1}]"), 0),
        )
        set_(self, "min_p", _number("min_p", self.min_p, 0.0, 1.0))
        if self.seed is not None:
            set_(self, "seed", _integer("seed", self.seed, -_INT64, _INT64, "a 64-bit signed integer"))
        set_(self, "presence_penalty", _number("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY))
        set_(self, "frequency_penalty", _number("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY))
        set_(
            self,
            "repetition_penalty",
            _number("repetition_penalty", self.repetition_penalty, 0.0, MAX_PENALTY, open_low=True),
        )
        set_(self, "stop", _stop_strings(self.stop))
        set_(self, "stop_token_ids", _token_ids("stop_token_ids", self.stop_token_ids, _UINT32))
        if not isinstance(self.ignore_eos, bool):
            raise FieldError("ignore_eos", "ignore_eos must be a boolean")
        if self.logprobs is not None:
            set_(self, "logprobs", logprobs_count(self.logprobs))
        set_(self, "logit_bias", _logit_bias(self.logit_bias))
        set_(self, "min_tokens", _integer("min_tokens", self.min_tokens, 0, _UINT32))
        if self.min_tokens > self.max_tokens:
            raise FieldError(
                "min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.prompt_logprobs is not None:
            set_(self, "prompt_logprobs", logprobs_count(self.prompt_logprobs, "prompt_logprobs"))
        if self.grammar is not None:
            if not isinstance(self.grammar, Grammar):
                raise FieldError("grammar", "grammar must be a contract.grammar.Grammar")
            self.grammar.compiled()  # a grammar the engine cannot compile is refused here, by name
        for flag in ("max_tokens_defaulted", "skip_special_tokens", "include_stop_str_in_output", "thinking"):
            if not isinstance(getattr(self, flag), bool):
                raise FieldError(flag, f"{flag} must be a boolean")
        set_(self, "allowed_token_ids", _token_ids("allowed_token_ids", self.allowed_token_ids, _UINT32))
        set_(self, "bad_words", _bad_words(self.bad_words))
        if self.thinking_token_budget is not None:
            set_(
                self, "thinking_token_budget", _integer("thinking_token_budget", self.thinking_token_budget, 0, _UINT32)
            )
            if not self.thinking:
                raise FieldError(
                    "thinking_token_budget", "thinking_token_budget bounds a reasoning model's thinking: set thinking"
                )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    # -- the wire ---------------------------------------------------------------------------------

    def to_wire(self) -> common_pb2.SamplingParams:
        message = common_pb2.SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logit_bias=dict(self.logit_bias),
            min_tokens=self.min_tokens,
            max_tokens_defaulted=self.max_tokens_defaulted,
            include_stop_str_in_output=self.include_stop_str_in_output,
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            thinking=self.thinking,
        )
        if self.thinking_token_budget is not None:
            message.thinking_token_budget = self.thinking_token_budget
        if not self.skip_special_tokens:  # unset means the default, True
            message.skip_special_tokens = False
        if self.seed is not None:
            message.seed = self.seed
        if self.logprobs is not None:
            message.logprobs = self.logprobs
        if self.prompt_logprobs is not None:
            message.prompt_logprobs = self.prompt_logprobs
        if self.grammar is not None:
            message.grammar.CopyFrom(self.grammar.to_wire())
        return message

    @classmethod
    def from_wire(cls, message: common_pb2.SamplingParams, default_max_tokens: int | None = None) -> SamplingParams:
        """proto3 zero values mean "unset" where zero is no valid setting: max_tokens (then
        ``default_max_tokens``, if given, marked ``max_tokens_defaulted``), top_p and repetition_penalty
        (then off). A zero temperature is greedy; a zero top_k is off. An unset skip_special_tokens is True."""
        max_tokens = message.max_tokens or default_max_tokens
        defaulted = message.max_tokens_defaulted or not message.max_tokens
        if max_tokens is None:
            raise FieldError("max_tokens", "max_tokens must be at least 1")
        return cls(
            max_tokens=max_tokens,
            temperature=message.temperature,
            top_p=message.top_p or 1.0,
            top_k=message.top_k,
            min_p=message.min_p,
            seed=message.seed if message.HasField("seed") else None,
            presence_penalty=message.presence_penalty,
            frequency_penalty=message.frequency_penalty,
            repetition_penalty=message.repetition_penalty or 1.0,
            stop=tuple(message.stop),
            stop_token_ids=tuple(message.stop_token_ids),
            ignore_eos=message.ignore_eos,
            logprobs=message.logprobs if message.HasField("logprobs") else None,
            logit_bias=tuple(message.logit_bias.items()),
            min_tokens=message.min_tokens,
            prompt_logprobs=message.prompt_logprobs if message.HasField("prompt_logprobs") else None,
            grammar=Grammar.from_wire(message.grammar) if message.HasField("grammar") else None,
            max_tokens_defaulted=defaulted,
            skip_special_tokens=message.skip_special_tokens if message.HasField("skip_special_tokens") else True,
            include_stop_str_in_output=message.include_stop_str_in_output,
            allowed_token_ids=tuple(message.allowed_token_ids),
            bad_words=tuple(message.bad_words),
            thinking=message.thinking,
            thinking_token_budget=message.thinking_token_budget if message.HasField("thinking_token_budget") else None,
        )


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))


# -- checks shared with whoever knows the vocabulary --------------------------------------------


def check_token_ids(token_ids: Iterable[int], vocab_size: int, field: str) -> None:
    """Token ids a model can read: each in [0, vocab_size). For prompts, stop_token_ids, logit_bias's keys and
    allowed_token_ids."""
    _token_ids(field, token_ids, vocab_size)


def check_vocabulary(params: SamplingParams, vocab_size: int) -> None:
    """Every token id the record names is one the model has; FieldError names the field otherwise."""
    check_token_ids(params.stop_token_ids, vocab_size, "stop_token_ids")
    check_token_ids((token_id for token_id, _ in params.logit_bias), vocab_size, "logit_bias")
    check_token_ids(params.allowed_token_ids, vocab_size, "allowed_token_ids")


def check_text(value: str, field: str) -> str:
    """``value`` if it is valid UTF-8 (no lone surrogates, which JSON escapes can carry); else FieldError."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FieldError(field, f"{field} is not valid UTF-8 (position {exc.start})") from exc
    return value


def wrap_seed(seed: int) -> int:
    """``seed`` folded into the signed 64-bit range (for seeds derived by arithmetic, e.g. seed + choice)."""
    return (seed + _INT64) % (2 * _INT64) - _INT64


# -- field checks -----------------------------------------------------------------------------------


def logprobs_count(value, name: str = "logprobs") -> int:
    """A count of most likely tokens to return, checked under the name the client gave it (chat's ``top_logprobs``
    is the record's ``logprobs``)."""
    return _integer(name, value, 0, MAX_TOP_LOGPROBS + 1)


def _integer(name: str, value, low: int, end: int, spelled: str | None = None) -> int:
    """``value`` as an int in [low, end)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < end:
        raise FieldError(name, f"{name} must be {spelled or f'an integer in [{low}, {end - 1}]'}")
    return int(value)


def _number(name: str, value, low: float, high: float, open_low: bool = False) -> float:
    """``value`` as a float in [low, high] (or (low, high]), checked again as the float32 the wire carries."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(name, f"{name} must be a number in {_interval(low, high, open_low)}")
    value = float(value)
    narrow = _as_float32(value)
    least, most = (value, narrow) if value <= narrow else (narrow, value)
    if not ((low < least if open_low else low <= least) and most <= high):  # NaN is never inside
        raise FieldError(name, f"{name} must be in {_interval(low, high, open_low)}")
    return value


def _interval(low: float, high: float, open_low: bool) -> str:
    return f"{'(' if open_low else '['}{low:g}, {high:g}]"


_FLOAT32 = struct.Struct("<f")


def _as_float32(value: float) -> float:
    if not math.isfinite(value) or abs(value) > 3.4e38:
        return value
    return _FLOAT32.unpack(_FLOAT32.pack(value))[0]


def _stop_strings(stop: Sequence[str]) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise FieldError("stop", f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")
    for text in stop:
        check_text(text, "stop")
    return stop


def _bad_words(words: Sequence[str]) -> tuple[str, ...]:
    if not isinstance(words, (tuple, list)):  # a bare string would read as its characters
        raise FieldError("bad_words", "bad_words must be a list of strings")
    words = tuple(words)
    if len(words) > MAX_BAD_WORDS or not all(
        isinstance(w, str) and w.strip() and len(w) <= MAX_BAD_WORD_CHARS for w in words
    ):
        raise FieldError(
            "bad_words",
            f"bad_words must be at most {MAX_BAD_WORDS} strings, each with a non-space and at most "
            f"{MAX_BAD_WORD_CHARS} characters",
        )
    for word in words:
        check_text(word, "bad_words")
    return words


def _logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """(token id, bias) pairs from a mapping or pairs: ids in uint32, biases in [-100, 100] as float32."""
    if isinstance(bias, (dict, tuple, list)) and not bias:  # none: nearly every request
        return ()
    pairs = tuple(bias.items()) if isinstance(bias, Mapping) else bias
    if not isinstance(pairs, (tuple, list)) or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise FieldError("logit_bias", "logit_bias must map token ids to biases")
    ids = _token_ids("logit_bias", (token_id for token_id, _ in pairs), _UINT32)
    if len(set(ids)) != len(ids):
        raise FieldError("logit_bias", "logit_bias names a token id twice")
    biases = (_number("logit_bias", b, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS) for _, b in pairs)
    return tuple(sorted((token_id, _as_float32(b)) for token_id, b in zip(ids, biases)))


_INT_ONLY = frozenset({int})


def _token_ids(name: str, token_ids: Iterable[int], end: int) -> tuple[int, ...]:
    try:
        ids = tuple(token_ids)
    except TypeError:  # not a sequence at all
        ids = (None,)
    plain = not ids or (set(map(type, ids)) == _INT_ONLY and 0 <= min(ids) and max(ids) < end)  # at C speed
    if not plain and not all(not isinstance(t, bool) and isinstance(t, int) and 0 <= t < end for t in ids):
        # The record alone knows no vocabulary, only the wire's range: it names none (check_token_ids names it).
        within = "of the model's vocabulary" if end == _UINT32 else f"in [0, {end})"
        raise FieldError(name, f"{name} must hold token ids {within}")
    return ids
