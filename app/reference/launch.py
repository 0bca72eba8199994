"""Runs the J training ranks of a TrainConfig as local processes on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import runpy
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

from netmoe.app.reference.results import RankResult
from netmoe.app.reference.train import PROGRESS_FILE, TrainConfig

# Ranks fork from a fork server that imported torch once, instead of each starting an interpreter
# that imports it: about 3 s of CPU per rank here, so 8 ranks on 2 cores waited 12 s per run
# (transformers' modeling_utils or torchtitan's MoE another 4 to 5 s: see `preload`). The fork
# server builds no thread pool, process group or CUDA context before it forks.
PRELOAD = ("torch",)


def start_process(target: Callable[..., object], *args: object,
                  env: Mapping[str, str] | None = None, preload: Sequence[str] = ()
                  ) -> BaseProcess:
    """Starts target(*args) in a process forked from the fork server, with the environment env
    (default: this process's), this working directory and env's PYTHONPATH on sys.path, as an
    interpreter started now would have them: the fork server keeps the state of when it
    started. target and args must be picklable (target importable by name). The fork server
    imports PRELOAD and `preload` when this call starts it; one already running keeps what it
    imported (the process imports the rest itself: slower, same result)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([*PRELOAD, *preload])
    state = dict(os.environ if env is None else env)
    proc = ctx.Process(target=_as_started_now, args=(target, args, state, os.getcwd()))
    proc.start()
    return proc


def _as_started_now(target: Callable[..., object], args: tuple[object, ...],
                    env: dict[str, str], cwd: str) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[:0] = paths
    target(*args)


def _run_module(module: str, argv: list[str], log: str) -> None:
    """``python -m MODULE ARGV`` in this process, stdout and stderr appended to the file log."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Interrupts:
    """While active, SIGTERM raises KeyboardInterrupt like SIGINT does, so cleanup in finally
    blocks runs (by default SIGTERM ends the process and would orphan the ranks).

    Inside ``deferred()`` both signals only take note and raise when it ends: an interrupt
    between a rank's fork and its start returning would leave a rank nobody knows of.
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
    preload: Sequence[str] = (),
) -> list[RankResult]:
    """Runs cfg.world ranks, each as ``python -m MODULE --config JSON --out FILE`` would (any
    config dataclass with ``world`` and ``threads``; FILE gets the rank's RankResult JSON), forked
    from the fork server (start_process); returns their results ordered by rank (ValueError
    naming the field when a FILE does not match RankResult). Every rank writes the steps it has
    finished to $NETMOE_PROGRESS_FILE (its own file). Raises RuntimeError (with the failing
    rank's stderr) if any rank fails, or when no rank finished a step for ``stall_seconds`` (a
    run still making progress is never cut short, however long it takes); every rank is gone
    when this returns or raises, also on SIGINT or SIGTERM. preload: modules MODULE imports
    that the fork server imports once (start_process).
    progress, if given, is called with the steps rank 0 has finished while they run."""
    config = json.dumps(dataclasses.asdict(cfg))
    port = free_port()
    interrupts = _Interrupts()
    with tempfile.TemporaryDirectory(prefix="netmoe-ranks-") as tmp, interrupts.active():
        procs: list[BaseProcess] = []
        logs = [Path(tmp) / f"rank{rank}.err" for rank in range(cfg.world)]
        try:
            for rank, log in enumerate(logs):
                env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(cfg.world),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           OMP_NUM_THREADS=str(cfg.threads))  # fmt: skip
                env.setdefault("GLOO_SOCKET_IFNAME", "lo")
                env[PROGRESS_FILE] = str(Path(tmp) / f"rank{rank}.progress")
                log.touch()
                argv = ["--config", config, "--out", str(Path(tmp) / f"rank{rank}.json")]
                with interrupts.deferred():
                    procs.append(start_process(_run_module, module, argv, str(log), env=env,
                                               preload=preload))
            done = [0] * cfg.world
            moved = time.monotonic()
            while any(p.exitcode is None for p in procs):
                if any(p.exitcode not in (None, 0) for p in procs):
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
            failed = [(rank, log.read_text()[-3000:]) for rank, (p, log)
                      in enumerate(zip(procs, logs, strict=True)) if p.exitcode not in (None, 0)]
            if failed:
                rank, text = failed[0]
                raise RuntimeError(f"training rank {rank} failed:\n{text}")
            if progress is not None:
                progress(cfg.steps)
            return [RankResult.from_json((Path(tmp) / f"rank{r}.json").read_text(),
                                         f"training rank {r}'s result")
                    for r in range(cfg.world)]
        finally:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
                p.join()
                p.close()
