"""Expert replication: replica-aware placement and copy choice against brute force, held-out
replay, the decision, bad input."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from netmoe.solver import Topology, solve
from netmoe.solver.cost import traffic
from netmoe.solver.experts import evaluate_experts, fit_experts, place_samples
from netmoe.solver.replicas import (
    _choose_copies,
    check_copies,
    evaluate_replicas,
    fit_replicas,
    place_replicated,
    recommend_replicas,
    route_table,
    served,
    slots_for_bytes,
    solve_replicated,
)
from netmoe.trace import load_trace, sample_counts

BIG = 10**9  # packs (inter, intra) into one integer; counts here are tiny


def _balanced(samples: int, devices: int) -> np.ndarray:
    """[K, samples]: every placement with samples/devices samples per device."""
    base = np.repeat(np.arange(devices), samples // devices)
    return np.array(sorted(set(itertools.permutations(base))))


def _channels(gpus: int, placements: np.ndarray, holders: np.ndarray,
              counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Independent replica-aware cost model, route by route. placements [K, I], holders [E, J]
    bool, counts [I, E] -> (inter, intra) routes, each [K]. A route is local when its sample's
    device holds the expert, intra when a device of the sample's node does, else inter."""
    on_dev = holders.T[placements]  # [K, I, E]: the sample's device holds the expert
    node_holds = holders.reshape(holders.shape[0], -1, gpus).any(axis=2)  # [E, N]
    on_node = node_holds.T[placements // gpus]  # [K, I, E]: a device of its node does
    return (counts * ~on_node).sum(axis=(1, 2)), (counts * (on_node & ~on_dev)).sum(axis=(1, 2))


def _random_holders(rng: np.random.Generator, topo: Topology, maps: np.ndarray,
                    copies: int) -> np.ndarray:
    """[L, E, J] bool: owners plus `copies` random copies per layer off the owner's device."""
    holders = np.zeros((len(maps), topo.experts, topo.devices), dtype=bool)
    for layer, m in enumerate(maps):
        holders[layer, np.arange(topo.experts), m] = True
        free = np.argwhere(~holders[layer])
        for e, d in free[rng.choice(len(free), copies, replace=False)]:
            holders[layer, e, d] = True
    return holders


@pytest.mark.parametrize("shape", [(2, 2, 4, 4), (2, 1, 4, 6), (3, 1, 6, 3), (2, 2, 8, 8)])
@pytest.mark.parametrize("seed", range(4))
def test_replica_aware_two_stage_is_exact(shape, seed):
    nodes, gpus, experts, samples = shape
    rng = np.random.default_rng(seed)
    topo = Topology(nodes, gpus, experts)
    maps = np.stack([rng.permutation(topo.expert_device) for _ in range(2)])
    holders = _random_holders(rng, topo, maps, copies=2)
    pair = rng.integers(0, 4, (2, samples, experts))
    home = np.arange(samples) // (samples // topo.devices)
    dev = place_replicated(topo, pair, holders, home)
    assert np.bincount(dev, minlength=topo.devices).tolist() == [samples // topo.devices] * \
        topo.devices

    placements = _balanced(samples, topo.devices)
    inter = intra = 0
    for layer in range(2):
        e, a = _channels(gpus, placements, holders[layer], pair[layer])
        inter, intra = inter + e, intra + a
    got = placements.tolist().index(dev.tolist())
    # Stage 1 is exact for inter-node routes; stage 2 for intra-node routes given the nodes.
    assert inter[got] == inter.min()
    same_nodes = (placements // gpus == dev // gpus).all(axis=1)
    assert intra[got] == intra[same_nodes].min()


@pytest.mark.parametrize("seed", range(4))
def test_routes_follow_the_table_and_cost_as_counted(seed):
    rng = np.random.default_rng(seed)
    topo = Topology(2, 2, 4)
    maps = rng.permutation(topo.expert_device)[None]
    holders = _random_holders(rng, topo, maps, copies=3)[0]
    table = route_table(topo, holders, maps[0])
    assert holders[np.arange(4)[:, None], table].all()  # every route goes to a holder
    for e, d in itertools.product(range(4), range(4)):
        on_node = np.flatnonzero(holders[e, d // 2 * 2:d // 2 * 2 + 2])
        if holders[e, d]:
            assert table[e, d] == d
        elif on_node.size:
            assert table[e, d] // 2 == d // 2
        else:
            assert table[e, d] == maps[0, e]
    counts = rng.integers(0, 5, (4, 4))
    dev = rng.permutation(np.arange(4))
    by_dev = served(topo, counts, table, dev)
    assert by_dev.sum(axis=1).tolist() == counts.sum(axis=1).tolist()
    # Served routes under the plain cost model, one pseudo-expert per device.
    inter, intra = _channels(2, dev[None], holders, counts)
    t = traffic(Topology(2, 2, 4), dev, by_dev)
    assert (t.inter, t.intra) == (int(inter[0]), int(intra[0]))


@pytest.mark.parametrize("seed", range(3))
def test_solve_replicated_is_solve_without_copies_and_counts_with_them(seed):
    rng = np.random.default_rng(seed)
    topo = Topology(2, 2, 8)
    maps = np.stack([rng.permutation(topo.expert_device) for _ in range(2)])
    gather, scatter = rng.integers(0, 5, (2, 8, 8))
    home = np.arange(8) // 2
    owners = check_copies("copies", [[], []], topo, maps)
    gtopo, stopo = topo.with_experts(maps[0]), topo.with_experts(maps[1])
    bare = solve_replicated(gtopo, gather, scatter, (owners[0], owners[1]), home=home,
                            scatter_topology=stopo)
    want = solve(gtopo, gather, scatter, scatter_topology=stopo)
    assert (bare.dest, bare.before, bare.after) == (want.dest, want.before, want.after)

    holders = _random_holders(rng, topo, maps, copies=3)
    plan = solve_replicated(gtopo, gather, scatter, (holders[0], holders[1]), home=home,
                            scatter_topology=stopo)
    assert list(plan.dest) == place_replicated(topo, [gather, scatter], holders, home).tolist()
    for dev, got in ((np.array(plan.dest), plan.after), (home, plan.before)):
        parts = [_channels(2, dev[None], holders[q], c) for q, c in ((0, gather), (1, scatter))]
        assert (got.inter, got.intra) == (sum(int(p[0][0]) for p in parts),
                                          sum(int(p[1][0]) for p in parts))
    assert plan.after.inter <= bare.after.inter
    last = solve_replicated(gtopo, gather, None, (holders[0], None), home=home)
    assert last.after.inter == int(_channels(2, np.array(last.dest)[None], holders[0],
                                             gather)[0][0])


def _inter_fixed(topo: Topology, rounds: list[np.ndarray], place: list[list[np.ndarray]],
                 layer: int, holders: np.ndarray) -> int:
    """Inter-node routes of one layer with samples fixed, over the pairs it takes part in.
    holders: [E, J] bool."""
    on_node = holders.reshape(topo.experts, topo.nodes, -1).any(axis=2)  # [E, N]
    total = 0
    for r, counts in enumerate(rounds):
        for p in (layer - 1, layer):
            if 0 <= p < counts.shape[0] - 1:
                near = on_node[:, topo.device_node[place[r][p]]].T  # [I, E]
                total += int((counts[layer] * ~near).sum())
    return total


@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize("sync", [0, 3])
@pytest.mark.parametrize("seed", range(3))
def test_copy_step_is_exact_given_samples(gpus, sync, seed):
    rng = np.random.default_rng(seed)
    topo = Topology(2, gpus, 4)
    rounds = [rng.integers(0, 4, (3, 4, 4)) for _ in range(2)]
    maps = np.stack([rng.permutation(topo.expert_device) for _ in range(3)])
    place, _ = place_samples(topo, rounds, maps)
    chosen = _choose_copies(topo, rounds, place, maps, 1, 1, sync)
    for layer in range(3):
        base = np.zeros((4, topo.devices), dtype=bool)
        base[np.arange(4), maps[layer]] = True
        owner = topo.device_node[maps[layer]]

        def cost(holders: np.ndarray, owner=owner, layer=layer) -> int:
            cross = holders & (topo.device_node[None, :] != owner[:, None])
            return _inter_fixed(topo, rounds, place, layer, holders) + int(cross.sum()) * sync

        # Every way of giving each device at most one copy.
        options = [[None] + [e for e in range(4) if maps[layer, e] != d]
                   for d in range(topo.devices)]
        best = math.inf
        for combo in itertools.product(*options):
            holders = base.copy()
            for d, e in enumerate(combo):
                if e is not None:
                    holders[e, d] = True
            best = min(best, cost(holders))
        assert cost(chosen[layer]) == best
        assert (chosen[layer].sum(axis=0) - base.sum(axis=0)).max() <= 1


@pytest.mark.parametrize("seed", range(4))
def test_fit_is_monotone_and_its_objective_recounts(seed):
    rng = np.random.default_rng(seed)
    topo = Topology(2, 2, 8)
    rounds = [rng.integers(0, 6, (3, 8, 8)) for _ in range(2)]
    fit = fit_experts(topo, rounds, starts=2, seed=seed)
    rep = fit_replicas(topo, rounds, fit.array(), slots=1, grad_bytes=1000)
    assert all(b < a for a, b in itertools.pairwise(rep.history))
    value = topo.bytes_per_route * 2
    # history[0] is joint placement without copies: the expert fit's own objective.
    assert rep.history[0][0] == fit.objective[0] * value
    holders = check_copies("copies", rep.copies, topo, fit.array(), slots=1)
    inter = 0
    for counts in rounds:
        home = np.arange(8) // 2
        for p in range(2):
            dev = place_replicated(topo, counts[p:p + 2], holders[p:p + 2], home)
            for layer in (p, p + 1):
                inter += int(_channels(2, dev[None], holders[layer], counts[layer])[0][0])
    assert inter == rep.inter
    cross = sum(1 for layer in range(3) for e, d in rep.copies[layer]
                if d // 2 != fit.maps[layer][e] // 2)
    assert rep.objective[0] == inter * value + cross * 2 * 1000 * len(rounds)


def test_no_slots_or_costly_sync_means_no_copies():
    rng = np.random.default_rng(0)
    topo = Topology(2, 2, 8)
    rounds = [rng.integers(0, 6, (2, 8, 8))]
    maps = np.tile(topo.expert_device, (2, 1))
    assert fit_replicas(topo, rounds, maps, slots=0).copies == ((), ())
    # A copy's sync (2 x grad bytes per step) above every route bytes it could save.
    huge = int(rounds[0].sum()) * topo.bytes_per_route
    assert fit_replicas(topo, rounds, maps, slots=2, grad_bytes=huge).copies == ((), ())


def test_evaluation_without_copies_is_joint_and_copies_help_on_flame():
    tr = load_trace(Path(__file__).parents[1] / "fixtures" / "flame_290m_2048tok_layers2-9.npz")
    counts = sample_counts(tr, 64, 64)[:4]  # 4 layers, 32 samples of 64 tokens
    topo = Topology(2, 4, 64)
    fit_half, held = [counts[:, :16]], [counts[:, 16:]]
    fit = fit_experts(topo, fit_half, starts=2)
    bare = evaluate_replicas(topo, held, fit.array(), [()] * 4)
    joint = evaluate_experts(topo, held, fit.array())
    assert bare.replicated == tuple(p.joint for p in joint.pairs)
    assert bare.replicated_devices == joint.joint_devices

    rep = fit_replicas(topo, fit_half, fit.array(), slots=1)
    assert [len(c) for c in rep.copies] == [8] * 4  # one per device and layer
    ev = evaluate_replicas(topo, held, fit.array(), rep.copies)
    assert ev.total.inter < ev.experts.joint.inter
    # The placements are balanced and the reported routes recount from them.
    holders = check_copies("copies", rep.copies, topo, fit.array())
    for p, routes in enumerate(ev.replicated):
        dev = np.array(ev.replicated_devices[0][p])
        assert np.bincount(dev).tolist() == [2] * 8
        tables = [route_table(topo, holders[q], fit.array()[q]) for q in (p, p + 1)]
        mats = [served(topo, held[0][q], t, dev) for q, t in zip((p, p + 1), tables, strict=True)]
        t = traffic(Topology(2, 4, 8), dev, *mats)
        assert (t.inter, t.intra) == (routes.inter, routes.intra)


def _evaluation(route_saving: int) -> tuple[Topology, object]:
    """A 2 x 1 evaluation where a copy of expert 0 on node 1 turns route_saving routes local."""
    topo = Topology(2, 1, 2, bytes_per_route=100)
    held = np.zeros((2, 2, 2), dtype=np.int64)
    held[0, :, 0] = route_saving  # both samples -> expert 0 (node 0): one of them crosses
    ev = evaluate_replicas(topo, [held], [[0, 1], [0, 1]], [[(0, 1)], []])
    return topo, ev


def test_recommendation_weighs_saving_sync_memory_and_creation():
    topo, ev = _evaluation(50)
    assert ev.experts.joint.inter == 50 and ev.total.inter == 0
    rec = recommend_replicas(topo, ev, bytes_per_expert=10_000, grad_bytes=1000,
                             horizon_steps=100)
    # 50 routes x 100 bytes x 2 passes saved, 2 x 1000 bytes synced, 10 kB to create the copy.
    assert (rec.saving_per_step, rec.sync_per_step, rec.migration_cost) == (10_000, 2000, 10_000)
    assert rec.adopt and rec.break_even_steps == 10_000 / 8000
    assert rec.memory_bytes == 10_000 and rec.n_copies == rec.cross_node_copies == 1
    assert "25.0% of expert memory" in rec.reason
    short = recommend_replicas(topo, ev, bytes_per_expert=10_000, grad_bytes=1000,
                               horizon_steps=1)
    assert not short.adopt and "horizon too short" in short.reason
    costly = recommend_replicas(topo, ev, bytes_per_expert=10_000, grad_bytes=6000,
                                horizon_steps=100)
    assert not costly.adopt and "sync costs more" in costly.reason
    secs = recommend_replicas(topo, ev, bytes_per_expert=10_000, grad_bytes=1000,
                              horizon_steps=100, unit="seconds")
    assert secs.sync_per_step == pytest.approx(2000 / topo.bw_inter)
    assert secs.adopt


def test_recommendation_without_copies_or_saving():
    topo, ev = _evaluation(0)
    rec = recommend_replicas(topo, ev, bytes_per_expert=10, grad_bytes=1, horizon_steps=10)
    assert not rec.adopt and "no saving" in rec.reason
    bare = evaluate_replicas(topo, [np.ones((2, 2, 2), dtype=np.int64)], [[0, 1], [0, 1]],
                             [[], []])
    rec = recommend_replicas(topo, bare, bytes_per_expert=10, grad_bytes=1, horizon_steps=10)
    assert not rec.adopt and "nothing to create" in rec.reason


MAPS = np.array([[0, 0, 1, 1], [0, 1, 0, 1]])


@pytest.mark.parametrize("copies, message", [
    ([[(0, 1)]], "must list the copies of each of the 2 layers, got 1"),
    ([[(4, 1)], []], r"copies\[0\]\[0\] names expert 4, experts are 0..3"),
    ([[], [(0, 2)]], r"copies\[1\]\[0\] names device 2, devices are 0..1"),
    ([[(0, 0)], []], "expert 0 of layer 0 is owned by device 0"),
    ([[(0, 1), (0, 1)], []], "already has a copy on device 1"),
    ([[(0, 1), (1, 1), (0.5, 1)], []], r"copies\[0\]\[2\] must be an \(expert, device\) pair"),
    ([[(0, 1), (1, 1)], []], "puts 2 copies on device 1, more than slots=1"),
])
def test_bad_copies(copies, message):
    topo = Topology(2, 1, 4)
    with pytest.raises(ValueError, match=message):
        check_copies("copies", copies, topo, MAPS, slots=1)


def test_bad_budget():
    topo = Topology(2, 1, 4)
    rounds = [np.ones((2, 2, 4), dtype=np.int64)]
    with pytest.raises(ValueError, match=r"slots must be an integer >= 0.*got -1"):
        fit_replicas(topo, rounds, MAPS, slots=-1)
    with pytest.raises(ValueError, match=r"slots=3 copies per device do not fit.*at most 2"):
        fit_replicas(topo, rounds, MAPS, slots=3)
    with pytest.raises(ValueError, match="grad_bytes must be an integer >= 0"):
        fit_replicas(topo, rounds, MAPS, slots=1, grad_bytes=-5)
    assert slots_for_bytes(3 * 2 * 100, 100, 2) == 3
    with pytest.raises(ValueError, match=r"memory_bytes must be an integer >= 0.*got -1"):
        slots_for_bytes(-1, 100, 2)
