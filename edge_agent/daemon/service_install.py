"""Run the daemon at boot: a systemd unit (Linux) or a launchd agent (macOS).

``install_plan`` / ``uninstall_plan`` say which files to write and which commands to run;
``apply`` does it. ``edge-agent service install --dry-run`` prints the plan instead, and the
test suite checks the unit with ``systemd-analyze verify`` and the plist with plistlib.

Linux (system service, run as root):

- a dedicated ``edge-agent`` system user and group (systemd-sysusers);
- ``/etc/edge-agent/config.toml`` (kept if it exists) putting the socket under ``/run``
  (``RuntimeDirectory``, mode 0660 for the ``edge-agent`` group: add users who may query the
  daemon to that group) and models, index and tuning state under ``/var/lib/edge-agent``
  (``StateDirectory``);
- the unit: ``Type=notify`` (READY=1 once the socket listens), ``WatchdogSec`` (the event loop
  pings it; a hung loop is restarted), ``Restart=on-failure``, and a sandbox: no new privileges,
  read-only system, no home directories, private /tmp and devices, no capabilities, a system
  call allow-list.

macOS (per user, no root): a LaunchAgent with ``KeepAlive`` (restarted when it crashes or exits
with an error) and its output in ``~/Library/Logs/edge-agent``.
"""

from __future__ import annotations

import os
import plistlib
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import config_template
from ..errors import UnsupportedPlatform

__all__ = [
    "LAUNCHD_LABEL",
    "SYSTEMD_UNIT",
    "Plan",
    "PlannedFile",
    "apply",
    "default_executable",
    "install_plan",
    "launchd_plist",
    "systemd_unit",
    "uninstall_plan",
]

SERVICE_USER = "edge-agent"
SYSTEMD_UNIT = "edge-agent.service"
UNIT_DIR = Path("/etc/systemd/system")
SYSUSERS_FILE = Path("/etc/sysusers.d/edge-agent.conf")
SYSTEM_CONFIG = Path("/etc/edge-agent/config.toml")
STATE_DIR = Path("/var/lib/edge-agent")
RUNTIME_DIR = Path("/run/edge-agent")
LAUNCHD_LABEL = "io.edge-agent.daemon"
# The loop pings every WATCHDOG_SEC / 2: long enough for a loaded Pi, short enough that a hung
# daemon is replaced within a minute.
WATCHDOG_SEC = 30
# First start on a Raspberry Pi: model conversion, 20 s of tuning, a self-test per file tried.
START_TIMEOUT = "15min"
# shutdown_grace (10 s) for requests in flight, then the index's final snapshot.
STOP_TIMEOUT_S = 45
# Home directories the sandbox hides (ProtectHome=yes); an executable there needs read-only.
_HOME_PREFIXES = ("/home/", "/root/", "/run/user/")


@dataclass(frozen=True)
class PlannedFile:
    path: Path
    content: str
    mode: int = 0o644
    keep_existing: bool = False  # a configuration the operator may have edited


@dataclass(frozen=True)
class Plan:
    platform: str
    files: tuple[PlannedFile, ...] = ()
    directories: tuple[Path, ...] = ()
    commands: tuple[tuple[str, ...], ...] = ()
    may_fail: frozenset[tuple[str, ...]] = frozenset()  # "stop it if it runs" steps
    remove: tuple[Path, ...] = ()
    notes: tuple[str, ...] = ()
    needs_root: bool = False

    def render(self) -> str:
        """The dry-run text: each file under a ``==> PATH (mode) <==`` header, then commands."""
        out: list[str] = []
        for planned in self.files:
            kept = ", kept if it exists" if planned.keep_existing else ""
            out.append(f"==> {planned.path} (mode {planned.mode:04o}{kept}) <==")
            out.append(planned.content.rstrip("\n"))
        if self.directories:
            out.append("==> directories <==")
            out += [str(d) for d in self.directories]
        if self.remove:
            out.append("==> remove <==")
            out += [str(p) for p in self.remove]
        if self.commands:
            out.append("==> commands <==")
            for command in self.commands:
                optional = "  # may fail: not running" if command in self.may_fail else ""
                out.append(" ".join(shlex.quote(c) for c in command) + optional)
        if self.notes:
            out.append("==> notes <==")
            out += list(self.notes)
        return "\n".join(out) + "\n"


def _unit_quote(word: str) -> str:
    """One ExecStart= word: % and $ are systemd specifiers/variables, doubled to stay literal."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not any(c.isspace() or c in "\"'\\;" for c in word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def default_executable() -> list[str]:
    """How a service should start this same edge-agent: the ``edge-agent`` script next to this
    interpreter (a virtualenv's bin/), else ``python -m edge_agent``. Absolute, not resolved:
    a venv's python is a symlink whose target would lose the venv."""
    python = Path(sys.executable).absolute()
    script = python.parent / "edge-agent"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [str(python), "-m", "edge_agent"]


# -- systemd ------------------------------------------------------------------------------------


def systemd_unit(executable: Sequence[str], config_path: Path = SYSTEM_CONFIG) -> str:
    """The unit file for ``executable`` (argv prefix of the edge-agent command)."""
    exe = " ".join(_unit_quote(word) for word in executable)
    in_home = any(str(Path(executable[0])).startswith(p) for p in _HOME_PREFIXES)
    protect_home = "read-only" if in_home else "yes"
    home_note = (
        "# The executable lives under a home directory, so homes are read-only rather than\n"
        "# hidden; install edge-agent under /opt (docs/raspberry-pi.md) to hide them.\n"
        if in_home
        else ""
    )
    return f"""\
# edge-agent: on-device text embeddings. Written by `edge-agent service install`.
# Settings: {config_path} (`edge-agent --config {config_path} config show`).
[Unit]
Description=edge-agent on-device text embeddings
# TCP (listen) and LAN announcements (advertise) need addresses; harmless without them.
Wants=network-online.target
After=network-online.target
# Five failed starts in five minutes: stop retrying and leave it failed for the operator.
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
# READY=1 comes once the socket accepts connections; WATCHDOG=1 every {WATCHDOG_SEC // 2}s from
# the event loop, so a hung loop is killed and restarted.
Type=notify
NotifyAccess=main
WatchdogSec={WATCHDOG_SEC}
Restart=on-failure
RestartSec=5
TimeoutStartSec={START_TIMEOUT}
TimeoutStopSec={STOP_TIMEOUT_S}
# SIGTERM to the daemon only: it drains requests, then stops the engine child itself.
KillMode=mixed
Environment=EDGE_AGENT_CONFIG={config_path}
Environment=PYTHONUNBUFFERED=1
# Builds or repairs the default model in the state directory (idempotent, seconds when it is
# already there); "-": a store holding only other models still starts.
ExecStartPre=-{exe} models prepare-default
ExecStart={exe} serve
User={SERVICE_USER}
Group={SERVICE_USER}
UMask=0027
# /var/lib/edge-agent (models, index, tuning state), /run/edge-agent (the socket),
# /var/cache/edge-agent and /etc/edge-agent (read-only), created with these owners and modes.
StateDirectory=edge-agent
StateDirectoryMode=0750
RuntimeDirectory=edge-agent
RuntimeDirectoryMode=0750
CacheDirectory=edge-agent
ConfigurationDirectory=edge-agent
# Profiles may lock the model in RAM (mlock) on big x86 boxes.
LimitMEMLOCK=infinity
# Sandbox. MemoryDenyWriteExecute is left out: ctypes callbacks (llama.cpp's log hook) need
# executable trampolines on some libffi builds. ProcSubset=pid is left out: the hardware probe
# reads /proc/cpuinfo and /proc/meminfo.
NoNewPrivileges=yes
ProtectSystem=strict
{home_note}ProtectHome={protect_home}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
CapabilityBoundingSet=
AmbientCapabilities=

[Install]
WantedBy=multi-user.target
"""


def sysusers_conf() -> str:
    return (
        "# The edge-agent service user (systemd-sysusers); its home is the state directory.\n"
        f'u {SERVICE_USER} - "edge-agent embedding daemon" {STATE_DIR}\n'
    )


def system_config() -> str:
    """The service's configuration file: paths systemd provides, group-readable socket."""
    return config_template(
        {
            "socket": str(RUNTIME_DIR / "edge-agent.sock"),
            "socket_mode": "0660",
            "models_dir": str(STATE_DIR / "models"),
            "index_dir": str(STATE_DIR / "index"),
            "state_dir": str(STATE_DIR / "hardware"),
        }
    )


def _systemd_install(executable: Sequence[str], start: bool) -> Plan:
    unit_path = UNIT_DIR / SYSTEMD_UNIT
    enable = (
        ("systemctl", "enable", "--now", SYSTEMD_UNIT)
        if start
        else ("systemctl", "enable", SYSTEMD_UNIT)
    )
    return Plan(
        platform="linux",
        files=(
            PlannedFile(SYSUSERS_FILE, sysusers_conf()),
            PlannedFile(SYSTEM_CONFIG, system_config(), keep_existing=True),
            PlannedFile(unit_path, systemd_unit(executable)),
        ),
        commands=(
            ("systemd-sysusers", str(SYSUSERS_FILE)),
            ("systemctl", "daemon-reload"),
            enable,
        ),
        notes=(
            f"socket: {RUNTIME_DIR / 'edge-agent.sock'} (mode 0660, group {SERVICE_USER}):"
            f" `usermod -aG {SERVICE_USER} USER` lets USER query the daemon",
            f"clients: `edge-agent --config {SYSTEM_CONFIG} health` (or set"
            f" EDGE_AGENT_SOCKET={RUNTIME_DIR / 'edge-agent.sock'})",
            f"logs: journalctl -u {SYSTEMD_UNIT}; status: systemctl status {SYSTEMD_UNIT}",
        ),
        needs_root=True,
    )


def _systemd_uninstall() -> Plan:
    stop = ("systemctl", "disable", "--now", SYSTEMD_UNIT)
    return Plan(
        platform="linux",
        commands=(stop, ("systemctl", "daemon-reload")),
        may_fail=frozenset({stop}),
        remove=(UNIT_DIR / SYSTEMD_UNIT,),
        notes=(
            f"kept: {STATE_DIR} (models, index), {SYSTEM_CONFIG}, the {SERVICE_USER} user"
            f" ({SYSUSERS_FILE}); remove them by hand if they are no longer wanted",
        ),
        needs_root=True,
    )


# -- launchd ------------------------------------------------------------------------------------


def launchd_plist(executable: Sequence[str], home: Path) -> bytes:
    logs = home / "Library" / "Logs" / "edge-agent"
    data = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": [*executable, "serve"],
        "RunAtLoad": True,
        # Restart after a crash or an error exit; a clean stop (launchctl bootout) stays stopped.
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": 10,
        # SIGTERM, then this many seconds to drain requests before SIGKILL.
        "ExitTimeOut": STOP_TIMEOUT_S,
        "StandardOutPath": str(logs / "edge-agent.log"),
        "StandardErrorPath": str(logs / "edge-agent.log"),
        "WorkingDirectory": str(home),
        "EnvironmentVariables": {"PYTHONUNBUFFERED": "1"},
    }
    return plistlib.dumps(data, fmt=plistlib.FMT_XML, sort_keys=False)


def _launchd_paths(home: Path) -> tuple[Path, Path]:
    return (
        home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist",
        home / "Library" / "Logs" / "edge-agent",
    )


def _launchd_install(executable: Sequence[str], start: bool, home: Path, uid: int) -> Plan:
    plist_path, logs = _launchd_paths(home)
    stop = ("launchctl", "bootout", f"gui/{uid}/{LAUNCHD_LABEL}")
    commands = (stop, ("launchctl", "bootstrap", f"gui/{uid}", str(plist_path))) if start else ()
    return Plan(
        platform="macos",
        files=(PlannedFile(plist_path, launchd_plist(executable, home).decode("utf-8")),),
        directories=(logs,),
        commands=commands,
        may_fail=frozenset({stop}),
        notes=(
            f"logs: {logs / 'edge-agent.log'}; settings: `edge-agent config path`",
            f"status: launchctl print gui/{uid}/{LAUNCHD_LABEL}",
        ),
    )


def _launchd_uninstall(home: Path, uid: int) -> Plan:
    plist_path, logs = _launchd_paths(home)
    stop = ("launchctl", "bootout", f"gui/{uid}/{LAUNCHD_LABEL}")
    return Plan(
        platform="macos",
        commands=(stop,),
        may_fail=frozenset({stop}),
        remove=(plist_path,),
        notes=(f"kept: the logs in {logs} and the data directories",),
    )


# -- entry points -------------------------------------------------------------------------------


def this_platform() -> str:
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "darwin":
        return "macos"
    raise UnsupportedPlatform(
        f"no service manager support for {sys.platform}: run `edge-agent serve` under your own"
        " supervisor"
    )


def install_plan(
    platform: str | None = None,
    executable: Sequence[str] | None = None,
    *,
    start: bool = True,
    home: Path | None = None,
    uid: int | None = None,
) -> Plan:
    platform = platform or this_platform()
    exe = list(executable) if executable else default_executable()
    if not Path(exe[0]).is_absolute():
        raise UnsupportedPlatform(f"the service needs an absolute executable path, got {exe[0]}")
    if platform == "linux":
        return _systemd_install(exe, start)
    return _launchd_install(exe, start, home or Path.home(), os.getuid() if uid is None else uid)


def uninstall_plan(
    platform: str | None = None, *, home: Path | None = None, uid: int | None = None
) -> Plan:
    platform = platform or this_platform()
    if platform == "linux":
        return _systemd_uninstall()
    return _launchd_uninstall(home or Path.home(), os.getuid() if uid is None else uid)


Runner = Callable[..., subprocess.CompletedProcess[str]]


def apply(plan: Plan, run: Runner = subprocess.run) -> list[str]:
    """Carry the plan out: write files (atomically), remove files, run the commands.

    Returns what was done, a line each. Raises PermissionError when the plan needs root and
    this is not root, CalledProcessError when a required command fails.
    """
    if plan.needs_root and hasattr(os, "geteuid") and os.geteuid() != 0:
        raise PermissionError(
            "installing a system service needs root: run it with sudo (or --dry-run to see"
            " what it would do)"
        )
    done: list[str] = []
    for directory in plan.directories:
        directory.mkdir(parents=True, exist_ok=True)
        done.append(f"created {directory}")
    for planned in plan.files:
        if planned.keep_existing and planned.path.exists():
            done.append(f"kept {planned.path} (exists)")
            continue
        _write_atomic(planned.path, planned.content, planned.mode)
        done.append(f"wrote {planned.path}")
    for path in plan.remove:
        try:
            path.unlink()
            done.append(f"removed {path}")
        except FileNotFoundError:
            done.append(f"{path} was not there")
    for command in plan.commands:
        result = run(list(command), capture_output=True, text=True, check=False)
        if result.returncode != 0 and command not in plan.may_fail:
            raise subprocess.CalledProcessError(
                result.returncode, list(command), result.stdout, result.stderr
            )
        done.append("ran " + " ".join(command))
    return done


def _write_atomic(path: Path, content: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
