"""Structured logs on stderr: ``key=value`` lines (default) or one JSON object a line.

Log calls in edge-agent pass their fields as ``kv(event=..., n=...)`` (edge_agent.logs); the
formatters here turn those into fields, and any other message into ``msg``. Values are ours
(counts, names, timings), never document text or auth tokens: callers log lengths and codes.

Under systemd, stderr goes to the journal (``JOURNAL_STREAM`` names that stream): lines then
start with a ``<N>`` syslog priority so ``journalctl -p warning`` works, and carry no timestamp
of their own because the journal records one.

This module imports nothing heavy: the CLI sets logging up before it knows the command.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

__all__ = [
    "LOG_FORMATS",
    "JsonFormatter",
    "KeyValueFormatter",
    "LogLimiter",
    "kv",
    "setup_logging",
    "under_journald",
]

LOG_FORMATS = ("kv", "json")
_SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}
_BASE_KEYS = ("ts", "level", "logger")
_HANDLER_MARK = "_edge_agent_handler"


def under_journald(stream: IO[str], environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``JOURNAL_STREAM=dev:ino``)."""
    env = os.environ if environ is None else environ
    expected = env.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _kv_text(value: Any) -> str:
    """One value as kv text: floats to 3 decimals, quoted when the text would split a field."""
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if not text or any(c in text for c in ' ="\n\\'):
        text = json.dumps(text)
    return text


class kv:  # lower case: used like a function, log.info("%s", kv(event="x", n=1))
    """key=value log fields, formatted only if the record is emitted: the one log style.

    Values are ours (counts, names, timings), never document text: callers pass lengths.
    The formatters below read ``fields`` directly; ``str()`` is the same kv text.
    """

    __slots__ = ("fields",)

    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{key}={_kv_text(value)}" for key, value in self.fields.items())


def _fields(record: logging.LogRecord) -> dict[str, Any] | None:
    """The kv(...) fields of a record logged as ``log.info("%s", kv(...))``, else None."""
    args = record.args
    if record.msg != "%s" or not isinstance(args, tuple) or len(args) != 1:
        return None
    return args[0].fields if isinstance(args[0], kv) else None


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=info logger=edge_agent.app event=model_loaded quant=Q8_0``."""

    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if not self.journald:
            parts.append(f"ts={_timestamp(record)}")
        parts += [f"level={record.levelname.lower()}", f"logger={record.name}"]
        fields = _fields(record)
        if fields is None:
            parts.append(f"msg={_kv_text(record.getMessage())}")
        else:
            parts += [f"{key}={_kv_text(value)}" for key, value in fields.items()]
        if record.exc_info:
            parts.append(f"exc={json.dumps(self.formatException(record.exc_info))}")
        line = " ".join(parts)
        if self.journald:
            return f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>{line}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, then the kv fields (or ``msg``)."""

    def __init__(self, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        fields = _fields(record)
        if fields is None:
            out["msg"] = record.getMessage()
        else:
            for key, value in fields.items():
                # A field may not overwrite the record's own keys.
                out[f"field_{key}" if key in _BASE_KEYS else key] = _json_value(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        line = json.dumps(out, ensure_ascii=False, separators=(",", ":"))
        if self.journald:
            return f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>{line}"
        return line


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return round(value, 3)
    return str(value)


def setup_logging(
    level: str = "info",
    fmt: str = "kv",
    *,
    stream: IO[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> logging.Handler:
    """Send edge-agent's logs (the root logger) to ``stream`` (stderr) in ``fmt``.

    Calling it again replaces the handler it installed before, so a process that runs the CLI
    twice (tests) does not print every line twice.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    stream = stream or sys.stderr
    journald = under_journald(stream, environ)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(KeyValueFormatter(journald) if fmt == "kv" else JsonFormatter(journald))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    return handler


class LogLimiter:
    """At most ``burst`` lines per ``window`` seconds for each key; the rest are counted.

    For lines a stranger can cause at will (a refused connection, a bad frame, a wrong token):
    without a limit, a flood of them fills the disk or the journal. Keys are event names, a
    fixed set chosen by the caller, never a peer's address, so the table stays small.

    Nothing is dropped silently: ``allow`` tells the first line written after some were
    dropped how many (its ``suppressed`` field), and ``flush`` returns the counts of windows
    that ended with lines dropped and nothing written since, for one summary line each.
    """

    def __init__(
        self, burst: int = 10, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if burst < 1 or not window > 0:
            raise ValueError(f"burst must be >= 1 and window > 0, got {burst!r}, {window!r}")
        self.burst = burst
        self.window = window
        self._clock = clock
        self._keys: dict[str, list[float]] = {}  # key -> [window start, written, suppressed]

    def allow(self, key: str) -> int | None:
        """None: drop this line (it is counted). Otherwise write it, noting the returned number
        of lines dropped before it (0 when none were)."""
        now = self._clock()
        state = self._keys.get(key)
        if state is None or now - state[0] >= self.window:
            dropped = int(state[2]) if state is not None else 0
            self._keys[key] = [now, 1, 0]
            return dropped
        if state[1] < self.burst:
            state[1] += 1
            return 0
        state[2] += 1
        return None

    def flush(self, everything: bool = False) -> list[tuple[str, int]]:
        """(key, lines dropped) for each window that has ended (every window, with
        ``everything``: at shutdown) with lines dropped; those counts are then forgotten, so
        each is reported once."""
        now = self._clock()
        out: list[tuple[str, int]] = []
        for key, state in list(self._keys.items()):
            if everything or now - state[0] >= self.window:
                if state[2]:
                    out.append((key, int(state[2])))
                del self._keys[key]
        return out
