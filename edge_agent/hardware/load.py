"""How much CPU *other* processes are using right now, from /proc (Linux).

Why: llama.cpp's worker threads meet at spin barriers after every graph node. When another
process holds one of the cores, the peer thread that a barrier waits for is descheduled for a
whole scheduler slice, and a 3 ms embedding takes hundreds of milliseconds (measured: p99
7 ms -> 916 ms with two busy loops on a 2-core box). The engine asks ``ThreadGovernor`` how many
threads it may use for the next call and runs with fewer when the cores are taken.

"Other" excludes this process and its parent (the daemon that feeds it): their use is the
engine's own work, not competition. Standard library only; readers take an injectable root so
the tests can feed them files. Where /proc/stat is missing (macOS, Windows) the sampler
reports no load and the engine keeps its configured threads.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CpuTimes", "LoadSampler", "ThreadGovernor", "read_cpu_times"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU seconds: the whole machine's busy time and that of our own processes."""

    busy_s: float  # every CPU's non-idle time, summed
    own_s: float  # this process and the listed relatives (user + system)


def _busy_seconds(root: Path) -> float | None:
    try:
        with open(root / "proc/stat", encoding="ascii") as stat:
            first = stat.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu" or len(first) < 5:
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user).
    values = [int(v) for v in first[1:9]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values) - idle) / _TICKS


def _process_seconds(root: Path, pid: int) -> float:
    try:
        with open(root / f"proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            text = stat.read()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rfind(")") + 2 :].split()
    if len(fields) < 13:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime


def read_cpu_times(root: Path, pids: tuple[int, ...]) -> CpuTimes | None:
    busy = _busy_seconds(root)
    if busy is None:
        return None
    return CpuTimes(busy, sum(_process_seconds(root, pid) for pid in pids))


class LoadSampler:
    """CPUs' worth of time that other processes used over the last sampling window.

    ``sample()`` is called on a schedule (``ThreadGovernor`` runs it on a thread every
    ``interval_s``); ``others`` is the load over the last ``window`` samples, so a busy loop
    that starts is seen within about ``interval_s * window`` seconds.
    """

    def __init__(
        self,
        root: Path = Path("/"),
        pids: tuple[int, ...] | None = None,
        window: int = 2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.pids = pids if pids is not None else (os.getpid(), os.getppid())
        self._clock = clock
        self._window = max(1, window)
        self._samples: list[tuple[float, CpuTimes]] = []

    @property
    def available(self) -> bool:
        return _busy_seconds(self.root) is not None

    def sample(self) -> float:
        """Take a sample; return the others' load in CPUs over the window (0.0 until two
        samples exist, or where /proc is missing)."""
        times = read_cpu_times(self.root, self.pids)
        if times is None:
            return 0.0
        self._samples.append((self._clock(), times))
        del self._samples[: -(self._window + 1)]
        return self.others()

    def others(self) -> float:
        if len(self._samples) < 2:
            return 0.0
        (start, first), (end, last) = self._samples[0], self._samples[-1]
        elapsed = end - start
        if elapsed <= 0:
            return 0.0
        other_busy = (last.busy_s - first.busy_s) - (last.own_s - first.own_s)
        return max(0.0, other_busy / elapsed)


class ThreadGovernor:
    """Threads for the next engine call: the configured count, or fewer while other processes
    keep the cores busy (never fewer than one).

    The rule: threads = min(configured, max(1, floor(cpus - others + 0.75))): a thread is
    given up once others take about a quarter of a CPU beyond the spare ones. With 2 CPUs,
    one or two busy loops elsewhere mean 1 thread (no barrier left to stall); a client that
    sends requests back to back (0.3-0.5 CPU, but never running while it waits for our
    answer) keeps both. A background thread samples every ``interval_s`` so the decision
    costs the engine call nothing.
    """

    def __init__(
        self,
        configured: int,
        cpus: int,
        sampler: LoadSampler | None = None,
        interval_s: float = 0.25,
    ) -> None:
        self.configured = max(1, configured)
        self.cpus = max(1, cpus)
        self.sampler = sampler or LoadSampler()
        self.interval_s = interval_s
        self._others = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ThreadGovernor:
        if self._thread is None and self.configured > 1 and self.sampler.available:
            self.sampler.sample()
            self._thread = threading.Thread(
                target=self._run, name="edge-agent-load", daemon=True
            )
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._others = self.sampler.sample()

    @property
    def others(self) -> float:
        return self._others

    def threads_for(self, others: float) -> int:
        spare = self.cpus - others
        return min(self.configured, max(1, int(spare + 0.75)))

    def threads(self) -> int:
        return self.threads_for(self._others)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
