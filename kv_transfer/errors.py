"""The one error type of KV transfer."""

from __future__ import annotations


class TransferError(Exception):
    """A transfer cannot proceed; the message says why (shown to the sender)."""

    def __init__(self, message: str, code: str = "FAILED_PRECONDITION") -> None:
        super().__init__(message)
        self.code = code  # a grpc.StatusCode name
