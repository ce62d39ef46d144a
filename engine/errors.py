"""Typed errors raised by the engine.

The router maps ``InvalidRequestError`` to HTTP 400 and ``ModelLoadError`` to a start-up failure;
anything else escaping the engine is a bug.
"""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (parameters out of range, prompt too long, empty prompt); ``field``: the request's
    field to change, where one is (``prompt``, ``max_tokens``), which the router names as the client's API spells it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ModelLoadError(EngineError):
    """The model directory is missing, malformed, or names an unsupported architecture."""


class NoFreeBlocksError(EngineError):
    """The KV pool cannot hold what was asked for; nothing was allocated."""
