"""`netmoe serve` refuses ports another server holds (no second server through SO_REUSEPORT)."""

from __future__ import annotations

import signal
import subprocess
import sys
from concurrent import futures

import pytest

from netmoe.app.cli import main
from netmoe.server.app import PortUnavailable, start
from netmoe.server.config import ServerConfig


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netmoe.app.cli", "serve", *args],
                          capture_output=True, text=True, timeout=60)


def test_a_second_server_on_a_taken_port_exits_2_and_the_first_keeps_serving() -> None:
    with start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=0)) as first:
        out = serve("--port", str(first.port), "--metrics-port", "-1")
        assert out.returncode == 2, out.stderr
        assert out.stderr.splitlines() == [
            f"netmoe serve: error: --port {first.port}: cannot listen on "
            f"127.0.0.1:{first.port}: another process listens there"]
        out = serve("--port", "0", "--metrics-port", str(first.metrics_port))
        assert out.returncode == 2, out.stderr
        assert out.stderr.splitlines() == [
            f"netmoe serve: error: --metrics-port {first.metrics_port}: cannot listen on "
            f"127.0.0.1:{first.metrics_port}: another process listens there"]
        # In one process too: the embedded server refuses the port rather than sharing it.
        with pytest.raises(PortUnavailable, match=f"--port {first.port}: cannot listen"):
            start(ServerConfig(port=first.port, metrics_port=None))
        assert main(["health", "--server", first.address, "--timeout", "5"]) == 0


def test_the_servers_socket_cannot_be_shared_even_by_a_reuseport_server() -> None:
    """Without grpc.so_reuseport 0 a plain gRPC server (SO_REUSEPORT on by default) would bind
    the same port next to ours and take half of the connections."""
    import grpc

    with start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None)) as first:
        other = grpc.server(futures.ThreadPoolExecutor(1))
        try:
            with pytest.raises(RuntimeError, match="Failed to bind"):
                other.add_insecure_port(first.address)
        finally:
            other.stop(None)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 0), (signal.SIGINT, 130)])
def test_startup_log_and_exit_codes_of_a_stop(sig: signal.Signals, code: int) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "netmoe.app.cli", "serve", "--port", "0",
                             "--metrics-port", "-1", "--grace-seconds", "1"],
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        line = ""
        while "gRPC on" not in line:
            line = proc.stderr.readline()
            assert line, "server exited"
    finally:
        proc.send_signal(sig)
        rest = proc.communicate(timeout=30)[1]
    assert line.rstrip().endswith("(plaintext), metrics disabled")
    assert proc.returncode == code, rest
    assert "Traceback" not in rest and "netmoe serve: stopped" in rest
