"""The version of the worker wire protocol (these .proto contracts and the KV transfer on them): one
number, checked by the KV handshake (``KVLayout.protocol_version``) and by routers (``ModelCard``).
Bump it when a change would make old and new peers misread each other."""

PROTOCOL_VERSION = 2  # 2: PrefillRequest.ticket_follows and SendTicket
