"""Sample placement for one (step, layer): the entry point of the solver package."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from netmoe.round import Traffic, rows_held

from .cost import (
    bottleneck_routes,
    channel_routes,
    check_counts,
    check_placement,
    device_counts,
    node_counts,
    traffic_from_routes,
    traffic_of,
)
from .exact import solve_bottleneck, solve_joint
from .topology import Topology, home_placement
from .two_stage import place_two_stage

Objective = Literal["volume", "bottleneck"]
Method = Literal["two_stage", "joint"]
OBJECTIVES = ("volume", "bottleneck")
METHODS = ("two_stage", "joint")


@dataclass(frozen=True, eq=False)
class Plan:
    """Where every sample of one round goes (the words of ``netmoe.round``).

    dest[i]: new device of sample row i. home[i]: its device before the move. moved: rows whose
    device changes. rows_held[d]: [I/J] int64 rows device d holds afterwards, ordered by (home
    device, row): the order in which all_to_all_single delivers them when every device sends its
    rows in row order.
    before / after: routes and modelled time of gather(l) + scatter(l+1) at home and placed.
    objective_value: for "volume", after.seconds; for "bottleneck", the busiest node's
    inter-node routes summed over both All-to-Alls.
    optimal: proven optimal for the method's own problem (two_stage: inter-node routes, then
    intra-node routes, stage by stage). gap: relative distance to CP-SAT's bound (0 when proven).
    """

    dest: tuple[int, ...]
    home: tuple[int, ...]
    moved: int
    rows_held: tuple[np.ndarray, ...]
    before: Traffic
    after: Traffic
    objective: str
    method: str
    objective_value: float
    status: str
    optimal: bool
    gap: float
    solve_seconds: float


def solve(
    topo: Topology,
    gather: object,
    scatter: object | None = None,
    *,
    home: object | None = None,
    objective: Objective = "volume",
    method: Method = "two_stage",
    time_limit: float = 1.0,
    workers: int = 1,
    scatter_topology: Topology | None = None,
) -> Plan:
    """Places I samples on J devices, I/J each, to cut All-to-All traffic.

    gather: [I, E] integer routes of each sample to each expert in the gather of layer l;
    scatter: [I, E] the (predicted) scatter of layer l+1, or None. home: [I] int, the current
    device of each sample, balanced (default sample i on device i // (I/J)).
    objective "volume" with method "two_stage" is the paper's problem solved exactly by two
    transportation problems; method "joint" solves the full time objective with CP-SAT.
    objective "bottleneck" minimizes the busiest node's inter-node routes with CP-SAT, on
    `workers` threads, warm-started from two-stage. time_limit bounds the whole call: CP-SAT
    searches for what checking the input and building its model left of it.
    scatter_topology: the same cluster with layer l+1's expert map, when the two layers' experts
    live on different devices (default: topo's map for both); scatter is costed with it.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not time_limit > 0:
        raise ValueError(f"time_limit must be positive, got {time_limit!r}")
    until = time.perf_counter() + time_limit
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    g = check_counts("gather", gather, samples=None, experts=topo.experts)
    samples, j = g.shape[0], topo.devices
    if samples == 0 or samples % j:
        raise ValueError(f"samples={samples} must be a positive multiple of devices={j}")
    mats = [g]
    if scatter is not None:
        mats.append(check_counts("scatter", scatter, samples=samples, experts=topo.experts))
    topos = [topo, _scatter_topology(topo, scatter_topology)][:len(mats)]
    if home is None:
        base = home_placement(samples, j)
    else:
        base = check_placement("home", home, samples=samples, devices=j)
        per_dev = np.bincount(base, minlength=j)
        if (per_dev != samples // j).any():
            d = int(np.flatnonzero(per_dev != samples // j)[0])
            raise ValueError(
                f"home is unbalanced: device {d} holds {int(per_dev[d])} samples, "
                f"need {samples // j} on each"
            )

    start = time.perf_counter()
    gathered = device_counts(topos[0], mats[0])
    summed = None  # with a scatter: gather + scatter device counts
    if len(mats) == 1:
        both = gathered
    else:
        # The scatter's device counts take the gather's in place: one [I, J] array less to
        # allocate and fill. The scatter's own counts are both - gathered, wherever needed.
        both = summed = device_counts(topos[1], mats[1])
        both += gathered
    if any(t is not topo for t in topos):
        # Every cost depends on the counts only through routes per device, so with two expert
        # maps the exact models run on the device counts, one pseudo-expert per device.
        topo, mats = topo.per_device(), [gathered, both - gathered]
    on_node = node_counts(topo, both)
    device = place_two_stage(topo, both, base, on_node=on_node)
    optimal, gap, used = True, 0.0, method
    if objective == "bottleneck":
        res = solve_bottleneck(topo, mats, base, device, until, workers)
        used = "cp-sat"
        if bottleneck_routes(topo, res.device, *mats) <= bottleneck_routes(topo, device, *mats):
            device = res.device
        optimal, gap = res.optimal, res.gap
    elif method == "joint":
        res = solve_joint(topo, mats, base, device, until, workers)
        dev_mats = [gathered] if len(mats) == 1 else [gathered, both - gathered]
        found = traffic_of(topo, res.device, dev_mats).seconds
        if found <= traffic_of(topo, device, dev_mats).seconds:
            device = res.device
        optimal, gap = res.optimal, res.gap
    elapsed = time.perf_counter() - start

    # Sums over every row and device: the node counts hold them at 1/G of the size.
    totals = [int(on_node.sum())] if summed is None else [int(gathered.sum()), int(on_node.sum())]
    after = _traffic(topo, device, gathered, summed, on_node, totals)
    if objective == "volume":
        value = after.seconds
    else:
        value = float(bottleneck_routes(topo, device, *mats))
    return Plan(
        dest=tuple(device.tolist()),
        home=tuple(base.tolist()),
        moved=int((device != base).sum()),
        rows_held=tuple(rows_held(device, j, base)),
        before=_traffic(topo, base, gathered, summed, on_node, totals),
        after=after,
        objective=objective,
        method=used,
        objective_value=value,
        status="optimal" if optimal else "feasible",
        optimal=optimal,
        gap=gap,
        solve_seconds=elapsed,
    )


def _traffic(topo: Topology, device: np.ndarray, gathered: np.ndarray,
             summed: np.ndarray | None, on_node: np.ndarray, totals: list[int]) -> Traffic:
    """traffic_of for the gather's device counts and, with a scatter, their sum with the
    scatter's: the scatter's routes are the difference, each route count being linear in the
    counts. gathered, summed: [I, J] int64; on_node: [I, N] int64 node counts of the last of
    them; totals: their sums."""
    if summed is None:
        return traffic_from_routes(
            topo, [channel_routes(topo, device, gathered, totals[0], on_node)])
    first = channel_routes(topo, device, gathered, totals[0])
    both = channel_routes(topo, device, summed, totals[1], on_node)
    second = tuple(b - a for a, b in zip(first, both, strict=True))
    return traffic_from_routes(topo, [first, second])


def _scatter_topology(topo: Topology, other: Topology | None) -> Topology:
    """other if it differs from topo only in the expert map (else ValueError); topo itself when
    other is None or has the same map, so the common case takes the unchanged path."""
    if other is None:
        return topo
    if not isinstance(other, Topology):
        raise ValueError(f"scatter_topology must be a Topology, got {type(other).__name__}")
    same_shape = (other.nodes, other.gpus_per_node, other.experts) == (
        topo.nodes, topo.gpus_per_node, topo.experts)
    if not same_shape or other.with_experts(topo.expert_device) != topo:
        raise ValueError(
            f"scatter_topology must describe the same cluster as topo except the expert map, got "
            f"nodes={other.nodes}, gpus_per_node={other.gpus_per_node}, experts={other.experts} "
            f"(topo: {topo.nodes}, {topo.gpus_per_node}, {topo.experts}) or other link costs"
        )
    return topo if other == topo else other

