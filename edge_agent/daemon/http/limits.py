"""The HTTP listener's own limits (docs/http.md lists them with the shared ones).

Read at use time (``limits.HEAD_TIMEOUT_S``), so tests can shorten them. The body size limit is
the daemon's ``limits.max_message_bytes`` and the connection limit ``limits.max_connections``,
shared with the MessagePack transports.
"""

from __future__ import annotations

HEAD_TIMEOUT_S = 10.0  # a request's line and headers must arrive within this, from its first byte
BODY_TIMEOUT_S = 30.0  # a request's whole body must arrive within this, from its head
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this
# After a reply that closes the connection, unread request bytes are dropped this long.
LINGER_S = 2.0
LINGER_MAX_BYTES = 1 << 20
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; more: 400 and the connection is closed
# An unauthenticated request with a larger (or chunked) body is answered 401 and closed, not
# drained: a stranger gets no more than this much of the daemon's reading.
MAX_UNAUTHENTICATED_BODY = 64 * 1024
