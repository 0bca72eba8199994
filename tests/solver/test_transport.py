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


def _random_instance(rng: np.random.Generator):
    """A block-structured instance with the shapes a wrong shortcut would trip on: empty blocks,
    uneven blocks, capacities of 0 and of a whole block, costs from a narrow range (ties
    everywhere), all zero, identical rows, or spread up to 10**9."""
    blocks, cols = int(rng.integers(1, 6)), int(rng.integers(2, 10))
    if rng.random() < 0.5:
        sizes = rng.integers(0, 80, blocks)
    else:
        sizes = np.full(blocks, int(rng.integers(1, 80)))
    block = rng.permutation(np.repeat(np.arange(blocks), sizes))
    capacity = np.zeros((blocks, cols), dtype=np.int64)
    for b, n in enumerate(sizes):
        kind = rng.integers(4)
        if kind == 0:  # one column takes the whole block
            capacity[b, rng.integers(cols)] = n
        elif kind == 1:  # some columns take nothing
            capacity[b] = rng.multinomial(n, rng.dirichlet(np.ones(cols) * 0.3))
        else:
            capacity[b] = rng.multinomial(n, np.ones(cols) / cols)
    rows = len(block)
    kind = rng.integers(5)
    if kind == 0:
        cost = np.zeros((rows, cols), dtype=np.int64)
    elif kind == 1:  # identical rows
        cost = np.tile(rng.integers(0, 5, cols), (rows, 1))
    else:
        cost = rng.integers(0, int(rng.choice([2, 4, 50, 10**9])), (rows, cols))
    return cost, block, capacity


def _assert_optimal(cost: np.ndarray, block: np.ndarray, capacity: np.ndarray,
                    col: np.ndarray) -> None:
    """col fills every column of every block exactly, at the reference flow's cost."""
    for b in range(capacity.shape[0]):
        rows = block == b
        assert (np.bincount(col[rows], minlength=capacity.shape[1]) == capacity[b]).all()
        ref = tr.transport(cost[rows], capacity[b])
        assert _cost_of(cost[rows], col[rows]) == _cost_of(cost[rows], ref)


@pytest.mark.parametrize("seed", range(300))
def test_pricing_matches_the_flow(seed: int) -> None:
    """_priced on its own, on random instances far below the size where transport_blocks
    picks it, so that many shapes are tried."""
    rng = np.random.default_rng(seed)
    cost, block, capacity = _random_instance(rng)
    shifted = cost - cost.min(axis=1, keepdims=True) if len(cost) else cost
    col = tr._priced(shifted, block, capacity, np.bincount(block, minlength=capacity.shape[0]))
    _assert_optimal(cost, block, capacity, col)


@pytest.mark.parametrize("seed", range(60))
def test_shortest_paths_are_exact_from_any_prices(seed: int) -> None:
    """The sweeps only save work: from random start prices the paths reach the optimum too."""
    rng = np.random.default_rng(1000 + seed)
    cost, block, capacity = _random_instance(rng)
    order = np.argsort(block, kind="stable")
    by_row = (cost - cost.min(axis=1, keepdims=True))[order] if len(cost) else cost
    price = rng.integers(-50, 50, capacity.shape)
    start = (by_row - price[block[order]]).argmin(axis=1) if len(cost) else block
    col = np.empty(len(block), dtype=np.int64)
    col[order] = tr._shortest_paths(by_row, start, block[order], capacity, price)
    _assert_optimal(cost, block, capacity, col)


@pytest.mark.parametrize("seed", range(60))
def test_transport_blocks_matches_the_flow_on_every_path(seed: int) -> None:
    """Through the public entry: one column, two columns (closed form), small blocks (flow),
    many rows per column (prices), huge cost ranges (flow)."""
    rng = np.random.default_rng(2000 + seed)
    cost, block, capacity = _random_instance(rng)
    if seed % 3 == 0:
        cost = np.minimum(cost, 64) << 38  # spreads past _MAX_RANGE: the flow's path
    col = tr.transport_blocks(cost, block, capacity)
    _assert_optimal(cost, block, capacity, col)
    one = tr.transport_blocks(cost[:, :1], block, capacity.sum(axis=1, keepdims=True))
    assert (one == 0).all()


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
    ("rows", "cols", "high"),
    [(2048, 16, 3), (1024, 32, 10**6), (4096, 32, 40), (1024, 8, 2**48)],  # the last: flow
)
def test_large_problems_take_the_priced_path_and_match_the_flow(rows: int, cols: int,
                                                                high: int) -> None:
    """Up to costs whose spread could overflow the prices' sums: those go to the flow."""
    rng = np.random.default_rng(rows + cols)
    cost = rng.integers(0, high, (rows, cols))
    capacity = rng.multinomial(rows, np.ones(cols) / cols)
    assert rows * cols >= tr._PRICED_ARCS and rows >= tr._PRICED_ROWS * cols
    col = tr.transport_blocks(cost, np.zeros(rows, dtype=np.int64), capacity[None, :])
    assert (np.bincount(col, minlength=cols) == capacity).all()
    assert _cost_of(cost, col) == _cost_of(cost, tr.transport(cost, capacity))


@pytest.mark.parametrize("seed", range(4))
def test_large_uneven_blocks_take_the_priced_path_and_match_the_flow(seed: int) -> None:
    """Blocks of different sizes (padded for the sweeps) and uneven capacities, as expert
    placement passes them, with ties from a narrow cost range."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(100, 300, 8)
    block = rng.permutation(np.repeat(np.arange(8), sizes))
    capacity = np.stack([rng.multinomial(n, rng.dirichlet(np.ones(8))) for n in sizes])
    cost = rng.integers(0, int(rng.choice([6, 10**4])), (len(block), 8))
    assert len(block) * 8 >= tr._PRICED_ARCS and len(block) >= tr._PRICED_ROWS * 8 * 8
    _assert_optimal(cost, block, capacity, tr.transport_blocks(cost, block, capacity))
