"""The placement solver: exactness against brute force, invariants, and input checks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netmoe.solver import Topology, bottleneck_routes, home_placement, solve, traffic


def balanced_placements(samples: int, devices: int):
    """Every placement of `samples` samples with samples/devices on each device."""
    per = samples // devices

    def rec(i: int, left: list[int], acc: list[int]):
        if i == samples:
            yield np.array(acc)
            return
        for d in range(devices):
            if left[d]:
                left[d] -= 1
                acc.append(d)
                yield from rec(i + 1, left, acc)
                acc.pop()
                left[d] += 1

    yield from rec(0, [per] * devices, [])


TINY = Topology(nodes=2, gpus_per_node=2, experts=4)


@pytest.mark.parametrize("seed", range(6))
def test_two_stage_reaches_brute_force_minimum_of_inter_node_routes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    g, s = rng.integers(0, 9, (2, 8, 4))
    plan = solve(TINY, g, s)
    best_inter = min(traffic(TINY, p, g, s).inter for p in balanced_placements(8, 4))
    assert plan.after.inter == best_inter
    assert plan.optimal and plan.status == "optimal"
    # Stage 2 is exact given stage 1's node assignment: no device swap within a node helps.
    nodes = TINY.device_node[np.array(plan.dest)]
    same_nodes = [
        p for p in balanced_placements(8, 4) if (TINY.device_node[p] == nodes).all()
    ]
    assert plan.after.intra == min(traffic(TINY, p, g, s).intra for p in same_nodes)


@pytest.mark.parametrize("seed", range(4))
def test_joint_and_bottleneck_reach_brute_force_optimum(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    topo = Topology(2, 2, 4, bw_intra=400e9, bw_inter=100e9, bytes_per_route=64)
    g, s = rng.integers(0, 9, (2, 8, 4))
    every = list(balanced_placements(8, 4))
    joint = solve(topo, g, s, method="joint", time_limit=20)
    assert joint.optimal
    assert joint.after.seconds == pytest.approx(
        min(traffic(topo, p, g, s).seconds for p in every)
    )
    neck = solve(topo, g, s, objective="bottleneck", time_limit=20)
    assert neck.optimal
    assert neck.objective_value == min(bottleneck_routes(topo, p, g, s) for p in every)
    # The two-stage answer is a feasible point of the joint problem, never better.
    assert solve(topo, g, s).after.seconds >= joint.after.seconds - 1e-15


def test_bottleneck_differs_from_volume_at_three_nodes() -> None:
    """At 3+ nodes the busiest node can be relieved at the price of more total volume."""
    topo = Topology(3, 1, 3)
    found = False
    for seed in range(40):
        rng = np.random.default_rng(seed)
        g = rng.integers(0, 9, (6, 3))
        vol = solve(topo, g)
        neck = solve(topo, g, objective="bottleneck", time_limit=10)
        assert neck.objective_value <= bottleneck_routes(topo, np.array(vol.dest), g)
        found |= neck.objective_value < bottleneck_routes(topo, np.array(vol.dest), g)
    assert found


counts_st = st.integers(1, 4).flatmap(
    lambda per: st.tuples(
        st.just(per),
        st.lists(st.integers(0, 50), min_size=2 * 8 * per * 8, max_size=2 * 8 * per * 8),
    )
)


@settings(max_examples=60, deadline=None)
@given(counts_st, st.booleans())
def test_plan_invariants(data: tuple[int, list[int]], shuffled_home: bool) -> None:
    per, flat = data
    topo = Topology(2, 4, 8)
    samples = 8 * per
    g, s = np.array(flat).reshape(2, samples, 8)
    home = home_placement(samples, 8)
    if shuffled_home:
        home = np.random.default_rng(per).permutation(home)
    plan = solve(topo, g, s, home=home)
    dev = np.array(plan.dest)
    assert np.bincount(dev, minlength=8).tolist() == [per] * 8
    held = sorted(r for rows in plan.rows_held for r in rows)
    assert held == list(range(samples))
    for d, rows in enumerate(plan.rows_held):
        assert all(plan.dest[r] == d for r in rows)
        # Delivery order of all_to_all_single: by source device, then source order.
        assert list(rows) == sorted(rows, key=lambda r: (home[r], r))
    for t in (plan.before, plan.after):
        assert t.inter + t.intra + t.local == int(g.sum() + s.sum())
    assert plan.after.inter <= plan.before.inter
    assert plan.home == tuple(int(h) for h in home)
    assert plan.moved == int((dev != home).sum())


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(0, 20))
def test_no_move_when_nothing_is_gained(per: int, value: int) -> None:
    """Every sample routes the same to every expert: any placement costs the same."""
    topo = Topology(2, 2, 4)
    g = np.full((4 * per, 4), value)
    plan = solve(topo, g, g)
    assert plan.moved == 0
    assert plan.dest == plan.home


@pytest.mark.parametrize("seed", range(4))
def test_before_and_after_are_the_traffic_of_home_and_dest(seed: int) -> None:
    """solve costs the scatter as the difference of the summed and the gather's counts; the
    routes and times per All-to-All must be traffic()'s, with and without a scatter."""
    rng = np.random.default_rng(seed)
    topo = Topology(4, 2, 16, bw_intra=400e9, bw_inter=100e9, bytes_per_route=64)
    g, s = rng.integers(0, 9, (2, 32, 16))
    home = rng.permutation(np.arange(32) // 4)
    for scatter in (s, None):
        plan = solve(topo, g, scatter, home=home)
        assert plan.before == traffic(topo, home, g, scatter)
        assert plan.after == traffic(topo, np.array(plan.dest), g, scatter)


def test_samples_already_well_placed_stay() -> None:
    topo = Topology(2, 2, 4)
    g = np.zeros((8, 4), dtype=np.int64)
    for i in range(8):
        g[i, i // 2] = 10  # sample i's experts live on its home device
    plan = solve(topo, g, g)
    assert plan.moved == 0 and plan.after.inter == 0 and plan.after.intra == 0


def test_samples_move_to_their_experts() -> None:
    topo = Topology(2, 2, 4)
    g = np.zeros((8, 4), dtype=np.int64)
    want = np.array([3, 2, 1, 0, 3, 2, 1, 0])
    g[np.arange(8), want] = 10
    plan = solve(topo, g)
    assert plan.after.inter == 0 and plan.after.intra == 0
    assert np.array_equal(np.array(plan.dest), want)
    assert plan.before.inter == 40


def test_deterministic() -> None:
    rng = np.random.default_rng(7)
    topo = Topology(2, 4, 16)
    g, s = rng.integers(0, 30, (2, 64, 16))
    assert solve(topo, g, s).dest == solve(topo, g, s).dest


def test_explicit_expert_map() -> None:
    topo = Topology(2, 1, 3, expert_device=[1, 1, 0])
    assert topo.expert_node.tolist() == [1, 1, 0]
    g = np.array([[5, 0, 0], [0, 0, 5]])
    plan = solve(topo, g)
    assert plan.dest == (1, 0) and plan.after.inter == 0


def test_traffic_channels_and_time() -> None:
    topo = Topology(2, 2, 4, alpha_intra=1e-6, alpha_inter=2e-6, bw_intra=4.0, bw_inter=1.0,
                    bytes_per_route=1)
    g = np.array([[1, 2, 3, 4]] * 4)
    t = traffic(topo, np.array([0, 1, 2, 3]), g)
    # device 0 (node 0): local expert 0, intra expert 1, inter experts 2, 3.
    assert (t.local, t.intra, t.inter) == (1 + 2 + 3 + 4, 2 + 1 + 4 + 3, 7 + 7 + 3 + 3)
    assert t.t_inter == pytest.approx(2e-6 + 20)
    assert t.seconds == pytest.approx(max(t.t_inter, t.t_intra))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gather": np.zeros((8, 5))}, r"gather must have shape \(samples, 4\)"),
        ({"scatter": np.zeros((7, 4))}, r"scatter must have shape \(8, 4\)"),
        ({"gather": np.zeros((6, 4))}, r"samples=6 must be a positive multiple of devices=4"),
        ({"gather": -np.ones((8, 4))}, r"gather\[0, 0\]=-1.0 is out of range"),
        ({"gather": np.eye(8, 4, k=2, dtype=np.int64) * -3}, r"gather\[0, 2\]=-3 is out of range"),
        ({"gather": -np.ones((8, 4), dtype=np.int8)}, r"gather\[0, 0\]=-1 is out of range"),
        ({"gather": np.full((8, 4), 2**63, dtype=np.uint64)}, r"gather\[0, 0\]=\d+ is out of"),
        ({"gather": np.full((8, 4), 0.5)}, r"gather\[0, 0\]=.*0.5 is not a whole number"),
        ({"gather": np.full((8, 4), np.nan)}, r"gather\[0, 0\]=.*nan is not a whole number"),
        ({"gather": np.full((8, 4), 2**41)}, r"out of range"),
        ({"gather": np.full((8, 4), 2**38)}, r"sums to .* routes, more than"),
        ({"gather": np.zeros((8, 4), dtype=bool)}, r"gather must hold integer counts"),
        ({"home": [0] * 8}, r"home is unbalanced: device 0 holds 8 samples, need 2"),
        ({"home": [9] * 8}, r"home\[0\]=9 is not a device"),
        ({"objective": "speed"}, r"objective must be one of .* got 'speed'"),
        ({"method": "greedy"}, r"method must be one of .* got 'greedy'"),
        ({"time_limit": 0}, r"time_limit must be positive, got 0"),
        ({"workers": 0}, r"workers must be a positive integer, got 0"),
        ({"warm": np.zeros((1, 2))}, r"warm must be a Plan's prices \(Prices\) or None, got nd"),
    ],
)
def test_bad_input_is_named(kwargs: dict, match: str) -> None:
    args = {"gather": np.ones((8, 4), dtype=np.int64), "scatter": None} | kwargs
    gather, scatter = args.pop("gather"), args.pop("scatter")
    with pytest.raises(ValueError, match=match):
        solve(TINY, gather, scatter, **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nodes": 0}, r"nodes must be a positive integer, got 0"),
        ({"experts": 6}, r"experts=6 is not divisible by devices=4"),
        ({"expert_device": [0, 1, 2, 4]}, r"expert_device\[3\]=4 is not a device \(devices 0..3\)"),
        ({"expert_device": [0, 1]}, r"expert_device must have shape \(4,\)"),
        ({"bw_inter": 0}, r"bw_inter must be a finite positive number, got 0"),
        ({"alpha_intra": float("nan")}, r"alpha_intra must be a finite non-negative number"),
        ({"bytes_per_route": -1}, r"bytes_per_route must be a positive integer, got -1"),
    ],
)
def test_bad_topology_is_named(kwargs: dict, match: str) -> None:
    args = {"nodes": 2, "gpus_per_node": 2, "experts": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        Topology(**args)


def test_topology_equality_and_with_experts() -> None:
    a = Topology(2, 2, 4)
    assert a == Topology(2, 2, 4, expert_device=[0, 1, 2, 3])
    b = a.with_experts(np.array([3, 2, 1, 0]))
    assert b != a and b.expert_node.tolist() == [1, 1, 0, 0]
    assert len({a, Topology(2, 2, 4)}) == 1


def test_brute_force_helper_enumerates_all() -> None:
    # 8 samples, 4 devices, 2 each: 8! / (2!)^4 placements.
    assert sum(1 for _ in balanced_placements(8, 4)) == 2520
    assert len(set(itertools.islice((tuple(p) for p in balanced_placements(4, 2)), 10))) == 6


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans())
def test_device_counts_match_a_plain_loop(seed: int, uniform: bool) -> None:
    """Fast paths (sorted equal groups, any map, devices without experts) agree with a loop."""
    from netmoe.solver.cost import device_counts, node_counts

    rng = np.random.default_rng(seed)
    topo0 = Topology(2, 3, 12)
    emap = topo0.expert_device if uniform else rng.integers(0, 6, 12)
    topo = topo0.with_experts(emap)
    counts = rng.integers(0, 20, (5, 12))
    want = np.stack([counts[:, emap == d].sum(axis=1) for d in range(6)], axis=1)
    got = device_counts(topo, counts)
    assert np.array_equal(got, want)
    assert np.array_equal(node_counts(topo, got), want.reshape(5, 2, 3).sum(axis=2))


def test_warm_solves_reach_the_cold_optimum_and_ignore_other_shapes() -> None:
    """solve(..., warm=plan.prices) over a job's alike rounds (both stages priced: 1024 samples
    on 16 nodes of 8) costs what the cold solve does, stage by stage: the same inter-node routes
    and, as both keep the fewest samples off their home node, the same samples kept on it.
    Prices from another topology or the wrong type start cold, without an error."""
    from netmoe.solver import Prices
    from netmoe.solver.synthetic import planted_rounds

    topo = Topology(16, 8, 256)
    gen = planted_rounds(np.random.default_rng(0), 1024, 256, domains=16)
    other = solve(Topology(4, 8, 256), *next(planted_rounds(
        np.random.default_rng(1), 1024, 256, domains=4))).prices
    warm = None
    for _ in range(4):
        gather, scatter = next(gen)
        cold = solve(topo, gather, scatter)
        assert cold.prices.node.shape == (1, 16) and cold.prices.device.shape == (16, 8)
        node = topo.device_node
        kept = (node[np.array(cold.dest)] == node[np.array(cold.home)]).sum()
        plans = [solve(topo, gather, scatter, warm=start)
                 for start in (warm, other, Prices(None, None))]
        for got in plans:
            assert got.after.inter == cold.after.inter
            assert (node[np.array(got.dest)] == node[np.array(got.home)]).sum() == kept
        warm = plans[0].prices  # the job's chain of warm starts
