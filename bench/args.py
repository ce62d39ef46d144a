"""What the benchmark commands (`splitserve bench ...`, `splitserve simulate`) accept, checked before anything
starts: argument types that refuse a bad value as argparse does (``argument --flag: ...``, exit 2), and
``Refused`` for a combination of flags, which ``bench.cli.main`` reports the same way."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable

from contract.bounds import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Bound
from contract.bounds import flag_type as bounded


class Refused(ValueError):
    """A flag, or a combination of flags, the command refuses: one line naming them (``bench.cli.main``)."""


# -- types: each parses one flag's text or raises ArgumentTypeError, which argparse prints naming the flag --


positive_int = bounded(int, AT_LEAST_ONE)
non_negative_int = bounded(int, NON_NEGATIVE)
positive_float = bounded(float, POSITIVE)
non_negative_float = bounded(float, NON_NEGATIVE)
fraction = bounded(float, Bound(0, 1, low_open=True), "in (0, 1]")  # an efficiency: some of the peak, at most all
share = bounded(float, Bound(0, 1))  # a range ratio, a share of requests


def int_at_least(low: int) -> Callable[[str], int]:
    return bounded(int, Bound(low))


def int_between(low: int, high: int) -> Callable[[str], int]:
    return bounded(int, Bound(low, high))


def list_of(item: Callable[[str], float]) -> Callable[[str], tuple]:
    """Comma-separated values of ``item``, at least one."""

    def parse(text: str) -> tuple:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"takes a comma-separated list, got {text!r}")
        return tuple(item(part) for part in parts)

    return parse


def or_word(word: str, item: Callable[[str], float]) -> Callable[[str], object]:
    """``word`` itself (e.g. auto: chosen by the command) or a value of ``item``."""

    def parse(text: str):
        return word if text == word else item(text)

    return parse


def or_inf(item: Callable[[str], float]) -> Callable[[str], float]:
    """inf (no limit: e.g. every request at once) or a value of ``item``."""

    def parse(text: str) -> float:
        return float("inf") if text == "inf" else item(text)

    return parse


def named_rates(text: str) -> tuple[tuple[str, float], ...]:
    """NAME=RATE,... with each rate > 0, e.g. grpc=9,nixl=80."""
    out = []
    for item in text.split(","):
        name, _, rate = item.partition("=")
        if not name.strip() or not rate:
            raise argparse.ArgumentTypeError(f"takes NAME=RATE,..., got {item!r}")
        out.append((name.strip(), positive_float(rate)))
    return tuple(out)


def int_range(text: str) -> tuple[int, int]:
    """LOW,HIGH with 1 <= LOW <= HIGH."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"takes LOW,HIGH, got {text!r}")
    low, high = (positive_int(part.strip()) for part in parts)
    if low > high:
        raise argparse.ArgumentTypeError(f"LOW must be <= HIGH, got {text}")
    return low, high


# -- combinations ------------------------------------------------------------------------------------


class Given:
    """The flags of a command line set to other than their defaults. argparse cannot tell a default typed out from
    one left out, and the two run alike; refusing those that differ refuses every flag that would change the run."""

    def __init__(self, parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
        defaults = vars(parser.parse_args([]))
        self._flags = {action.dest: action.option_strings[0] for action in parser._actions if action.option_strings}
        self.dests = {dest for dest, value in vars(args).items() if dest in defaults and value != defaults[dest]}

    def among(self, dests: Iterable[str]) -> list[str]:
        """The flags of ``dests`` given, as typed (``--batch-sizes``)."""
        return [self._flags[dest] for dest in dests if dest in self.dests]

    def refuse(self, dests: Iterable[str], why: str) -> None:
        """Refused, naming them, if any of ``dests`` is given: ``--a, --b: <why>``."""
        if flags := self.among(dests):
            raise Refused(f"{', '.join(flags)}: {why}")


def refuse_beside_quick(given: Given, quick: Iterable[str]) -> None:
    """--quick sets these sizes itself: given beside it, they are refused rather than overridden."""
    if "quick" in given.dests:
        given.refuse(quick, "--quick picks its own sizes: drop --quick, or these")


def check_json_path(path: str | None) -> None:
    """--json PATH, opened now (and removed again if it did not exist): an unwritable path is refused before the
    run, not found after it."""
    if path is None:
        return
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise Refused(f"--json {path}: {exc.strerror or exc}") from None
    if not existed:
        os.remove(path)


# -- secrets ------------------------------------------------------------------------------------------

SECRETS = ("api_key", "admin_token")  # never written to a report: reports get attached to issues and committed


def report_config(args: argparse.Namespace) -> dict:
    """The run's settings as a report records them: every flag's value, never a secret."""
    return {k: v for k, v in vars(args).items() if k not in ("run", "module", *SECRETS)}


def api_key_from(args: argparse.Namespace) -> str | None:
    """The API key to send: the first in --api-key-file, else in $SPLITSERVE_API_KEYS[_FILE] (router.config reads
    both, as the router does); None: none is configured."""
    from router.config import api_keys_from_env, read_api_keys

    try:
        keys = read_api_keys(args.api_key_file, "--api-key-file") if args.api_key_file else api_keys_from_env()
    except ValueError as exc:
        raise Refused(str(exc)) from None
    return keys[0] if keys else None


def add_api_key_arguments(parser: argparse.ArgumentParser, api_key_file_help: str) -> None:
    """--api-key-file PATH, and --api-key refused as `splitserve status` refuses it (`ps` shows a command line)."""
    from router.config import API_KEY_SOURCES, SecretOnCommandLine

    parser.add_argument("--api-key", action=SecretOnCommandLine, alternatives=API_KEY_SOURCES)
    parser.add_argument("--api-key-file", default=None, metavar="PATH", help=api_key_file_help)
