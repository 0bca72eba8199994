"""Load-aware expert placement (solver/balance.py): route tables and tiny fits against brute
force, the bound and the migration budget on the FLAME fixture, held-out loads, bad input."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from netmoe.solver import Topology
from netmoe.solver.balance import (
    balanced_table,
    candidates,
    check_tables,
    choose,
    fit_balanced,
    load_summary,
    loads_of,
    owner_loads,
)
from netmoe.solver.experts import fit_experts
from netmoe.solver.replicas import (
    check_copies,
    evaluate_replicas,
    fit_replicas,
    place_replicated,
    served,
)
from netmoe.trace import load_trace, sample_counts

FLAME = Path(__file__).parents[1] / "fixtures" / "flame_290m_2048tok_layers2-9.npz"


def _allowed(gpus: int, holders: np.ndarray, e: int, d: int) -> list[int]:
    """The rule, written out: d itself, else the holders on d's node, else every holder."""
    if holders[e, d]:
        return [d]
    node = [h for h in np.flatnonzero(holders[e]) if h // gpus == d // gpus]
    return [int(h) for h in (node or np.flatnonzero(holders[e]))]


def test_candidates_follow_the_rule() -> None:
    rng = np.random.default_rng(1)
    topo = Topology(2, 2, 8)
    holders = rng.random((8, 4)) < 0.4
    holders[np.arange(8), rng.integers(0, 4, 8)] = True
    allowed = candidates(topo, holders)
    for e, d in itertools.product(range(8), range(4)):
        assert np.flatnonzero(allowed[e, d]).tolist() == _allowed(2, holders, e, d)


@pytest.mark.parametrize("seed", range(6))
def test_balanced_table_is_optimal_on_small_cases(seed: int) -> None:
    rng = np.random.default_rng(seed)
    topo = Topology(2, 2, 4)
    holders = rng.random((4, 4)) < 0.5
    holders[np.arange(4), rng.integers(0, 4, 4)] = True
    weight = rng.integers(0, 9, (4, 4))
    table = balanced_table(topo, weight, holders)
    options = [_allowed(2, holders, e, d) for e, d in itertools.product(range(4), range(4))]
    best = min(
        np.bincount(list(pick), weights=weight.ravel(), minlength=4).max()
        for pick in itertools.product(*options)
    )
    assert loads_of(table, weight, 4).max() == best
    check_tables("t", table.T[None], topo, holders[None])  # within the rule


def _brute(topo: Topology, counts: np.ndarray, slots: int, bound: float,
           now: np.ndarray, budget: int | None) -> tuple:
    """Best (within bound, excess, inter, intra, moved) over every map and copy set, samples
    placed by the exact replica-aware two-stage placement, tables by enumeration."""
    layers, experts, j, g = counts.shape[0], topo.experts, topo.devices, topo.gpus_per_node
    per = experts // j
    maps_options = sorted(set(itertools.permutations(np.repeat(np.arange(j), per).tolist())))
    options = []
    for owners in maps_options:
        per_device = [[c for k in range(slots + 1)
                       for c in itertools.combinations([e for e in range(experts)
                                                        if owners[e] != d], k)]
                      for d in range(j)]
        for pick in itertools.product(*per_device):
            held = np.zeros((experts, j), dtype=bool)
            held[np.arange(experts), owners] = True
            for d, chosen in enumerate(pick):
                held[list(chosen), d] = True
            options.append((np.array(owners), held))
    home = np.repeat(np.arange(j), counts.shape[1] // j)
    best = None
    for pick in itertools.product(options, repeat=layers):
        maps = np.stack([m for m, _ in pick])
        holders = np.stack([h for _, h in pick])
        moved = int((maps != now).sum())
        if budget is not None and moved > budget:
            continue
        inter = intra = 0
        weight = np.zeros((layers, experts, j), dtype=np.int64)
        for p in range(layers - 1):
            dev = place_replicated(topo, counts[p:p + 2], holders[p:p + 2], home)
            for q in (p, p + 1):
                for i, e in itertools.product(range(counts.shape[1]), range(experts)):
                    n, d = counts[q, i, e], dev[i]
                    weight[q, e, d] += n
                    node = holders[q, e, d // g * g:(d // g + 1) * g].any()
                    inter += 0 if node else n
                    intra += n if node and not holders[q, e, d] else 0
        excess = 0.0
        for q in range(layers):
            opts = [_allowed(g, holders[q], e, d) for e, d in itertools.product(range(experts),
                                                                                range(j))]
            top = min(np.bincount(list(t), weights=weight[q].ravel(), minlength=j).max()
                      for t in itertools.product(*opts))
            mean = weight[q].sum() / j
            excess += max(0.0, (top / mean if mean else 1.0) - bound)
        key = (0, 0.0, inter, intra, moved) if excess <= 1e-12 else (1, excess, inter, intra,
                                                                      moved)
        best = key if best is None or key < best else best
    return best


@pytest.mark.parametrize("nodes, gpus, slots, bound, budget, seed", [
    (2, 1, 0, 1.0, None, 0),
    (2, 1, 1, 1.2, None, 1),
    (1, 2, 1, 1.0, None, 2),
    (2, 1, 0, math.inf, 1, 3),
    (2, 1, 1, 1.1, 2, 4),
])
def test_tiny_fits_are_exact(nodes: int, gpus: int, slots: int, bound: float,
                             budget: int | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    topo = Topology(nodes, gpus, 4)
    counts = rng.integers(0, 4, (2, 2, 4))
    now = np.tile(topo.expert_device, (2, 1))
    fit = fit_balanced(topo, [counts], slots=slots, max_load_ratio=bound,
                       migration_budget=budget)
    assert fit.exact
    excess = sum(max(0.0, r - bound) for r in fit.ratios)
    got = ((0, 0.0) if excess <= 1e-12 else (1, pytest.approx(excess))) + (
        *fit.objective, fit.moved)
    assert got == _brute(topo, counts, slots, bound, now, budget)


def _flame(samples: int = 64) -> np.ndarray:
    return sample_counts(load_trace(FLAME), 64, samples)


def test_fixture_fit_meets_the_bound_for_few_more_routes() -> None:
    counts = _flame()[:, :16]
    topo = Topology(2, 4, 64)
    maps = fit_experts(topo, [counts]).array()
    routes_only = fit_replicas(topo, [counts], maps, slots=1)
    fit = fit_balanced(topo, [counts], slots=1, max_load_ratio=1.05)
    assert not fit.exact and fit.within_bound
    assert max(fit.ratios) <= 1.05
    # Balancing costs at most 2% more inter-node routes than routes only, here.
    assert fit.objective[0] <= routes_only.inter * 1.02
    # The fit's loads are what the tables serve on the fit window: replayed, they agree.
    ev = evaluate_replicas(topo, [counts], np.array(fit.maps), fit.copies, tables=fit.tables)
    per_layer = np.zeros((8, 8), dtype=np.int64)
    for p, pair in enumerate(ev.loads):
        per_layer[p:p + 2] += np.array(pair)
    assert per_layer.tolist() == [list(v) for v in fit.loads]
    assert ev.total.inter == fit.objective[0]


def test_migration_budget_bounds_the_moves() -> None:
    counts = _flame()[:, :16]
    topo = Topology(2, 4, 64)
    home = np.tile(topo.expert_device, (8, 1))
    frozen = fit_balanced(topo, [counts], slots=1, migration_budget=0)
    assert frozen.moved == 0 and np.array_equal(np.array(frozen.maps), home)
    few = fit_balanced(topo, [counts], slots=1, max_load_ratio=1.05, migration_budget=20)
    assert 0 < few.moved <= 20
    assert few.objective[0] < frozen.objective[0] or max(few.ratios) < max(frozen.ratios)


def test_held_out_loads_recount_from_tables() -> None:
    counts = _flame()
    topo = Topology(2, 4, 64)
    choice = choose(topo, [counts[:, :16]], np.tile(topo.expert_device, (8, 1)),
                    method="balanced", slots=1, max_load_ratio=1.05)
    held = counts[:, 16:]
    ev = evaluate_replicas(topo, [held], np.array(choice.maps), choice.copies,
                           tables=choice.tables)
    tables = np.array(choice.tables).transpose(0, 2, 1)  # [L, E, J]
    for p, pair in enumerate(ev.loads):
        dev = np.array(ev.replicated_devices[0][p])
        for k in range(2):
            load = np.zeros(8, dtype=np.int64)
            for i, e in itertools.product(range(held.shape[1]), range(64)):
                load[tables[p + k, e, dev[i]]] += held[p + k, i, e]
            assert list(pair[k]) == load.tolist()
            assert served(topo, held[p + k], tables[p + k], dev).sum(axis=0).tolist() == \
                load.tolist()
    mean, worst = load_summary(ev.loads)
    assert 1.0 <= mean <= worst
    home = owner_loads(topo, [held], topo.expert_device)
    assert home.shape == (7, 2, 8)
    for layer in range(8):  # expert e's routes land on its home device e // 8
        per_device = held[layer].sum(axis=0).reshape(8, 8).sum(axis=1).tolist()
        assert home[min(layer, 6), 0 if layer < 7 else 1].tolist() == per_device


def test_eplb_choice_is_served_within_the_rule() -> None:
    counts = _flame()[:, :16]
    topo = Topology(2, 4, 64)
    choice = choose(topo, [counts], topo.expert_device, method="eplb", slots=1)
    holders = check_copies("c", choice.copies, topo, np.array(choice.maps))
    check_tables("t", choice.tables, topo, holders)
    assert holders.sum() <= 8 * (64 + 8)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_load_ratio": 0.9}, "max_load_ratio must be a number >= 1"),
    ({"max_load_ratio": float("nan")}, "max_load_ratio must be a number >= 1"),
    ({"migration_budget": -1}, "migration_budget must be an integer >= 0"),
    ({"slots": 4}, "slots=4 copies per device do not fit"),
])
def test_bad_fit_input(kwargs: dict, message: str) -> None:
    topo = Topology(2, 1, 4)
    with pytest.raises(ValueError, match=message):
        fit_balanced(topo, [np.ones((2, 2, 4), dtype=np.int64)], **kwargs)


def test_bad_tables() -> None:
    topo = Topology(2, 2, 4)
    maps = np.array([[0, 1, 2, 3]])
    holders = check_copies("copies", [[(0, 2)]], topo, maps)
    good = np.array([[0, 1, 2, 3]] * 4)  # [J][E]: owners serve every device...
    good[2, 0] = good[3, 0] = 2  # ...except expert 0 on node 1, where its copy is
    check_tables("tables", good[None], topo, holders)
    bad = good.copy()
    bad[1, 1] = 3
    with pytest.raises(ValueError, match=r"tables\[0\]\[1\]\[1\]=3 names a device that does not "
                                         r"hold expert 1 of layer 0 \(its owner and copies: "
                                         r"\[1\]\)"):
        check_tables("tables", bad[None], topo, holders)
    bad = good.copy()
    bad[2, 0] = 0
    with pytest.raises(ValueError, match=r"tables\[0\]\[2\]\[0\]=0: device 2 holds expert 0 and "
                                         r"must serve its own samples"):
        check_tables("tables", bad[None], topo, holders)
    bad = good.copy()
    bad[3, 0] = 0
    with pytest.raises(ValueError, match=r"tables\[0\]\[3\]\[0\]=0: node 1 holds expert 0, the "
                                         r"table sends its routes to node 0"):
        check_tables("tables", bad[None], topo, holders)
    with pytest.raises(ValueError, match=r"tables must be integers of shape \(1, 4, 4\)"):
        check_tables("tables", good, topo, holders)


def test_copies_split_a_hot_expert_that_exchanges_cannot() -> None:
    # One node, so copies save no inter-node route and a route-only fit makes none; expert 0
    # carries 40% of the routes: no exchange of owners gets the busiest device below 1.6 x mean.
    rng = np.random.default_rng(3)
    topo = Topology(1, 4, 8)
    counts = rng.poisson(2.0, (2, 16, 8))
    counts[:, :, 0] += 8
    fit = fit_balanced(topo, [counts], slots=1, max_load_ratio=1.2)
    assert not fit.exact
    assert fit.within_bound, fit.ratios
    for layer in range(2):
        assert sum(e == 0 for e, _ in fit.copies[layer]) >= 2  # the hot expert is split
    routes_only = fit_balanced(topo, [counts], slots=1)
    assert min(routes_only.ratios) > 1.5
