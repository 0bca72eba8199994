"""Every row of issue 11's bad-input table, through the real console command: exit code 2 and
one line on stderr naming the flag, variable or field and the value, never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from support import free_port

FLAME = Path(__file__).parents[1] / "fixtures" / "flame_290m_2048tok_layers2-9.npz"


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another socket listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def text_file(d: Path) -> list[str]:
    (d / "t.npz").write_text("topk_ids,sample_ids\n1,2\n")
    return ["evaluate", "--trace", str(d / "t.npz"), "--tokens-per-sample", "4"]


def random_bytes(d: Path) -> list[str]:
    (d / "r.npz").write_bytes(np.random.default_rng(0).bytes(4096))
    return ["evaluate", "--trace", str(d / "r.npz"), "--tokens-per-sample", "4"]


def truncated(d: Path) -> list[str]:
    (d / "cut.npz").write_bytes(FLAME.read_bytes()[:40_000])
    return ["evaluate", "--trace", str(d / "cut.npz"), "--tokens-per-sample", "64"]


def npy(d: Path) -> list[str]:
    np.save(d / "t.npy", np.zeros((2, 8, 2), dtype=np.int64))
    return ["evaluate", "--trace", str(d / "t.npy"), "--tokens-per-sample", "4"]


def object_array(d: Path) -> list[str]:
    np.savez(d / "obj.npz", topk_ids=np.array([[1, None]], dtype=object))
    return ["evaluate", "--trace", str(d / "obj.npz"), "--tokens-per-sample", "1"]


def huge_expert_id(d: Path, *extra: str) -> list[str]:
    topk = np.zeros((2, 64, 2), dtype=np.int64)
    topk[1, 5, 0] = 10**9
    np.savez(d / "huge.npz", topk_ids=topk)
    return ["evaluate", "--trace", str(d / "huge.npz"), "--tokens-per-sample", "8", *extra]


def garbage_tls(d: Path) -> list[str]:
    (d / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    (d / "key.pem").write_bytes(b"\x00\x01garbage")
    return ["serve", "--port", "0", "--metrics-port", "-1", "--tls-cert", str(d / "cert.pem"),
            "--tls-key", str(d / "key.pem")]


def fixed(*args: str) -> Callable[[Path], list[str]]:
    return lambda d: list(args)


# (id, arguments from a scratch folder, extra environment, words the one line must hold)
ROWS: list[tuple[str, Callable[[Path], list[str]], dict[str, str], list[str]]] = [
    ("text-file-trace", text_file, {}, ["t.npz", "is not an .npz archive"]),
    ("random-bytes-trace", random_bytes, {}, ["r.npz", "is not an .npz archive"]),
    ("truncated-npz", truncated, {}, ["cut.npz", "truncated"]),
    ("npy-not-npz", npy, {}, ["t.npy", "single .npy array, not an .npz"]),
    ("object-array", object_array, {}, ["obj.npz", "topk_ids", "without pickle"]),
    ("expert-id-1e9", huge_expert_id, {}, ["topk_ids names expert 1000000000", "exceed"]),
    ("expert-id-1e9-experts", lambda d: huge_expert_id(d, "--experts", "64"), {},
     ["--experts 64", "expert 1000000000"]),
    ("experts-0", lambda d: ["evaluate", "--trace", str(FLAME), "--experts", "0"], {},
     ["--experts", "'0'"]),
    ("metrics-port-in-use", None, {}, ["--metrics-port", "another process listens"]),  # fixture
    ("metrics-port-equals-port", fixed("serve", "--port", "50123", "--metrics-port", "50123"),
     {}, ["metrics_port=50123 equals port"]),
    ("garbage-tls-cert", garbage_tls, {}, ["--tls-cert", "cert.pem", "not a PEM certificate"]),
    ("log-level-loud", fixed("serve", "--port", "0"), {"NETMOE_LOG_LEVEL": "LOUD"},
     ["NETMOE_LOG_LEVEL='LOUD'", "not a log level"]),
    ("netmoe-port-abc", fixed("health"), {"NETMOE_PORT": "abc"}, ["NETMOE_PORT='abc'"]),
    ("bench-solver-devices-0", fixed("bench", "solver", "--devices", "0"), {},
     ["--devices", "'0'"]),
    ("bench-solver-repeats-0", fixed("bench", "solver", "--repeats", "0"), {},
     ["--repeats", "'0'"]),
    ("bench-service-rounds-0", fixed("bench", "service", "--rounds", "0"), {},
     ["--rounds", "'0'"]),
    ("bench-solver-samples-63", fixed("bench", "solver", "--samples", "63"), {},
     ["--samples 63", "fits none of --devices"]),
    ("bench-service-nodes-0", fixed("bench", "service", "--nodes", "0"), {},
     ["--nodes", "'0'"]),
    ("bench-service-ep-size-3", fixed("bench", "service", "--ep-size", "3"), {},
     ["--ep-size 3", "ep_size=3 does not divide world_size=32"]),
    ("bench-service-server-unreachable", None, {}, ["--server 127.0.0.1:", "no placement"]),
    ("bench-service-services-3-of-2-groups",
     fixed("bench", "service", "--services", "3", "--ep-size", "16"), {},
     ["--services 3", "more services than the 2 EP groups", "--ep-size 16"]),
    ("bench-service-services-embedded",
     fixed("bench", "service", "--services", "2", "--ep-size", "16", "--embedded"), {},
     ["--services 2", "excludes --embedded"]),
]


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netmoe.app.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env})


@pytest.mark.parametrize(("make", "env", "words"), [row[1:] for row in ROWS],
                         ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line_and_exit_2(
    request: pytest.FixtureRequest, tmp_path: Path, make: Callable[[Path], list[str]] | None,
    env: dict[str, str], words: list[str],
) -> None:
    if make is None:  # rows that need a port
        if "metrics" in request.node.callspec.id:
            port = request.getfixturevalue("taken_port")
            args = ["serve", "--port", "0", "--metrics-port", str(port)]
        else:
            args = ["bench", "service", "--server", f"127.0.0.1:{free_port()}"]
    else:
        args = make(tmp_path)
    out = run_cli(args, env)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("netmoe ") and ": error: " in lines[0]
    for word in words:
        assert word in lines[0]
    assert out.stdout == ""
