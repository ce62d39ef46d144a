"""Bounds of numeric settings, for every package that checks one: a flag, a config key, a worker's own limit."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

# The longest lease a decode worker grants: a router may not ask for more (RouterConfig.lease_ms), and a worker caps
# what a peer asks for at it (decode_worker/worker.py).
MAX_LEASE_MS = 600_000


@dataclass(frozen=True)
class Bound:
    """The values a numeric setting admits: finite, at least ``low`` (above it where ``low_open``), at most ``high``."""

    low: float
    high: float | None = None
    low_open: bool = False

    def admits(self, value) -> bool:
        if not math.isfinite(value) or (self.high is not None and value > self.high):
            return False
        return value > self.low if self.low_open else value >= self.low

    def __str__(self) -> str:
        if self.high is not None:
            return f"between {self.low:g} and {self.high:g}"
        return f"{'>' if self.low_open else '>='} {self.low:g}"


POSITIVE = Bound(0, low_open=True)
NON_NEGATIVE = Bound(0)
AT_LEAST_ONE = Bound(1)
PORT = Bound(0, 65535)  # 0: any free port
LEASE_MS = Bound(1, MAX_LEASE_MS)


def check_bounds(owner, bounds: dict[str, Bound]) -> None:
    """ValueError naming the first of ``owner``'s fields in ``bounds`` that is set (not None) and out of its bound
    (a config file's loader names the section: cluster.config)."""
    for name, bound in bounds.items():
        value = getattr(owner, name)
        if value is not None and not bound.admits(value):
            finite = "" if math.isfinite(value) else "finite and "
            raise ValueError(f"{name} must be {finite}{bound}, got {value!r}")


def flag_type(convert: Callable[[str], float], bound: Bound, admits: str | None = None) -> Callable[[str], float]:
    """An argparse type: a number ``convert`` reads from the flag's text, within ``bound`` (``admits`` says so where
    str(bound) would not); else ArgumentTypeError, which argparse prints naming the flag."""
    kind = "an integer" if convert is int else "a number"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        if not bound.admits(value):
            raise argparse.ArgumentTypeError(f"must be {admits or bound}, got {text}")
        return value

    return parse
