"""``netmoe serve``: run the solver service until SIGTERM.

Every flag can also be set through an environment variable (for containers): ``--metrics-port``
is NETMOE_METRICS_PORT, and so on; a flag on the command line wins over the environment.

Secure defaults: it binds 127.0.0.1 (a sidecar shares its pod's network namespace); any other
address needs --allow-remote. With --auth-token-file (or --auth-token, which `ps` shows) every
call but health checking needs the metadata `authorization: Bearer TOKEN`; --tls-cert and
--tls-key serve TLS, --tls-client-ca requires client certificates (mutual TLS).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from netmoe.server.config import ServerConfig, read_token_file


def boolean(raw: str) -> bool:
    """Environment spelling of a switch: 1/true/yes/on or 0/false/no/off (any case)."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(raw)


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
    ("--process-solve-rows", "process_solve_rows", int,
     "rounds of at least this many samples are solved in a child process (0: never)"),
    ("--max-jobs", "max_jobs", int, "jobs registered at once"),
    ("--max-pending-rounds", "max_pending_rounds", int, "open rounds per job"),
    ("--finished-memory", "finished_memory", int,
     "fallback rounds per job remembered to answer late reports"),
    ("--drain-seconds", "drain_seconds", float,
     "on SIGTERM, seconds of NOT_SERVING health before the server stops accepting RPCs"),
    ("--grace-seconds", "grace_seconds", float, "then, seconds open RPCs get to finish"),
    ("--allow-remote", "allow_remote", boolean,
     "allow binding a non-loopback address (gRPC or metrics)"),
    ("--auth-token", "auth_token", str,
     "shared token; clients send 'authorization: Bearer TOKEN' (visible in ps: prefer the file)"),
    ("--tls-cert", "tls_cert", str, "PEM certificate chain of the server (TLS, with --tls-key)"),
    ("--tls-key", "tls_key", str, "PEM private key of the server"),
    ("--tls-client-ca", "tls_client_ca", str,
     "PEM CA bundle: require client certificates signed by it (mutual TLS)"),
    ("--bind-jobs-to-certs", "bind_jobs_to_certs", boolean,
     "mutual TLS: only clients with the certificate (common name) that registered a job may "
     "act for it"),
    ("--max-world-size", "max_world_size", int, "largest world size a job may register"),
    ("--max-report-cells", "max_report_cells", int,
     "largest samples_per_device x experts of one report"),
    ("--max-job-pending-bytes", "max_job_pending_bytes", int,
     "bytes of reports one job's open rounds may hold"),
    ("--max-pending-bytes", "max_pending_bytes", int,
     "bytes of reports all open rounds may hold"),
    ("--stream-backlog-bytes", "stream_backlog_bytes", int,
     "bytes of plans queued for a stream before its (not reading) client is disconnected"),
    ("--max-streams", "max_streams", int, "open report streams at once"),
    ("--stream-idle-seconds", "stream_idle_seconds", float,
     "seconds a stream may send nothing before it is closed"),
    ("--expert-window-steps", "expert_window_steps", int,
     "latest steps of round counts each job's expert placement window keeps"),
    ("--expert-window-bytes", "expert_window_bytes", int,
     "bytes of round counts each job's expert placement window keeps"),
    ("--expert-max-starts", "expert_max_starts", int,
     "random starts one RecommendExperts may ask for (a fit's time grows with them)"),
    ("--expert-confirmed-bytes", "expert_confirmed_bytes", int,
     "bytes of maps, copies and route tables one ConfirmExperts may put in force (a job keeps "
     "8 versions)"),
]
TOKEN_FILE = "--auth-token-file"


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
        default = "(none)" if name == "auth_token" else defaults[name]
        extra: dict[str, Any] = (
            {"action": "store_const", "const": True} if kind is boolean else {"type": kind}
        )
        parser.add_argument(
            flag, dest=name, default=None,
            help=f"{text} [env {env_name(flag)}, default {default}]", **extra,
        )
    parser.add_argument(
        TOKEN_FILE, dest="auth_token_file", default=None,
        help=f"file holding the shared token (a mounted secret) [env {env_name(TOKEN_FILE)}]",
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
    defaults = {f.name: f.default for f in fields(ServerConfig)}
    values: dict[str, Any] = {}
    for flag, name, kind, _ in _FLAGS:
        value = getattr(args, name, None)
        raw = environ.get(env_name(flag))
        # An empty variable leaves an optional setting unset (compose's ${VAR:-} idiom).
        if value is None and raw is not None and (raw or defaults[name] is not None):
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
    token_file = getattr(args, "auth_token_file", None) or environ.get(env_name(TOKEN_FILE))
    if token_file:
        if "auth_token" in values:
            raise ValueError(f"give the token once: {TOKEN_FILE} (or {env_name(TOKEN_FILE)}) "
                             f"and --auth-token (or NETMOE_AUTH_TOKEN) are both set")
        values["auth_token"] = read_token_file(TOKEN_FILE, token_file)
    return ServerConfig(**values)


def run(args: argparse.Namespace) -> int:
    import logging

    from netmoe.server.app import serve

    source, level = "--log-level", args.log_level
    if level is None:
        source, level = env_name("--log-level"), os.environ.get(env_name("--log-level"), "INFO")
    names = [n for n in logging.getLevelNamesMapping() if n not in ("NOTSET", "WARN", "FATAL")]
    if level.upper() not in names:
        raise ValueError(f"{source}={level!r} is not a log level (one of {', '.join(names)})")
    config = config_from_args(args)
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    return serve(config)
