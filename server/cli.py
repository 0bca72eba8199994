"""``netmoe serve``: run the solver service until SIGTERM.

Every flag can also be set through an environment variable (for containers): ``--metrics-port``
is NETMOE_METRICS_PORT, and so on; a flag on the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from netmoe.server.config import ServerConfig

# (flag, ServerConfig field, parser of the value, help)
_FLAGS: list[tuple[str, str, Callable[[str], Any], str]] = [
    ("--host", "host", str, "address to bind the gRPC port to"),
    ("--port", "port", int, "gRPC port (0: ephemeral)"),
    ("--metrics-host", "metrics_host", str, "address of the metrics endpoint (default: --host)"),
    ("--metrics-port", "metrics_port", int, "Prometheus /metrics port (0: ephemeral, -1: off)"),
    ("--max-message-bytes", "max_message_bytes", int, "largest gRPC message accepted or sent"),
    ("--keepalive-time", "keepalive_time_s", float, "seconds between keepalive pings"),
    ("--keepalive-timeout", "keepalive_timeout_s", float, "seconds to wait for a ping ack"),
    ("--solver-threads", "solver_threads", int, "threads solving rounds in parallel"),
    ("--max-jobs", "max_jobs", int, "jobs registered at once"),
    ("--max-pending-rounds", "max_pending_rounds", int, "open rounds per job"),
    ("--finished-memory", "finished_memory", int,
     "fallback rounds per job remembered to answer late reports"),
    ("--drain-seconds", "drain_seconds", float,
     "on SIGTERM, seconds of NOT_SERVING health before the server stops accepting RPCs"),
    ("--grace-seconds", "grace_seconds", float, "then, seconds open RPCs get to finish"),
]


def env_name(flag: str) -> str:
    return "NETMOE_" + flag.lstrip("-").replace("-", "_").upper()


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = {f.name: f.default for f in fields(ServerConfig)}
    parser = subparsers.add_parser(
        "serve",
        help="run the placement solver service (gRPC + Prometheus metrics)",
        description=__doc__,
    )
    for flag, name, kind, text in _FLAGS:
        default = defaults[name]
        parser.add_argument(
            flag, dest=name, type=kind, default=None,
            help=f"{text} [env {env_name(flag)}, default {default}]",
        )
    parser.add_argument(
        "--log-level", default=None,
        help=f"logging level [env {env_name('--log-level')}, default INFO]",
    )
    parser.set_defaults(func=run)


def config_from_args(
    args: argparse.Namespace, environ: dict[str, str] | None = None
) -> ServerConfig:
    """ServerConfig from flags, then NETMOE_* variables, then defaults. ValueError names the
    flag or variable and the value."""
    environ = dict(os.environ) if environ is None else environ
    values: dict[str, Any] = {}
    for flag, name, kind, _ in _FLAGS:
        value = getattr(args, name, None)
        if value is None and env_name(flag) in environ:
            raw = environ[env_name(flag)]
            try:
                value = kind(raw)
            except ValueError:
                raise ValueError(
                    f"{env_name(flag)}={raw!r} is not a valid {kind.__name__}"
                ) from None
        if value is not None:
            values[name] = value
    if values.get("metrics_port") == -1:
        values["metrics_port"] = None
    return ServerConfig(**values)


def run(args: argparse.Namespace) -> int:
    import logging

    from netmoe.server.app import serve

    level = args.log_level or os.environ.get(env_name("--log-level"), "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    return serve(config_from_args(args))
