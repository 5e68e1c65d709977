"""The llama.cpp library itself (not a model or a context): backend start-up and its log
routing into Python logging. Shared by the engine (edge_agent.embedding.engine) and GGUF
quantisation (edge_agent.models.quantize); importing it loads the native library.
"""

from __future__ import annotations

import ctypes
import logging

import llama_cpp

__all__ = ["route_engine_logs"]

_engine_log = logging.getLogger("edge_agent.llama_cpp")

# ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line's level.
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_last_level = [logging.DEBUG]


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp is chatty (every tensor on load, expected quantization fallbacks): everything
    # but its errors goes to debug.
    python_level = _last_level[0] if level == 5 else _LEVELS.get(level, logging.DEBUG)
    _last_level[0] = python_level
    if python_level < logging.ERROR:
        python_level = logging.DEBUG
    if _engine_log.isEnabledFor(python_level):
        _engine_log.log(python_level, "%s", text.decode("utf-8", errors="replace").rstrip())


_backend_ready = False


def route_engine_logs() -> None:
    """Send llama.cpp's logging to Python logging and initialise the backend (idempotent)."""
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        _backend_ready = True
