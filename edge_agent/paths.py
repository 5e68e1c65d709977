"""Where edge-agent keeps things, from platformdirs, each overridable by environment."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import platformdirs

__all__ = ["Paths", "default_paths"]

APP_NAME = "edge-agent"


@dataclass(frozen=True)
class Paths:
    data_dir: Path
    models_dir: Path
    cache_dir: Path
    runtime_dir: Path

    @property
    def default_socket(self) -> Path:
        return self.runtime_dir / "edge-agent.sock"


def default_paths(environ: dict[str, str] | None = None) -> Paths:
    """platformdirs locations; ``EDGE_AGENT_HOME`` moves all of them under one directory
    (handy for tests and containers), and ``EDGE_AGENT_MODELS_DIR`` moves the model store."""
    env = os.environ if environ is None else environ
    home = env.get("EDGE_AGENT_HOME")
    if home:
        base = Path(home).expanduser()
        data, cache, runtime = base / "data", base / "cache", base / "run"
    else:
        data = Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))
        cache = Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))
        with warnings.catch_warnings():
            # Without XDG_RUNTIME_DIR (containers, su, cron) platformdirs warns and falls back to
            # /tmp/runtime-UID; that fallback is fine for us (the server creates it 0700).
            warnings.simplefilter("ignore")
            runtime = Path(platformdirs.user_runtime_dir(APP_NAME, appauthor=False))
    models = (
        Path(env["EDGE_AGENT_MODELS_DIR"]).expanduser()
        if env.get("EDGE_AGENT_MODELS_DIR")
        else data / "models"
    )
    return Paths(data_dir=data, models_dir=models, cache_dir=cache, runtime_dir=runtime)
