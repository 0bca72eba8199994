"""Fixtures of the server tests: a real server on a loopback port, and a bystander job whose
rounds are checked against the solver while another tenant misbehaves on the same server."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from netmoe.server.app import ServerHandle, start
from netmoe.server.config import ServerConfig

from support import Bystander


@pytest.fixture
def server() -> Iterator[ServerHandle]:
    """A server on an ephemeral port (metrics too), in this process."""
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=0, grace_seconds=1.0))
    yield handle
    handle.stop()


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
