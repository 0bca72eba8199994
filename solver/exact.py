"""Exact placement with CP-SAT: the joint objective and the bottleneck objective.

The two-stage solver is exact for its own lexicographic objective (inter-node routes, then
intra-node routes) but not for the paper's full objective, the modelled time of both
All-to-Alls, each the max of its two channels. These models optimize that, or the busiest
node's inter-node load, over all balanced placements at once, warm-started from the two-stage
answer so a time limit still returns something at least as good.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from ortools.sat.python import cp_model

from .topology import Topology
from .two_stage import per_device, per_node

MIN_SEARCH_S = 0.001  # CP-SAT still runs its presolve and checks the hint


@dataclass(frozen=True)
class ExactResult:
    device: np.ndarray  # [I] int64
    optimal: bool
    objective: float  # the primary term only, in the model's integer units
    bound: float  # CP-SAT's lower bound on it

    @property
    def gap(self) -> float:
        """Relative distance between the found objective and CP-SAT's lower bound."""
        return 0.0 if self.objective <= 0 else max(0.0, 1.0 - self.bound / self.objective)


def _channel_weights(topo: Topology) -> tuple[int, int, int, int]:
    """Integer (w_intra, w_inter, a_intra, a_inter): time per route and fixed latency per channel.

    CP-SAT needs integer coefficients. Time is measured in units of 1/64 of one intra-node
    route; the inter/intra ratio is kept exact up to 1/64.
    """
    unit = Fraction(topo.bytes_per_route) / Fraction(topo.bw_intra) / 64
    ratio = Fraction(topo.bw_intra) / Fraction(topo.bw_inter)
    w_inter = max(1, round(64 * ratio))
    a_intra = round(Fraction(topo.alpha_intra) / unit)
    a_inter = round(Fraction(topo.alpha_inter) / unit)
    return 64, w_inter, a_intra, a_inter


class _Model:
    """Balanced-placement variables shared by both objectives."""

    def __init__(self, topo: Topology, samples: int, hint: np.ndarray) -> None:
        self.topo = topo
        self.m = cp_model.CpModel()
        j, g = topo.devices, topo.gpus_per_node
        self.x = [[self.m.new_bool_var(f"x{i}_{d}") for d in range(j)] for i in range(samples)]
        for i in range(samples):
            self.m.add_exactly_one(self.x[i])
            for d in range(j):
                self.m.add_hint(self.x[i][d], int(hint[i] == d))
        for d in range(j):
            self.m.add(sum(self.x[i][d] for i in range(samples)) == samples // j)
        # y[i][n] = 1 iff sample i sits on node n (a linear expression, no extra variable).
        self.y = [
            [sum(self.x[i][n * g: (n + 1) * g]) for n in range(topo.nodes)] for i in range(samples)
        ]

    def inter(self, counts: np.ndarray) -> cp_model.LinearExpr:
        tot = counts.sum(axis=1)
        on_node = per_node(self.topo, counts)
        return sum(
            int(tot[i] - on_node[i, n]) * self.y[i][n]
            for i in range(len(self.x))
            for n in range(self.topo.nodes)
            if tot[i] - on_node[i, n]
        )

    def intra(self, counts: np.ndarray) -> cp_model.LinearExpr:
        on_node = per_node(self.topo, counts)
        on_dev = per_device(self.topo, counts)
        dnode = self.topo.device_node
        return sum(
            int(on_node[i, dnode[d]] - on_dev[i, d]) * self.x[i][d]
            for i in range(len(self.x))
            for d in range(self.topo.devices)
            if on_node[i, dnode[d]] - on_dev[i, d]
        )

    def moved(self, home: np.ndarray) -> cp_model.LinearExpr:
        return len(self.x) - sum(self.x[i][int(home[i])] for i in range(len(self.x)))

    def solve(
        self, until: float, workers: int, fallback: np.ndarray, scale: int
    ) -> ExactResult:
        """until: time.perf_counter() by which to stop; CP-SAT gets what building the model left.
        scale: weight of the primary term in the objective; lower terms only break ties."""
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = max(until - time.perf_counter(), MIN_SEARCH_S)
        solver.parameters.num_workers = int(workers)
        # Determinism: with one worker and a fixed seed the same input gives the same answer.
        solver.parameters.random_seed = 0
        status = solver.solve(self.m)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            return ExactResult(fallback, False, float("nan"), float("nan"))
        device = np.array(
            [next(d for d, v in enumerate(row) if solver.boolean_value(v)) for row in self.x],
            dtype=np.int64,
        )
        return ExactResult(
            device,
            status == cp_model.OPTIMAL,
            float(solver.objective_value // scale),
            float(np.ceil(solver.best_objective_bound / scale - 1e-9)),
        )


def solve_joint(
    topo: Topology,
    mats: list[np.ndarray],
    home: np.ndarray,
    hint: np.ndarray,
    until: float,
    workers: int,
) -> ExactResult:
    """Minimizes the modelled time: sum over All-to-Alls of max(t_intra, t_inter).

    mats: the [I, E] int64 route counts of each All-to-All (gather l, scatter l+1).
    Moves only break ties: the time term is weighted by I + 1.
    """
    model = _Model(topo, len(home), hint)
    w_intra, w_inter, a_intra, a_inter = _channel_weights(topo)
    times = []
    for k, counts in enumerate(mats):
        t = model.m.new_int_var(0, 2**50, f"t{k}")
        model.m.add(t >= w_intra * model.intra(counts) + a_intra)
        model.m.add(t >= w_inter * model.inter(counts) + a_inter)
        times.append(t)
    scale = len(home) + 1
    model.m.minimize(sum(times) * scale + model.moved(home))
    return model.solve(until, workers, hint, scale)


def solve_bottleneck(
    topo: Topology,
    mats: list[np.ndarray],
    home: np.ndarray,
    hint: np.ndarray,
    until: float,
    workers: int,
) -> ExactResult:
    """Minimizes, summed over the All-to-Alls, the busiest node's inter-node routes (sent +
    received); then total inter-node routes; then moves.

    A route between a sample on node a and an expert on node b != a loads both a and b, so
    node n's load is sum_i y[i,n] * (routes of i off node n) + sum_i (1 - y[i,n]) * (routes of i
    to experts on n).
    """
    samples = len(home)
    model = _Model(topo, samples, hint)
    total_routes = int(sum(int(m.sum()) for m in mats))
    loads, inters = [], []
    for k, counts in enumerate(mats):
        tot = counts.sum(axis=1)
        on_node = per_node(topo, counts)
        peak = model.m.new_int_var(0, 2 * total_routes, f"peak{k}")
        for n in range(topo.nodes):
            model.m.add(
                peak
                >= int(on_node[:, n].sum())
                + sum(
                    int(tot[i] - 2 * on_node[i, n]) * model.y[i][n]
                    for i in range(samples)
                    if tot[i] - 2 * on_node[i, n]
                )
            )
        loads.append(peak)
        inters.append(model.inter(counts))
    w_inter = samples + 1
    w_peak = w_inter * (total_routes + 1)
    model.m.minimize(w_peak * sum(loads) + w_inter * sum(inters) + model.moved(home))
    return model.solve(until, workers, hint, w_peak)
