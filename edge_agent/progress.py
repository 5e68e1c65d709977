"""Progress for long operations: a bar on a terminal, log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

__all__ = ["Progress"]

log = logging.getLogger("edge_agent.progress")


class Progress:
    """``with Progress("quantize", total=6) as p: p.advance(1, "Q8_0")``.

    On a terminal it redraws one line; elsewhere it logs at most one line per
    ``log_interval`` seconds plus the final one, so service logs stay readable.
    """

    def __init__(
        self,
        label: str,
        total: float | None,
        unit: str = "",
        stream: TextIO | None = None,
        log_interval: float = 5.0,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.done = 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.is_tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.log_interval = log_interval
        self._last_log = 0.0
        self._started = time.monotonic()

    def __enter__(self) -> Progress:
        self._emit("started", force=True)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._emit("failed" if exc_type else "done", force=True, final=True)

    def advance(self, amount: float = 1, detail: str = "") -> None:
        self.done += amount
        self._emit(detail)

    def _emit(self, detail: str, force: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        if self.total:
            fraction = min(1.0, self.done / self.total)
            text = f"{self.label}: {self.done:g}/{self.total:g}{self.unit} ({fraction:.0%})"
        else:
            text = f"{self.label}: {self.done:g}{self.unit}"
        if detail:
            text += f" {detail}"
        text += f" [{now - self._started:.1f}s]"
        if self.is_tty:
            width = 24
            filled = int(width * (self.done / self.total)) if self.total else 0
            bar = "#" * filled + "-" * (width - filled)
            self.stream.write(f"\r[{bar}] {text}\x1b[K" + ("\n" if final else ""))
            self.stream.flush()
        elif force or now - self._last_log >= self.log_interval:
            self._last_log = now
            log.info("%s", text)
