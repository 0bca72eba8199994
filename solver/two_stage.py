"""The paper's two-stage placement, each stage solved exactly as a transportation problem.

Stage 1 puts each node's share of the rows on it, minimizing routes off node. Stage 2 fills the
devices of each node, minimizing routes to other devices of the node; nodes are independent, so
all of them go to one transportation call. In both stages a row prefers its home (node, then
device) among equal-cost choices, so rows move only when moving saves routes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .cost import device_counts, node_counts
from .topology import Topology
from .transport import Assignment, transport_blocks


@dataclass(frozen=True, eq=False)
class Prices:
    """Each stage's optimal column prices (the transportation duals) from a solve: what the next
    solve of an alike round (same shape, new samples of the same job) may start from.

    node: [1, N] int64, stage 1's; device: [N, G] int64, stage 2's, one row per node. None where
    the stage took a path without prices (transport_blocks: two columns, few rows, the flow).
    Their unit is the stage's cost (routes times the tie-break weight, which depends on the
    number of rows), so they suit problems of the same shape only; prices of another shape are
    ignored. Whatever they hold, the placement is as exact as from a cold start.
    """

    node: np.ndarray | None
    device: np.ndarray | None


@dataclass(frozen=True, eq=False)
class Stages:
    """place_stages' answer. device: [R] int64 the device of each row; node, within: stage 1's
    and stage 2's transport_blocks answers (columns within the stage, path, prices, rounds)."""

    device: np.ndarray
    node: Assignment
    within: Assignment

    @property
    def prices(self) -> Prices:
        """Both stages' optimal prices: the warm start of the next alike placement."""
        return Prices(self.node.price, self.within.price)


def per_node(topo: Topology, counts: np.ndarray) -> np.ndarray:
    """[I, N] int64: routes of each sample to the experts on each node. counts: [I, E] int64."""
    return node_counts(topo, device_counts(topo, counts))


def per_device(topo: Topology, counts: np.ndarray) -> np.ndarray:
    """[I, J] int64: routes of each sample to the experts on each device."""
    return device_counts(topo, counts)


def with_tiebreak(cost: np.ndarray, stay: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Scales cost so that the number of samples kept home only ever breaks ties.

    stay: [R, C] bool, True where column c is row r's home. rows: the most rows of one
    problem (default R; less when cost stacks independent problems). With weight rows + 1 per
    unit of cost, no number of kept-home samples (at most rows) can outweigh one route.
    """
    weight = (cost.shape[0] if rows is None else rows) + 1
    return cost * weight + (~stay).astype(np.int64)


def place_two_stage(
    topo: Topology, on_dev: np.ndarray, home: np.ndarray, capacity: np.ndarray | None = None,
    on_node: np.ndarray | None = None,
) -> np.ndarray:
    """Device of each row, [R] int64, by the two stages.

    on_dev: [R, J] int64 routes of each row with each device (a sample's routes to the experts
    of each device, or an expert's routes with the samples on each device); home: [R] int64 the
    device each row prefers among equal costs; capacity: [J] int64 rows each device takes,
    summing to R (default R / J on every device); on_node: [R, N] int64 node_counts of on_dev,
    when the caller has them.
    """
    rows = on_dev.shape[0]
    if on_node is None:
        on_node = node_counts(topo, on_dev)
    by_node = on_dev.reshape(rows, topo.nodes, topo.gpus_per_node)
    r = np.arange(rows)
    return place_stages(topo, on_node, lambda node: by_node[r, node], home, capacity).device


def place_stages(
    topo: Topology, on_node: np.ndarray, within: Callable[[np.ndarray], np.ndarray],
    home: np.ndarray, capacity: np.ndarray | None = None, warm: Prices | None = None,
) -> Stages:
    """place_two_stage given the rows' node counts and, for stage 2, a function of the nodes:
    the caller need not hold all [R, J] device counts.

    on_node: [R, N] int64 routes of each row with each node; within(node): [R, G] int64 routes
    of each row with each device of node[r], node: [R] int64; home, capacity: as in
    place_two_stage; warm: the prices of an alike earlier placement (Stages.prices) to start
    each stage's priced path from (transport_blocks' price), or None.
    """
    rows = on_node.shape[0]
    nodes, gpus = topo.nodes, topo.gpus_per_node
    if capacity is None:
        capacity = np.full(topo.devices, rows // topo.devices, dtype=np.int64)
    dev_cap = capacity.reshape(nodes, gpus)
    inter = on_node.sum(axis=1, keepdims=True) - on_node  # [R, N]
    stay = topo.device_node[home][:, None] == np.arange(nodes)[None, :]
    first = transport_blocks(
        with_tiebreak(inter, stay), np.zeros(rows, dtype=np.int64), dev_cap.sum(axis=1)[None, :],
        None if warm is None else warm.node,
    )
    node = first.col
    intra = on_node[np.arange(rows), node][:, None] - within(node)  # [R, G]
    stay = (home - node * gpus)[:, None] == np.arange(gpus)[None, :]
    largest = int(dev_cap.sum(axis=1).max())  # rows of the fullest node
    second = transport_blocks(with_tiebreak(intra, stay, largest), node, dev_cap,
                              None if warm is None else warm.device)
    return Stages(node * gpus + second.col, first, second)
