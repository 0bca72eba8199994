"""Fixtures of the server tests: a real server on a loopback port, and a bystander job whose
rounds are checked against the solver while another tenant misbehaves on the same server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.server.app import ServerHandle, start
from netmoe.server.config import ServerConfig

from support import MARGIN_S, check_round, job_spec, round_reports


@pytest.fixture
def server() -> Iterator[ServerHandle]:
    """A server on an ephemeral port (metrics too), in this process."""
    handle = start(ServerConfig(port=0, metrics_port=0, grace_seconds=1.0))
    yield handle
    handle.stop()


class Bystander:
    """A second job on the same server, solving one whole round after another with unary Solve
    in its own thread until ``stop``; every plan is checked against the solver (``check_round``:
    optimal, the solver's placement) and timed.

    deadline_ms: the job's round deadline; a round answered later than it plus MARGIN_S (the
    busy box's slack) counts as late.
    """

    def __init__(self, address: str, job: str = "bystander", deadline_ms: int = 2000) -> None:
        self.spec = job_spec(deadline_ms=deadline_ms)
        self.job = job
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self._channel = grpc.insecure_channel(address)
        self._stub = placement_pb2_grpc.PlacementServiceStub(self._channel)
        self._stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=self.spec), timeout=30)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bystander-{job}", daemon=True)

    def __enter__(self) -> Bystander:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        step = 0
        while not self._stop.is_set():
            reports = round_reports(self.job, self.spec, step, 0, seed=step % 16)
            t0 = time.monotonic()
            try:
                reply = self._stub.Solve(pb.SolveRequest(reports=reports), timeout=60)
                self.latencies.append(time.monotonic() - t0)
                check_round(self.spec, reports, list(reply.plans))
            except BaseException as err:  # reported by stop(), in the test's thread
                self.errors.append(err)
                return
            step += 1

    def wait_rounds(self, rounds: int, timeout: float = 60.0) -> None:
        """Waits until ``rounds`` more rounds were answered (or one failed)."""
        want = len(self.latencies) + rounds
        deadline = time.monotonic() + timeout
        while len(self.latencies) < want and not self.errors:
            assert time.monotonic() < deadline, f"bystander answered {len(self.latencies)} rounds"
            time.sleep(0.01)

    def stop(self) -> list[float]:
        """Stops, unregisters the job and asserts every round was solved optimally in time;
        returns the latencies (seconds per round)."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(90)
            try:
                self._stub.UnregisterJob(pb.UnregisterJobRequest(job=self.job), timeout=30)
            finally:
                self._channel.close()
        if self.errors:
            raise self.errors[0]
        assert self.latencies, "the bystander got no round answered"
        limit = self.spec.deadline_ms / 1000 + MARGIN_S
        assert max(self.latencies) < limit, (max(self.latencies), limit)
        return self.latencies


@pytest.fixture
def bystanders() -> Iterator[Callable[..., Bystander]]:
    """Starts Bystander(address, ...) on request (running, one round answered); stops every
    one when the test ends (a test checks its own with ``stop`` first)."""
    started: list[Bystander] = []

    def make(address: str, **kwargs: object) -> Bystander:
        by = Bystander(address, **kwargs).__enter__()  # type: ignore[arg-type]
        started.append(by)
        by.wait_rounds(1)
        return by

    yield make
    for by in started:
        by.stop()


@pytest.fixture
def bystander(server: ServerHandle, bystanders: Callable[..., Bystander]) -> Bystander:
    """A running bystander on ``server``."""
    return bystanders(server.address)
