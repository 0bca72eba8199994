"""Configuration of one server instance (no heavy imports: ``netmoe serve --help`` reads it)."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


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
    solver_threads: int = 1
    max_jobs: int = 64
    max_pending_rounds: int = 16
    finished_memory: int = 256
    drain_seconds: float = 0.0
    grace_seconds: float = 5.0

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError(f"host must be a non-empty address, got {self.host!r}")
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is None and name == "metrics_port":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
                raise ValueError(f"{name} must be an integer port in [0, 65535], got {value!r}")
        for name in ("max_message_bytes", "solver_threads", "max_jobs", "max_pending_rounds",
                     "finished_memory"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("keepalive_time_s", "keepalive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
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
        ]
