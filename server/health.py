"""``netmoe health``: gRPC health probe of a running service (Docker HEALTHCHECK, kubelet exec).

Exit code 0 when the service answers SERVING within the timeout, 1 otherwise (NOT_SERVING while
draining, unreachable, TLS or auth failure), 2 for bad options. The address (--server) defaults
to 127.0.0.1:$NETMOE_PORT, so a container probes whatever port its server was configured with.
The token options read the same variables as ``netmoe serve``; TLS options have their own
(NETMOE_HEALTH_TLS_*), since the probe is a client and verifies the server.
"""

from __future__ import annotations

import argparse
import os
import sys

from netmoe.server.config import check_token, read_token_file

DEFAULT_PORT = "50051"

# (flag, environment variable, help)
_OPTIONS: list[tuple[str, str, str]] = [
    ("--auth-token", "NETMOE_AUTH_TOKEN", "bearer token (not needed by health; sent if given)"),
    ("--auth-token-file", "NETMOE_AUTH_TOKEN_FILE", "file holding the bearer token"),
    ("--tls-ca", "NETMOE_HEALTH_TLS_CA", "PEM CA that signed the server certificate: use TLS"),
    ("--tls-cert", "NETMOE_HEALTH_TLS_CERT", "PEM client certificate (mutual TLS)"),
    ("--tls-key", "NETMOE_HEALTH_TLS_KEY", "PEM client key (mutual TLS)"),
    ("--tls-server-name", "NETMOE_HEALTH_TLS_SERVER_NAME",
     "name to check the server certificate against (default: the host of --server)"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "health", help="probe a running service's gRPC health (exit 0 if SERVING)",
        description=__doc__,
    )
    parser.add_argument(
        "--server", default=None, metavar="HOST:PORT",
        help="the service [env NETMOE_HEALTH_SERVER, default 127.0.0.1:$NETMOE_PORT "
             f"or 127.0.0.1:{DEFAULT_PORT}]",
    )
    parser.add_argument("--service", default="",
                        help="service name to check (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    for flag, env, text in _OPTIONS:
        parser.add_argument(flag, default=None, help=f"{text} [env {env}]")
    parser.set_defaults(func=run)


def _option(args: argparse.Namespace, flag: str, env: str) -> str | None:
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    return value if value is not None else os.environ.get(env) or None


def _read(flag: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"{flag}={path!r} cannot be read: {err}") from None


def _env_port() -> str:
    raw = os.environ.get("NETMOE_PORT") or DEFAULT_PORT
    if not raw.isdigit() or not 0 < int(raw) <= 65535:
        raise ValueError(f"NETMOE_PORT={raw!r} is not a port (1..65535)")
    return raw


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    opts = {flag: _option(args, flag, env) for flag, env, _ in _OPTIONS}
    addr = args.server or os.environ.get("NETMOE_HEALTH_SERVER") or f"127.0.0.1:{_env_port()}"
    if not args.timeout > 0:
        raise ValueError(f"--timeout must be positive, got {args.timeout}")
    token, token_file = opts["--auth-token"], opts["--auth-token-file"]
    if token is not None and token_file is not None:
        raise ValueError("give the token once: --auth-token and --auth-token-file are both set")
    if token_file is not None:
        token = read_token_file("--auth-token-file", token_file)
    elif token is not None:
        check_token("--auth-token", token)
    if (opts["--tls-cert"] is None) != (opts["--tls-key"] is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if opts["--tls-cert"] is not None and opts["--tls-ca"] is None:
        raise ValueError("--tls-cert needs --tls-ca (client certificates only exist over TLS)")

    if opts["--tls-ca"] is None:
        channel = grpc.insecure_channel(addr)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read("--tls-ca", opts["--tls-ca"]),
            private_key=_read("--tls-key", opts["--tls-key"]),
            certificate_chain=_read("--tls-cert", opts["--tls-cert"]),
        )
        name = opts["--tls-server-name"]
        options = [] if name is None else [("grpc.ssl_target_name_override", name)]
        channel = grpc.secure_channel(addr, creds, options=options)
    metadata = [] if token is None else [("authorization", f"Bearer {token}")]
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout,
                metadata=metadata,
            )
        except grpc.RpcError as err:
            print(f"netmoe health: {addr}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"netmoe health: {addr}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
