"""Expert placement advisor: alternation against brute force, planted affinity, migration."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from netmoe.solver import Topology
from netmoe.solver.experts import (
    _place_experts,
    _relabel,
    advise,
    evaluate_experts,
    fit_experts,
    migration,
    place_samples,
    recommend,
)
from netmoe.trace import load_trace, sample_counts

BIG = 10**9  # packs (inter, intra) into one integer for brute force; counts here are tiny


def _balanced(samples: int, devices: int) -> np.ndarray:
    """[K, samples]: every placement with samples/devices samples per device."""
    base = np.repeat(np.arange(devices), samples // devices)
    return np.array(sorted(set(itertools.permutations(base))))


def _channels(gpus: int, sample_dev: np.ndarray, expert_dev: np.ndarray,
              counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent cost model. sample_dev [K, I], expert_dev [M, E], counts [I, E] ->
    (inter, intra) routes, each [K, M]."""
    sd = sample_dev[:, :, None, None]
    ed = expert_dev[None, None, :, :]
    cross = sd // gpus != ed // gpus
    near = ~cross & (sd != ed)
    w = counts[None, :, None, :]
    return (w * cross).sum(axis=(1, 3)), (w * near).sum(axis=(1, 3))


def _brute_force(nodes: int, gpus: int, rounds: list[np.ndarray]) -> tuple[int, int]:
    """Lexicographic min of (inter, intra) over all balanced expert maps per layer and all
    balanced sample placements per round and pair."""
    layers, _, experts = rounds[0].shape
    j = nodes * gpus
    maps = _balanced(experts, j)
    pair_cost = []  # [p]: [M, M] best packed cost for maps (m_l, m_l+1), summed over rounds
    for p in range(layers - 1):
        table = np.zeros((len(maps), len(maps)), dtype=np.int64)
        for counts in rounds:
            placements = _balanced(counts.shape[1], j)
            ia, aa = _channels(gpus, placements, maps, counts[p])
            ib, ab = _channels(gpus, placements, maps, counts[p + 1])
            packed = (ia[:, :, None] + ib[:, None, :]) * BIG + aa[:, :, None] + ab[:, None, :]
            table += packed.min(axis=0)
        pair_cost.append(table)
    best = min(
        sum(int(pair_cost[p][combo[p], combo[p + 1]]) for p in range(layers - 1))
        for combo in itertools.product(range(len(maps)), repeat=layers)
    )
    return divmod(best, BIG)


def _samples_only(nodes: int, gpus: int, rounds: list[np.ndarray],
                  maps: np.ndarray) -> int:
    """Brute-force min inter-node routes with the expert maps [L, E] fixed."""
    total = 0
    for counts in rounds:
        placements = _balanced(counts.shape[1], nodes * gpus)
        for p in range(counts.shape[0] - 1):
            ia, _ = _channels(gpus, placements, maps[p][None], counts[p])
            ib, _ = _channels(gpus, placements, maps[p + 1][None], counts[p + 1])
            total += int((ia + ib).min())
    return total


SHAPES = [  # nodes, gpus, experts, layers, samples
    (2, 1, 4, 3, 4),
    (2, 2, 4, 2, 4),
    (3, 1, 6, 2, 6),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(4))
def test_alternation_never_worsens_and_reaches_brute_force(shape, seed):
    nodes, gpus, experts, layers, samples = shape
    rng = np.random.default_rng(seed)
    rounds = [rng.integers(0, 4, (layers, samples, experts)) for _ in range(2)]
    topo = Topology(nodes, gpus, experts)

    few = fit_experts(topo, rounds, starts=2, seed=seed)
    assert few.starts[0].label == "current"
    for run in few.starts:
        assert all(b < a for a, b in itertools.pairwise(run.history)), run
    # The current map's first point is its exact sample-only optimum (the sample step is exact
    # for inter-node routes), and the fit never ends above it.
    current = np.tile(topo.expert_device, (layers, 1))
    assert few.starts[0].history[0][0] == _samples_only(nodes, gpus, rounds, current)
    assert few.objective <= few.starts[0].history[0]

    best = _brute_force(nodes, gpus, rounds)
    assert few.objective >= best
    many = fit_experts(topo, rounds, starts=30, seed=seed)
    assert many.objective[0] == best[0]
    if gpus == 1:
        assert many.objective == best
    # The reported objective is what the returned maps achieve.
    assert _samples_only(nodes, gpus, rounds, many.array()) == many.objective[0]


@pytest.mark.parametrize("seed", range(3))
def test_expert_step_is_exact_given_samples(seed):
    rng = np.random.default_rng(seed)
    topo = Topology(3, 1, 6)
    rounds = [rng.integers(0, 5, (3, 6, 6)) for _ in range(2)]
    start = np.stack([rng.permutation(topo.expert_device) for _ in range(3)])
    place, _ = place_samples(topo, rounds, start)
    capacity = np.full(3, 2, dtype=np.int64)
    maps = _place_experts(topo, rounds, place, capacity, start)
    candidates = _balanced(6, 3)
    for layer in range(3):
        # Layer l's routes count in pair l - 1 (as scatter) and pair l (as gather).
        inter = np.zeros(len(candidates), dtype=np.int64)
        for p in (layer - 1, layer):
            if 0 <= p < 2:
                for r, counts in enumerate(rounds):
                    inter += _channels(1, place[r][p][None], candidates, counts[layer])[0][0]
        got = inter[[np.array_equal(c, maps[layer]) for c in candidates].index(True)]
        assert got == inter.min()
        assert np.bincount(maps[layer], minlength=3).tolist() == [2, 2, 2]


def _planted(rng: np.random.Generator, rounds: int, samples: int, groups: np.ndarray,
             noise: float = 0.1, routes: int = 64) -> list[np.ndarray]:
    """groups [L, D, E/D]: the experts of each domain per layer. Each sample has one domain (as
    many samples in each) and sends routes to its experts, a fraction noise of them to any
    expert."""
    layers, domains, _ = groups.shape
    experts = groups.size // layers
    out = []
    for _ in range(rounds):
        domain = rng.permutation(np.arange(samples) % domains)
        counts = np.zeros((layers, samples, experts), dtype=np.int64)
        for layer in range(layers):
            for i in range(samples):
                noisy = rng.random(routes) < noise
                picks = np.where(noisy, rng.integers(0, experts, routes),
                                 rng.choice(groups[layer, domain[i]], routes))
                np.add.at(counts[layer, i], picks, 1)
        out.append(counts)
    return out


def test_planted_affinity_is_recovered_and_generalizes():
    rng = np.random.default_rng(7)
    topo = Topology(2, 2, 8)  # default map: experts 0-3 on node 0, 4-7 on node 1
    # Each layer's two domains use experts from both nodes: every sample needs both nodes.
    groups = np.stack([np.stack([p[[0, 2, 4, 6]], p[[1, 3, 5, 7]]]) for p in
                       (np.arange(8), np.array([0, 4, 1, 5, 2, 6, 3, 7]),
                        np.array([7, 0, 6, 1, 5, 2, 4, 3]))])
    data = _planted(rng, 8, 8, groups)
    fit = fit_experts(topo, data[:4], seed=1)
    maps = fit.array()
    for layer in range(3):
        for domain in range(2):
            nodes = set(topo.device_node[maps[layer, groups[layer, domain]]].tolist())
            assert len(nodes) == 1, (layer, domain, maps[layer])

    ev = evaluate_experts(topo, data[4:], maps)
    assert ev.rounds == 4 and [p.layers for p in ev.pairs] == [(0, 1), (1, 2)]
    home, alone, joint = ev.home, ev.sample_only, ev.joint
    assert alone.inter <= home.inter
    assert joint.inter < 0.5 * home.inter
    assert joint.inter < 0.6 * alone.inter
    assert ev.inter_saving_per_step > 0 and ev.seconds_saving_per_step > 0
    # Held-out home figures from the independent cost model: samples at home, default experts.
    want = 0
    for counts in data[4:]:
        home_dev = (np.arange(8) // 2)[None]
        for p in range(2):
            want += int(_channels(2, home_dev, topo.expert_device[None], counts[p])[0][0, 0])
            want += int(_channels(2, home_dev, topo.expert_device[None], counts[p + 1])[0][0, 0])
    assert home.inter == want
    # Joint sample placements are balanced and achieve the reported routes.
    got = 0
    for r, counts in enumerate(data[4:]):
        for p in range(2):
            dev = np.array(ev.joint_devices[r][p])
            assert np.bincount(dev, minlength=4).tolist() == [2, 2, 2, 2]
            got += int(_channels(2, dev[None], maps[p][None], counts[p])[0][0, 0])
            got += int(_channels(2, dev[None], maps[p + 1][None], counts[p + 1])[0][0, 0])
    assert got == joint.inter


def test_flame_fixture_fit_generalizes_a_little():
    trace = load_trace(Path(__file__).parents[1] / "fixtures" / "flame_290m_2048tok_layers2-9.npz")
    counts = sample_counts(trace, 64, 64)  # [8 layers, 32 samples, 64 experts]
    topo = Topology(2, 4, 64)
    fit = fit_experts(topo, [counts[:, :16]], starts=2)
    assert fit.objective < fit.starts[0].history[0]
    for layer in fit.maps:
        assert np.bincount(layer, minlength=8).tolist() == [8] * 8
    ev = evaluate_experts(topo, [counts[:, 16:]], fit.array())
    assert len(ev.pairs) == 7
    # A homogeneous pretraining stream: small but real gains on held-out samples.
    assert ev.joint.inter < ev.sample_only.inter < ev.home.inter


def test_fit_is_deterministic_for_a_seed():
    rng = np.random.default_rng(3)
    data = [rng.integers(0, 5, (3, 8, 8)) for _ in range(2)]
    topo = Topology(2, 2, 8)
    assert fit_experts(topo, data, seed=5) == fit_experts(topo, data, seed=5)


def test_uneven_capacity_is_respected():
    rng = np.random.default_rng(4)
    data = [rng.integers(0, 6, (3, 8, 8)) for _ in range(2)]
    topo = Topology(2, 2, 8)
    capacity = [3, 1, 0, 4]
    fit = fit_experts(topo, data, capacity=capacity, starts=3)
    # The default map (2 per device) breaks this capacity, so it is no start.
    assert [s.label for s in fit.starts] == ["random-1", "random-2", "random-3"]
    assert fit.capacity == (3, 1, 0, 4)
    for layer in fit.maps:
        assert np.bincount(layer, minlength=4).tolist() == capacity


def test_a_good_current_map_stays_and_is_not_recommended():
    rng = np.random.default_rng(9)
    topo = Topology(2, 1, 8)  # one device per node: routes are local or inter-node
    # Domains already grouped by node under the default map: no map does better, and among
    # equally good maps the current one wins.
    groups = np.tile(np.array([[0, 1, 2, 3], [4, 5, 6, 7]]), (3, 1, 1))
    data = _planted(rng, 6, 8, groups, noise=0.0)
    out = advise(topo, data[:3], data[3:], bytes_per_expert=10**6, horizon_steps=10**9)
    assert out.fit.objective == (0, 0)
    assert out.fit.maps == tuple(tuple(topo.expert_device.tolist()) for _ in range(3))
    rec = out.recommendation
    assert not rec.adopt and rec.moved_experts == 0 and rec.migration_bytes == 0
    assert "nothing to move" in rec.reason


def test_relabel_undoes_a_renaming_of_devices():
    topo = Topology(3, 2, 12)
    rng = np.random.default_rng(2)
    current = np.stack([rng.permutation(topo.expert_device) for _ in range(2)])
    # Swap nodes 0 and 2, and the two devices of node 1: same routes, every expert moves.
    rename = np.array([4, 5, 3, 2, 0, 1])
    assert np.all(rename[current] != current)
    capacity = np.full(6, 2, dtype=np.int64)
    assert np.array_equal(_relabel(topo, rename[current], current, capacity), current)
    # With uneven capacity a renaming must keep every device's capacity: 5 - d would keep all
    # experts in place but swaps devices of capacity 1 and 3.
    uneven = np.array([1, 3, 2, 2, 1, 3])
    maps = np.stack([np.repeat(np.arange(6), uneven)] * 2)
    current = 5 - maps
    got = _relabel(topo, maps, current, uneven)
    for layer in got:
        assert np.bincount(layer, minlength=6).tolist() == uneven.tolist()
    assert (got == current).sum() > (maps == current).sum()


def test_recommendation_weighs_horizon_against_migration():
    rng = np.random.default_rng(11)
    topo = Topology(2, 2, 8, alpha_inter=1e-5, alpha_intra=1e-6)
    groups = np.stack([np.array([[0, 2, 4, 6], [1, 3, 5, 7]])] * 3)
    data = _planted(rng, 6, 8, groups)
    ev = evaluate_experts(topo, data[3:], fit_experts(topo, data[:3]).array())
    per_expert = 64 * 2**20
    short = recommend(topo, ev, bytes_per_expert=per_expert, horizon_steps=1)
    assert not short.adopt
    assert "horizon too short" in short.reason and "1 steps" in short.reason
    assert short.moved_experts > 0 and short.migration_bytes == short.moved_experts * per_expert
    assert short.saving_per_step == pytest.approx(2 * ev.seconds_saving_per_step)

    steps = math.ceil(short.break_even_steps) + 1
    long = recommend(topo, ev, bytes_per_expert=per_expert, horizon_steps=steps)
    assert long.adopt and f"{steps} steps" in long.reason
    assert long.saving_per_step * steps > long.migration_cost

    by_bytes = recommend(topo, ev, bytes_per_expert=per_expert, horizon_steps=steps,
                         unit="bytes", passes=1)
    assert by_bytes.migration_cost == by_bytes.moved_inter * per_expert
    assert by_bytes.saving_per_step == ev.inter_saving_per_step * topo.bytes_per_route


def test_recommendation_refuses_without_saving():
    rng = np.random.default_rng(12)
    topo = Topology(2, 1, 8)
    data = [rng.integers(0, 5, (2, 8, 8)) for _ in range(2)]
    # Swapping the two nodes' experts moves every expert and changes no route's channel once
    # samples follow: zero saving, never worth a migration.
    swapped = np.tile(1 - topo.expert_device, (2, 1))
    ev = evaluate_experts(topo, data, swapped)
    assert ev.joint.inter == ev.sample_only.inter
    rec = recommend(topo, ev, bytes_per_expert=1, horizon_steps=10**9)
    assert not rec.adopt and rec.moved_experts == 16 and rec.moved_inter == 16
    assert "no saving on 2 held-out rounds" in rec.reason
    assert rec.break_even_steps == math.inf


def test_migration_counts_and_time():
    topo = Topology(2, 2, 8, alpha_intra=1e-6, alpha_inter=2e-6, bw_intra=4e9, bw_inter=1e9)
    current = np.tile(topo.expert_device, (2, 1))  # 0 0 1 1 2 2 3 3
    maps = current.copy()
    maps[0, [0, 2]] = maps[0, [2, 0]]  # within node 0
    maps[1, [0, 4]] = maps[1, [4, 0]]  # across nodes
    moved, inter, seconds = migration(topo, maps, current, 10**6)
    assert (moved, inter) == (4, 2)
    assert seconds == pytest.approx(max(1e-6 + 2e6 / 4e9, 2e-6 + 2e6 / 1e9))
    assert migration(topo, current, current, 10**6) == (0, 0, 0.0)


def _rounds(layers=2, samples=4, experts=8):
    return [np.ones((layers, samples, experts), dtype=np.int64)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rounds": []}, "rounds must be a non-empty"),
        ({"rounds": np.ones((2, 4, 8), dtype=np.int64)}, "wrap it in a list"),
        ({"rounds": _rounds(layers=1)}, r"rounds\[0\] must have shape \(layers >= 2"),
        ({"rounds": _rounds() + _rounds(layers=3)}, r"rounds\[1\] has 3 layers"),
        ({"rounds": _rounds(samples=6)}, r"rounds\[0\] has samples=6"),
        ({"rounds": [np.full((2, 4, 8), -1)]}, r"rounds\[0\]\[0\]\[0, 0\]=-1"),
        ({"rounds": [np.full((2, 4, 7), 1)]}, r"rounds\[0\]\[0\] must have shape \(4, 8\)"),
        ({"capacity": [2, 2, 2]}, r"capacity must have shape \(4,\)"),
        ({"capacity": [3, 3, 3, 3]}, "capacity sums to 12"),
        ({"capacity": [4, 4, -1, 1]}, r"capacity\[2\]=-1"),
        ({"capacity": [2.0, 2, 2, 2]}, "capacity must hold integers"),
        ({"current": [0, 0, 1, 1, 2, 2, 3, 9]}, r"current\[0\]\[7\]=9 is not a device"),
        ({"current": np.zeros((3, 8), dtype=np.int64)}, r"current must have shape \(2, 8\)"),
        ({"starts": -1}, "starts must be an integer >= 0"),
        ({"max_iters": 0}, "max_iters must be a positive integer, got 0"),
        ({"seed": 1.5}, "seed must be an integer, got 1.5"),
        ({"starts": 0, "capacity": [4, 4, 0, 0]}, "starts=0"),
    ],
)
def test_fit_bad_input(kwargs, message):
    args = {"rounds": _rounds(), **kwargs}
    with pytest.raises(ValueError, match=message):
        fit_experts(Topology(2, 2, 8), args.pop("rounds"), **args)


def test_capacity_needed_when_experts_do_not_divide():
    topo = Topology(2, 2, 6, expert_device=np.array([0, 0, 1, 2, 3, 3]))
    with pytest.raises(ValueError, match="capacity must be given: experts=6"):
        fit_experts(topo, _rounds(experts=6))
    fit = fit_experts(topo, _rounds(experts=6), capacity=[2, 1, 1, 2], starts=1)
    assert fit.starts[0].label == "current"


def test_evaluate_and_recommend_bad_input():
    topo = Topology(2, 2, 8)
    with pytest.raises(ValueError, match=r"maps must have shape \(2, 8\)"):
        evaluate_experts(topo, _rounds(), np.zeros((3, 8), dtype=np.int64))
    with pytest.raises(ValueError, match=r"maps\[1\]\[0\]=-2"):
        evaluate_experts(topo, _rounds(), np.array([[0] * 8, [-2] + [0] * 7]))
    ev = evaluate_experts(topo, _rounds(), topo.expert_device)
    for kwargs, message in [
        ({"bytes_per_expert": 0}, "bytes_per_expert must be a positive integer, got 0"),
        ({"horizon_steps": -3}, "horizon_steps must be a positive integer, got -3"),
        ({"passes": True}, "passes must be a positive integer, got True"),
        ({"unit": "joules"}, "unit must be one of .* got 'joules'"),
    ]:
        args = {"bytes_per_expert": 1, "horizon_steps": 1, **kwargs}
        with pytest.raises(ValueError, match=message):
            recommend(topo, ev, **args)
