"""DeepSeek's expert-parallel load balancer (EPLB) as a baseline, written from its description.

EPLB (github deepseek-ai/EPLB, `eplb.py`) balances expert load and ignores traffic:
`rebalance_experts(weight [L, E] load, num_replicas, num_groups, num_nodes, num_gpus)` returns
(phy2log [L, P], log2phy [L, E, X], logcnt [L, E]); physical expert p lives on GPU p // (P / J).
Hierarchical policy (num_groups a multiple of num_nodes): pack groups of E / num_groups
consecutive experts onto nodes (equal counts, heaviest group first to the lightest node), then on
each node add replicas one by one to the expert with the highest load per replica, then pack the
node's physical experts onto its GPUs the same way. Otherwise the global policy: the same with
one group and one node. Ties: the first expert / pack in index order (stable sort, first
minimum), as EPLB's loops do.

`eplb_holders` turns that into this project's model: an expert's owner is its replica of rank 0,
its other replicas are copies; two replicas on one GPU count as one holder there.
"""

from __future__ import annotations

import numpy as np

from netmoe.checks import positive_int

from .topology import Topology


def balanced_packing(weight: np.ndarray, packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Packs the n items of each row of weight [X, n] float into `packs` packs of n / packs
    items, heaviest first into the lightest pack with room. Returns (pack [X, n], rank in pack
    [X, n]), int64."""
    rows, n = weight.shape
    per = n // packs
    if per == 1:
        return np.tile(np.arange(n, dtype=np.int64), (rows, 1)), np.zeros((rows, n), np.int64)
    pack = np.full((rows, n), -1, dtype=np.int64)
    rank = np.full((rows, n), -1, dtype=np.int64)
    for i in range(rows):
        # EPLB sums float32 weights; the same dtype keeps its ties and roundings.
        totals = np.zeros(packs, dtype=np.float32)
        items = np.zeros(packs, dtype=np.int64)
        for item in np.argsort(-weight[i], kind="stable"):
            open_ = np.flatnonzero(items < per)
            p = int(open_[np.argmin(totals[open_])])
            pack[i, item], rank[i, item] = p, items[p]
            totals[p] += weight[i, item]
            items[p] += 1
    return pack, rank


def replicate_experts(weight: np.ndarray,
                      physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adds physical - n replicas to the items of weight [X, n] float32, each to the item with
    the highest load per replica. Returns (phy2log [X, physical], replica rank [X, physical],
    count [X, n]), int64."""
    rows, n = weight.shape
    phy2log = np.tile(np.arange(physical, dtype=np.int64), (rows, 1))
    rank = np.zeros((rows, physical), dtype=np.int64)
    count = np.ones((rows, n), dtype=np.int64)
    every = np.arange(rows)
    for p in range(n, physical):
        hot = np.argmax(weight / count.astype(np.float32), axis=1)
        phy2log[:, p] = hot
        rank[:, p] = count[every, hot]
        count[every, hot] += 1
    return phy2log, rank, count


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[1]), perm.shape), axis=1)
    return inv


def _hierarchical(weight: np.ndarray, physical: int, groups: int, nodes: int,
                  gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    layers, experts = weight.shape
    size = experts // groups
    per_gpu = physical // gpus
    group_pack, group_rank = balanced_packing(weight.reshape(layers, groups, size).sum(-1),
                                              nodes)
    log2mlog = (((group_pack * (groups // nodes) + group_rank) * size)[:, :, None]
                + np.arange(size)).reshape(layers, experts)
    mlog2log = _inverse(log2mlog)
    per_node = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, experts // nodes)
    phy2mlog, phyrank, mlogcnt = replicate_experts(per_node, physical // nodes)
    per_phy = np.take_along_axis(per_node / mlogcnt.astype(np.float32), phy2mlog, axis=1)
    pack, rank = balanced_packing(per_phy, gpus // nodes)
    pphy2phy = _inverse(pack * per_gpu + rank)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1)
    pphy2mlog = (pphy2mlog.reshape(layers, nodes, -1)
                 + np.arange(0, experts, experts // nodes)[None, :, None]).reshape(layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
    pphyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, axis=1)
    return pphy2log, pphyrank, logcnt


def rebalance_experts(weight: object, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """EPLB's entry point. weight: [L, E] load of each expert (e.g. routes on a fit window).
    Returns phy2log [L, num_replicas] (expert of each physical slot, slot p on GPU
    p // (num_replicas / num_gpus)), log2phy [L, E, X] (slots of each expert, -1 padded) and
    logcnt [L, E] (replicas per expert), all int64."""
    w = np.asarray(weight)
    if w.ndim != 2 or not (np.issubdtype(w.dtype, np.integer)
                           or np.issubdtype(w.dtype, np.floating)):
        raise ValueError(f"weight must be a [layers, experts] numeric array, got shape "
                         f"{w.shape} dtype {w.dtype}")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ValueError("weight must hold finite non-negative loads")
    layers, experts = w.shape
    gpus = positive_int("num_gpus", num_gpus)
    nodes = positive_int("num_nodes", num_nodes)
    groups = positive_int("num_groups", num_groups)
    replicas = positive_int("num_replicas", num_replicas, minimum=experts)
    if replicas % gpus:
        raise ValueError(f"num_replicas={replicas} is not a multiple of num_gpus={gpus}")
    if gpus % nodes:
        raise ValueError(f"num_gpus={gpus} is not a multiple of num_nodes={nodes}")
    if experts % groups:
        raise ValueError(f"experts={experts} is not a multiple of num_groups={groups}")
    w = w.astype(np.float32)
    if groups % nodes == 0:
        phy2log, rank, logcnt = _hierarchical(w, replicas, groups, nodes, gpus)
    else:
        phy2log, rank, logcnt = _hierarchical(w, replicas, 1, 1, gpus)
    width = int(logcnt.max())
    log2phy = np.full((layers, experts * width), -1, dtype=np.int64)
    np.put_along_axis(log2phy, phy2log * width + rank,
                      np.broadcast_to(np.arange(replicas), phy2log.shape), axis=1)
    return phy2log, log2phy.reshape(layers, experts, width), logcnt


def eplb_holders(topo: Topology, phy2log: np.ndarray,
                 log2phy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps [L, E] int64 owner = GPU of each expert's rank-0 replica, holders [L, E, J] bool)
    of EPLB's physical layout, slot p on GPU p // (P / J)."""
    layers, slots = phy2log.shape
    per_gpu = slots // topo.devices
    maps = log2phy[:, :, 0] // per_gpu
    holders = np.zeros((layers, topo.experts, topo.devices), dtype=bool)
    gpu = np.arange(slots) // per_gpu
    for layer in range(layers):
        holders[layer, phy2log[layer], gpu] = True
    return maps, holders


def eplb_placement(topo: Topology, load: object, *, slots: int,
                   groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """EPLB with slots redundant experts per GPU (J x slots per layer) and `groups` expert groups
    for load [L, E] (routes per expert on the fit window): (maps [L, E], holders [L, E, J])."""
    k = positive_int("slots", slots, minimum=0)
    phy2log, log2phy, _ = rebalance_experts(load, topo.experts + topo.devices * k, groups,
                                            topo.nodes, topo.devices)
    return eplb_holders(topo, phy2log, log2phy)
