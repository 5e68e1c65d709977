"""HTTP for the daemon: OpenAI-compatible embeddings, a REST API over collections and a
search page, on the daemon's own event loop (docs/http.md)."""

from __future__ import annotations

from .routes import HttpSettings, build_app
from .server import HttpServer

__all__ = ["HttpServer", "HttpSettings", "build_app"]
