"""The EPLB baseline (solver/eplb.py) on small cases worked out by hand from EPLB's description."""

from __future__ import annotations

import numpy as np
import pytest

from netmoe.solver import Topology
from netmoe.solver.eplb import (
    balanced_packing,
    eplb_holders,
    eplb_placement,
    rebalance_experts,
    replicate_experts,
)


def test_packing_puts_the_heaviest_item_in_the_lightest_open_pack() -> None:
    # 5 -> p0; 4 -> p1; 3 -> p1 (4 < 5); 2 -> p0 (5 < 7); 1 -> p0 (7 = 7: the first); 0 -> p1.
    pack, rank = balanced_packing(np.array([[5.0, 4, 3, 2, 1, 0]]), 2)
    assert pack.tolist() == [[0, 1, 1, 0, 0, 1]]
    assert rank.tolist() == [[0, 0, 1, 1, 2, 2]]


def test_replicas_go_to_the_highest_load_per_replica() -> None:
    # 6/1 is highest -> a 2nd replica of 0; then 3/1 = 6/2: the first (expert 0) gets a 3rd.
    phy2log, rank, count = replicate_experts(np.array([[6.0, 3, 2]], dtype=np.float32), 5)
    assert phy2log.tolist() == [[0, 1, 2, 0, 0]]
    assert rank.tolist() == [[0, 0, 0, 1, 2]]
    assert count.tolist() == [[3, 1, 1]]


def test_global_policy_by_hand() -> None:
    # Replicas: expert 0 (load 6) gets two more: physical loads [2, 3, 2, 1, 2, 2] for logical
    # [0, 1, 2, 3, 0, 0]. Packing 3 per GPU, heaviest first: phy1 -> g0 (3), phy0 -> g1 (2),
    # phy2 -> g1 (4), phy4 -> g0 (5), phy5 -> g1 (6, full), phy3 -> g0 (6).
    phy2log, log2phy, logcnt = rebalance_experts(np.array([[6, 3, 2, 1]]), 6, 1, 1, 2)
    assert phy2log.tolist() == [[1, 0, 3, 0, 2, 0]]
    assert logcnt.tolist() == [[3, 1, 1, 1]]
    assert log2phy.tolist() == [[[3, 1, 5], [0, -1, -1], [4, -1, -1], [2, -1, -1]]]
    topo = Topology(1, 2, 4)
    maps, holders = eplb_holders(topo, phy2log, log2phy)
    assert maps.tolist() == [[1, 0, 1, 0]]  # the GPU of each expert's rank-0 replica
    assert holders[0].tolist() == [[True, True], [True, False], [False, True], [True, False]]


def test_hierarchical_policy_packs_groups_onto_nodes() -> None:
    # Groups of 2: loads [8, 6, 2, 4]; nodes take 2 each: g0 -> n0, g1 -> n1, g3 -> n1 (6 < 8),
    # g2 -> n0. Node 0 holds experts 0, 1, 4, 5 and node 1 2, 3, 6, 7, one GPU each.
    weight = np.array([[4, 4, 3, 3, 1, 1, 2, 2]])
    phy2log, _, logcnt = rebalance_experts(weight, 8, 4, 2, 2)
    assert phy2log.tolist() == [[0, 1, 4, 5, 2, 3, 6, 7]]
    assert logcnt.tolist() == [[1] * 8]
    # The global policy ignores groups: heaviest first, ties to the first GPU.
    phy2log, _, _ = rebalance_experts(weight, 8, 1, 2, 2)  # 1 group: not a multiple of nodes
    assert phy2log.tolist() == [[0, 2, 6, 4, 1, 3, 7, 5]]


def test_placement_uses_slots_per_gpu_as_redundant_experts() -> None:
    topo = Topology(2, 2, 8)
    load = np.array([[40, 1, 1, 1, 1, 1, 1, 1]] * 2)
    maps, holders = eplb_placement(topo, load, slots=1)
    # 4 redundant experts all go to the hot expert 0: five replicas on 4 GPUs, one per GPU
    # after packing (equal loads spread first), so every GPU holds expert 0.
    assert holders[:, 0].all()
    assert holders.sum() == 8 * 2 + 4 * 2 - 2  # two replicas share a GPU in each layer
    assert maps.shape == (2, 8)


@pytest.mark.parametrize("args, message", [
    ((np.ones((1, 4)), 6, 1, 1, 4), "num_replicas=6 is not a multiple of num_gpus=4"),
    ((np.ones((1, 4)), 3, 1, 1, 1), "num_replicas must be an integer >= 4"),
    ((np.ones((1, 4)), 4, 3, 1, 2), "experts=4 is not a multiple of num_groups=3"),
    ((-np.ones((1, 4)), 4, 1, 1, 2), "finite non-negative"),
])
def test_bad_input(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rebalance_experts(*args)
