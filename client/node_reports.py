"""Node reports: the ranks of an expert-parallel group on one node report as one.

With per-rank reports a round costs 2J messages on the service; with node reports 2N. At
``submit`` (right after routing) every rank of the node starts one asynchronous ``dist.gather``
of its counts to the node's first rank on an intra-node process group, so the gather overlaps
the dispatch. The first rank sends one node report for the node and receives one plan for all of
it (``PlacementClient(ranks=...)``). In the combine, the control exchange that already carries
every rank's offer carries the first rank's offer of the whole node, and each rank reads its own
part from it (``expand``): no collective besides the gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from netmoe.groups import EPGroups
from netmoe.round import RoundCounts


@dataclass(frozen=True, eq=False)
class NodeReports:
    """One rank's part in node reporting.

    members: the global ranks of its group on its node, ascending (members[0] reports);
    index: its position there; nodes: the group devices of every node of the group, each node's
    first device its reporter (what ``expand`` reads offers by); group: the intra-node process
    group of members.
    """

    members: tuple[int, ...]
    index: int
    nodes: tuple[tuple[int, ...], ...]
    group: Any

    @property
    def first(self) -> bool:
        """This rank reports for its node."""
        return self.index == 0

    @property
    def size(self) -> int:
        return len(self.members)


def node_reports(groups: EPGroups, rank: int) -> NodeReports:
    """This rank's NodeReports. Collective: every rank of the world calls it, in the same order,
    as it creates one process group per (group, node) with ``dist.new_group``."""
    gpn = groups.gpus_per_node
    mine: tuple[tuple[int, ...], Any] | None = None
    for ranks in groups.ranks:
        for node in sorted({r // gpn for r in ranks}):
            members = tuple(r for r in ranks if r // gpn == node)
            pg = dist.new_group(list(members))
            if rank in members:
                mine = (members, pg)
    assert mine is not None  # EPGroups cover every rank
    members, pg = mine
    per = groups.gpus
    nodes = tuple(tuple(range(k * per, (k + 1) * per)) for k in range(groups.nodes))
    return NodeReports(members, members.index(rank), nodes, pg)


def pack(ids: np.ndarray, gather: torch.Tensor, scatter: torch.Tensor | None) -> torch.Tensor:
    """[n, 1 + E (+ E)] int64 on gather's device: each local sample's id, gather and scatter
    routes. ids: [n] uint64 ids below 2^63; gather, scatter: [n, E] int64."""
    cols = [torch.as_tensor(ids.astype(np.int64), device=gather.device).unsqueeze(1), gather]
    if scatter is not None:
        cols.append(scatter)
    return torch.cat([c.to(torch.int64) for c in cols], dim=1)


def unpack(rows: torch.Tensor, experts: int) -> RoundCounts:
    """The node's counts from its gathered ``pack`` rows [G * n, 1 + E (+ E)], members in
    turn."""
    arr = rows.cpu().numpy()
    scatter = arr[:, 1 + experts:] if arr.shape[1] > 1 + experts else None
    return RoundCounts(arr[:, 0].astype(np.uint64), arr[:, 1:1 + experts], scatter)


def expand(offers: np.ndarray, node: NodeReports, samples: int) -> np.ndarray:
    """Every rank's own offer [J, 1 + 2n] from the node offers [J, 1 + 2nG] int64 that the
    combine exchanged: row d of the result is node reporter's flag, then device d's part of its
    dests and of its held ids (``netmoe.client.planning.agree`` reads it)."""
    n, g = samples, node.size
    out = np.zeros((offers.shape[0], 1 + 2 * n), dtype=np.int64)
    for devices in node.nodes:
        row = offers[devices[0]]
        for k, d in enumerate(devices):
            out[d, 0] = row[0]
            out[d, 1:1 + n] = row[1 + k * n:1 + (k + 1) * n]
            out[d, 1 + n:] = row[1 + g * n + k * n:1 + g * n + (k + 1) * n]
    return out
