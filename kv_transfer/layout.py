"""What two workers must agree on before KV crosses between them, and the check itself."""

from __future__ import annotations

from engine.kv_cache import KVLayout
from protos import common_pb2
from protos.version import PROTOCOL_VERSION

POOL_AXES = "layer,block,kv,slot,head,dim"


def layout_message(layout: KVLayout, model_fingerprint: str) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        protocol_version=PROTOCOL_VERSION,
        model_fingerprint=model_fingerprint,
        dtype=layout.dtype,
        block_size=layout.block_size,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        layout=POOL_AXES,
    )


_CHECKED_FIELDS = (
    ("protocol_version", "protocol version"),
    ("model_fingerprint", "model"),
    ("dtype", "dtype"),
    ("block_size", "block size"),
    ("num_layers", "number of layers"),
    ("num_kv_heads", "number of KV heads"),
    ("head_dim", "head dim"),
    ("layout", "pool layout"),
)


def layout_mismatch(ours: common_pb2.KVLayout, theirs: common_pb2.KVLayout) -> str | None:
    """None if KV can move between the two; otherwise a message naming every difference."""
    differences = [
        f"{label}: receiver {getattr(ours, name)!r} vs sender {getattr(theirs, name)!r}"
        for name, label in _CHECKED_FIELDS
        if getattr(ours, name) != getattr(theirs, name)
    ]
    return "incompatible KV layout — " + "; ".join(differences) if differences else None
