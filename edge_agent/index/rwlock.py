"""A readers-writer lock: many searches at once, or one mutation of the in-memory index."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["RWLock"]


class RWLock:
    """Writer-preferring (a waiting writer stops new readers, so a steady stream of searches
    cannot starve an insert). Not reentrant: a thread must not nest acquisitions."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def try_read(self) -> Iterator[bool]:
        """Read access only if it is free now (no writer holding or waiting): yields whether
        it was taken. For callers that must not block (an event loop)."""
        with self._cond:
            taken = not self._writer and not self._waiting_writers
            if taken:
                self._readers += 1
        try:
            yield taken
        finally:
            if taken:
                with self._cond:
                    self._readers -= 1
                    if not self._readers:
                        self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
