"""What every command shares: its configuration, the model store, the daemon client, and
the option sets several commands take.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

# Options whose default comes from the configuration: (argparse dest, setting key).
_CONFIGURED_OPTIONS = (
    ("socket", "socket"),
    ("connect", "socket"),
    ("index_dir", "index_dir"),
    ("model", "model"),
)


# Options whose default of None is filled from the configuration by prepare():
# flag > EDGE_AGENT_SOCKET > file > default.
SOCKET_DEFAULT = None


def effective_config(args: argparse.Namespace, with_profile: bool = False) -> Any:
    """The effective configuration (flag > env > config file > hardware profile), loaded once
    per command; ``with_profile`` also probes the host for the profile's values."""
    from ..config import load_config

    cache = vars(args).setdefault("_configs", {})
    if with_profile not in cache:
        cache[with_profile] = load_config(
            args._flags, os.environ, getattr(args, "config", None), with_profile=with_profile
        )
    return cache[with_profile]


def prepare(args: argparse.Namespace) -> None:
    """Set logging up and fill the options the user left out from the configuration, so that
    every command uses the daemon's socket, model store and index."""
    from ..config import Flag, flags_from_args
    from ..logs import setup_logging

    # What the user typed, before the defaults below are filled in.
    args._flags = flags_from_args(args)
    if getattr(args, "no_tune", False):
        args._flags["tune_budget"] = Flag(0.0, "--no-tune")
    if getattr(args, "without_config", False):
        # `config path` / `config init` must work whatever the file holds.
        setup_logging(args.log_level or "info", args.log_format or "kv")
        return
    config = effective_config(args)
    setup_logging(config["log.level"], config["log.format"])
    args.models_dir = Path(config["models_dir"])
    for dest, key in _CONFIGURED_OPTIONS:
        if dest in vars(args) and getattr(args, dest) is None:
            value = config[key]
            setattr(args, dest, str(value) if dest in ("socket", "connect") else value)


def model_store(args: argparse.Namespace) -> Any:
    from ..models import ModelStore

    return ModelStore(args.models_dir)


def connect_client(args: argparse.Namespace) -> Any:
    from ..client import Client

    token = None
    if getattr(args, "token_file", None):
        token = Path(args.token_file).expanduser().read_text(encoding="utf-8").strip()
    return Client(args.connect, timeout=args.timeout, token=token)


def state_dir_of(args: argparse.Namespace) -> Path:
    return Path(effective_config(args)["state_dir"])


def selection_override(args: argparse.Namespace) -> Any:
    """What the user pinned for model selection: flags, environment and the config file."""
    return effective_config(args).override()


def embedder_config(args: argparse.Namespace) -> Any:
    from ..embedding.embedder import EmbedderConfig

    return EmbedderConfig(threads=args.threads)


def collection_path(args: argparse.Namespace) -> Path:
    """A collection by name (under the index root) or by path."""
    given = Path(args.collection)
    if given.is_dir() or "/" in args.collection:
        return given
    return args.index_dir / args.collection


def parse_dims_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def add_model_options(p: argparse.ArgumentParser) -> None:
    from ..models.default import DEFAULT_MODEL

    p.add_argument("--model", help=f"model name (env EDGE_AGENT_MODEL; default {DEFAULT_MODEL})")
    # None = not given: selection then takes env EDGE_AGENT_QUANT/THREADS, then profiles.
    p.add_argument("--quant", help="pin a quantization (env EDGE_AGENT_QUANT)")
    p.add_argument("--threads", type=int, help="pin the thread count (env EDGE_AGENT_THREADS)")
    p.add_argument("--profile", help="force a hardware profile (env EDGE_AGENT_PROFILE)")


def add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--connect",
        "--socket",
        dest="connect",
        default=SOCKET_DEFAULT,
        metavar="ADDRESS",
        help="socket path or HOST:PORT (env EDGE_AGENT_SOCKET; default %(default)s)",
    )
    p.add_argument("--token-file", help="auth token for TCP (else env EDGE_AGENT_TOKEN)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per call")
