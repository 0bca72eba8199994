"""Runs the J training ranks of a TrainConfig as local processes on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from netmoe.client.train import TrainConfig


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_ranks(cfg: TrainConfig, timeout: float = 600.0) -> list[dict[str, Any]]:
    """Starts cfg.world processes of ``python -m netmoe.client.train``; returns their results
    ordered by rank. Raises RuntimeError (with the failing rank's stderr) if any rank fails;
    every process is gone when this returns."""
    config = json.dumps(dataclasses.asdict(cfg))
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="netmoe-ranks-") as tmp:
        procs = []
        for rank in range(cfg.world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(cfg.world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=str(cfg.threads))  # fmt: skip
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            err = open(Path(tmp) / f"rank{rank}.err", "w+")  # noqa: SIM115 (closed below)
            cmd = [sys.executable, "-m", "netmoe.client.train", "--config", config,
                   "--out", str(Path(tmp) / f"rank{rank}.json")]  # fmt: skip
            procs.append((subprocess.Popen(cmd, env=env, stdout=err, stderr=err), err))
        deadline = time.monotonic() + timeout
        failed: list[tuple[int, str]] = []
        try:
            while any(p.poll() is None for p, _ in procs):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"training ranks did not finish within {timeout:.0f} s")
                if any(p.returncode not in (None, 0) for p, _ in procs):
                    break  # one rank died: the others would hang in a collective
                time.sleep(0.05)
            for rank, (p, err) in enumerate(procs):
                if p.poll() not in (None, 0):
                    err.seek(0)
                    failed.append((rank, err.read()[-3000:]))
            if failed:
                rank, text = failed[0]
                raise RuntimeError(f"training rank {rank} failed:\n{text}")
            return [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(cfg.world)]
        finally:
            for p, err in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
                err.close()
