"""One host's side of the discovery tests (tests/lan.py starts it inside a namespace).

Talks JSON lines: commands on stdin, events on stdout (``{"event": ...}``). End of stdin stops
it the clean way (goodbye packets), so a test that dies takes its nodes with it.

    lan_node.py advertise [--hostname H] [--interface I]... --id ID --bind HOST --port P ...
    lan_node.py watch [--hostname H] [--interface I]...
    lan_node.py agent [--hostname H] --models-dir D --data D --listen HOST:PORT [--token T]
    lan_node.py client [--interface I]...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from edge_agent.lan.discovery import Advertiser, AgentBrowser, AgentInfo, BrowseEvent


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def own_uts_namespace() -> bool:
    """True when this process has a UTS namespace of its own (``unshare --uts``, which execs
    us, so our parent is the test), the only case where setting the host name cannot touch
    the machine's real one. (PID 1's namespace may not be readable in a sandbox.)"""
    try:
        return os.readlink("/proc/self/ns/uts") != os.readlink(f"/proc/{os.getppid()}/ns/uts")
    except OSError:
        return False


async def commands() -> asyncio.Queue[dict[str, Any] | None]:
    """stdin as a queue of JSON commands; None at end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def pump() -> None:
        while line := await reader.readline():
            try:
                out.put_nowait(json.loads(line))
            except ValueError:
                emit("error", message=f"bad command {line!r}")
        out.put_nowait(None)

    task = loop.create_task(pump())
    task.add_done_callback(lambda _t: None)
    commands.task = task  # type: ignore[attr-defined]  # keep a reference
    return out


async def advertise(args: argparse.Namespace) -> None:
    info = AgentInfo(args.id, args.model, args.dims, args.quant, args.auth)
    # What the daemon's ``follow`` callable reads (its loaded model); "set" changes it the way
    # swapping the model would, and the advertiser must notice by itself.
    state = {"info": info}
    advertiser = Advertiser(
        info,
        args.port,
        bound_hosts=args.bind,
        interfaces=args.interface,
        hostname=args.hostname,
        follow=lambda: state["info"],
        refresh_s=0.5,
    )
    await advertiser.start()
    emit("ready", name=advertiser.name, addresses=advertiser.addresses, server=advertiser.server)
    inbox = await commands()
    try:
        while (command := await inbox.get()) is not None:
            if command.get("cmd") == "update":
                fields = {k: v for k, v in command.items() if k != "cmd"}
                info = state["info"] = AgentInfo(**{**info.__dict__, **fields})
                await advertiser.update(info)
                emit("updated", txt=info.txt())
            elif command.get("cmd") == "set":
                fields = {k: v for k, v in command.items() if k != "cmd"}
                info = state["info"] = AgentInfo(**{**state["info"].__dict__, **fields})
            elif command.get("cmd") == "close":
                break
    finally:
        await advertiser.close()
    emit("closed")


async def watch(args: argparse.Namespace) -> None:
    def on_event(event: BrowseEvent) -> None:
        emit(event.kind, agent=event.agent.to_json())

    async with AgentBrowser(args.interface, on_event=on_event):
        emit("ready")
        inbox = await commands()
        while (command := await inbox.get()) is not None:
            if command.get("cmd") == "close":
                break
    emit("closed")


async def agent(args: argparse.Namespace) -> None:
    """A real daemon (``app.run_server``), advertising; SIGTERM or end of stdin stops it."""
    from edge_agent.daemon.app import run_server
    from edge_agent.embedding.embedder import EmbedderConfig
    from edge_agent.options import ServeOptions

    data = Path(args.data)
    options = ServeOptions(
        socket_path=data / "edge-agent.sock",
        models_dir=Path(args.models_dir),
        quant=args.quant,
        embedder=EmbedderConfig(threads=1),
        select_model=False,  # the model is pinned: each daemon starts in about a second
        isolate_engine=False,
        index_dir=data / "index",
        listen=args.listen,
        auth_token=args.token,
        advertise=True,
        advertise_interfaces=tuple(args.interface),
        shutdown_grace=5.0,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    inbox = await commands()

    async def stop_on_eof() -> None:
        while (command := await inbox.get()) is not None and command.get("cmd") != "close":
            pass
        stop.set()

    watcher = loop.create_task(stop_on_eof())
    await run_server(options, stop, lambda address: emit("ready", address=address))
    watcher.cancel()
    emit("closed")


async def client(args: argparse.Namespace) -> None:
    """A fleet client: browses, connects to agents by id or name, searches the fleet."""
    from edge_agent.client import AsyncClient, async_fleet_search
    from edge_agent.lan.discovery import async_browse

    seen: list[Any] = []
    inbox = await commands()
    while (command := await inbox.get()) is not None:
        cmd = command.pop("cmd")
        try:
            if cmd == "browse":
                seen = await async_browse(command["timeout"], interfaces=args.interface)
                emit("browsed", agents=[agent.to_json() for agent in seen])
            elif cmd == "hello":
                conn = await AsyncClient.discover(command["agent"], interfaces=args.interface)
                async with conn:
                    hello = await conn.hello()
                emit("hello", hello=hello, address=str(conn.endpoint))
            elif cmd == "add_vectors":
                conn = await AsyncClient.discover(command["agent"], interfaces=args.interface)
                async with conn:
                    await conn.add_vectors(
                        command["collection"], command["ids"], command["vectors"]
                    )
                emit("added")
            elif cmd == "fleet":
                # "cached": search the agents of the last browse (some may have died since).
                cached = command.pop("cached", False)
                result = await async_fleet_search(
                    **command, agents=seen if cached else None, interfaces=args.interface
                )
                emit("fleet", result=result.to_json())
        except Exception as exc:
            emit("failed", cmd=cmd, error=f"{type(exc).__name__}: {exc}")
    emit("closed")


def main() -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--hostname")
    common.add_argument("--interface", action="append", default=[])
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("advertise", parents=[common])
    p.add_argument("--id", required=True)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--dims", type=int, default=384)
    p.add_argument("--quant", default="F32")
    p.add_argument("--auth", action="store_true")
    p.add_argument("--bind", action="append", required=True)
    p.add_argument("--port", type=int, required=True)
    sub.add_parser("watch", parents=[common])
    p = sub.add_parser("agent", parents=[common])
    p.add_argument("--models-dir", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--quant", default="F32")
    p.add_argument("--listen", required=True)
    p.add_argument("--token")
    sub.add_parser("client", parents=[common])
    args = parser.parse_args()
    if args.hostname and own_uts_namespace():
        socket.sethostname(args.hostname)
    try:
        roles = {"advertise": advertise, "watch": watch, "agent": agent, "client": client}
        asyncio.run(roles[args.command](args))
    except BaseException as exc:
        emit("error", message=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        raise


if __name__ == "__main__":
    main()
