"""Running an agent: ``index check|repair`` (on disk, daemon stopped), ``stats``, ``health``,
``token``, ``discover``, ``config show|path|init``, ``service install|uninstall``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgument
from .common import (
    add_client_options,
    add_model_options,
    collection_path,
    connect_client,
    effective_config,
)

if TYPE_CHECKING:
    from ..paths import Paths


def cmd_index_check(args: argparse.Namespace) -> int:
    from ..index import check_collection

    report = check_collection(collection_path(args))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0 if report.ok else 1


def cmd_index_repair(args: argparse.Namespace) -> int:
    from ..index import repair_collection

    report = repair_collection(collection_path(args))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with connect_client(args) as client:
        print(json.dumps(client.stats(), indent=2))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 when the daemon answers and reports ok, 1 otherwise (for HEALTHCHECK/scripts)."""
    from ..protocol import ProtocolError

    try:
        with connect_client(args) as client:
            health = client.health()
    except ProtocolError as exc:
        print(f"unhealthy: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(health, indent=2) if args.json else health.get("status", "unknown"))
    return 0 if health.get("status") == "ok" else 1


def cmd_token(args: argparse.Namespace) -> int:
    import secrets

    # 32 random bytes: 43 URL-safe characters, well over MIN_TOKEN_CHARS.
    print(secrets.token_urlsafe(32))
    return 0


def _agent_table(agents: list[Any]) -> str:
    rows = [("NAME", "AGENT ID", "ADDRESS", "MODEL", "QUANT", "DIMS", "AUTH", "PROTO")]
    for agent in agents:
        rows.append(
            (
                agent.name,
                agent.agent_id or "?",
                agent.endpoint.removeprefix("tcp://"),
                agent.model or "?",
                agent.quant or "?",
                str(agent.dims or "?"),
                {True: "yes", False: "no", None: "?"}[agent.auth_required],
                str(agent.protocol or "?"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def cmd_discover(args: argparse.Namespace) -> int:
    from ..lan.discovery import browse

    agents = browse(args.timeout, interfaces=tuple(args.interface))
    if args.json:
        print(json.dumps([agent.to_json() for agent in agents], indent=2))
    elif agents:
        print(_agent_table(agents))
    else:
        print(f"no agents answered within {args.timeout:g}s", file=sys.stderr)
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    config = effective_config(args, with_profile=True)
    print(json.dumps(config.to_json(), indent=2) if args.json else config.table())
    return 0


def cmd_config_path(args: argparse.Namespace) -> int:
    from ..config import resolve_config_path

    path, _how = resolve_config_path(args.config, os.environ)
    print(path)
    return 0


def cmd_config_init(args: argparse.Namespace) -> int:
    from ..config import config_template, resolve_config_path

    path, _how = resolve_config_path(args.config, os.environ)
    if path.exists() and not args.force:
        raise InvalidArgument(f"{path} exists; add --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_template(), encoding="utf-8")
    print(f"wrote {path} (every key commented out at its default)")
    return 0


def cmd_service_install(args: argparse.Namespace) -> int:
    from ..daemon.service_install import install_plan

    executable = [str(Path(args.executable).absolute())] if args.executable else None
    return _run_plan(install_plan(args.platform, executable, start=not args.no_start), args)


def cmd_service_uninstall(args: argparse.Namespace) -> int:
    from ..daemon.service_install import uninstall_plan

    return _run_plan(uninstall_plan(args.platform), args)


def _run_plan(plan: Any, args: argparse.Namespace) -> int:
    """Print the plan (--dry-run) or apply it, then its notes."""
    from ..daemon.service_install import apply

    if args.dry_run:
        print(plan.render(), end="")
        return 0
    for line in apply(plan):
        print(line)
    for note in plan.notes:
        print(note)
    return 0


def add_index_parser(commands: Any, paths: Paths) -> None:
    """``index`` and its sub-commands."""
    index = commands.add_parser("index", help="check or repair a collection on disk")
    index.add_argument(
        "--index-dir",
        type=Path,
        help=f"collections root (default {paths.data_dir / 'index'})",
    )
    index_commands = index.add_subparsers(dest="index_command", required=True)
    p = index_commands.add_parser("check", help="validate every file; exit 1 if damaged")
    p.add_argument("collection", help="collection name or directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_index_check)
    p = index_commands.add_parser(
        "repair", help="rebuild from what is intact; damaged files are set aside, never deleted"
    )
    p.add_argument("collection", help="collection name or directory")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_index_repair)


def add_status_parsers(commands: Any) -> None:
    """``stats``, ``health`` and ``token``."""
    p = commands.add_parser("stats", help="the daemon's counters and latency percentiles")
    add_client_options(p)
    p.set_defaults(func=cmd_stats)

    p = commands.add_parser("health", help="exit 0 if the daemon is healthy, 1 otherwise")
    p.add_argument("--json", action="store_true")
    add_client_options(p)
    p.set_defaults(func=cmd_health)

    p = commands.add_parser("token", help="print a new random auth token for --listen")
    p.set_defaults(func=cmd_token)


def add_discover_parser(commands: Any) -> None:
    """``discover``."""
    p = commands.add_parser("discover", help="list the agents advertising on the LAN (mDNS)")
    p.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to listen for answers (default 3)"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--interface",
        action="append",
        default=[],
        help="browse only on this interface name or address (repeatable; default all)",
    )
    p.set_defaults(func=cmd_discover)


def add_config_parser(commands: Any) -> None:
    """``config`` and its sub-commands."""
    config = commands.add_parser("config", help="the effective configuration and its file")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    p = config_commands.add_parser("show", help="every setting, its value and where it came from")
    p.add_argument("--json", action="store_true")
    add_model_options(p)
    p.set_defaults(func=cmd_config_show)
    p = config_commands.add_parser("path", help="the configuration file that is read")
    p.set_defaults(func=cmd_config_path, without_config=True)
    p = config_commands.add_parser("init", help="write a commented configuration file")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_config_init, without_config=True)


def add_service_parser(commands: Any) -> None:
    """``service install|uninstall``."""
    service = commands.add_parser("service", help="run at boot: systemd (Linux), launchd (macOS)")
    service_commands = service.add_subparsers(dest="service_command", required=True)
    for action, what in (("install", "install and start"), ("uninstall", "stop and remove")):
        p = service_commands.add_parser(action, help=f"{what} the service")
        p.add_argument("--dry-run", action="store_true", help="print the files and commands")
        p.add_argument("--platform", choices=("linux", "macos"), help="default: this machine's")
        if action == "install":
            p.add_argument("--exec", dest="executable", help="edge-agent executable to run")
            p.add_argument("--no-start", action="store_true", help="install and enable only")
        p.set_defaults(func=cmd_service_install if action == "install" else cmd_service_uninstall)
