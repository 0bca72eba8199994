"""The transportation paths against references: the min-cost flow over every arc, and the
optimality condition of a transportation problem (no cycle of moves that lowers the cost),
checked without any solver.

Each path must reach the optimal cost (several optima may exist; any one is right) and fill
every column exactly. Costs drawn from a narrow range make ties common, which is where a wrong
shortcut would show."""

from __future__ import annotations

import numpy as np
import pytest

from netmoe.solver import Topology, solve
from netmoe.solver import transport as tr
from netmoe.solver.cost import channel_routes, device_counts
from netmoe.solver.synthetic import planted_counts, planted_rounds
from netmoe.solver.two_stage import Prices, place_stages, place_two_stage, with_tiebreak


def _cost_of(cost: np.ndarray, col: np.ndarray) -> int:
    return int(cost[np.arange(len(col)), col].sum())


def _improving_cycle(cost: np.ndarray, col: np.ndarray) -> bool:
    """Whether moving one row along each edge of a cycle of columns lowers the total cost. A
    filled assignment is optimal exactly when no such cycle exists (negative-cycle optimality of
    min-cost flow), so this decides optimality with numpy alone.

    cost: [R, C] int64, the rows of one block; col: [R] int64 the column of each row."""
    cols = cost.shape[1]
    # move[a, b]: the least cost change of moving one row of column a to column b.
    move = np.full((cols, cols), np.iinfo(np.int64).max // 4)
    for a in range(cols):
        rows = col == a
        if rows.any():
            move[a] = (cost[rows] - cost[rows, a][:, None]).min(axis=0)
    np.fill_diagonal(move, 0)
    for k in range(cols):  # Floyd-Warshall: a negative diagonal is a negative cycle
        move = np.minimum(move, move[:, k:k + 1] + move[k:k + 1, :])
    return bool((np.diag(move) < 0).any())


def _assert_optimal(cost: np.ndarray, block: np.ndarray, capacity: np.ndarray,
                    col: np.ndarray) -> None:
    """col fills every column of every block exactly, no cycle of moves improves it, and it
    costs what the reference flow's assignment costs."""
    for b in range(capacity.shape[0]):
        rows = block == b
        assert (np.bincount(col[rows], minlength=capacity.shape[1]) == capacity[b]).all()
        assert not _improving_cycle(cost[rows], col[rows])
        ref = tr.transport(cost[rows], capacity[b])
        assert _cost_of(cost[rows], col[rows]) == _cost_of(cost[rows], ref)


def test_the_optimality_check_finds_a_cheaper_assignment() -> None:
    """The check can fail: two rows each on the other's cheap column, and a three-column cycle
    whose every pair swap costs more than it saves."""
    assert _improving_cycle(np.array([[0, 5], [5, 0]]), np.array([1, 0]))
    assert not _improving_cycle(np.array([[0, 5], [5, 0]]), np.array([0, 1]))
    cycle = np.array([[0, 1, 9], [9, 0, 1], [1, 9, 0]])
    assert _improving_cycle(cycle, np.array([1, 2, 0]))  # each row one column late
    assert not _improving_cycle(cycle, np.array([0, 1, 2]))
    assert not _improving_cycle(np.array([[0, 5], [5, 0]])[:0], np.array([], dtype=np.int64))


def test_blocks_reject_capacities_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="block 1: capacities sum to 3, need one slot per row"):
        tr.transport_blocks(np.zeros((4, 2), dtype=np.int64), np.array([0, 0, 1, 1]),
                            np.array([[1, 1], [2, 1]]))


def _random_instance(rng: np.random.Generator, cols: int | None = None, least: int = 0,
                     most: int = 80, blocks: int | None = None):
    """A block-structured instance with the shapes a wrong shortcut would trip on: empty blocks,
    uneven blocks, capacities of 0 and of a whole block, costs from a narrow range (ties
    everywhere), all zero, identical rows, or spread up to 10**9. Blocks of least to most rows
    (random widths when cols or blocks are None)."""
    blocks = int(rng.integers(1, 6)) if blocks is None else blocks
    cols = int(rng.integers(2, 10)) if cols is None else cols
    if rng.random() < 0.5:
        sizes = rng.integers(least, most, blocks)
    else:
        sizes = np.full(blocks, int(rng.integers(max(1, least), most)))
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


def _instance_on(path: tr.Path, rng: np.random.Generator):
    """A random instance of the shape transport_blocks solves on that path."""
    if path == "one column":
        if rng.random() < 0.25:  # no rows at all, whatever the width
            cols, blocks = int(rng.integers(2, 10)), int(rng.integers(1, 6))
            empty = np.zeros((0, cols), dtype=np.int64)
            return empty, np.zeros(0, dtype=np.int64), np.zeros((blocks, cols), dtype=np.int64)
        return _random_instance(rng, cols=1)
    if path == "two columns":
        return _random_instance(rng, cols=2, most=int(rng.choice([12, 300])))
    if path == "priced":  # enough arcs, and rows per column and block
        cols, blocks = int(rng.integers(3, 9)), int(rng.integers(1, 4))
        least = max(-(-tr._PRICED_ARCS // (cols * blocks)), tr._PRICED_ROWS * cols)
        return _random_instance(rng, cols, least, 2 * least, blocks)
    return _random_instance(rng, cols=int(rng.integers(3, 10)), most=int(rng.choice([12, 80])))


@pytest.mark.parametrize("seed", range(15))
@pytest.mark.parametrize("path", tr.PATHS)
def test_transport_blocks_matches_the_flow_on_every_path(path: tr.Path, seed: int) -> None:
    """Through the public entry, on instances of each path's shape: the path taken is the one
    expected, and its assignment is optimal."""
    cost, block, capacity = _instance_on(path, np.random.default_rng(2000 + seed))
    got = tr.transport_blocks(cost, block, capacity)
    assert got.path == path
    _assert_optimal(cost, block, capacity, got.col)


@pytest.mark.parametrize("seed", range(300))
def test_pricing_matches_the_flow(seed: int) -> None:
    """_priced on its own, on random instances far below the size where transport_blocks
    picks it, so that many shapes are tried."""
    rng = np.random.default_rng(seed)
    cost, block, capacity = _random_instance(rng)
    shifted = cost - cost.min(axis=1, keepdims=True) if len(cost) else cost
    col = tr._priced(shifted, block, capacity, np.bincount(block, minlength=capacity.shape[0])).col
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
    col[order] = tr._shortest_paths(by_row, start, block[order], capacity, price)[0]
    _assert_optimal(cost, block, capacity, col)


def _bad_prices(rng: np.random.Generator, shape: tuple[int, int], kind: int) -> np.ndarray:
    """Start prices that no earlier alike problem would give: random, huge (near the int64
    ends, which a careless shift would overflow), or all equal."""
    if kind == 0:
        return rng.integers(-10**6, 10**6, shape)
    if kind == 1:
        return rng.choice(np.array([-2**63, 2**63 - 1, 0, 2**62]), shape)
    return np.full(shape, 7, dtype=np.int64)


@pytest.mark.parametrize("seed", range(150))
def test_pricing_from_any_warm_prices_matches_the_flow(seed: int) -> None:
    """Warm-started _priced, from random, huge or equal start prices, on the random instances
    of test_pricing_matches_the_flow (ties, zero costs, identical rows, full and empty columns):
    the optimum every time."""
    rng = np.random.default_rng(5000 + seed)
    cost, block, capacity = _random_instance(rng)
    if not len(cost):
        return
    shifted = cost - cost.min(axis=1, keepdims=True)
    start = tr._warm_start(_bad_prices(rng, capacity.shape, seed % 3), capacity.shape,
                           int(shifted.max()))
    got = tr._priced(shifted, block, capacity, np.bincount(block, minlength=capacity.shape[0]),
                     start)
    assert got.sweeps == tr._WARM_SWEEPS
    _assert_optimal(cost, block, capacity, got.col)


@pytest.mark.parametrize("seed", range(12))
def test_transport_blocks_from_warm_prices_matches_the_flow(seed: int) -> None:
    """Through the public entry on priced-path instances: from the instance's own optimal prices,
    another instance's, bad ones, or prices that do not fit (another shape, a float dtype: a
    cold start, no error), the optimum every time."""
    rng = np.random.default_rng(6000 + seed)
    cost, block, capacity = _instance_on("priced", rng)
    cold = tr.transport_blocks(cost, block, capacity)
    assert cold.path == "priced" and cold.sweeps == tr._SWEEPS
    assert cold.price is not None and cold.price.shape == capacity.shape
    other = tr.transport_blocks(*_instance_on("priced", np.random.default_rng(7000 + seed)))
    starts = [cold.price, _bad_prices(rng, capacity.shape, seed % 3)]
    if other.price.shape == capacity.shape:
        starts.append(other.price)
    for start in starts:
        got = tr.transport_blocks(cost, block, capacity, start)
        assert (got.path, got.sweeps) == ("priced", tr._WARM_SWEEPS)
        _assert_optimal(cost, block, capacity, got.col)
    for unfit in (np.zeros((capacity.shape[0] + 1, capacity.shape[1]), dtype=np.int64),
                  cold.price.astype(np.float64), [[0] * capacity.shape[1]]):
        got = tr.transport_blocks(cost, block, capacity, unfit)
        assert (got.path, got.sweeps) == ("priced", tr._SWEEPS)
        _assert_optimal(cost, block, capacity, got.col)


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


def _alike_rounds(topo: Topology, seed: int, rounds: int, tokens: int = 64) -> list[np.ndarray]:
    """[I, J] int64 device counts (gather + scatter) of a planted job's alike rounds, 16 samples
    per device (few tokens: ties are common)."""
    gen = planted_rounds(np.random.default_rng(seed), topo.devices * 16, topo.experts,
                         tokens=tokens, domains=topo.nodes)
    return [device_counts(topo, c[0]) + device_counts(topo, c[1])
            for c in (next(gen) for _ in range(rounds))]


def _stages(topo: Topology, on_dev: np.ndarray, home: np.ndarray, warm: Prices | None):
    samples = on_dev.shape[0]
    by_node = on_dev.reshape(samples, topo.nodes, topo.gpus_per_node)
    return place_stages(topo, by_node.sum(axis=2), lambda n: by_node[np.arange(samples), n],
                        home, warm=warm)


@pytest.mark.parametrize("seed", range(2))
def test_warm_two_stage_matches_the_flow_reference(seed: int) -> None:
    """Both stages priced (4096 samples on 32 nodes of 8), warm-started from the previous alike
    round's prices, from bad prices, and from another topology's (ignored): stage 1 reaches the
    reference's cost, stage 2 given stage 1's nodes the reference's intra-node routes and
    samples kept home."""
    topo = Topology(32, 8, 512)
    rounds = _alike_rounds(topo, seed, 3)
    rng = np.random.default_rng(seed)
    home = rng.permutation(np.arange(len(rounds[0])) // 16)
    small = _stages(Topology(4, 8, 64), _alike_rounds(Topology(4, 8, 64), seed, 1)[0],
                    np.arange(512) // 16, None).prices
    previous = _stages(topo, rounds[0], home, None).prices
    bad = Prices(_bad_prices(rng, (1, 32), 1), _bad_prices(rng, (32, 8), 0))
    for on_dev in rounds[1:]:
        cost, _ = _stage1_cost(topo, on_dev, home)
        ref = topo.device_node[_reference_two_stage(topo, on_dev, home)]
        for warm in (previous, bad, small):
            got = _stages(topo, on_dev, home, warm)
            assert (got.node.path, got.within.path) == ("priced", "priced")
            assert got.node.sweeps == (tr._SWEEPS if warm is small else tr._WARM_SWEEPS)
            assert _cost_of(cost, topo.device_node[got.device]) == _cost_of(cost, ref)
            same_nodes = _reference_stage2(topo, on_dev, home, topo.device_node[got.device])
            assert channel_routes(topo, got.device, on_dev) == channel_routes(
                topo, same_nodes, on_dev)
            assert (got.device == home).sum() == (same_nodes == home).sum()
        previous = _stages(topo, on_dev, home, previous).prices


def test_warm_start_takes_effect_on_alike_rounds() -> None:
    """On a job's alike rounds the previous round's prices start both stages (fewer sweeps) and
    save stage 2 shortest-path rounds (measured: 14.3 cold, 7.9 warm on average at 4096 x 256,
    the bench's 1024 tokens), so this fails if warm starts silently stop working."""
    topo = Topology(32, 8, 512)
    rounds = _alike_rounds(topo, 7, 6, tokens=1024)
    home = np.arange(len(rounds[0])) // 16
    warm, cold_rounds, warm_rounds = None, 0, 0
    for on_dev in rounds:
        cold = _stages(topo, on_dev, home, None)
        got = _stages(topo, on_dev, home, warm)
        if warm is not None:
            assert (got.node.sweeps, got.within.sweeps) == (tr._WARM_SWEEPS, tr._WARM_SWEEPS)
            cold_rounds += cold.within.rounds
            warm_rounds += got.within.rounds
        warm = got.prices
    assert warm_rounds < cold_rounds


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
    ("rows", "cols", "high", "path"),
    [(2048, 16, 3, "priced"), (1024, 32, 10**6, "priced"), (4096, 32, 40, "priced"),
     (1024, 8, 2**48, "flow")],
)
def test_large_problems_take_the_priced_path_and_match_the_flow(rows: int, cols: int,
                                                                high: int, path: str) -> None:
    """Up to costs whose spread could overflow the prices' sums: those go to the flow."""
    rng = np.random.default_rng(rows + cols)
    cost = rng.integers(0, high, (rows, cols))
    capacity = rng.multinomial(rows, np.ones(cols) / cols)
    assert rows * cols >= tr._PRICED_ARCS and rows >= tr._PRICED_ROWS * cols
    got = tr.transport_blocks(cost, np.zeros(rows, dtype=np.int64), capacity[None, :])
    assert got.path == path
    _assert_optimal(cost, np.zeros(rows, dtype=np.int64), capacity[None, :], got.col)


@pytest.mark.parametrize("seed", range(4))
def test_large_uneven_blocks_take_the_priced_path_and_match_the_flow(seed: int) -> None:
    """Blocks of different sizes (padded for the sweeps) and uneven capacities, as expert
    placement passes them, with ties from a narrow cost range."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(100, 300, 8)
    block = rng.permutation(np.repeat(np.arange(8), sizes))
    capacity = np.stack([rng.multinomial(n, rng.dirichlet(np.ones(8))) for n in sizes])
    cost = rng.integers(0, int(rng.choice([6, 10**4])), (len(block), 8))
    got = tr.transport_blocks(cost, block, capacity)
    assert got.path == "priced"
    _assert_optimal(cost, block, capacity, got.col)


def test_spreading_ties_keeps_least_reduced_costs_and_reaches_the_optimum() -> None:
    """The priced start's tie step: every row stays on a column of least reduced cost, no column
    fills past its capacity or drops below it, and the shortest paths from that start reach the
    optimum. Narrow cost ranges and small prices make ties common, so the step moves rows."""
    moved = 0
    for seed in range(80):
        rng = np.random.default_rng(3000 + seed)
        cost, block, capacity = _random_instance(rng)
        if not len(cost):
            continue
        order = np.argsort(block, kind="stable")
        by_row, blk = (cost - cost.min(axis=1, keepdims=True))[order], block[order]
        price = rng.integers(-3, 4, capacity.shape)
        reduced = by_row - price[blk]
        start = reduced.argmin(axis=1)
        spread = tr._spread_ties(reduced, start, blk, capacity)
        assert (reduced[np.arange(len(blk)), spread] == reduced.min(axis=1)).all()
        cols, need = capacity.shape[1], capacity.ravel()
        before = np.bincount(blk * cols + start, minlength=need.size)
        after = np.bincount(blk * cols + spread, minlength=need.size)
        assert (after <= np.maximum(before, need)).all()
        assert (after >= np.minimum(before, need)).all()
        moved += int((spread != start).sum())
        col = np.empty(len(block), dtype=np.int64)
        col[order] = tr._shortest_paths(by_row, spread, blk, capacity, price)[0]
        _assert_optimal(cost, block, capacity, col)
    assert moved > 0
