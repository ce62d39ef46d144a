from protos import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HandshakeRequest(_message.Message):
    __slots__ = ("layout", "sender_id", "nixl_agents", "bulk")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    NIXL_AGENTS_FIELD_NUMBER: _ClassVar[int]
    BULK_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KVLayout
    sender_id: str
    nixl_agents: _containers.RepeatedScalarFieldContainer[str]
    bulk: bool
    def __init__(self, layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., sender_id: _Optional[str] = ..., nixl_agents: _Optional[_Iterable[str]] = ..., bulk: _Optional[bool] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("accepted", "message", "layout", "instance_id", "nixl_metadata", "nixl_pool", "bulk_port")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    NIXL_METADATA_FIELD_NUMBER: _ClassVar[int]
    NIXL_POOL_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    layout: _common_pb2.KVLayout
    instance_id: str
    nixl_metadata: bytes
    nixl_pool: bytes
    bulk_port: int
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., instance_id: _Optional[str] = ..., nixl_metadata: _Optional[bytes] = ..., nixl_pool: _Optional[bytes] = ..., bulk_port: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("request_id", "instance_id", "layer", "block_ids", "data", "checksum", "commit", "first_token_id", "first_logprob", "abort", "abort_reason", "token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    instance_id: str
    layer: int
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    checksum: int
    commit: bool
    first_token_id: int
    first_logprob: _common_pb2.TokenLogprob
    abort: bool
    abort_reason: str
    token: str
    def __init__(self, request_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., layer: _Optional[int] = ..., block_ids: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ..., commit: _Optional[bool] = ..., first_token_id: _Optional[int] = ..., first_logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., abort: _Optional[bool] = ..., abort_reason: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class PushResult(_message.Message):
    __slots__ = ("bytes_received",)
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    def __init__(self, bytes_received: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("request_id", "instance_id", "first_token_id", "first_logprob", "abort", "abort_reason", "token")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    instance_id: str
    first_token_id: int
    first_logprob: _common_pb2.TokenLogprob
    abort: bool
    abort_reason: str
    token: str
    def __init__(self, request_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., first_token_id: _Optional[int] = ..., first_logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., abort: _Optional[bool] = ..., abort_reason: _Optional[str] = ..., token: _Optional[str] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
