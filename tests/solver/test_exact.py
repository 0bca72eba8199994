"""solve_joint and solve_bottleneck (CP-SAT) on their own, against brute force on tiny instances."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from netmoe.round import home_placement
from netmoe.solver import Topology, bottleneck_routes, traffic
from netmoe.solver.exact import solve_bottleneck, solve_joint


def _balanced(samples: int, devices: int):
    for perm in set(itertools.permutations(np.arange(samples) // (samples // devices))):
        yield np.array(perm)


@pytest.mark.parametrize("seed", range(4))
def test_joint_reaches_the_brute_force_minimum_of_modelled_time(seed: int) -> None:
    topo = Topology(2, 2, 4, alpha_inter=1e-6, bw_intra=400e9, bw_inter=100e9,
                    bytes_per_route=4096)
    rng = np.random.default_rng(seed)
    g, s = rng.integers(0, 7, (2, 8, 4))
    home = home_placement(8, 4)
    res = solve_joint(topo, [g, s], home, home, until=time.perf_counter() + 10, workers=1)
    best = min(traffic(topo, p, g, s).seconds for p in _balanced(8, 4))
    assert res.optimal and res.gap == 0.0
    assert traffic(topo, res.device, g, s).seconds == pytest.approx(best, rel=1e-9)
    assert np.bincount(res.device, minlength=4).tolist() == [2] * 4


@pytest.mark.parametrize("seed", range(3))
def test_bottleneck_reaches_the_brute_force_minimum(seed: int) -> None:
    topo = Topology(3, 1, 3)
    rng = np.random.default_rng(10 + seed)
    g = rng.integers(0, 9, (6, 3))
    home = home_placement(6, 3)
    res = solve_bottleneck(topo, [g], home, home, until=time.perf_counter() + 10, workers=1)
    best = min(bottleneck_routes(topo, p, g) for p in _balanced(6, 3))
    assert res.optimal and bottleneck_routes(topo, res.device, g) == best
