"""Tracing on the workers' engine threads: timings recorded there, spans made elsewhere.

An engine thread runs every request's layers back to back; it only appends a tuple per pushed
layer (two clock reads and a list append, nothing of OpenTelemetry). Once the request's RPC has
answered, a gRPC termination callback turns them into spans (see contract/tracing.py for the rest).
"""

from __future__ import annotations

import time

from contract import tracing


class LayerPushes:
    """One request's KV pushes, layer by layer: appended by the engine thread, read by the request's
    RPC thread once no more pushes come (after its commit or abort)."""

    def __init__(self, transport: str, region_bytes: int) -> None:
        self.transport = transport
        self.region_bytes = region_bytes  # one (layer, block) region
        self._records: list[tuple[int, int, int, int]] = []  # (layer, blocks, started_ns, ended_ns)

    @classmethod
    def if_tracing(cls, transport: str, region_bytes: int) -> LayerPushes | None:
        return cls(transport, region_bytes) if tracing.ENABLED else None

    def record(self, layer: int, blocks: int, started_ns: int) -> None:
        """Engine thread, right after ``push_layer`` returned."""
        self._records.append((layer, blocks, started_ns, time.time_ns()))

    def emit_after(self, rpc_context) -> None:
        """``emit`` under the current span once the RPC has answered: a span costs tens of
        microseconds, which the request's first token should not wait for."""
        parent = tracing.current_context()
        if not rpc_context.add_callback(lambda: self.emit(parent)):
            self.emit(parent)  # the RPC has ended already

    def emit(self, parent=None) -> None:
        """One ``kv.push_layer`` span per layer, a child of ``parent`` (a Context; default: the
        current one): from the layer's first push to its last (chunked prefill pushes a layer once
        per chunk)."""
        layers: dict[int, list[int]] = {}
        for layer, blocks, started, ended in list(self._records):
            entry = layers.setdefault(layer, [0, 0, started, ended])
            entry[0] += blocks
            entry[1] += 1
            entry[2], entry[3] = min(entry[2], started), max(entry[3], ended)
        for layer, (blocks, pushes, started, ended) in sorted(layers.items()):
            span = tracing.start_span(
                "kv.push_layer",
                parent=parent,
                start_ns=started,
                layer=layer,
                blocks=blocks,
                bytes=blocks * self.region_bytes,
                pushes=pushes,
                transport=self.transport,
            )
            span.end(end_ns=ended)


def trace_kv_receiver(receiver) -> None:
    """While tracing: the receiver's push streams and commits (over gRPC or a bulk link) run in SERVER
    spans that continue the sender's context (the prefill worker's Prefill span), the bytes received
    on the push's span."""
    if not tracing.ENABLED:
        return
    push = receiver.PushKV

    def push_kv(request_iterator, context):
        result = push(request_iterator, context)
        tracing.annotate(bytes_received=result.bytes_received)
        return result

    receiver.PushKV = tracing.server_span("splitserve.KVReceiver/PushKV")(push_kv)
    receiver.Commit = tracing.server_span("splitserve.KVReceiver/Commit")(receiver.Commit)
    link_commit = receiver.link_commit

    def traced_link_commit(request, metadata) -> None:
        # A commit a bulk link carried is the same step as one over gRPC: the same span, the sender's child.
        with tracing.start_span(
            "splitserve.KVReceiver/Commit", kind="server", parent=tracing.extract(metadata), transport="bulk"
        ):
            link_commit(request, metadata)

    receiver.link_commit = traced_link_commit
