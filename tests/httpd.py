"""A real daemon with its HTTP listener on a free loopback port (tests/test_http*.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from daemon import ServerThread, options_for

from edge_agent.models import ModelStore

TOKEN = "test-token-0123456789abcdef"  # long enough for MIN_TOKEN_CHARS


def start_http_daemon(
    model_store: ModelStore, tmp: Path, **overrides: Any
) -> tuple[ServerThread, str]:
    """The daemon and its ``http://127.0.0.1:PORT`` base URL."""
    overrides.setdefault("http_listen", "127.0.0.1:0")
    thread = ServerThread(options_for(model_store, tmp / "run" / "edge-agent.sock", **overrides))
    thread.start()
    # ready() announces the HTTP address right after the socket's, from the daemon's thread.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [a for a in thread.addresses if a.startswith("http://")]
        if found:
            return thread, found[0]
        time.sleep(0.01)
    thread.stop()
    raise AssertionError(f"no HTTP address announced: {thread.addresses}")


def host_port(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def raw_request(base: str, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One request with ``target`` sent byte for byte (no client-side path normalisation):
    the status and the JSON body."""
    import json
    import socket

    lines = [f"{method} {target} HTTP/1.1", "Host: test", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
    with socket.create_connection(host_port(base), timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(payload) if payload else None
