"""Per-request sampling parameters, validated once at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """What to generate and when to stop.

    ``temperature == 0`` means greedy. ``top_k <= 0`` and ``top_p == 1`` and ``min_p == 0`` disable
    those filters. ``logprobs=None`` returns no logprobs; ``logprobs=n`` returns the sampled token's
    logprob plus the ``n`` most likely tokens (0 ≤ n ≤ 20).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1")
        _check(self.temperature >= 0.0, "temperature must be >= 0")
        _check(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        _check(isinstance(self.top_k, int), "top_k must be an integer (0 or -1 disables it)")
        _check(0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]")
        _check(self.repetition_penalty > 0.0, "repetition_penalty must be > 0")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(
            self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
            f"logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)
