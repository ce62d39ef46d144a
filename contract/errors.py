"""The error every contract record raises for a bad request field."""

from __future__ import annotations


class FieldError(ValueError):
    """A request field is malformed or out of range; ``field`` names it (an OpenAI ``param``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


# Trailing metadata of a worker's failed call when the failure is a peer's, not the worker's own: the worker could
# not reach the address it names (a prefill worker: its ticket's KV receiver). The call's status is UNAVAILABLE,
# which alone would say the worker itself is gone; a router reads this key to blame the link instead.
UNREACHABLE_PEER = "splitserve-unreachable-peer"
