"""The KVReceiver gRPC service a decode worker hosts: handshake, gRPC pushes, commits (also those a
bulk link carries).

Every message from a sender about a reservation (a commit, an abort, the end or break of its push
stream) is also its word that it writes no more into that reservation's blocks (see
kv_transfer/sender.py); the inbox passes that on, and the decode worker decides what it means.

Trust: the worker's server interceptor admits cluster members only (worker_server/security.py).
Within the cluster a ticket is a capability: every push stream, commit and abort presents the
ticket's token, checked (``KVInbox.authorize``) before anything about the reservation is read or
enqueued, so another request's ticket or a wrong token is PERMISSION_DENIED and changes nothing.
On NIXL, only an authenticated handshake hands out this worker's agent metadata and admits the
sender's agent, whose notifications must carry the token too."""

from __future__ import annotations

import logging

import grpc

from kv_transfer.errors import TransferError
from kv_transfer.inbox import KVInbox
from kv_transfer.layout import layout_mismatch
from protos import common_pb2, kv_transfer_pb2, kv_transfer_pb2_grpc

log = logging.getLogger(__name__)

# Notifications of the last NIXL writes may trail the sender's commit by a little.
COMMIT_WAIT_S = 5.0


class KVReceiverService(kv_transfer_pb2_grpc.KVReceiverServicer):
    def __init__(
        self,
        inbox: KVInbox,
        layout: common_pb2.KVLayout,
        instance_id: str,
        nixl=None,  # kv_transfer.nixl_transport.NixlReceiver when the transport is NIXL
        bulk=None,  # kv_transfer.bulk_transport.BulkReceiver: KV bytes over plain TCP (gRPC transport)
    ) -> None:
        self.inbox = inbox
        self.layout = layout
        self.instance_id = instance_id
        self.nixl = nixl
        self.bulk = bulk
        if bulk is not None:
            bulk.take_commits(self)  # it calls link_commit (which tracing may wrap) per commit frame

    def Handshake(self, request, context):
        response = kv_transfer_pb2.HandshakeResponse(layout=self.layout, instance_id=self.instance_id)
        mismatch = layout_mismatch(self.layout, request.layout)
        if mismatch:
            log.warning("refused KV sender %s: %s", request.sender_id, mismatch)
            response.message = mismatch
            return response
        if self.nixl is not None:
            if not request.nixl_agents:
                # A gRPC sender: it would stream what NIXL WRITEs here (the reverse is the sender's to say).
                response.message = (
                    "the decode worker receives KV over NIXL and this sender offers no NIXL agent (transport "
                    "mismatch: start the prefill and decode workers with the same --transport)"
                )
                return response
            for agent in request.nixl_agents:
                self.nixl.admit(agent)
            response.nixl_metadata = self.nixl.metadata()
            response.nixl_pool = self.nixl.pool_descriptor_bytes()
        elif self.bulk is not None and request.bulk:
            response.bulk_port = self.bulk.port  # the sender connects, authenticates, commits here
        response.accepted = True
        return response

    def PushKV(self, request_iterator, context):
        request_id = None
        try:
            for chunk in request_iterator:
                if request_id is None:
                    request_id = self._first_chunk(chunk)
                    continue
                if chunk.abort:
                    self._push_stopped(request_id, chunk.abort_reason or "aborted by the prefill worker")
                    return kv_transfer_pb2.PushResult()
                if chunk.commit:
                    received = self.inbox.commit(request_id, chunk.first_token_id, _logprob(chunk))
                    return kv_transfer_pb2.PushResult(bytes_received=received)
                self.inbox.write(request_id, chunk.layer, chunk.block_ids, chunk.data, chunk.checksum)
        except TransferError as exc:
            if request_id is not None and exc.code != "NOT_FOUND":
                self._push_stopped(request_id, str(exc))
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        except grpc.RpcError:
            # The stream broke (sender gone, or a message over the size limit): nobody will commit.
            if request_id is not None:
                self._push_stopped(request_id, "the KV stream broke before a commit")
            raise
        # The stream ended without a commit: the sender gave up.
        if request_id is not None:
            self._push_stopped(request_id, "prefill worker closed the KV stream without committing")
        context.abort(grpc.StatusCode.CANCELLED, "KV stream ended without a commit")

    def _push_stopped(self, request_id: str, reason: str) -> None:
        # A push stream speaks for the gRPC data path only: on a NIXL receiver the sender's WRITEs
        # may still be on their way, whatever happens to a stream.
        self.inbox.abort(request_id, reason, sender_stopped=self.nixl is None)

    def _first_chunk(self, chunk) -> str:
        if not chunk.request_id:
            raise TransferError("the first KV message must name the request", "INVALID_ARGUMENT")
        if chunk.instance_id and chunk.instance_id != self.instance_id:
            raise TransferError(
                f"ticket is for instance {chunk.instance_id}; this worker is {self.instance_id}", "FAILED_PRECONDITION"
            )
        self.inbox.authorize(chunk.request_id, chunk.token)  # the stream is bound to this reservation from now on
        return chunk.request_id

    def Commit(self, request, context):
        try:
            self.commit(request)
        except TransferError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        return kv_transfer_pb2.CommitResponse()

    def link_commit(self, request: kv_transfer_pb2.CommitRequest, metadata) -> None:
        """A commit that came on a bulk link (kv_transfer/bulk_transport.py), with the trace context the
        sender's gRPC calls carry (``metadata``; while tracing, worker_server/tracing.py spans it)."""
        self.commit(request)

    def commit(self, request: kv_transfer_pb2.CommitRequest) -> None:
        """A sender's commit or abort, whichever way it came: returns once the owner accepted the KV (or
        took the abort); raises TransferError when refused. A request for another instance, or one whose
        ticket does not match, changes nothing; any other refusal stops the reservation."""
        if request.instance_id and request.instance_id != self.instance_id:
            # Not about any reservation of this instance: leave them alone.
            raise TransferError(
                f"ticket is for instance {request.instance_id}; this worker is {self.instance_id}",
                "FAILED_PRECONDITION",
            )
        self.inbox.authorize(request.request_id, request.token)  # not this sender's reservation: leave it alone
        try:
            if request.abort:
                self.inbox.abort(request.request_id, request.abort_reason or "aborted by the prefill worker")
                return
            self._wait_for_layers(request.request_id)
            self.inbox.commit(request.request_id, request.first_token_id, _logprob(request))
        except TransferError as exc:
            if exc.code != "NOT_FOUND":
                self.inbox.abort(request.request_id, str(exc))
            raise

    def _wait_for_layers(self, request_id: str) -> None:
        self.inbox.wait_for_layers(request_id, COMMIT_WAIT_S)  # if in vain, commit() names the missing layers


def _logprob(message) -> common_pb2.TokenLogprob | None:
    return message.first_logprob if message.HasField("first_logprob") else None
