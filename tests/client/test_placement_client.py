"""PlacementClient against a real service: a job that ends cleanly frees its id for a restart with
another spec; a restart that collides with a job still registered gets a clear, final error
instead of reconnecting for ever."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from netmoe.client.dispatcher import Layout, TokenDispatcher
from netmoe.client.layer import ExpertParallel
from netmoe.client.placement_client import PlacementClient, job_spec
from netmoe.client.planning import NoPlan, Placement
from netmoe.round import RoundCounts
from netmoe.server.app import ServerHandle, start
from netmoe.server.config import ServerConfig

from support import wait_for


@pytest.fixture
def server() -> Iterator[ServerHandle]:
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0))
    yield handle
    handle.stop()


def _round(clients: list[PlacementClient], spd: int, experts: int = 4) -> list[object]:
    """Every rank reports step 0, layer 0; each rank's plan or the exception it got."""
    rng = np.random.default_rng(0)
    futures = [c.submit(0, 0, RoundCounts(
        np.arange(r * spd, (r + 1) * spd, dtype=np.uint64),
        rng.integers(0, 5, (spd, experts)), None)) for r, c in enumerate(clients)]
    out: list[object] = []
    for f in futures:
        try:
            out.append(f.result(timeout=10))
        except Exception as err:
            out.append(err)
    return out


def _clients(handle: ServerHandle, spd: int) -> list[PlacementClient]:
    spec = job_spec(1, 2, 4, spd, hidden_size=8, deadline_ms=2000)
    return [PlacementClient(handle.address, "restart", r, spec, connect_timeout=10.0,
                            backoff=(0.05, 0.2)) for r in range(2)]


def test_clean_close_frees_the_job_id_for_a_restart_with_another_spec(server: ServerHandle
                                                                      ) -> None:
    first = _clients(server, spd=2)
    assert all(p.solved for p in _round(first, spd=2))  # type: ignore[attr-defined]
    first[1].close()
    first[0].close(unregister=True)  # the last rank out forgets the job
    second = _clients(server, spd=4)
    try:
        plans = _round(second, spd=4)
        assert all(p.solved and len(p.dest) == 4 for p in plans)  # type: ignore[attr-defined]
        assert not any(c.rejected for c in second)
    finally:
        for c in second:
            c.close(unregister=c.rank == 0)


def test_restart_over_a_live_job_gets_a_final_clear_error(server: ServerHandle) -> None:
    first = _clients(server, spd=2)  # still registered: this run never unregisters
    try:
        t0 = time.monotonic()
        second = _clients(server, spd=4)
        assert time.monotonic() - t0 < 10  # no waiting out the connect timeout
        try:
            assert all("ALREADY_EXISTS" in c.rejected for c in second), [c.rejected for c in second]
            plans = _round(second, spd=4)
            assert all(isinstance(p, NoPlan) and "rejected: ALREADY_EXISTS" in str(p)
                       for p in plans), plans
            # It stopped trying: the connection thread ended without reconnecting.
            wait_for(lambda: not any(c._thread.is_alive() for c in second))
            assert [c.reconnects for c in second] == [0, 0]
        finally:
            for c in second:
                c.close()
        assert all(p.solved for p in _round(first, spd=2))  # type: ignore[attr-defined]
    finally:
        for c in first:
            c.close(unregister=c.rank == 0)


def test_submit_refuses_counts_the_wire_cannot_carry_and_sends_wide_ones(server: ServerHandle
                                                                         ) -> None:
    clients = _clients(server, spd=2)
    try:
        ids = np.arange(2, dtype=np.uint64)
        ok = np.ones((2, 4), dtype=np.int64)
        for gather, scatter, error in (
                (np.ones((2, 3), dtype=np.int64), None, r"gather must be \[2, 4\], got shape"),
                (ok - 2, None, r"^gather must lie in \[0, 4294967295\], got \[-1, -1\]"),
                (ok, ok << 32, r"^scatter must lie in \[0, 4294967295\], got \[4294967296, ")):
            with pytest.raises(ValueError, match=error):
                clients[0].submit(0, 0, RoundCounts(ids, gather, scatter))
        # Counts past uint8 and uint16 travel in wider dtypes and solve like any others.
        futures = [c.submit(0, 0, RoundCounts(ids + 2 * r, ok * (300 + 70_000 * r), ok))
                   for r, c in enumerate(clients)]
        assert all(f.result(timeout=10).solved for f in futures)
    finally:
        for c in clients:
            c.close(unregister=c.rank == 0)


def test_device_count_jobs_get_routes_per_device_from_the_layers(server: ServerHandle) -> None:
    """ExpertParallel on the two ranks of a device_counts job reports [n, J] routes per device
    (Placement takes the choice from its PlacementClient's spec); the plans equal those of the
    same routing reported per expert, and [n, E] counts are refused naming the need."""
    spd, seq, world, experts = 2, 8, 2, 4
    gen = torch.Generator().manual_seed(5)
    # Rank r's tokens route to the other node's experts: every sample is worth moving.
    ids = [torch.randint(0, 2, (spd * seq, 2), generator=gen) + 2 * (1 - r) for r in range(world)]
    plans = {}
    for job, by_device in (("per-expert", False), ("per-device", True)):
        spec = job_spec(2, 1, experts, spd, hidden_size=8, deadline_ms=5000,
                        device_counts=by_device)
        clients = [PlacementClient(server.address, job, r, spec, connect_timeout=10.0)
                   for r in range(world)]
        try:
            hooks = [Placement(c, r, world, spd, timeout=10.0) for r, c in enumerate(clients)]
            assert [h.device_counts for h in hooks] == [by_device] * world
            layers = [ExpertParallel(TokenDispatcher(Layout(r, world, 1, experts, spd, seq)), h)
                      for r, h in enumerate(hooks)]
            tickets = [ep.submit(0, 0, ids[r], ids[r]) for r, ep in enumerate(layers)]
            plans[job] = [t.future.result(timeout=10) for t in tickets]  # type: ignore[union-attr]
            if by_device:
                with pytest.raises(ValueError, match=r"gather must be \[2, 2\] \(device_counts: "
                                                     r"routes per device\), got shape \(2, 4\)"):
                    clients[0].submit(1, 0, RoundCounts(np.arange(2, dtype=np.uint64),
                                                        np.ones((2, 4), dtype=np.int64), None))
        finally:
            for c in clients:
                c.close(unregister=c.rank == 0)
    for by_expert, by_device in zip(plans["per-expert"], plans["per-device"], strict=True):
        assert by_expert.solved and by_device.solved
        assert by_device.dest.tolist() == by_expert.dest.tolist()
        assert by_device.held_ids.tolist() == by_expert.held_ids.tolist()
        assert (by_device.before, by_device.after) == (by_expert.before, by_expert.after)
    assert plans["per-device"][0].moved == world * spd


def test_an_unreachable_service_costs_one_line_per_state_change(caplog: pytest.LogCaptureFixture
                                                                ) -> None:
    """Down, then up: one line when the stream is lost, one when it is back; one line when the
    rounds start falling back and one when plans come back, whatever the number of layers."""
    from netmoe.app.reference.launch import free_port

    port = free_port()
    spec = job_spec(1, 2, 4, 2, hidden_size=8, deadline_ms=5000)
    client = PlacementClient(f"127.0.0.1:{port}", "quiet", 0, spec, connect_timeout=0.2,
                             backoff=(0.01, 0.05))
    placement = Placement(client, 0, 2, 2, timeout=1.0)
    counts = torch.ones(2, 4, dtype=torch.int64)

    def round_(step: int, layer: int, peer: torch.Tensor) -> None:
        """This rank's round, settled with rank 1's offer (peer [1 + 2n])."""
        offer = placement.wait(placement.submit(step, layer, counts, None))
        offer.settle(torch.stack([offer.offer(), peer]), 0.0)

    try:
        with caplog.at_level("WARNING", logger="netmoe.client"):
            wait_for(lambda: client.reconnects >= 5)
            for step in range(3):
                for layer in range(4):
                    round_(step, layer, torch.zeros(5, dtype=torch.int64))
            assert placement.stats.fallbacks == 12
            lost = [r.message for r in caplog.records if "placement stream" in r.message]
            assert len(lost) == 1 and "lost" in lost[0], lost
            falling = [r.message for r in caplog.records if ": no move (" in r.message]
            assert len(falling) == 1 and "step 0 micro-batch 0 layer 0" in falling[0], falling
            with start(ServerConfig(port=port, drain_seconds=0.0, metrics_port=None,
                                    grace_seconds=1.0)):
                wait_for(lambda: client.connected)
                other = PlacementClient(f"127.0.0.1:{port}", "quiet", 1, spec)
                try:
                    theirs = other.submit(3, 0, RoundCounts(np.array([2, 3], dtype=np.uint64),
                                                            counts.numpy(), None))
                    offer = placement.wait(placement.submit(3, 0, counts, None))
                    reply = theirs.result(timeout=10)
                    peer = torch.tensor([1, *reply.dest.tolist(),
                                         *reply.held_ids.astype(np.int64).tolist()])
                    offer.settle(torch.stack([offer.offer(), peer]), 0.0)
                finally:
                    other.close(unregister=True)
                    client.close()  # before the service stops: that would be a state change
    finally:
        if not client._closed.is_set():
            client.close()
    assert placement.stats.plans == 1
    lines = [r.message for r in caplog.records]
    assert len([m for m in lines if "placement stream" in m]) == 2, lines
    assert any("placement stream" in m and "back after" in m for m in lines), lines
    again = [m for m in lines if "plans again" in m]
    assert len(again) == 1 and "from step 3 micro-batch 0 layer 0, after 12 layers" in again[0]
