"""The error every contract record raises for a bad request field."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager


class FieldError(ValueError):
    """A request field is malformed or out of range; ``field`` names it (an OpenAI ``param``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# A request id is echoed (gRPC: in every chunk) and goes into log lines: a longer one is refused, as is one that is
# not printable ASCII (a newline would forge a log line). The router holds its clients' ids to it, the workers every
# id they are sent.
MAX_REQUEST_ID_CHARS = 256


def check_request_id(request_id: str, field: str) -> None:
    """FieldError naming ``field`` for a request id past MAX_REQUEST_ID_CHARS or not printable ASCII."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise FieldError(field, f"{field} has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS} are allowed")
    if not (request_id.isascii() and request_id.isprintable()):
        raise FieldError(field, f"{field} must be printable ASCII")


@contextmanager
def fields_named(names: Mapping[str, str]) -> Iterator[None]:
    """Renames the field of a FieldError raised inside, where the request spells it otherwise than the record that
    checked it (``names``: the record's name to the request's, e.g. ``{"stop": "stop_sequences"}``); the message's
    mentions of the field too. A field under a renamed one (``messages.2.role``) keeps its tail."""
    try:
        yield
    except FieldError as exc:
        head, dot, tail = exc.field.partition(".")
        if head not in names:
            raise
        raise FieldError(f"{names[head]}{dot}{tail}", renamed(str(exc), head, names[head])) from None


def renamed(message: str, field: str, name: str) -> str:
    """``message`` with its mentions of ``field`` as the request spells it, ``name``."""
    return re.sub(rf"(?<![\w.]){re.escape(field)}\b", name, message)


# Trailing metadata of a worker's failed call when the failure is a peer's, not the worker's own: the worker could
# not reach the address it names (a prefill worker: its ticket's KV receiver). The call's status is UNAVAILABLE,
# which alone would say the worker itself is gone; a router reads this key to blame the link instead.
UNREACHABLE_PEER = "splitserve-unreachable-peer"
# Trailing metadata of a worker's INVALID_ARGUMENT where the refusal is of one request field (engine's
# InvalidRequestError.field): the router's 400 names it as the client's API spells it.
REFUSED_FIELD = "splitserve-refused-field"
