"""``HOST:PORT`` strings and what counts as loopback: one definition for TCP, metrics and config."""

from __future__ import annotations

import ipaddress

from .errors import InvalidArgument

__all__ = ["is_loopback", "parse_host_port"]


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``:PORT`` (loopback) -> (host, port)."""
    if not isinstance(text, str) or ":" not in text:
        raise InvalidArgument(f"expected HOST:PORT, got {text!r:.80}")
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise InvalidArgument("empty IPv6 address in [ADDR]:PORT")
    elif ":" in host:
        raise InvalidArgument(f"write an IPv6 address as [ADDR]:PORT, got {text!r:.80}")
    if any(c.isspace() for c in host):
        raise InvalidArgument(f"the host contains whitespace: {text!r:.80}")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InvalidArgument(f"the port must be 0-65535, got {port_text!r:.20}")
    return host or "127.0.0.1", int(port_text)


def is_loopback(host: str) -> bool:
    """Only literal loopback addresses and "localhost" count: a name could resolve anywhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
