"""How much engine time a set of texts will take, learned from the engine's own replies.

The daemon needs this twice: to cut bulk requests into slices of a few tens of milliseconds
(so a query waits behind one slice, not behind a 2-second batch), and to give every engine
call a deadline derived from its work (so a stopped or swapped-out engine is noticed in
seconds, not after a flat ten minutes). Pure arithmetic, no I/O: the service feeds it each
call's size and duration.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DeadlinePolicy", "WorkModel"]


@dataclass(frozen=True)
class DeadlinePolicy:
    """deadline = floor_s + factor x estimated tokens x the slowest recent seconds-per-token."""

    floor_s: float = 2.0
    factor: float = 10.0


class WorkModel:
    """Estimates tokens from characters and seconds from tokens.

    Both ratios start from what the engine measured at start (seconds per token on a warm-up
    text) or a conservative default, and follow the calls the engine completes: an
    exponentially weighted mean for slicing, the slowest of the last calls for deadlines.
    """

    _ALPHA = 0.2

    def __init__(
        self,
        max_tokens: int,
        seconds_per_token: float,
        deadline: DeadlinePolicy | None = None,
        chars_per_token: float = 3.0,
    ) -> None:
        self.max_tokens = max(1, max_tokens)
        # Without a measurement, 2 ms a token: slow enough for a large model on a Pi.
        self.seconds_per_token = seconds_per_token if seconds_per_token > 0 else 0.002
        self.chars_per_token = chars_per_token
        self.deadline_policy = deadline or DeadlinePolicy()
        self._recent: deque[float] = deque([self.seconds_per_token], maxlen=16)

    def text_tokens(self, text: str, long_text: str) -> int:
        """Tokens the engine will run for ``text`` (the special tokens included)."""
        tokens = math.ceil(len(text) / self.chars_per_token) + 2
        if long_text == "chunk":
            return tokens
        return min(tokens, self.max_tokens)

    def slice_tokens(self, slice_s: float) -> int:
        """Tokens that take about ``slice_s`` seconds, but at least one full sequence: slices
        of a single long text cost bulk throughput (measured 0.65-0.8x of whole requests,
        docs/benchmarks.md) for little gain in query latency."""
        return max(self.max_tokens, int(slice_s / self.seconds_per_token))

    def deadline(self, tokens: int) -> float:
        """The floor covers a call's fixed cost (the hop, building the graph); the factor
        covers the per-token work at the slowest rate seen on calls of some size lately."""
        policy = self.deadline_policy
        return policy.floor_s + policy.factor * tokens * max(self._recent)

    def observe(
        self,
        texts: Sequence[str],
        token_counts: Sequence[int],
        long_text: str,
        elapsed_s: float,
    ) -> None:
        """A completed call: its texts, the token counts the engine reported, its duration."""
        counted = sum(token_counts)
        if counted <= 0 or elapsed_s <= 0:
            return
        chars = sum(len(text) for text in texts)
        ratio = min(16.0, max(0.5, chars / counted))
        self.chars_per_token += self._ALPHA * (ratio - self.chars_per_token)
        if long_text == "chunk":
            run = counted
        else:
            run = sum(min(n, self.max_tokens) for n in token_counts)
        # A short call's fixed cost (the hop, the graph) would inflate the per-token rate:
        # learn it from calls of some size only.
        if run >= 64:
            rate = elapsed_s / run
            self._recent.append(rate)
            self.seconds_per_token += self._ALPHA * (rate - self.seconds_per_token)
