"""The router's model of a prefill worker's queue, which the router (router/workers.py) and the simulator
(bench/sim/cluster.py) both keep: turns the prompts sent to a prefill worker into the wait a prompt sent now would
have there, the figure the overflow rule (router.routing.overflows_to_decode) weighs."""

from __future__ import annotations

from dataclasses import dataclass, field

PREFILL_SPEED_WEIGHT = 0.2  # of the newest sample in a worker's measured seconds per prefill token


def timed_prefill(previous: float | None, uncached_tokens: int, seconds: float) -> float | None:
    """A worker's seconds per prefill token after a prompt sent to it while it had nothing else to compute took
    ``seconds`` to compute: an exponential average of such prompts' compute time per uncached token."""
    if uncached_tokens <= 0:
        return previous
    sample = seconds / uncached_tokens
    return sample if previous is None else previous + PREFILL_SPEED_WEIGHT * (sample - previous)


@dataclass(eq=False)
class SentPrompt:
    """A prompt sent to a prefill worker whose compute has not been reported yet."""

    at: float  # when it was sent (the clock's time base, e.g. time.monotonic())
    tokens: int  # its uncached prompt tokens
    timed: bool  # sent while the worker had nothing else to compute: its compute time times the worker's speed
    forecast_s: float | None = None  # the clock's, when sent: seconds until it is computed (None: no speed yet)


@dataclass
class PrefillClock:
    """The router's model of one prefill worker's queue, which the router and the simulator both keep: prompts are
    computed in the order sent, each taking its uncached tokens x ``s_per_token``; every answer reports its own
    compute time (``PrefillResponse.prefill_ms``), which dates when that prompt, and every one sent before it, had
    been computed. The expected wait of a prompt sent now is what the prompts still unreported need from there.

    The answer itself is no clock: it comes once the decode worker has taken the KV, so a busy decode worker (its
    Reserve answered between steps, its commit behind a step) delays every answer. Timed and counted by answers, a
    prefill worker looked more than twice as slow under load, and the overflow that made the decode worker busier
    made it look slower still."""

    s_per_token: float | None = None
    _unreported: list[SentPrompt] = field(default_factory=list)  # in the order sent
    _computed_until: float = float("-inf")  # when the newest prompt reported had been computed

    @property
    def queued_tokens(self) -> int:
        """Uncached tokens of the prompts not reported computed yet."""
        return sum(prompt.tokens for prompt in self._unreported)

    def send(self, tokens: int, now: float) -> SentPrompt:
        wait = self.wait_s(now)
        forecast = None if wait is None else wait + tokens * self.s_per_token
        prompt = SentPrompt(now, tokens, timed=not self._unreported, forecast_s=forecast)
        self._unreported.append(prompt)
        return prompt

    def computed(self, prompt: SentPrompt, seconds: float) -> float | None:
        """``prompt``'s answer: it was computed ``seconds`` after it was sent (and so was every prompt before it).
        Returns how far the clock's forecast for it was off, forecast - ``seconds`` (negative: it took longer than
        the overflow rule assumed when it let the prompt wait there); None without a forecast, or if the prompt was
        reported already."""
        if prompt not in self._unreported:
            return None  # reported already, by a later prompt's answer
        del self._unreported[: self._unreported.index(prompt) + 1]
        self._computed_until = max(self._computed_until, prompt.at + seconds)
        if prompt.timed:
            self.s_per_token = timed_prefill(self.s_per_token, prompt.tokens, seconds)
        return None if prompt.forecast_s is None else prompt.forecast_s - seconds

    def forget(self, prompt: SentPrompt) -> None:
        """A prompt that will not be reported (its prefill failed or was cancelled)."""
        if prompt in self._unreported:
            self._unreported.remove(prompt)

    def wait_s(self, now: float) -> float | None:
        """Seconds until the prompts sent so far are computed (None until a speed was measured)."""
        if self.s_per_token is None:
            return None
        done = self._computed_until
        for prompt in self._unreported:
            done = max(done, prompt.at) + prompt.tokens * self.s_per_token
        return max(0.0, done - now)
