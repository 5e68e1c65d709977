"""The agent's id, kept beside its collections (no zeroconf here: the daemon needs the id for
``hello`` whether or not it announces itself, and a daemon that does not announce never loads
zeroconf)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path
from typing import Final

from ..errors import DiscoveryError

__all__ = ["AGENT_ID_FILE", "agent_id_for"]

_AGENT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
AGENT_ID_FILE: Final = "agent-id"


def agent_id_for(directory: Path) -> str:
    """The agent id stored in ``directory`` (created on first use): random, so it says nothing
    about the host, and stable across restarts and address changes, so clients can find the
    same agent again."""
    path = Path(directory) / AGENT_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        existing = path.read_text(encoding="ascii").strip()
        if _AGENT_ID.match(existing):
            return existing
        raise DiscoveryError(f"{path} does not hold an agent id; remove it to make a new one")
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = secrets.token_hex(8)
    temporary = path.with_name(f".{AGENT_ID_FILE}.{os.getpid()}.{candidate}")
    temporary.write_text(candidate + "\n", encoding="ascii")
    try:
        # link() fails if another daemon made the file first: then its id is the one.
        os.link(temporary, path)
    except FileExistsError:
        return agent_id_for(directory)
    finally:
        temporary.unlink()
    return candidate
