"""The fast transportation paths against the reference min-cost flow over every arc.

Each fast path must reach the flow's optimal cost (several optima may exist; any one is right)
and fill every column exactly. Costs drawn from a narrow range make ties common, which is where
a wrong shortcut would show."""

from __future__ import annotations

import numpy as np
import pytest

from netmoe.solver import Topology, solve
from netmoe.solver import transport as tr
from netmoe.solver.cost import channel_routes, device_counts
from netmoe.solver.synthetic import planted_counts
from netmoe.solver.two_stage import place_two_stage, with_tiebreak


def _cost_of(cost: np.ndarray, col: np.ndarray) -> int:
    return int(cost[np.arange(len(col)), col].sum())


def _random_blocks(rng: np.random.Generator, cols: int, high: int):
    blocks = int(rng.integers(1, 5))
    sizes = rng.integers(0, 12, blocks)
    block = np.repeat(np.arange(blocks), sizes)
    capacity = np.stack([rng.multinomial(s, np.ones(cols) / cols) for s in sizes])
    return rng.integers(0, high, (len(block), cols)), block, capacity


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("cols", [1, 2, 3, 5])
def test_blocks_match_one_flow_per_block(seed: int, cols: int) -> None:
    rng = np.random.default_rng(seed)
    cost, block, capacity = _random_blocks(rng, cols, high=int(rng.choice([3, 1000])))
    col = tr.transport_blocks(cost, block, capacity)
    for b in range(capacity.shape[0]):
        rows = block == b
        assert (np.bincount(col[rows], minlength=cols) == capacity[b]).all()
        ref = tr.transport(cost[rows], capacity[b])
        assert _cost_of(cost[rows], col[rows]) == _cost_of(cost[rows], ref)


def test_blocks_reject_capacities_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="block 1: capacities sum to 3, need one slot per row"):
        tr.transport_blocks(np.zeros((4, 2), dtype=np.int64), np.array([0, 0, 1, 1]),
                            np.array([[1, 1], [2, 1]]))


@pytest.mark.parametrize("seed", range(12))
def test_pricing_matches_the_flow(seed: int) -> None:
    """_priced on its own, well below the size where transport_blocks picks it, so that many
    shapes are tried: few and many columns, uneven capacities, heavy ties."""
    rng = np.random.default_rng(seed)
    rows, cols = int(rng.integers(40, 600)), int(rng.integers(3, 12))
    capacity = rng.multinomial(rows, rng.dirichlet(np.ones(cols)))
    cost = rng.integers(0, int(rng.choice([4, 50, 10**6])), (rows, cols))
    col = tr._priced(cost, capacity)
    assert (np.bincount(col, minlength=cols) == capacity).all()
    assert _cost_of(cost, col) == _cost_of(cost, tr.transport(cost, capacity))


def test_pricing_falls_back_to_the_flow_when_its_proof_needs_more_rounds(monkeypatch) -> None:
    rng = np.random.default_rng(5)
    cost, capacity = rng.integers(0, 10**6, (300, 6)), np.full(6, 50)
    monkeypatch.setattr(tr, "_PRICED_ROUNDS", 0)
    col = tr._priced(cost, capacity)
    assert _cost_of(cost, col) == _cost_of(cost, tr.transport(cost, capacity))


def _stage1_cost(topo: Topology, on_dev: np.ndarray, home: np.ndarray) -> tuple[np.ndarray, ...]:
    samples = on_dev.shape[0]
    on_node = on_dev.reshape(samples, topo.nodes, topo.gpus_per_node).sum(axis=2)
    stay = topo.device_node[home][:, None] == np.arange(topo.nodes)[None, :]
    return with_tiebreak(on_dev.sum(axis=1, keepdims=True) - on_node, stay), on_node


def _reference_two_stage(topo: Topology, on_dev: np.ndarray, home: np.ndarray) -> np.ndarray:
    """Both stages as one min-cost flow per problem (stage 2 node by node)."""
    samples, gpus = on_dev.shape[0], topo.gpus_per_node
    cost, on_node = _stage1_cost(topo, on_dev, home)
    node = tr.transport(cost, np.full(topo.nodes, samples // topo.nodes))
    device = np.empty(samples, dtype=np.int64)
    for n in range(topo.nodes):
        rows = np.flatnonzero(node == n)
        devs = np.arange(n * gpus, (n + 1) * gpus)
        intra = on_node[rows, n][:, None] - on_dev[np.ix_(rows, devs)]
        stay = home[rows][:, None] == devs[None, :]
        per = samples // topo.devices
        device[rows] = devs[tr.transport(with_tiebreak(intra, stay), np.full(gpus, per))]
    return device


@pytest.mark.parametrize(("nodes", "gpus", "per_device", "seed"), [
    (2, 8, 24, 0),  # closed form in stage 1
    (2, 2, 8, 1),  # closed form in both stages
    (4, 8, 8, 2),
    (32, 8, 16, 3),  # pricing in stage 1 (4096 samples on 32 nodes)
    (32, 8, 16, 4),
])
def test_two_stage_matches_the_flow_reference(nodes: int, gpus: int, per_device: int,
                                              seed: int) -> None:
    """Stage 1: the same inter-node routes and the same number of samples kept on their home
    node; stage 2, given stage 1's nodes: the same intra-node routes and samples kept home."""
    topo = Topology(nodes, gpus, 2 * nodes * gpus)
    samples = nodes * gpus * per_device
    counts = planted_counts(np.random.default_rng(seed), samples, topo.experts, tokens=64,
                            domains=max(2, nodes))
    on_dev = device_counts(topo, counts[0]) + device_counts(topo, counts[1])
    home = np.random.default_rng(seed).permutation(np.arange(samples) // per_device)
    fast = place_two_stage(topo, on_dev, home)
    ref = _reference_two_stage(topo, on_dev, home)
    cost, _ = _stage1_cost(topo, on_dev, home)
    node_fast, node_ref = topo.device_node[fast], topo.device_node[ref]
    assert _cost_of(cost, node_fast) == _cost_of(cost, node_ref)
    assert (np.bincount(fast, minlength=topo.devices) == per_device).all()
    # Stage 2 given the fast stage 1: the reference's device stage on the same nodes.
    inter, intra, _ = channel_routes(topo, fast, on_dev)
    same_nodes = _reference_stage2(topo, on_dev, home, node_fast)
    assert (inter, intra) == channel_routes(topo, same_nodes, on_dev)[:2]
    assert (fast == home).sum() == (same_nodes == home).sum()


def _reference_stage2(topo: Topology, on_dev: np.ndarray, home: np.ndarray,
                      node: np.ndarray) -> np.ndarray:
    samples, gpus = on_dev.shape[0], topo.gpus_per_node
    on_node = on_dev.reshape(samples, topo.nodes, gpus).sum(axis=2)
    device = np.empty(samples, dtype=np.int64)
    for n in range(topo.nodes):
        rows = np.flatnonzero(node == n)
        devs = np.arange(n * gpus, (n + 1) * gpus)
        intra = on_node[rows, n][:, None] - on_dev[np.ix_(rows, devs)]
        stay = home[rows][:, None] == devs[None, :]
        per = samples // topo.devices
        device[rows] = devs[tr.transport(with_tiebreak(intra, stay), np.full(gpus, per))]
    return device


@pytest.mark.parametrize(("nodes", "per_device"), [(2, 24), (32, 16)])
def test_equal_costs_keep_every_sample_home(nodes: int, per_device: int) -> None:
    """Closed form and pricing keep the flow's tie rule: nothing moves when nothing is gained."""
    topo = Topology(nodes, 8, nodes * 8)
    counts = np.full((nodes * 8 * per_device, topo.experts), 3)
    home = np.random.default_rng(0).permutation(np.arange(len(counts)) // per_device)
    plan = solve(topo, counts, counts, home=home)
    assert plan.moved == 0


@pytest.mark.parametrize(
    ("rows", "cols", "high"), [(2048, 16, 3), (1024, 32, 10**6), (4096, 32, 40)]
)
def test_large_problems_take_the_priced_path_and_match_the_flow(rows: int, cols: int,
                                                                high: int) -> None:
    rng = np.random.default_rng(rows + cols)
    cost = rng.integers(0, high, (rows, cols))
    capacity = rng.multinomial(rows, np.ones(cols) / cols)
    assert rows * cols >= tr._PRICED_ARCS and cols >= tr._PRICED_COLS
    col = tr.transport_blocks(cost, np.zeros(rows, dtype=np.int64), capacity[None, :])
    assert (np.bincount(col, minlength=cols) == capacity).all()
    assert _cost_of(cost, col) == _cost_of(cost, tr.transport(cost, capacity))
