"""`netmoe serve`: flags and NETMOE_* variables, and the real command started, probed, SIGTERMed."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from netmoe.app.cli import build_parser
from netmoe.server.cli import config_from_args, env_name
from netmoe.server.config import ServerConfig


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_flags_then_environment_then_defaults() -> None:
    env = {"NETMOE_PORT": "6000", "NETMOE_METRICS_PORT": "-1", "NETMOE_GRACE_SECONDS": "2.5"}
    cfg = config_from_args(parse("--port", "7000", "--max-jobs", "3"), env)
    assert cfg.port == 7000  # the flag wins over NETMOE_PORT
    assert cfg.metrics_port is None  # -1 disables the endpoint
    assert cfg.grace_seconds == 2.5 and cfg.max_jobs == 3
    assert cfg.host == ServerConfig().host == "127.0.0.1"
    assert env_name("--max-pending-rounds") == "NETMOE_MAX_PENDING_ROUNDS"


def test_bad_values_name_the_variable_or_field() -> None:
    with pytest.raises(ValueError, match=r"NETMOE_PORT='http' is not a valid int"):
        config_from_args(parse(), {"NETMOE_PORT": "http"})
    with pytest.raises(ValueError, match=r"port must be an integer port in \[0, 65535\], got 7"):
        config_from_args(parse("--port", "70000"), {})
    with pytest.raises(ValueError, match="solver_threads must be a positive integer, got 0"):
        config_from_args(parse(), {"NETMOE_SOLVER_THREADS": "0"})
    with pytest.raises(ValueError, match="process_solve_rows must be a non-negative integer, "
                                         "got -1"):
        config_from_args(parse("--process-solve-rows", "-1"), {})
    assert config_from_args(parse("--process-solve-rows", "0"), {}).process_solve_rows == 0


def test_serve_listens_answers_and_drains_on_sigterm() -> None:
    env = {**os.environ, "NETMOE_METRICS_PORT": "0", "NETMOE_GRACE_SECONDS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "netmoe.app.cli", "serve", "--port", "0"],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True)
    reader.start()
    try:
        log = ""
        while "metrics on" not in log:
            log += lines.get(timeout=30)
        match = re.search(r"gRPC on 127\.0\.0\.1:(\d+) \(plaintext\), metrics on "
                          r"(http://127\.0\.0\.1:\d+/metrics)", log)
        assert match, log
        with grpc.insecure_channel(f"127.0.0.1:{match[1]}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(match[2], timeout=10) as resp:
            assert b"grpc_server_handled_total" in resp.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        reader.join(10)  # stderr is at EOF once the process exited
        rest = ""
        while not lines.empty():
            rest += lines.get()
        assert "got SIGTERM" in rest and "draining" in rest and "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
