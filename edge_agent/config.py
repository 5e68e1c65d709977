"""One configuration for the daemon: flags > environment > config file > hardware profile.

Every setting is declared once in ``SETTINGS`` (key, type, range, environment variable, flag,
help). ``load_config`` reads the layers, validates every value once and remembers where each
came from; ``Config.serve_options()`` turns the result into the daemon's ``ServeOptions``, and
``edge-agent config show`` prints it. Errors are ``ConfigError`` and name the key, the source
(``flag --threads``, ``env EDGE_AGENT_THREADS``, ``file /etc/edge-agent/config.toml``) and the
allowed range; unknown keys in the file are errors too, with a did-you-mean.

The file is TOML, by default ``config.toml`` in the platformdirs config directory
(``~/.config/edge-agent`` on Linux, ``$EDGE_AGENT_HOME`` when that is set); ``--config PATH`` or
``EDGE_AGENT_CONFIG`` name another. docs/configuration.md lists every key (a test keeps it in
step with ``SETTINGS``).

Model-selection settings (quant, threads, batch sizes, context, profile) reach the daemon as an
``Override``: only what the user set is pinned; the rest is chosen at start-up from
measurements on this box, then the hardware profile (edge_agent.selection.choose). ``config show``
reports the profile's value for those, noting that start-up tuning may refine it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import platformdirs

from .addresses import parse_host_port
from .errors import ConfigError
from .paths import APP_NAME, default_paths

if TYPE_CHECKING:
    from .hardware.host import HostInfo
    from .options import ServeOptions
    from .selection.choose import Override
    from .selection.profiles import Profile

__all__ = [
    "CONFIG_ENV",
    "SETTINGS",
    "Config",
    "ConfigError",
    "Flag",
    "Setting",
    "Value",
    "config_template",
    "default_config_path",
    "flags_from_args",
    "load_config",
    "reference_table",
    "resolve_config_path",
]

CONFIG_ENV = "EDGE_AGENT_CONFIG"
CONFIG_FILE = "config.toml"
KIB = 1 << 10
_SIZE_UNITS = {"": 1, "b": 1, "kib": KIB, "mib": KIB**2, "gib": KIB**3, "tib": KIB**4}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# Settings that model selection decides when the user does not (flag > env > file > measured >
# profile): they are passed to it as an Override instead of being fixed here.
_OVERRIDE_KEYS = {
    "quant": "quant",
    "threads": "threads",
    "profile": "profile",
    "embedder.batch_tokens": "batch_tokens",
    "embedder.max_sequences": "max_sequences",
    "embedder.max_context": "max_context",
}


@dataclass(frozen=True)
class Setting:
    """One configuration key. ``kind`` is one of int, bytes (an int that may be written "64MiB"),
    float, bool, str, choice, path, address (HOST:PORT), strings (a list), mode (octal)."""

    key: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    env: str | None = None
    flag: str | None = None  # the command-line spelling, e.g. "--threads"
    secret: bool = False  # never printed; only from the environment
    in_file: bool = True  # False: refused in the file (secrets belong in token_file)

    @property
    def section(self) -> str:
        return self.key.rpartition(".")[0]

    @property
    def name(self) -> str:
        return self.key.rpartition(".")[2]

    def allowed(self) -> str:
        """The allowed values, in words, for errors and the docs."""
        if self.kind in ("int", "bytes"):
            unit = ' (or a string like "64MiB")' if self.kind == "bytes" else ""
            return f"an integer in [{_num(self.low)}, {_num(self.high)}]{unit}"
        if self.kind == "float":
            if self.low == 0 and self.high == 1 and self.key == "index.compact_deleted_ratio":
                return "a number in (0, 1]"
            return f"a number in [{_num(self.low)}, {_num(self.high)}]"
        if self.kind == "bool":
            return "true or false"
        if self.kind in ("choice", "mode"):
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == "address":
            return 'HOST:PORT ("127.0.0.1:7878", "[::1]:7878", ":7878" for loopback)'
        if self.kind == "strings":
            return "a list of non-empty strings"
        if self.kind == "path":
            return "a path"
        return "a non-empty string"


def _num(value: float | None) -> str:
    if value is None:
        return "?"
    if float(value).is_integer():
        number = int(value)
        for unit, size in (("TiB", KIB**4), ("GiB", KIB**3), ("MiB", KIB**2)):
            if number >= size and number % size == 0 and number > 1_000_000:
                return f"{number // size} {unit}"
        return f"{number:_}".replace("_", " ") if number >= 100_000 else str(number)
    return f"{value:g}"


def _s(key: str, kind: str, default: Any, help: str, **more: Any) -> Setting:
    return Setting(key, kind, default, help, **more)


# Every setting, in the order `config show` and docs/configuration.md list them. Ranges match
# the validators of the dataclasses they feed (EmbedderConfig, IndexConfig, ServiceConfig...);
# tests/test_config.py checks each boundary against them.
# fmt: off
SETTINGS: tuple[Setting, ...] = (
    # -- where things are ------------------------------------------------------------------
    _s("socket", "path", None, "Unix socket the daemon listens on",
       env="EDGE_AGENT_SOCKET", flag="--socket"),
    _s("socket_mode", "mode", "0600",
       'permissions of the socket: "0660" lets the socket\'s group connect (system service)',
       choices=("0600", "0660"), env="EDGE_AGENT_SOCKET_MODE"),
    _s("models_dir", "path", None, "the model store",
       env="EDGE_AGENT_MODELS_DIR", flag="--models-dir"),
    _s("index_dir", "path", None, "collections of the vector index",
       env="EDGE_AGENT_INDEX_DIR", flag="--index-dir"),
    _s("state_dir", "path", None, "tuning measurements and files known to fail on this host",
       env="EDGE_AGENT_STATE_DIR"),
    # -- the model -------------------------------------------------------------------------
    _s("model", "str", None, "model to serve (a name in the model store)",
       env="EDGE_AGENT_MODEL", flag="--model"),
    _s("quant", "str", None, "pin a quantization (F32, F16, Q8_0, ...); unset: chosen at start",
       env="EDGE_AGENT_QUANT", flag="--quant"),
    _s("profile", "str", None, "force a hardware profile (profiles/*.toml); unset: matched",
       env="EDGE_AGENT_PROFILE", flag="--profile"),
    _s("threads", "int", None, "llama.cpp threads; unset: measured best, else the profile's rule",
       low=1, high=512, env="EDGE_AGENT_THREADS", flag="--threads"),
    _s("tune_budget", "float", 20.0,
       "seconds of measurement on first start (0: no tuning, the profile's rules decide)",
       low=0, high=600, env="EDGE_AGENT_TUNE_BUDGET", flag="--tune-budget"),
    # -- network ---------------------------------------------------------------------------
    _s("listen", "address", None,
       "TCP besides the Unix socket; a non-loopback host needs an auth token",
       env="EDGE_AGENT_LISTEN", flag="--listen"),
    _s("token_file", "path", None, "file (mode 0600) holding the TCP auth token",
       env="EDGE_AGENT_TOKEN_FILE", flag="--token-file"),
    _s("token", "str", None, "the TCP auth token itself (environment only, never in the file)",
       env="EDGE_AGENT_TOKEN", secret=True, in_file=False),
    _s("auth_timeout", "float", 10.0,
       "seconds a TCP client has to authenticate before it is disconnected",
       low=0.1, high=600, env="EDGE_AGENT_AUTH_TIMEOUT"),
    _s("first_byte_timeout", "float", 3.0,
       "seconds a TCP client that must authenticate has to send its first bytes",
       low=0.1, high=600, env="EDGE_AGENT_FIRST_BYTE_TIMEOUT"),
    _s("max_preauth_connections", "int", 16,
       "TCP connections waiting to authenticate; when full, a newcomer displaces the oldest"
       " of the address holding the most", low=1, high=65536,
       env="EDGE_AGENT_MAX_PREAUTH_CONNECTIONS"),
    _s("max_preauth_per_source", "int", 8,
       "TCP connections waiting to authenticate from one address (IPv6: one /64); more are"
       " refused OVERLOADED", low=1, high=65536, env="EDGE_AGENT_MAX_PREAUTH_PER_SOURCE"),
    _s("idle_timeout", "float", 300.0,
       "seconds a connection (Unix, or authenticated TCP) may stay idle before it is closed;"
       " 0: never", low=0, high=86400, env="EDGE_AGENT_IDLE_TIMEOUT"),
    _s("advertise", "bool", False, "announce the TCP endpoint on the LAN (mDNS); needs listen",
       env="EDGE_AGENT_ADVERTISE", flag="--advertise"),
    _s("advertise_interfaces", "strings", (),
       "addresses or interface names to announce on; empty: all",
       env="EDGE_AGENT_ADVERTISE_INTERFACES", flag="--advertise-interface"),
    _s("metrics_listen", "address", None,
       "Prometheus text exposition over HTTP at http://HOST:PORT/metrics; unset: off",
       env="EDGE_AGENT_METRICS_LISTEN", flag="--metrics-listen"),
    _s("http", "address", None,
       "OpenAI-compatible embeddings, a REST API and a search page at http://HOST:PORT/;"
       " a non-loopback host needs an auth token; unset: off",
       env="EDGE_AGENT_HTTP", flag="--http"),
    # -- limits ----------------------------------------------------------------------------
    _s("limits.max_message_bytes", "bytes", 8 << 20, "bytes of one request",
       low=64, high=1 << 30, env="EDGE_AGENT_MAX_MESSAGE_BYTES"),
    _s("limits.max_connections", "int", 64, "open connections; more are refused OVERLOADED",
       low=1, high=65536, env="EDGE_AGENT_MAX_CONNECTIONS"),
    _s("limits.max_queue", "int", 256, "embed requests waiting for the model; more: OVERLOADED",
       low=1, high=1_000_000, env="EDGE_AGENT_MAX_QUEUE"),
    _s("limits.shutdown_grace", "float", 10.0,
       "seconds a stop waits for requests in flight before answering SHUTTING_DOWN",
       low=0, high=3600, env="EDGE_AGENT_SHUTDOWN_GRACE"),
    # -- embedder --------------------------------------------------------------------------
    _s("embedder.batch_tokens", "int", 512, "tokens per llama.cpp batch; unset: measured/profile",
       low=32, high=8192, env="EDGE_AGENT_BATCH_TOKENS"),
    _s("embedder.max_sequences", "int", 64, "sequences per batch; unset: measured/profile",
       low=1, high=256, env="EDGE_AGENT_MAX_SEQUENCES"),
    _s("embedder.max_context", "int", 8192,
       "longest sequence fed to the model (longer texts follow long_text); decoders (Qwen3):"
       " at most max(batch_tokens, 512); unset: profile",
       low=16, high=32768, env="EDGE_AGENT_MAX_CONTEXT"),
    _s("embedder.solo_tokens", "int", 256,
       "a lone text of up to this many tokens runs in a small second context without flash"
       " attention (10-15% faster); 0: off", low=0, high=8192, env="EDGE_AGENT_SOLO_TOKENS"),
    _s("embedder.chunk_overlap", "int", 32, 'tokens shared by chunks with long_text="chunk"',
       low=0, high=4096, env="EDGE_AGENT_CHUNK_OVERLAP"),
    _s("embedder.max_texts", "int", 4096, "texts per embed call",
       low=1, high=1_000_000, env="EDGE_AGENT_MAX_TEXTS"),
    _s("embedder.max_text_bytes", "bytes", 1 << 20, "UTF-8 bytes per text",
       low=1, high=1 << 30, env="EDGE_AGENT_MAX_TEXT_BYTES"),
    _s("embedder.use_mmap", "bool", True, "map the model file instead of reading it",
       env="EDGE_AGENT_USE_MMAP"),
    _s("embedder.adaptive_threads", "bool", True,
       "use fewer llama.cpp threads while other processes keep the CPUs busy",
       env="EDGE_AGENT_ADAPTIVE_THREADS"),
    # -- the engine call scheduler (edge_agent.daemon.service) -------------------------------
    _s("engine.slice_time", "float", 0.025,
       "seconds of engine work per call: larger requests are cut so queries can go between",
       low=0.001, high=60, env="EDGE_AGENT_SLICE_TIME"),
    _s("engine.query_streak", "int", 8,
       "query calls that may run ahead of waiting document work before one of its slices runs",
       low=1, high=1_000_000, env="EDGE_AGENT_QUERY_STREAK"),
    _s("engine.query_lane", "bool", True,
       "while the engine runs document work, run queries on a second one-thread engine"
       " process (started on demand, stopped after engine.query_lane_idle)",
       env="EDGE_AGENT_QUERY_LANE"),
    _s("engine.query_lane_idle", "float", 30.0,
       "seconds without document work after which the query lane's process exits",
       low=1, high=3600, env="EDGE_AGENT_QUERY_LANE_IDLE"),
    _s("engine.call_deadline_floor", "float", 2.0,
       "seconds every engine call may take, plus call_deadline_factor x its estimated work",
       low=0.1, high=3600, env="EDGE_AGENT_CALL_DEADLINE_FLOOR"),
    _s("engine.call_deadline_factor", "float", 10.0,
       "multiple of a call's estimated engine time it may take before the engine is restarted",
       low=1, high=1000, env="EDGE_AGENT_CALL_DEADLINE_FACTOR"),
    _s("engine.liveness_interval", "float", 1.0,
       "seconds between pings of an idle engine (no answer in call_deadline_floor: restart);"
       " 0: off", low=0, high=3600, env="EDGE_AGENT_LIVENESS_INTERVAL"),
    # -- index -----------------------------------------------------------------------------
    _s("index.fsync", "choice", "always",
       '"always": fsync before a write returns; "batch": within batch_window_ms; "off": OS',
       choices=("always", "batch", "off"), env="EDGE_AGENT_INDEX_FSYNC"),
    _s("index.batch_window_ms", "int", 20, 'fsync delay with fsync = "batch"',
       low=1, high=10_000, env="EDGE_AGENT_INDEX_BATCH_WINDOW_MS"),
    _s("index.snapshot_wal_bytes", "bytes", 64 << 20,
       "WAL bytes since the last snapshot that trigger a new one",
       low=1 << 10, high=1 << 40, env="EDGE_AGENT_INDEX_SNAPSHOT_WAL_BYTES"),
    _s("index.snapshot_wal_records", "int", 50_000,
       "WAL records since the last snapshot that trigger a new one",
       low=1, high=1 << 40, env="EDGE_AGENT_INDEX_SNAPSHOT_WAL_RECORDS"),
    _s("index.snapshot_on_close", "bool", True, "write a snapshot when a collection closes",
       env="EDGE_AGENT_INDEX_SNAPSHOT_ON_CLOSE"),
    _s("index.snapshot_in_background", "bool", True,
       "writers wait only for an in-memory copy of the graph, not for the snapshot's files",
       env="EDGE_AGENT_INDEX_SNAPSHOT_IN_BACKGROUND"),
    _s("index.snapshot_copy_max_bytes", "bytes", 1 << 30,
       "largest graph copied in memory for a background snapshot (bigger: written in place)",
       low=0, high=1 << 50, env="EDGE_AGENT_INDEX_SNAPSHOT_COPY_MAX_BYTES"),
    _s("index.keep_snapshots", "int", 2, "snapshots kept (the newest plus fallbacks)",
       low=1, high=16, env="EDGE_AGENT_INDEX_KEEP_SNAPSHOTS"),
    _s("index.m", "int", 16, "HNSW graph degree (new collections); unset: profile",
       low=2, high=128, env="EDGE_AGENT_INDEX_M"),
    _s("index.ef_construction", "int", 200, "HNSW build candidates (new collections); profile",
       low=8, high=4096, env="EDGE_AGENT_INDEX_EF_CONSTRUCTION"),
    _s("index.ef_search", "int", 96, "HNSW query candidates; unset: profile",
       low=1, high=65536, env="EDGE_AGENT_INDEX_EF_SEARCH"),
    _s("index.exact_search_max", "int", None,
       "live vectors up to which search is an exact scan; unset: by dimension (~10k at 384)",
       low=0, high=1_000_000, env="EDGE_AGENT_INDEX_EXACT_SEARCH_MAX"),
    _s("index.compact_deleted_ratio", "float", 0.5,
       "share of deleted graph slots that makes a snapshot rebuild the graph",
       low=0, high=1, env="EDGE_AGENT_INDEX_COMPACT_DELETED_RATIO"),
    _s("index.threads", "int", 1, "hnswlib threads for inserts",
       low=1, high=512, env="EDGE_AGENT_INDEX_THREADS"),
    _s("index.initial_capacity", "int", 1024, "graph slots a new collection starts with",
       low=1, high=1 << 31, env="EDGE_AGENT_INDEX_INITIAL_CAPACITY"),
    _s("index.max_vectors", "int", 10_000_000, "vectors per collection",
       low=1, high=1 << 40, env="EDGE_AGENT_INDEX_MAX_VECTORS"),
    _s("index.max_id_bytes", "int", 512, "UTF-8 bytes per document id",
       low=1, high=1 << 16, env="EDGE_AGENT_INDEX_MAX_ID_BYTES"),
    _s("index.max_metadata_bytes", "bytes", 64 << 10, "bytes of metadata per document",
       low=16, high=1 << 24, env="EDGE_AGENT_INDEX_MAX_METADATA_BYTES"),
    _s("index.max_text_bytes", "bytes", 1 << 20, "UTF-8 bytes of stored text per document",
       low=1, high=1 << 30, env="EDGE_AGENT_INDEX_MAX_TEXT_BYTES"),
    _s("index.max_batch", "int", 10_000, "documents per write call",
       low=1, high=1_000_000, env="EDGE_AGENT_INDEX_MAX_BATCH"),
    _s("index.backend", "choice", "local",
       'where new collections live: "local" (files under index_dir) or "milvus" (milvus_uri)',
       choices=("local", "milvus"), env="EDGE_AGENT_INDEX_BACKEND"),
    _s("index.milvus_uri", "str", None,
       "Milvus for new milvus collections: a Milvus Lite file (*.db) or http://host:19530",
       env="EDGE_AGENT_INDEX_MILVUS_URI"),
    _s("index.milvus_token_file", "path", None,
       "file holding the Milvus token (user:password or an API key); read, never stored",
       env="EDGE_AGENT_INDEX_MILVUS_TOKEN_FILE"),
    _s("index.milvus_timeout", "float", 10.0,
       "seconds each Milvus call may take before the collection reports BACKEND_UNAVAILABLE",
       low=0.1, high=600, env="EDGE_AGENT_INDEX_MILVUS_TIMEOUT"),
    # -- logs ------------------------------------------------------------------------------
    _s("log.level", "choice", "info", "least severe level written",
       choices=("debug", "info", "warning", "error"), env="EDGE_AGENT_LOG_LEVEL",
       flag="--log-level"),
    _s("log.format", "choice", "kv",
       '"kv": key=value lines; "json": one JSON object a line (both: no document text)',
       choices=("kv", "json"), env="EDGE_AGENT_LOG_FORMAT", flag="--log-format"),
)
# fmt: on
_BY_KEY = {s.key: s for s in SETTINGS}
# The [engine] settings and the ServiceConfig fields they set.
ENGINE_SETTINGS = {
    "engine.slice_time": "slice_s",
    "engine.query_streak": "query_streak",
    "engine.call_deadline_floor": "call_deadline_floor_s",
    "engine.call_deadline_factor": "call_deadline_factor",
    "engine.liveness_interval": "liveness_interval_s",
    "engine.query_lane": "query_lane",
    "engine.query_lane_idle": "query_lane_idle_s",
}

SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS if s.section))
# Keys whose value the hardware profile supplies when the user sets none.
PROFILE_KEYS = (
    "profile",
    "quant",
    "threads",
    "embedder.batch_tokens",
    "embedder.max_sequences",
    "embedder.max_context",
    "index.m",
    "index.ef_construction",
    "index.ef_search",
)


# -- values and sources -------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """A command-line value with the flag that gave it, when that is not ``--<key>``
    (``--no-tune`` sets tune_budget to 0)."""

    value: Any
    name: str


@dataclass(frozen=True)
class Value:
    value: Any
    source: str  # "flag --threads", "env EDGE_AGENT_THREADS", "file PATH", "profile NAME"...
    layer: str  # "flag", "env", "file", "profile" or "default"
    note: str = ""

    @property
    def user_set(self) -> bool:
        return self.layer in ("flag", "env", "file")


@dataclass(frozen=True)
class Config:
    """The effective settings, each with where it came from."""

    values: Mapping[str, Value]
    path: Path  # the config file that was (or would have been) read
    path_source: str  # "flag --config", "env EDGE_AGENT_CONFIG" or "default"
    file_found: bool
    profile: Profile | None = None
    profile_reasons: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def __getitem__(self, key: str) -> Any:
        return self.values[key].value

    def source(self, key: str) -> str:
        return self.values[key].source

    def override(self) -> Override:
        """What model selection must not change: the selection settings the user set."""
        from .selection.choose import Override

        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key, name in _OVERRIDE_KEYS.items():
            value = self.values[key]
            if value.user_set and value.value is not None:
                values[name] = value.value
                sources[name] = value.source
        return Override(**values, sources=sources)

    def serve_options(self) -> ServeOptions:
        """The daemon's options. Selection settings the user did not set stay unpinned (the
        Override); the index graph parameters fall back to the profile's, then the defaults."""
        from .embedding.embedder import EmbedderConfig
        from .index.config import IndexConfig
        from .options import ServeOptions, ServiceConfig

        v = self.__getitem__
        threads = v("threads") if self.values["threads"].user_set else None
        embedder = EmbedderConfig(
            threads=threads,
            batch_tokens=v("embedder.batch_tokens"),
            max_sequences=v("embedder.max_sequences"),
            max_sequence_tokens=v("embedder.max_context"),
            solo_tokens=v("embedder.solo_tokens"),
            chunk_overlap=v("embedder.chunk_overlap"),
            max_texts=v("embedder.max_texts"),
            max_text_bytes=v("embedder.max_text_bytes"),
            use_mmap=v("embedder.use_mmap"),
            adaptive_threads=v("embedder.adaptive_threads"),
        )
        scheduler = ServiceConfig(
            max_queue=v("limits.max_queue"),
            **{field: v(key) for key, field in ENGINE_SETTINGS.items()},
        )
        index_fields = {s.name: v(s.key) for s in SETTINGS if s.section == "index"}
        budget = v("tune_budget")
        token_file = v("token_file")
        return ServeOptions(
            socket_path=Path(v("socket")),
            models_dir=Path(v("models_dir")),
            model=v("model"),
            embedder=embedder,
            max_message_bytes=v("limits.max_message_bytes"),
            max_connections=v("limits.max_connections"),
            max_queue=v("limits.max_queue"),
            service=scheduler,
            shutdown_grace=float(v("limits.shutdown_grace")),
            override=self.override(),
            state_dir=Path(v("state_dir")),
            tune_budget_s=float(budget) if budget else None,
            index_dir=Path(v("index_dir")),
            index=IndexConfig(**index_fields),
            listen=v("listen"),
            auth_token_file=Path(token_file) if token_file is not None else None,
            # A token file, when given, wins over EDGE_AGENT_TOKEN (app.resolve_auth_token).
            auth_token=v("token") if token_file is None else None,
            auth_timeout=float(v("auth_timeout")),
            first_byte_timeout=float(v("first_byte_timeout")),
            max_preauth_connections=v("max_preauth_connections"),
            max_preauth_per_source=v("max_preauth_per_source"),
            idle_timeout=float(v("idle_timeout")),
            advertise=v("advertise"),
            advertise_interfaces=tuple(v("advertise_interfaces")),
            metrics_listen=v("metrics_listen"),
            http_listen=v("http"),
            socket_mode=int(v("socket_mode"), 8),
        )

    # -- reports --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        settings: dict[str, Any] = {}
        for setting in SETTINGS:
            value = self.values[setting.key]
            entry: dict[str, Any] = {
                "value": _jsonable(setting, value.value),
                "source": value.source,
                "layer": value.layer,
            }
            if value.note:
                entry["note"] = value.note
            settings[setting.key] = entry
        return {
            "config_file": str(self.path),
            "config_file_source": self.path_source,
            "config_file_found": self.file_found,
            "profile": self.profile.name if self.profile is not None else None,
            "profile_reasons": list(self.profile_reasons),
            "settings": settings,
            "warnings": list(self.warnings),
        }

    def table(self) -> str:
        """The human report behind ``edge-agent config show``."""
        found = "" if self.file_found else " (not found: nothing read from it)"
        lines = [f"config file  {self.path}{found} [{self.path_source}]"]
        if self.profile is not None:
            lines.append(f"profile      {'; '.join(self.profile_reasons) or self.profile.name}")
        lines.append("")
        rows = [("key", "value", "source")]
        for setting in SETTINGS:
            value = self.values[setting.key]
            source = value.source + (f" ({value.note})" if value.note else "")
            shown = _display(setting, value.value)
            if value.value is None and value.layer == "profile":
                shown = "auto"
            rows.append((setting.key, shown, source))
        width_key = max(len(r[0]) for r in rows)
        width_value = min(48, max(len(r[1]) for r in rows))
        for key, text, source in rows:
            lines.append(f"{key:<{width_key}}  {text:<{width_value}}  {source}".rstrip())
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _jsonable(setting: Setting, value: Any) -> Any:
    if setting.secret and value is not None:
        return "(hidden)"
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _display(setting: Setting, value: Any) -> str:
    if value is None:
        return "-"
    if setting.secret:
        return "(hidden)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ", ".join(value) if value else "[]"
    return str(value)


# -- parsing and validation ---------------------------------------------------------------------


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text.replace("_", ""))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("not a size")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _coerce(setting: Setting, raw: Any, layer: str, base: Path | None) -> Any:
    """Turn a raw value (TOML value, environment string or parsed flag) into the setting's type.

    Raises ValueError with what is wrong; the caller adds the key and the source.
    """
    kind = setting.kind
    text_layer = layer == "env"  # environment values are always strings
    if kind in ("int", "bytes"):
        if isinstance(raw, str) and (text_layer or kind == "bytes"):
            try:
                raw = _parse_size(raw) if kind == "bytes" else int(raw.strip().replace("_", ""))
            except ValueError:
                raise ValueError("not an integer") from None
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise ValueError("not an integer")
        assert setting.low is not None and setting.high is not None
        if not setting.low <= raw <= setting.high:
            raise ValueError("out of range")
        return raw
    if kind == "float":
        if isinstance(raw, str) and text_layer:
            try:
                raw = float(raw.strip())
            except ValueError:
                raise ValueError("not a number") from None
        if not isinstance(raw, (int, float)) or isinstance(raw, bool) or not math.isfinite(raw):
            raise ValueError("not a number")
        assert setting.low is not None and setting.high is not None
        if setting.key == "index.compact_deleted_ratio":
            ok = setting.low < raw <= setting.high
        else:
            ok = setting.low <= raw <= setting.high
        if not ok:
            raise ValueError("out of range")
        return float(raw)
    if kind == "bool":
        if isinstance(raw, str) and text_layer:
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError("not a boolean (1/0, true/false, yes/no, on/off)")
        if not isinstance(raw, bool):
            raise ValueError("not true or false")
        return raw
    if kind == "strings":
        if isinstance(raw, str) and text_layer:
            raw = [part.strip() for part in raw.split(",") if part.strip()]
        if not isinstance(raw, (list, tuple)) or not all(isinstance(x, str) and x for x in raw):
            raise ValueError("not a list of non-empty strings")
        return tuple(raw)
    if not isinstance(raw, (str, os.PathLike)) or not str(raw).strip():
        raise ValueError("not a non-empty string")
    text = str(raw).strip() if kind != "path" else os.fspath(raw)
    if kind in ("choice", "mode"):
        if text.lower() not in setting.choices:
            raise ValueError("not an allowed value")
        return text.lower()
    if kind == "address":
        parse_host_port(text)
        return text
    if kind == "path":
        path = Path(text).expanduser()
        if base is not None and not path.is_absolute():
            # Relative paths in a config file are relative to the file, not to wherever the
            # daemon happens to be started from.
            path = base / path
        return path
    return text


def _error(setting: Setting, source: str, raw: Any, why: str) -> str:
    shown = "(hidden)" if setting.secret else repr(raw)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    detail = "" if why in ("out of range", "not an allowed value") else f" ({why})"
    return f"{setting.key} ({source}) must be {setting.allowed()}, got {shown}{detail}"


def did_you_mean(name: str, known: Sequence[str]) -> str:
    """ "; did you mean 'x'?" for the closest known name (also a key in another section)."""
    last = name.rpartition(".")[2]
    same_name = [k for k in known if k.rpartition(".")[2] == last and k != name]
    close = same_name or difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not close:
        # A typo in the key's last part within its section ("index.fsnyc").
        section = name.rpartition(".")[0]
        in_section = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == section]
        near = difflib.get_close_matches(last, in_section, n=1, cutoff=0.6)
        close = [f"{section}.{near[0]}" if section else near[0]] if near else []
    return f"; did you mean {close[0]!r}?" if close else ""


def _flatten_file(data: Mapping[str, Any], path: Path, errors: list[str]) -> dict[str, Any]:
    """The file's tables as dotted keys; unknown sections and keys become errors."""
    flat: dict[str, Any] = {}
    known_keys = [s.key for s in SETTINGS if s.in_file]
    for name, value in data.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                errors.append(f"{name} ({path}) must be a table ([{name}]), got {value!r:.60}")
                continue
            for sub, item in value.items():
                key = f"{name}.{sub}"
                if isinstance(item, dict):
                    errors.append(f"unknown table [{key}] in {path}{did_you_mean(key, known_keys)}")
                elif key in _BY_KEY:
                    flat[key] = item
                else:
                    errors.append(f"unknown key {key!r} in {path}{did_you_mean(key, known_keys)}")
        elif name in _BY_KEY and not isinstance(value, dict):
            flat[name] = value
        elif isinstance(value, dict):
            hint = did_you_mean(name, list(SECTIONS))
            errors.append(f"unknown table [{name}] in {path}{hint}")
        else:
            errors.append(f"unknown key {name!r} in {path}{did_you_mean(name, known_keys)}")
    for key in list(flat):
        if not _BY_KEY[key].in_file:
            errors.append(
                f"{key} cannot be set in a config file ({path}): put it in a file of mode 0600"
                " and set token_file, or use the environment"
            )
            del flat[key]
    return flat


# -- the config file ----------------------------------------------------------------------------


def default_config_path(environ: Mapping[str, str] | None = None) -> Path:
    """``config.toml`` in the platformdirs config dir, or in ``$EDGE_AGENT_HOME`` when set."""
    env = os.environ if environ is None else environ
    if env.get("EDGE_AGENT_HOME"):
        return Path(env["EDGE_AGENT_HOME"]).expanduser() / CONFIG_FILE
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False)) / CONFIG_FILE


def resolve_config_path(
    flag: str | os.PathLike[str] | None, environ: Mapping[str, str] | None = None
) -> tuple[Path, str]:
    """(path, how it was chosen): ``--config`` > ``EDGE_AGENT_CONFIG`` > the default."""
    env = os.environ if environ is None else environ
    if flag:
        return Path(flag).expanduser(), "flag --config"
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]).expanduser(), f"env {CONFIG_ENV}"
    return default_config_path(env), "default"


def _read_file(path: Path, explicit: bool) -> dict[str, Any] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist", path=str(path)) from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}", path=str(path)) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}", path=str(path)) from exc


# -- loading ------------------------------------------------------------------------------------


def _defaults(environ: Mapping[str, str]) -> dict[str, Any]:
    """Built-in defaults that depend on the platform (paths) or on other modules."""
    from .models.default import DEFAULT_MODEL

    # The default of models_dir must not already contain EDGE_AGENT_MODELS_DIR: that is the
    # environment layer, reported as such.
    paths = default_paths({k: v for k, v in environ.items() if k != "EDGE_AGENT_MODELS_DIR"})
    return {
        "socket": paths.default_socket,
        "models_dir": paths.models_dir,
        "index_dir": paths.data_dir / "index",
        "state_dir": paths.data_dir / "hardware",
        "model": DEFAULT_MODEL,
    }


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_flag: str | os.PathLike[str] | None = None,
    *,
    with_profile: bool = False,
    host: HostInfo | None = None,
    profiles: Sequence[Profile] | None = None,
) -> Config:
    """Resolve every setting: flag > environment > config file > hardware profile > default.

    ``flags``: setting key -> value given on the command line (None or absent: not given; a
    ``Flag`` to name the flag). ``with_profile``: probe the host (or use ``host``/``profiles``)
    and fill unset selection and index settings from the matching profile. Raises ConfigError
    listing every problem at once.
    """
    env = os.environ if environ is None else environ
    path, path_source = resolve_config_path(config_flag, env)
    data = _read_file(path, explicit=path_source != "default")
    errors: list[str] = []
    file_values = _flatten_file(data, path, errors) if data is not None else {}
    defaults = _defaults(env)
    values: dict[str, Value] = {}
    for setting in SETTINGS:
        chosen: Value | None = None
        candidates: list[tuple[str, str, Any, Path | None]] = []
        given = (flags or {}).get(setting.key)
        if isinstance(given, Flag):
            if given.value is not None:
                candidates.append(("flag", f"flag {given.name}", given.value, None))
        elif given is not None:
            candidates.append(("flag", f"flag {setting.flag or '--' + setting.key}", given, None))
        if setting.env and env.get(setting.env, "").strip():
            candidates.append(("env", f"env {setting.env}", env[setting.env], None))
        if setting.key in file_values:
            candidates.append(("file", f"file {path}", file_values[setting.key], path.parent))
        for layer, source, raw, base in candidates:
            # Every layer that is present is validated, even when a higher one wins: a broken
            # value in the file should not wait until the flag is dropped to surface.
            try:
                value = _coerce(setting, raw, layer, base)
            except ValueError as exc:
                errors.append(_error(setting, source, raw, str(exc)))
                continue
            if chosen is None:
                chosen = Value(value, source, layer)
        if chosen is None:
            chosen = Value(defaults.get(setting.key, setting.default), "default", "default")
        values[setting.key] = chosen
    if errors:
        if len(errors) == 1:
            raise ConfigError(errors[0], errors=errors, path=str(path))
        listed = "".join(f"\n  - {e}" for e in errors)
        raise ConfigError(
            f"{len(errors)} configuration errors:{listed}", errors=errors, path=str(path)
        )
    warnings = _environment_warnings(env)
    profile, reasons = None, cast(tuple[str, ...], ())
    if with_profile:
        profile, reasons = _apply_profile(values, host, profiles)
    _check_combinations(values)
    return Config(
        values=values,
        path=path,
        path_source=path_source,
        file_found=data is not None,
        profile=profile,
        profile_reasons=reasons,
        warnings=tuple(warnings),
    )


def _check_combinations(values: Mapping[str, Value]) -> None:
    advertise, listen = values["advertise"], values["listen"]
    if advertise.value and listen.value is None:
        raise ConfigError(
            f"advertise ({advertise.source}) needs listen (HOST:PORT): mDNS announces the TCP"
            " endpoint, and there is none",
            key="advertise",
        )


def _environment_warnings(env: Mapping[str, str]) -> list[str]:
    """EDGE_AGENT_* variables that look like a misspelt setting (others may be other tools')."""
    known = [s.env for s in SETTINGS if s.env] + [CONFIG_ENV]
    warnings = []
    for name in sorted(env):
        if not name.startswith("EDGE_AGENT_") or name in known:
            continue
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.88)
        if close:
            warnings.append(
                f"environment variable {name} is not a setting; did you mean {close[0]}?"
            )
    return warnings


def _apply_profile(
    values: dict[str, Value],
    host: HostInfo | None,
    profiles: Sequence[Profile] | None,
) -> tuple[Profile, tuple[str, ...]]:
    """Fill unset selection and index settings from the hardware profile (in place)."""
    from .hardware import probe_host
    from .selection.profiles import load_profiles, match_profile, threads_for

    host = host or probe_host()
    profiles = profiles if profiles is not None else load_profiles()
    pinned = values["profile"]
    match = match_profile(host, profiles, pinned.value if pinned.user_set else None)
    profile = match.profile
    source = f"profile {profile.name}"
    refine = "start-up tuning may replace it with a measured best"
    threads, _ = threads_for(host, profile.threads)
    from_profile: dict[str, tuple[Any, str]] = {
        "profile": (profile.name, "matched to this host"),
        "quant": (None, "chosen at start: " + ", ".join(profile.quants) + ", self-tested"),
        "threads": (threads, refine),
        "embedder.batch_tokens": (profile.batch_tokens, refine),
        "embedder.max_sequences": (profile.max_sequences, refine),
        "embedder.max_context": (profile.max_context, "capped at the model's own maximum"),
        "index.m": (profile.index.m, "new collections"),
        "index.ef_construction": (profile.index.ef_construction, "new collections"),
        "index.ef_search": (profile.index.ef_search, ""),
    }
    for key, (value, note) in from_profile.items():
        if not values[key].user_set:
            values[key] = Value(value, source, "profile", note)
    return profile, match.reasons


# -- docs ---------------------------------------------------------------------------------------


def reference_table() -> str:
    """The Markdown table of every key (docs/configuration.md embeds it verbatim)."""
    lines = [
        "| key | default | allowed | environment | flag | what |",
        "|---|---|---|---|---|---|",
    ]
    shown_defaults = {
        "socket": "`$XDG_RUNTIME_DIR/edge-agent/edge-agent.sock`",
        "models_dir": "`<data dir>/models`",
        "index_dir": "`<data dir>/index`",
        "state_dir": "`<data dir>/hardware`",
        "model": "`all-MiniLM-L6-v2`",
    }
    for s in SETTINGS:
        if s.key in shown_defaults:
            default = shown_defaults[s.key]
        elif s.default is None:
            default = "unset"
        elif isinstance(s.default, bool):
            default = f"`{str(s.default).lower()}`"
        elif isinstance(s.default, str):
            default = f'`"{s.default}"`'
        elif isinstance(s.default, tuple):
            default = "`[]`"
        else:
            default = f"`{_num(s.default)}`"
        if s.key in PROFILE_KEYS:
            default += " (profile)"
        allowed = s.allowed().replace("|", "\\|")
        flag = f"`{s.flag}`" if s.flag else ""
        env = f"`{s.env}`" if s.env else ""
        lines.append(f"| `{s.key}` | {default} | {allowed} | {env} | {flag} | {s.help} |")
    return "\n".join(lines)


# Example values the template shows for settings that are unset by default.
_EXAMPLES: dict[str, Any] = {
    "quant": "Q8_0",
    "profile": "raspberry-pi-4",
    "threads": 4,
    "listen": "127.0.0.1:7878",
    "token_file": "/etc/edge-agent/token",
    "metrics_listen": "127.0.0.1:9464",
    "http": "127.0.0.1:8080",
    "index.exact_search_max": 10000,
    "index.milvus_uri": "http://milvus.lan:19530",
    "index.milvus_token_file": "/etc/edge-agent/milvus.token",
}


def config_template(
    values: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """A config file with every key commented out at its default, or at an example for keys
    that are unset by default; keys in ``values`` (dotted) are written uncommented. What
    ``edge-agent config init`` and ``edge-agent service install`` write."""
    values = values or {}
    defaults = _defaults(os.environ if environ is None else environ)
    out = [
        "# edge-agent configuration. Precedence: flag > environment > this file > hardware",
        "# profile > default. `edge-agent config show` prints the effective values and where",
        "# each came from; docs/configuration.md explains every key.",
    ]
    section = ""
    for s in SETTINGS:
        if not s.in_file:
            continue
        if s.section != section:
            section = s.section
            out += ["", f"[{section}]"]
        out.append("")
        out.append(f"# {s.help}")
        out.append(f"#   {s.allowed()}; env {s.env}")
        if s.key in values:
            out.append(f"{s.name} = {_toml(values[s.key])}")
        elif s.key in _EXAMPLES:
            out.append(f"# {s.name} = {_toml(_EXAMPLES[s.key])}  # example; unset by default")
        else:
            out.append(f"# {s.name} = {_toml(defaults.get(s.key, s.default))}")
    return "\n".join(out) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def flags_from_args(args: Any, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Setting key -> value for every setting with a flag that ``args`` (an argparse
    Namespace) carries and the user gave (None / False = not given)."""
    flags: dict[str, Any] = {}
    for setting in SETTINGS:
        if not setting.flag:
            continue
        dest = (names or {}).get(setting.key) or setting.flag.lstrip("-").replace("-", "_")
        value = getattr(args, dest, None)
        if value is None or value is False:
            continue
        flags[setting.key] = value
    return flags


if __name__ == "__main__":  # regenerate docs/configuration.md's table
    print(reference_table())
