"""The one error type of KV transfer."""

from __future__ import annotations


class TransferError(Exception):
    """A transfer cannot proceed; the message says why (shown to the sender)."""

    def __init__(
        self, message: str, code: str = "FAILED_PRECONDITION", unreachable: str = "", refused: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code  # a grpc.StatusCode name
        self.refused = refused  # the peer answered, and refused this sender (a handshake): no KV will be sent
        # The peer that could not be reached (its address): the failure is that peer's or the link's, not the
        # sender's own; the worker says so in its answer (contract.errors.UNREACHABLE_PEER).
        self.unreachable = unreachable
