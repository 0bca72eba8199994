"""The paper's two-stage placement, each stage solved exactly as a transportation problem.

Stage 1 puts I/N samples on each node, minimizing inter-node routes of gather(l) + scatter(l+1).
Stage 2 puts I/J of each node's samples on each of its devices, minimizing intra-node routes;
nodes are independent. In both stages a sample prefers its home (node, then device) among
equal-cost choices, so samples move only when moving saves routes.
"""

from __future__ import annotations

import numpy as np

from .cost import device_counts, node_counts
from .topology import Topology
from .transport import transport


def per_node(topo: Topology, counts: np.ndarray) -> np.ndarray:
    """[I, N] int64: routes of each sample to the experts on each node. counts: [I, E] int64."""
    return node_counts(topo, device_counts(topo, counts))


def per_device(topo: Topology, counts: np.ndarray) -> np.ndarray:
    """[I, J] int64: routes of each sample to the experts on each device."""
    return device_counts(topo, counts)


def with_tiebreak(cost: np.ndarray, stay: np.ndarray) -> np.ndarray:
    """Scales cost so that the number of samples kept home only ever breaks ties.

    stay: [R, C] bool, True where column c is row r's home. With weight R + 1 per unit of
    cost, no number of kept-home samples (at most R) can outweigh one route.
    """
    return cost * (cost.shape[0] + 1) + (~stay).astype(np.int64)


def solve_two_stage(topo: Topology, counts: np.ndarray, home: np.ndarray) -> np.ndarray:
    """Device of each sample, [I] int64. counts: [I, E] int64 routes of both All-to-Alls summed;
    home: [I] int64 current device of each sample."""
    return place_two_stage(topo, device_counts(topo, counts), home)


def place_two_stage(topo: Topology, on_dev: np.ndarray, home: np.ndarray) -> np.ndarray:
    """solve_two_stage from device_counts: on_dev [I, J] int64 routes of each sample to the
    experts of each device. Returns [I] int64."""
    samples = on_dev.shape[0]
    nodes, gpus = topo.nodes, topo.gpus_per_node
    on_node = node_counts(topo, on_dev)
    home_node = topo.device_node[home]
    inter = on_dev.sum(axis=1, keepdims=True) - on_node
    stay = home_node[:, None] == np.arange(nodes)[None, :]
    node = transport(with_tiebreak(inter, stay), np.full(nodes, samples // nodes))

    device = np.empty(samples, dtype=np.int64)
    per_dev = samples // topo.devices
    for n in range(nodes):
        rows = np.flatnonzero(node == n)
        devs = np.arange(n * gpus, (n + 1) * gpus)
        intra = on_node[rows, n][:, None] - on_dev[np.ix_(rows, devs)]
        stay = home[rows][:, None] == devs[None, :]
        device[rows] = devs[transport(with_tiebreak(intra, stay), np.full(gpus, per_dev))]
    return device
