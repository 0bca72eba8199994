"""solve(..., scatter_topology=...): gather of layer l and scatter of layer l+1 with each layer's
own expert map, checked against brute force and against the single-map path."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from netmoe.solver import Topology, bottleneck_routes, solve, traffic
from netmoe.solver.cost import device_counts

GATHER_TOPO = Topology(2, 2, 8, bw_intra=400e9, bw_inter=100e9, bytes_per_route=64)
# Layer l+1 keeps two experts per device but swaps halves across nodes and within nodes.
SCATTER_TOPO = GATHER_TOPO.with_experts(np.array([3, 2, 0, 1, 3, 1, 2, 0]))


# Every balanced placement of 8 samples on 4 devices (2520).
EVERY = [np.array(p) for p in sorted(set(itertools.permutations([0, 0, 1, 1, 2, 2, 3, 3])))]


def _two_map_cost(device: np.ndarray, g: np.ndarray, s: np.ndarray):
    a, b = traffic(GATHER_TOPO, device, g), traffic(SCATTER_TOPO, device, s)
    return a.inter + b.inter, a.intra + b.intra, a.seconds + b.seconds


@pytest.mark.parametrize("seed", range(4))
def test_two_maps_reach_brute_force_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g, s = rng.integers(0, 7, (2, 8, 8))
    plan = solve(GATHER_TOPO, g, s, scatter_topology=SCATTER_TOPO)
    inter, intra, seconds = _two_map_cost(np.array(plan.dest), g, s)
    assert (plan.after.inter, plan.after.intra) == (inter, intra)
    assert plan.after.seconds == pytest.approx(seconds)
    assert inter == min(_two_map_cost(p, g, s)[0] for p in EVERY)
    home = _two_map_cost(np.array(plan.home), g, s)
    assert (plan.before.inter, plan.before.intra) == home[:2]
    joint = solve(GATHER_TOPO, g, s, scatter_topology=SCATTER_TOPO, method="joint",
                  time_limit=20)
    assert joint.optimal
    assert joint.after.seconds == pytest.approx(min(_two_map_cost(p, g, s)[2] for p in EVERY))
    neck = solve(GATHER_TOPO, g, s, scatter_topology=SCATTER_TOPO, objective="bottleneck",
                 time_limit=20)
    per_dev = Topology(2, 2, 4)

    def neck_of(p: np.ndarray) -> int:
        return bottleneck_routes(per_dev, p, device_counts(GATHER_TOPO, g),
                                 device_counts(SCATTER_TOPO, s))

    assert neck.optimal
    assert neck.objective_value == min(neck_of(p) for p in EVERY)


def test_scatter_map_matters_and_same_map_is_the_default_path() -> None:
    rng = np.random.default_rng(9)
    g, s = rng.integers(0, 7, (2, 8, 8))
    one = solve(GATHER_TOPO, g, s)
    same = solve(GATHER_TOPO, g, s, scatter_topology=GATHER_TOPO.with_experts(
        GATHER_TOPO.expert_device))
    assert same.dest == one.dest and same.after == one.after
    two = solve(GATHER_TOPO, g, s, scatter_topology=SCATTER_TOPO)
    assert two.before != one.before  # the scatter is costed with layer l+1's map
    # Without a scatter there is nothing for the second map to change.
    assert solve(GATHER_TOPO, g, scatter_topology=SCATTER_TOPO).after == solve(
        GATHER_TOPO, g).after


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (Topology(2, 2, 4), r"scatter_topology must describe the same cluster.*experts=4"),
        (Topology(1, 4, 8), r"scatter_topology must describe the same cluster.*nodes=1"),
        (Topology(2, 2, 8, bw_inter=1e9), r"scatter_topology must describe the same cluster"),
        ("map", r"scatter_topology must be a Topology, got str"),
    ],
)
def test_bad_scatter_topology_is_named(other: object, match: str) -> None:
    g = np.ones((8, 8), dtype=np.int64)
    with pytest.raises(ValueError, match=match):
        solve(GATHER_TOPO, g, g, scatter_topology=other)  # type: ignore[arg-type]


def test_device_counts_on_the_per_device_topology_solve_alike() -> None:
    """Routes per device with Topology.per_device (what a device_counts job sends) place samples
    as the expert counts with their map do: the same plan from two-stage, the same optimum from
    CP-SAT (whose ties may fall elsewhere)."""
    rng = np.random.default_rng(5)
    g, s = rng.integers(0, 7, (2, 8, 8))
    per_dev = SCATTER_TOPO.per_device()
    # One pseudo-expert per device, expert d on device d; the links stay.
    assert per_dev == Topology(2, 2, 4, bw_intra=400e9, bw_inter=100e9, bytes_per_route=64)
    dg, ds = device_counts(SCATTER_TOPO, g), device_counts(SCATTER_TOPO, s)
    a, b = solve(SCATTER_TOPO, g, s), solve(per_dev, dg, ds)
    assert (b.dest, b.before, b.after) == (a.dest, a.before, a.after)
    a, b = (solve(SCATTER_TOPO, g, s, method="joint", time_limit=20),
            solve(per_dev, dg, ds, method="joint", time_limit=20))
    assert a.optimal and b.optimal
    assert b.after.seconds == pytest.approx(a.after.seconds)
