"""A throw-away LAN for discovery tests: network namespaces joined by a bridge.

``Lan`` makes a "switch" namespace holding a bridge, and one namespace per host joined to it by
a veth pair, with 10.77.0.N/24 and fd77::N/64 on each host's eth0: real multicast between
separate network stacks, the way boxes on one link see each other. Every process is started
inside a host's namespace, so no packet of these tests reaches a real interface. Names carry
the test run's pid and a random tag, and ``close`` (run from a fixture finalizer) kills the
processes and deletes the namespaces even when a test fails.

Where namespaces cannot be made (no root, no ``ip``), ``Lan`` falls back to loopback: every
host shares this machine's ``lo`` with its own 127.77.0.N address, and mDNS is bound to ``lo``
only. That fallback is announced with a warning in the test output, never silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NODE = Path(__file__).resolve().parent / "lan_node.py"
# Force the loopback fallback (to exercise it where namespaces do work).
FORCE_LOOPBACK_ENV = "EDGE_AGENT_TEST_LAN_LOOPBACK"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def namespaces_available() -> tuple[bool, str]:
    """Whether ``ip netns`` works here, and why not."""
    if os.environ.get(FORCE_LOOPBACK_ENV) == "1":
        return False, f"{FORCE_LOOPBACK_ENV}=1"
    if shutil.which("ip") is None:
        return False, "no `ip` command"
    if shutil.which("unshare") is None:
        return False, "no `unshare` command"
    probe = f"eaprobe{os.getpid()}{secrets.token_hex(2)}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return False, f"`ip netns add` failed: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return True, ""


class Proc:
    """A subprocess speaking JSON lines on stdout; stderr goes to a log file for failures."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=ROOT,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(raw))
        self.lines.put(None)  # end of stream

    @property
    def pid(self) -> int:
        return self.popen.pid

    def send(self, **command: Any) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write((json.dumps(command) + "\n").encode())
        self.popen.stdin.flush()

    def expect(self, event: str, timeout: float = 30.0, **match: Any) -> dict[str, Any]:
        """The next line whose "event" is ``event`` (and whose fields equal ``match``)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event!r} {match} within {timeout}s\n{self.stderr()}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.popen.wait(5)
                raise AssertionError(
                    f"{self.argv[-1]!r} exited ({self.popen.returncode}) before {event!r}\n"
                    f"{self.stderr()}"
                )
            if line.get("event") in ("error", "failed"):
                raise AssertionError(f"node error: {line}\n{self.stderr()}")
            if line.get("event") == event and all(line.get(k) == v for k, v in match.items()):
                return line

    def stderr(self, tail: int = 4000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-tail:]

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signum)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def close(self) -> None:
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)  # a stopped process cannot act on SIGKILL's cleanup
            self.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()


@dataclass(eq=False)  # hosts are identities (dict keys), not values
class Host:
    lan: Lan
    name: str
    index: int
    netns: str | None  # None: the loopback fallback
    procs: list[Proc] = field(default_factory=list)

    @property
    def ipv4(self) -> str:
        return f"10.77.0.{self.index}" if self.netns else f"127.77.0.{self.index}"

    @property
    def ipv6(self) -> str | None:
        return f"fd77::{self.index}" if self.netns else None

    @property
    def interface(self) -> str:
        return "eth0" if self.netns else "lo"

    @property
    def interface_args(self) -> list[str]:
        """mDNS interface flags: none in a namespace (all of its interfaces are the test's own),
        ``lo`` only in the loopback fallback so nothing reaches this machine's real links."""
        return [] if self.netns else ["--interface", "lo"]

    def run(
        self, *argv: str, timeout: float = 60.0, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A command on this host, to completion (e.g. the edge-agent CLI)."""
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return subprocess.run(
            [*prefix, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        )

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> Proc:
        """``tests/lan_node.py ARGS`` on this host (its own namespace and host name)."""
        command, *rest = args
        node = [sys.executable, str(NODE), command, "--hostname", self.name]
        node += [*self.interface_args, *rest]
        if self.netns:
            # unshare --uts: each host gets its own host name, as separate boxes have.
            argv = ["ip", "netns", "exec", self.netns, "unshare", "--uts", *node]
        else:
            argv = node
        full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        log_path = self.lan.log_dir / f"{self.name}-{len(self.procs)}.log"
        proc = Proc(argv, log_path, full_env)
        self.procs.append(proc)
        return proc


class Lan:
    def __init__(self, log_dir: Path, use_namespaces: bool, reason: str = "") -> None:
        self.log_dir = log_dir
        self.use_namespaces = use_namespaces
        self.reason = reason
        self.tag = f"ea{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.switch: str | None = None
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []
        if use_namespaces:
            self.switch = self._netns("sw")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            _ip("-n", self.switch, "link", "set", "br0", "up")
        else:
            warnings.warn(
                f"network namespaces unavailable ({reason}): discovery tests use loopback"
                " multicast on lo instead of separate network stacks",
                stacklevel=2,
            )
            print(f"LAN FALLBACK: loopback multicast ({reason})", file=sys.stderr)

    def _netns(self, suffix: str) -> str:
        name = f"{self.tag}-{suffix}"
        _ip("netns", "add", name)
        self._namespaces.append(name)
        return name

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 1
        netns = None
        if self.use_namespaces:
            assert self.switch is not None
            netns = self._netns(name)
            port = f"p{index}"
            # Both ends are created directly in their namespaces: no name ever exists in the
            # root namespace, so parallel runs cannot collide.
            _ip("link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", port,
                "netns", self.switch)  # fmt: skip
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            # No duplicate-address detection: the link-local address is usable at once.
            subprocess.run(
                ["ip", "netns", "exec", netns, "sh", "-c",
                 "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad"],
                check=True, timeout=20,
            )  # fmt: skip
            _ip("-n", netns, "addr", "add", f"10.77.0.{index}/24", "dev", "eth0")
            _ip("-n", netns, "addr", "add", f"fd77::{index}/64", "dev", "eth0", "nodad")
            _ip("-n", netns, "link", "set", "lo", "up")
            _ip("-n", netns, "link", "set", "eth0", "up")
            # mDNS goes to 224.0.0.251 / ff02::fb: route multicast out of eth0 explicitly.
            _ip("-n", netns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        host = Host(self, name, index, netns)
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            for proc in host.procs:
                proc.close()
        for name in reversed(self._namespaces):
            _ip("netns", "del", name, check=False)
        self._namespaces.clear()
