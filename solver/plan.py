"""Sample placement for one (step, layer): the entry point of the solver package."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import numpy as np

from netmoe.round import FEASIBLE, OPTIMAL, Traffic, home_placement, rows_held

from .cost import (
    bottleneck_routes,
    by_device,
    channel_routes,
    check_counts,
    check_placement,
    device_counts,
    node_counts,
    own_node,
    traffic_from_routes,
    traffic_of,
)
from .exact import solve_bottleneck, solve_joint
from .topology import Topology
from .two_stage import Prices, place_stages

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
    prices: the two-stage placement's optimal prices (also under CP-SAT, which starts from it),
    for solve(..., warm=plan.prices) of the job's next alike round; None from other solvers.
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
    prices: Prices | None = None


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
    warm: Prices | None = None,
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
    warm: the prices of an alike earlier round (the previous Plan.prices of the same job and
    layer): the two stages start from them, which saves work when the rounds are alike. The
    answer is the same optimum whatever they hold; prices of another shape (another topology or
    number of samples) are ignored, a cold start.
    """
    until = _check_options(objective, method, time_limit, workers)
    if warm is not None and not isinstance(warm, Prices):
        raise ValueError(f"warm must be a Plan's prices (Prices) or None, got "
                         f"{type(warm).__name__}")
    mats, topos, base = _check_input(topo, gather, scatter, home, scatter_topology)
    start = time.perf_counter()
    counts = _counts(topos, mats)
    placed = _place(counts, base, objective, method, until, workers, warm)
    return _plan(counts, base, placed, objective, time.perf_counter() - start)


@dataclass(frozen=True, eq=False)
class _Counts:
    """A round's routes as the placement steps take them.

    topo: the cluster the models run on; with two expert maps topo.per_device(), one
    pseudo-expert per device (every cost depends on the counts only through routes per device).
    mats: the models' [I, E] int64 route matrices in topo's experts, the gather's, then the
    scatter's when there is one. grouped: the same per All-to-All as [I, J * k] int64 routes
    grouped by device (cost.by_device: mats themselves for the common map). per_node: [I, N]
    int64 node counts of each All-to-All; on_node: of both. totals: each All-to-All's sum of
    routes.
    """

    topo: Topology
    mats: list[np.ndarray]
    grouped: list[np.ndarray]
    per_node: list[np.ndarray]
    on_node: np.ndarray
    totals: list[int]

    def within(self, node: np.ndarray) -> np.ndarray:
        """[I, G] int64 routes of both All-to-Alls to each device of node[i]; node: [I] int64."""
        return own_node(self.topo, self.grouped, node)

    def per_all_to_all(self) -> list[np.ndarray]:
        """[I, J] int64 device counts of each All-to-All: the gather's, then the scatter's."""
        return [device_counts(self.topo, m) for m in self.mats]


@dataclass(frozen=True, eq=False)
class _Placed:
    """A placement method's answer. device: [I] int64 new device of each row; method: the one
    that produced it; optimal, gap, prices: as in Plan."""

    device: np.ndarray
    method: str
    optimal: bool
    gap: float
    prices: Prices


def _check_options(objective: str, method: str, time_limit: float, workers: int) -> float:
    """The perf_counter time by which solve must return, or ValueError naming the option."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not time_limit > 0:
        raise ValueError(f"time_limit must be positive, got {time_limit!r}")
    until = time.perf_counter() + time_limit
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    return until


def _check_input(topo: Topology, gather: object, scatter: object | None, home: object | None,
                  scatter_topology: Topology | None
                  ) -> tuple[list[np.ndarray], list[Topology], np.ndarray]:
    """solve's counts and home, checked: the route matrices ([I, E] int64, the gather's, then
    the scatter's if any), the topology of each, and home [I] int64 (balanced; the contiguous
    layout when None). ValueError names the argument and its value."""
    g = check_counts("gather", gather, samples=None, experts=topo.experts)
    samples, j = g.shape[0], topo.devices
    if samples == 0 or samples % j:
        raise ValueError(f"samples={samples} must be a positive multiple of devices={j}")
    mats = [g]
    if scatter is not None:
        mats.append(check_counts("scatter", scatter, samples=samples, experts=topo.experts))
    topos = [topo, _scatter_topology(topo, scatter_topology)][:len(mats)]
    if home is None:
        return mats, topos, home_placement(samples, j)
    base = check_placement("home", home, samples=samples, devices=j)
    per_dev = np.bincount(base, minlength=j)
    if (per_dev != samples // j).any():
        d = int(np.flatnonzero(per_dev != samples // j)[0])
        raise ValueError(
            f"home is unbalanced: device {d} holds {int(per_dev[d])} samples, "
            f"need {samples // j} on each"
        )
    return mats, topos, base


def _counts(topos: list[Topology], mats: list[np.ndarray]) -> _Counts:
    """Node counts and totals of the route matrices, each costed with its own topology."""
    topo = topos[0]
    if any(t is not topo for t in topos):
        # With two expert maps the exact models run on the device counts.
        mats = [device_counts(t, m) for t, m in zip(topos, mats, strict=True)]
        topo = topo.per_device()
    grouped = [by_device(topo, m) for m in mats]
    per_node = [node_counts(topo, m) for m in grouped]
    on_node = per_node[0] if len(per_node) == 1 else per_node[0] + per_node[1]
    # Sums over every row and device: the node counts hold them at 1/J of the size or less.
    return _Counts(topo, mats, grouped, per_node, on_node, [int(n.sum()) for n in per_node])


def _place(counts: _Counts, base: np.ndarray, objective: Objective, method: Method,
           until: float, workers: int, warm: Prices | None) -> _Placed:
    """The two-stage placement, improved by CP-SAT where the objective or method asks for it
    (kept only where it does better: CP-SAT may stop at the deadline with a worse one)."""
    topo, mats = counts.topo, counts.mats
    stages = place_stages(topo, counts.on_node, counts.within, base, warm=warm)
    device = stages.device
    if objective == "bottleneck":
        res = solve_bottleneck(topo, mats, base, device, until, workers)
        if bottleneck_routes(topo, res.device, *mats) <= bottleneck_routes(topo, device, *mats):
            device = res.device
        return _Placed(device, "cp-sat", res.optimal, res.gap, stages.prices)
    if method == "joint":
        res = solve_joint(topo, mats, base, device, until, workers)
        dev_mats = counts.per_all_to_all()
        found = traffic_of(topo, res.device, dev_mats).seconds
        if found <= traffic_of(topo, device, dev_mats).seconds:
            device = res.device
        return _Placed(device, method, res.optimal, res.gap, stages.prices)
    return _Placed(device, method, True, 0.0, stages.prices)


def _plan(counts: _Counts, base: np.ndarray, placed: _Placed, objective: Objective,
          elapsed: float) -> Plan:
    """The Plan of a placement: its rows' moves, and routes and time before and after."""
    device, j = placed.device, counts.topo.devices
    after = _traffic(counts, device)
    if objective == "volume":
        value = after.seconds
    else:
        value = float(bottleneck_routes(counts.topo, device, *counts.mats))
    return Plan(
        dest=tuple(device.tolist()),
        home=tuple(base.tolist()),
        moved=int((device != base).sum()),
        rows_held=tuple(rows_held(device, j, base)),
        before=_traffic(counts, base),
        after=after,
        objective=objective,
        method=placed.method,
        objective_value=value,
        status=OPTIMAL if placed.optimal else FEASIBLE,
        optimal=placed.optimal,
        gap=placed.gap,
        solve_seconds=elapsed,
        prices=placed.prices,
    )


def _traffic(counts: _Counts, device: np.ndarray) -> Traffic:
    """traffic_of the placement device ([I] int64), from the grouped counts and their totals."""
    return traffic_from_routes(counts.topo, [
        channel_routes(counts.topo, device, m, total, on_node)
        for m, total, on_node in zip(counts.grouped, counts.totals, counts.per_node, strict=True)
    ])


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

