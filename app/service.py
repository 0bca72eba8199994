"""The placement service a command trains against: one given by --server, checked before any
work starts, or an embedded one that lives as long as the command."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# grpc.health.v1.HealthCheckResponse{status: SERVING} on the wire (field 1, varint 1): the check
# needs no grpcio-health-checking, which a trainer's install (netmoe[client]) lacks.
_SERVING = b"\x08\x01"


def check_server(address: str, timeout: float = 5.0) -> None:
    """ValueError naming --server and address unless a gRPC service there answers a health check
    SERVING within ``timeout`` seconds, over the channel the training ranks use (TLS when
    $NETMOE_TLS_CA is set, see netmoe.client.placement_client.channel_to)."""
    import grpc

    from netmoe.client.placement_client import channel_to

    env = os.environ.get
    with channel_to(address, tls_ca=env("NETMOE_TLS_CA"), tls_cert=env("NETMOE_TLS_CLIENT_CERT"),
                    tls_key=env("NETMOE_TLS_CLIENT_KEY")) as channel:
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        try:
            reply = check(b"", timeout=timeout)  # an empty HealthCheckRequest: the whole server
        except grpc.RpcError as err:
            raise ValueError(f"--server {address}: no placement service answers there "
                             f"({err.code().name}: {err.details()})") from None
    if reply != _SERVING:
        raise ValueError(f"--server {address}: the service there is not SERVING (health reply "
                         f"{reply!r})")


@contextmanager
def placement_service(address: str) -> Iterator[tuple[str, str]]:
    """(address, metrics URL) the placement runs use: `address` as given (no URL; check it with
    check_server first), or, when it is empty, an embedded service that lives as long as the
    block."""
    if address:
        yield address, ""
        return
    from netmoe.server.app import start
    from netmoe.server.config import ServerConfig

    # No health probe watches an embedded service: it stops without a drain.
    handle = start(ServerConfig(port=0, metrics_port=0, drain_seconds=0.0))
    try:
        yield handle.address, f"http://127.0.0.1:{handle.metrics_port}/metrics"
    finally:
        handle.stop()
