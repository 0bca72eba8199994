"""Configuration of one server instance (no heavy imports: ``netmoe serve --help`` reads it)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def check_token(name: str, token: str) -> str:
    """The token must fit in an HTTP/2 header value after 'Bearer '."""
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ValueError(f"{name} must be non-empty printable ASCII without spaces, "
                         f"got {len(token)} characters")
    return token


def read_token_file(name: str, path: str) -> str:
    """The token stored in a file (one line; a trailing newline is ignored). ValueError names
    the option and the path."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{name}={path!r} cannot be read: {err}") from None
    return check_token(f"the token in {name}={path!r}", text.rstrip("\r\n"))


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``netmoe serve`` can set. metrics_port None disables the metrics endpoint;
    port 0 (either) picks an ephemeral port. metrics_host None means the gRPC host."""

    host: str = "127.0.0.1"
    port: int = 50051
    metrics_host: str | None = None
    metrics_port: int | None = 9464
    max_message_bytes: int = 16 * MiB
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    solver_threads: int = 4  # solves in parallel, shared evenly among the registered jobs
    # Rounds of at least this many samples are solved in a child process of their solver
    # thread (min-cost flow holds the GIL); 0: every round in the server's process.
    process_solve_rows: int = 2048
    max_jobs: int = 64
    max_pending_rounds: int = 16
    finished_memory: int = 256
    drain_seconds: float = 1.0  # a 1 s health probe sees NOT_SERVING before RPCs stop
    grace_seconds: float = 5.0
    # Security. Binding a non-loopback address (gRPC or metrics) needs allow_remote.
    allow_remote: bool = False
    auth_token: str | None = field(default=None, repr=False)  # never in logs
    tls_cert: str | None = None  # PEM files; cert and key together enable TLS
    tls_key: str | None = None
    tls_client_ca: str | None = None  # requires client certificates signed by it (mutual TLS)
    # With mutual TLS: a job belongs to the certificate (common name) that registered it.
    bind_jobs_to_certs: bool = False
    # Limits on what one job may ask of the server.
    max_world_size: int = 1024
    max_report_cells: int = 1 << 20  # samples_per_device x experts of one report
    # Memory held for clients, in bytes and streams.
    max_job_pending_bytes: int = 256 * MiB  # reports of one job's open rounds
    max_pending_bytes: int = 1024 * MiB  # reports of all open rounds
    stream_backlog_bytes: int = 8 * MiB  # plans queued for a stream whose client does not read
    max_streams: int = 4096
    stream_idle_seconds: float = 600.0  # a stream that sends nothing for this long is closed
    # Expert placement window per job (netmoe.server.advisor.WindowLimits).
    expert_window_steps: int = 32
    expert_window_bytes: int = 32 * MiB
    # What one RecommendExperts / ConfirmExperts may ask (netmoe.server.advisor.WindowLimits).
    expert_max_starts: int = 64
    expert_confirmed_bytes: int = 64 * MiB

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError(f"host must be a non-empty address, got {self.host!r}")
        for name in ("host", "metrics_host"):
            value = getattr(self, name)
            if value is not None and not is_loopback(value) and not self.allow_remote:
                raise ValueError(
                    f"{name}={value!r} is not a loopback address; binding it exposes the service "
                    f"to other machines and needs allow_remote (--allow-remote, "
                    f"NETMOE_ALLOW_REMOTE=1)"
                )
        if self.auth_token is not None:
            check_token("auth_token", self.auth_token)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"tls_cert and tls_key go together, got tls_cert={self.tls_cert!r} "
                             f"and tls_key={self.tls_key!r}")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(f"tls_client_ca={self.tls_client_ca!r} needs tls_cert and tls_key "
                             f"(mutual TLS is TLS first)")
        if self.bind_jobs_to_certs and self.tls_client_ca is None:
            raise ValueError("bind_jobs_to_certs needs mutual TLS (tls_client_ca, tls_cert and "
                             "tls_key): jobs are bound to client certificates")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is None and name == "metrics_port":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise ValueError(f"{name} must be an integer port in [0, 65535], got {value!r}")
        if self.port and self.metrics_port == self.port and self.metrics_host in (None, self.host):
            raise ValueError(f"metrics_port={self.metrics_port} equals port: the metrics endpoint "
                             f"needs a port of its own")
        for name in ("max_message_bytes", "solver_threads", "max_jobs", "max_pending_rounds",
                     "finished_memory", "max_world_size", "max_report_cells",
                     "max_job_pending_bytes", "max_pending_bytes", "stream_backlog_bytes",
                     "max_streams",
                     "expert_window_steps", "expert_window_bytes", "expert_max_starts",
                     "expert_confirmed_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("keepalive_time_s", "keepalive_timeout_s", "stream_idle_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        rows = self.process_solve_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"process_solve_rows must be a non-negative integer, got {rows!r}")
        for name in ("drain_seconds", "grace_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)!r}")

    def grpc_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            # Workers may ping idle streams between steps; do not GOAWAY them for it.
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Off: with SO_REUSEPORT a second server on a taken port starts and splits the jobs.
            ("grpc.so_reuseport", 0),
        ]
