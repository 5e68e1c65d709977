"""The HTTP listener's own limits (docs/http.md lists them with the shared ones).

Read at use time (``limits.HEAD_TIMEOUT_S``), so tests can shorten them. The body size limit is
the daemon's ``limits.max_message_bytes`` and the connection limit ``limits.max_connections``,
shared with the MessagePack transports.
"""

from __future__ import annotations

HEAD_TIMEOUT_S = 10.0  # a request's line and headers must arrive within this, from its first byte
BODY_TIMEOUT_S = 30.0  # a request's whole body must arrive within this, from its head
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this
MAX_HEAD_BYTES = 16 * 1024  # request line + headers; more: 400 and the connection is closed
