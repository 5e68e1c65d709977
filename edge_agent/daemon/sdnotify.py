"""systemd's service notification protocol (sd_notify), with the standard library only.

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET``, an AF_UNIX datagram socket (a path, or
an abstract address written with a leading ``@``). The daemon sends newline-separated
``KEY=VALUE`` lines there:

- ``READY=1`` once the socket listens, so ``systemctl start`` returns when clients can connect
  and units ordered after edge-agent start at the right moment;
- ``WATCHDOG=1`` every half of ``WATCHDOG_USEC``, from a task on the event loop: a loop that
  hangs stops the pings and systemd restarts the service (``WatchdogSec=``);
- ``STOPPING=1`` when a stop begins; ``STATUS=...`` for ``systemctl status``.

Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing. A failed send is logged, never
raised: notification is a courtesy to the supervisor, not a reason to stop serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

from ..logs import kv

__all__ = ["Notifier"]

log = logging.getLogger("edge_agent.sdnotify")

# WATCHDOG_USEC below this is a misconfiguration we would flood the socket for; clamp the ping
# interval instead.
_MIN_INTERVAL_S = 0.05


def _address(value: str) -> str | None:
    """NOTIFY_SOCKET -> the address for sendto: "@name" is Linux's abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock and relative paths: not something a service of ours is given


class Notifier:
    """Sends notifications to the service manager named by ``NOTIFY_SOCKET``, if any."""

    def __init__(self, notify_socket: str | None, watchdog_usec: int | None = None) -> None:
        self.address = _address(notify_socket) if notify_socket else None
        if notify_socket and self.address is None:
            log.warning(
                "%s",
                kv(
                    event="notify_socket_ignored",
                    value=notify_socket[:100],
                    reason="not a path or @abstract address",
                ),
            )
        self.watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._ready_sent = False

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier:
        """The notifier systemd set up for this process.

        ``WATCHDOG_PID``, when set, names the process the watchdog is meant for: a child that
        inherited the environment must not ping on its parent's behalf.
        """
        env = os.environ if environ is None else environ
        usec: int | None = None
        raw = env.get("WATCHDOG_USEC", "")
        if raw.isdigit():
            usec = int(raw)
            owner = env.get("WATCHDOG_PID", "")
            if owner.isdigit() and int(owner) != (pid if pid is not None else os.getpid()):
                usec = None
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        if self.address is None or self.watchdog_usec is None:
            return None
        return max(_MIN_INTERVAL_S, self.watchdog_usec / 2_000_000)

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` ("READY=1", "STATUS=...") as one datagram; True if it was sent."""
        if self.address is None:
            return False
        payload = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(payload, self.address)
        except OSError as exc:
            address = self.address.replace("\0", "@")
            log.warning("%s", kv(event="sd_notify_failed", address=address, error=str(exc)))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1, once; later calls only update the status."""
        fields = [] if self._ready_sent else ["READY=1"]
        self._ready_sent = True
        if status:
            fields.append(f"STATUS={status}")
        return self.notify(*fields) if fields else False

    def stopping(self, status: str = "stopping") -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def keepalive(self) -> None:
        """Ping the watchdog from the event loop until cancelled (returns at once if off).

        Running on the loop is the point: if a callback blocks the loop, the pings stop and
        systemd restarts the daemon.
        """
        interval = self.watchdog_interval
        if interval is None:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)
