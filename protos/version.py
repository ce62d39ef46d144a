"""The version of the worker wire protocol (these .proto contracts and the KV transfer on them): one
number, checked by the KV handshake (``KVLayout.protocol_version``) and by routers (``ModelCard``).
Bump it when a change would make old and new peers misread each other."""

# 2: PrefillRequest.ticket_follows and SendTicket; 3: Ticket.lease_ms (the lease left) replaces its wall-clock deadline;
# 4: DecodeWorker.GenerateStream, which routers send every Generate on, and SamplingParams.thinking and
# thinking_token_budget, which an older worker would drop unread (a grammar holding the thinking, no budget);
# 5: HandshakeRequest.nixl_agents, a NIXL sender's agents (one per posting thread), which an older receiver would read
# as one name, ignoring the other agents' notifications until every commit timed out (and its nixl_metadata, never
# read, is gone)
PROTOCOL_VERSION = 5
