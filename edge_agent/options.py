"""What the daemon is told: ``ServeOptions`` (and the engine scheduler's ``ServiceConfig``).

Plain, validated values with their defaults. ``edge_agent.config`` builds them from flags,
the environment and the config file; ``edge_agent.daemon.app`` consumes them. Below both, so
configuration does not import the daemon it configures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .embedding.embedder import EmbedderConfig
from .errors import InvalidArgument
from .index.config import IndexConfig
from .models.default import DEFAULT_MODEL
from .selection.choose import Override

__all__ = ["ServeOptions", "ServiceConfig"]


@dataclass(frozen=True)
class ServiceConfig:
    max_queue: int = 256  # embed requests waiting for the engine; more are refused OVERLOADED
    # How long the first request of a batch waits for company, when the previous batch served
    # several requests (under concurrency); a lone client's requests go to the engine at once.
    batch_window_s: float = 0.002
    batch_max_texts: int = 256  # texts per engine call
    reservoir_size: int = 1024  # latency samples kept per method
    # Engine time of one call: larger requests are cut into slices of about this much work,
    # so a query waits behind one slice of a bulk add, not behind the whole request.
    slice_s: float = 0.025
    # Query-kind calls that may go ahead of waiting document work in a row before one
    # document slice runs: bulk indexing slows down while people search, but never stops.
    query_streak: int = 8
    # An engine call that takes longer than floor + factor x its estimated work is killed
    # (the child restarts; that call fails with ENGINE_ERROR, queued requests continue).
    call_deadline_floor_s: float = 2.0
    call_deadline_factor: float = 10.0
    # An idle engine child is asked to answer a ping this often (0: never); one that does not
    # answer within call_deadline_floor_s is killed and restarted before a request needs it.
    liveness_interval_s: float = 1.0
    # While the engine runs document work, query-kind requests go to a second engine process
    # with one thread (started when a query meets document work, stopped after
    # query_lane_idle_s without any): a search never waits behind a document's engine time.
    query_lane: bool = True
    query_lane_idle_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_queue <= 1_000_000:
            raise InvalidArgument(f"max_queue must be in [1, 1000000], got {self.max_queue!r}")
        if not 0 <= self.batch_window_s <= 1:
            raise InvalidArgument(f"batch_window_s must be in [0, 1], got {self.batch_window_s!r}")
        if self.batch_max_texts < 1 or self.reservoir_size < 1:
            raise InvalidArgument("batch_max_texts and reservoir_size must be positive")
        if not 1 <= self.query_streak <= 1_000_000:
            raise InvalidArgument(
                f"query_streak must be in [1, 1000000], got {self.query_streak!r}"
            )
        for name, low, high in (
            ("slice_s", 0.001, 60.0),
            ("call_deadline_floor_s", 0.1, 3600.0),
            ("call_deadline_factor", 1.0, 1000.0),
            ("liveness_interval_s", 0.0, 3600.0),
            ("query_lane_idle_s", 1.0, 3600.0),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise InvalidArgument(f"{name} must be in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class ServeOptions:
    socket_path: Path
    models_dir: Path
    model: str = DEFAULT_MODEL
    quant: str | None = None
    embedder: EmbedderConfig = field(default_factory=EmbedderConfig)
    max_message_bytes: int = 8 << 20
    max_connections: int = 64
    max_queue: int = ServiceConfig.max_queue  # wins over service.max_queue
    # The engine call scheduler: slices, query priority, deadlines, liveness (max_queue above
    # wins over its own).
    service: ServiceConfig = field(default_factory=ServiceConfig)
    # How long a stop waits for in-flight requests before answering them SHUTTING_DOWN.
    shutdown_grace: float = 10.0
    # Run llama.cpp in a child process (edge_agent.embedding.worker): an engine abort then fails the
    # requests in flight and restarts the child instead of killing the daemon.
    isolate_engine: bool = True
    # Choose quant/threads/batch from the hardware probe, profiles and measurements, and
    # self-test the chosen file in a child before serving
    # (edge_agent.selection.selftest.safe_start).
    # False: open ``quant`` (or the manifest's default) with ``embedder`` as given.
    select_model: bool = True
    override: Override | None = None  # what the user pinned (flag > env > config file)
    state_dir: Path | None = None  # tuning results + known-bad files; None: data dir/hardware
    tune_budget_s: float | None = 20.0  # first-start tuning; None skips it
    # Collections live here (edge_agent.index); None: the platformdirs data dir / "index".
    index_dir: Path | None = None
    index: IndexConfig = field(default_factory=IndexConfig)
    # TCP besides the Unix socket: "HOST:PORT" ("127.0.0.1:7878", "[::1]:0", "0.0.0.0:7878").
    # A non-loopback HOST refuses to start without an auth token (like Redis' protected mode).
    listen: str | None = None
    auth_token_file: Path | None = None  # the token's file (0600); env EDGE_AGENT_TOKEN also
    auth_token: str | None = None  # resolved token; wins over auth_token_file
    auth_timeout: float = 10.0  # seconds a TCP peer has to authenticate before it is dropped
    # Pre-auth admission (edge_agent.daemon.server): a TCP peer that must authenticate is dropped if
    # it sends nothing for first_byte_timeout seconds; at most max_preauth_per_source such
    # connections per source address and max_preauth_connections in all.
    first_byte_timeout: float = 3.0
    max_preauth_connections: int = 16
    max_preauth_per_source: int = 8
    # Seconds a connection (Unix, or authenticated TCP) may stay idle before it is closed; 0:
    # never (idle ones still make room for new clients when every slot is taken).
    idle_timeout: float = 300.0
    # Announce the TCP endpoint on the LAN with zeroconf (edge_agent.lan.discovery); needs listen.
    advertise: bool = False
    advertise_interfaces: tuple[str, ...] = ()  # addresses/interfaces to announce on; () = all
    # Prometheus text exposition at http://HOST:PORT/metrics (edge_agent.daemon.metrics); None: off.
    metrics_listen: str | None = None
    # OpenAI-compatible embeddings, the REST API and the search page (edge_agent.daemon.http) at
    # http://HOST:PORT/; same protected mode as listen. None: off.
    http_listen: str | None = None
    # The Unix socket's permissions: 0o660 lets the socket's group connect (a system service
    # whose clients are in its group); anything wider is refused.
    socket_mode: int = 0o600
