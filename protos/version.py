"""The version of the worker wire protocol (these .proto contracts and the KV transfer on them): one
number, checked by the KV handshake (``KVLayout.protocol_version``) and by routers (``ModelCard``).
Bump it when a change would make old and new peers misread each other."""

# 2: PrefillRequest.ticket_follows and SendTicket; 3: Ticket.lease_ms (the lease left) replaces its wall-clock deadline
PROTOCOL_VERSION = 3
