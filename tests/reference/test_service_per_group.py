"""A service per EP group, found through the job's store: 8 gloo ranks on 4 nodes x 2 as two EP
groups of 4 (nodes 0-1 and 2-3), each group's rounds answered by the sidecar of its first node,
a real ``netmoe serve`` process of its own."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import pytest

from netmoe.app.reference.launch import free_port, run_ranks
from netmoe.app.reference.train import TrainConfig

from support import ServerProcess, assert_planned, assert_same_training


@pytest.fixture(scope="module")
def sidecars() -> Iterator[tuple[ServerProcess, ServerProcess]]:
    a, b = ServerProcess(), ServerProcess()
    yield a, b
    for proc in (a, b):
        assert proc.stop() == 0, "".join(proc.log)


def _solved(proc: ServerProcess, job: str) -> float:
    return sum(v for labels, v in proc.samples("netmoe_rounds_total").items()
               if dict(labels) == {"job": job, "outcome": "solved"})


def test_each_group_is_planned_by_its_own_service_found_in_the_store(
        two_groups: Any, sidecars: tuple[ServerProcess, ServerProcess]) -> None:
    """Node reports: each node's report goes to its group's service (per-rank reports run in
    the test below)."""
    cfg, base = two_groups
    a, b = sidecars
    job = "per-group"
    # Only the groups' first nodes (0 and 2) publish; nodes 1 and 3 name sidecars nobody uses.
    net = run_ranks(dataclasses.replace(
        cfg, placement="service", job=job, report_by="node", unregister=False,
        sidecars=(a.address, "", b.address, f"127.0.0.1:{free_port()}")))
    assert_same_training(base, net)
    for d in range(4):  # the two groups' holders of the same experts summed their gradients
        assert net[d].param_checksum == net[4 + d].param_checksum
    rounds = cfg.steps * cfg.layers
    assert_planned(net, rounds)
    # Each service solved its group's rounds and none of the other's.
    assert (_solved(a, job), _solved(b, job)) == (rounds, rounds)


def test_a_group_whose_service_is_down_falls_back_alone(
        two_groups: Any, sidecars: tuple[ServerProcess, ServerProcess]) -> None:
    """Per-rank reports: every rank of the group whose service is down names the reason."""
    cfg, base = two_groups
    a, _ = sidecars
    dead = f"127.0.0.1:{free_port()}"
    net = run_ranks(dataclasses.replace(cfg, placement="service", job="half-down",
                                        unregister=False, sidecars=(a.address, "", dead, "")))
    assert_same_training(base, net)
    rounds = cfg.steps * cfg.layers
    assert [r.placement.plans for r in net] == [rounds] * 4 + [0] * 4
    assert [r.placement.fallbacks for r in net] == [0] * 4 + [rounds] * 4
    for r in net[4:]:
        assert r.placement.fallback_reasons == {f"no service: not connected to {dead}": rounds}
    assert _solved(a, "half-down") == rounds


@pytest.mark.parametrize(("fields", "message"), [
    ({"server": "a:1", "sidecars": ("b:2", "", "", "")},
     "server='a:1' and sidecars=['b:2', '', '', ''] exclude each other"),
    ({"sidecars": ("b:2", "c:3")}, "sidecars must name one address per node (4), got 2"),
    ({"sidecars": ("b:2", "nope", "", "")}, "sidecars[1] must be host:port, got 'nope'"),
])
def test_inconsistent_sidecars_are_refused_naming_the_values(fields: dict[str, Any],
                                                             message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        TrainConfig(nodes=4, gpus_per_node=2, ep_size=4, placement="service", **fields)
