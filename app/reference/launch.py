"""Runs the J training ranks of a TrainConfig as local processes on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from netmoe.app.reference.results import RankResult
from netmoe.app.reference.train import PROGRESS_FILE, TrainConfig


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Interrupts:
    """While active, SIGTERM raises KeyboardInterrupt like SIGINT does, so cleanup in finally
    blocks runs (by default SIGTERM ends the process and would orphan the ranks).

    Inside ``deferred()`` both signals only take note and raise when it ends: an interrupt
    between a rank's fork and its Popen returning would leave a rank nobody knows of.
    """

    def __init__(self) -> None:
        self._defer = False
        self._pending: int | None = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self._defer:
            self._pending = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    @contextmanager
    def active(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._defer = True
        try:
            yield
        finally:
            self._defer = False
        if self._pending is not None:
            raise KeyboardInterrupt(f"signal {self._pending}")


def _steps_done(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def run_ranks(
    cfg: TrainConfig, stall_seconds: float = 600.0,
    progress: Callable[[int], None] | None = None, module: str = "netmoe.app.reference.train",
) -> list[RankResult]:
    """Starts cfg.world processes of ``python -m MODULE --config JSON --out FILE`` (any config
    dataclass with ``world`` and ``threads``; FILE gets the rank's RankResult JSON); returns
    their results ordered by rank (ValueError naming the field when a FILE does not match
    RankResult). Every rank writes the steps it has finished to $NETMOE_PROGRESS_FILE (its own
    file). Raises RuntimeError (with the failing rank's stderr) if any rank fails, or when no
    rank finished a step for ``stall_seconds`` (a run still making progress is never cut short,
    however long it takes); every process is gone when this returns or raises, also on SIGINT
    or SIGTERM.
    progress, if given, is called with the steps rank 0 has finished while they run."""
    config = json.dumps(dataclasses.asdict(cfg))
    port = free_port()
    interrupts = _Interrupts()
    with tempfile.TemporaryDirectory(prefix="netmoe-ranks-") as tmp, interrupts.active():
        procs: list[tuple[subprocess.Popen[bytes], Any]] = []
        failed: list[tuple[int, str]] = []
        try:
            for rank in range(cfg.world):
                env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(cfg.world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS=str(cfg.threads))  # fmt: skip
                env.setdefault("GLOO_SOCKET_IFNAME", "lo")
                env[PROGRESS_FILE] = str(Path(tmp) / f"rank{rank}.progress")
                err = open(Path(tmp) / f"rank{rank}.err", "w+")  # noqa: SIM115 (closed below)
                cmd = [sys.executable, "-m", module, "--config", config,
                       "--out", str(Path(tmp) / f"rank{rank}.json")]  # fmt: skip
                try:
                    with interrupts.deferred():
                        procs.append((subprocess.Popen(cmd, env=env, stdout=err, stderr=err), err))
                except BaseException:
                    if not procs or procs[-1][1] is not err:
                        err.close()
                    raise
            done = [0] * cfg.world
            moved = time.monotonic()
            while any(p.poll() is None for p, _ in procs):
                if any(p.returncode not in (None, 0) for p, _ in procs):
                    break  # one rank died: the others would hang in a collective
                now_done = [_steps_done(Path(tmp) / f"rank{r}.progress") for r in range(cfg.world)]
                if now_done != done:
                    done, moved = now_done, time.monotonic()
                elif time.monotonic() - moved > stall_seconds:
                    raise RuntimeError(f"training ranks made no progress for {stall_seconds:.0f} s "
                                       f"(steps finished per rank: {done})")
                if progress is not None:
                    progress(done[0])
                time.sleep(0.05)
            for rank, (p, err) in enumerate(procs):
                if p.poll() not in (None, 0):
                    err.seek(0)
                    failed.append((rank, err.read()[-3000:]))
            if failed:
                rank, text = failed[0]
                raise RuntimeError(f"training rank {rank} failed:\n{text}")
            if progress is not None:
                progress(cfg.steps)
            return [RankResult.from_json((Path(tmp) / f"rank{r}.json").read_text(),
                                         f"training rank {r}'s result")
                    for r in range(cfg.world)]
        finally:
            for p, err in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
                err.close()
