from protos import common_pb2 as _common_pb2
from protos import decode_pb2 as _decode_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "ticket", "resume_token_ids", "ticket_follows", "priority")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TICKET_FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    ticket: _decode_pb2.Ticket
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ticket_follows: bool
    priority: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., ticket: _Optional[_Union[_decode_pb2.Ticket, _Mapping]] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., ticket_follows: _Optional[bool] = ..., priority: _Optional[int] = ...) -> None: ...

class TicketDelivery(_message.Message):
    __slots__ = ("request_id", "ticket")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    ticket: _decode_pb2.Ticket
    def __init__(self, request_id: _Optional[str] = ..., ticket: _Optional[_Union[_decode_pb2.Ticket, _Mapping]] = ...) -> None: ...

class TicketAccepted(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PrefillResponse(_message.Message):
    __slots__ = ("first_token_id", "first_logprob", "num_cached_tokens", "kv_bytes_sent", "prefill_ms", "exposed_transfer_ms")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    EXPOSED_TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    first_logprob: _common_pb2.TokenLogprob
    num_cached_tokens: int
    kv_bytes_sent: int
    prefill_ms: float
    exposed_transfer_ms: float
    def __init__(self, first_token_id: _Optional[int] = ..., first_logprob: _Optional[_Union[_common_pb2.TokenLogprob, _Mapping]] = ..., num_cached_tokens: _Optional[int] = ..., kv_bytes_sent: _Optional[int] = ..., prefill_ms: _Optional[float] = ..., exposed_transfer_ms: _Optional[float] = ...) -> None: ...

class PrefillCall(_message.Message):
    __slots__ = ("id", "prefill", "ticket", "cancel")
    ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    TICKET_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    id: int
    prefill: PrefillRequest
    ticket: TicketDelivery
    cancel: bool
    def __init__(self, id: _Optional[int] = ..., prefill: _Optional[_Union[PrefillRequest, _Mapping]] = ..., ticket: _Optional[_Union[TicketDelivery, _Mapping]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class PrefillAnswer(_message.Message):
    __slots__ = ("id", "prefill", "accepted", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    prefill: PrefillResponse
    accepted: TicketAccepted
    error: _decode_pb2.CallStatus
    def __init__(self, id: _Optional[int] = ..., prefill: _Optional[_Union[PrefillResponse, _Mapping]] = ..., accepted: _Optional[_Union[TicketAccepted, _Mapping]] = ..., error: _Optional[_Union[_decode_pb2.CallStatus, _Mapping]] = ...) -> None: ...
