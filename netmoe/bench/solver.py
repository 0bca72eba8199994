"""`netmoe bench solver`: solve times of the exact two-stage solver against the paper's
formulation (balanced assignment on the I x I expanded matrix), and the two-stage gap to the
CP-SAT joint optimum on small instances."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

SIZES_I = (32, 64, 128, 256, 384, 1024, 4096)
SIZES_J = (16, 32, 64, 256)


def expanded_two_stage(topo: Any, counts: np.ndarray) -> np.ndarray:
    """The paper's solver: both stages as I x I (then I/N x I/N) linear sum assignments, every
    node (device) expanded into one column per sample slot. Exact, like Kuhn-Munkres.
    counts: [I, E] int64. Returns the device of each sample, [I] int64."""
    from ortools.graph.python import linear_sum_assignment

    from netmoe.solver.two_stage import per_device, per_node

    def assign(cost: np.ndarray, slots: int) -> np.ndarray:
        rows = cost.shape[0]
        wide = np.repeat(cost, slots, axis=1)  # [rows, columns * slots]
        lsa = linear_sum_assignment.SimpleLinearSumAssignment()
        lsa.add_arcs_with_cost(
            np.repeat(np.arange(rows), rows), np.tile(np.arange(rows), rows), wide.ravel()
        )
        if lsa.solve() != lsa.OPTIMAL:
            raise RuntimeError("linear sum assignment failed")
        return np.array([lsa.right_mate(r) // slots for r in range(rows)], dtype=np.int64)

    samples, g = counts.shape[0], topo.gpus_per_node
    on_node = per_node(topo, counts)
    node = assign(counts.sum(axis=1, keepdims=True) - on_node, samples // topo.nodes)
    on_dev = per_device(topo, counts)
    device = np.empty(samples, dtype=np.int64)
    for n in range(topo.nodes):
        rows = np.flatnonzero(node == n)
        devs = np.arange(n * g, (n + 1) * g)
        intra = on_node[rows, n][:, None] - on_dev[np.ix_(rows, devs)]
        device[rows] = devs[assign(intra, samples // topo.devices)]
    return device


def _times(fn: Any, repeats: int) -> tuple[float, float]:
    """(median, p99) wall time of fn() in milliseconds."""
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return float(np.median(out)), float(np.percentile(out, 99))


def bench_sizes(
    sizes_i: tuple[int, ...], sizes_j: tuple[int, ...], repeats: int, max_expanded: int, seed: int
) -> list[dict[str, Any]]:
    from netmoe.solver import Topology, solve, traffic
    from netmoe.solver.synthetic import planted_counts

    rows = []
    for j in sizes_j:
        for samples in sizes_i:
            if samples % j or samples < j:
                continue
            topo = Topology(j // 8, 8, 2 * j)
            counts = planted_counts(np.random.default_rng(seed), samples, 2 * j, domains=j // 8)
            reps = repeats if samples <= 1024 else max(3, repeats // 10)
            med, p99 = _times(lambda t=topo, c=counts: solve(t, c[0], c[1]), reps)
            row: dict[str, Any] = {
                "samples": samples, "devices": j, "experts": 2 * j,
                "two_stage_ms_median": round(med, 3), "two_stage_ms_p99": round(p99, 3),
            }
            if samples <= max_expanded:
                ereps = max(3, reps // 5) if samples > 256 else reps
                emed, ep99 = _times(
                    lambda t=topo, c=counts: expanded_two_stage(t, c[0] + c[1]), ereps
                )
                ours = solve(topo, counts[0], counts[1])
                theirs = expanded_two_stage(topo, counts[0] + counts[1])
                paper = traffic(topo, theirs, counts[0], counts[1])
                row.update(
                    expanded_ms_median=round(emed, 3), expanded_ms_p99=round(ep99, 3),
                    speedup=round(emed / med, 1),
                    same_inter=ours.after.inter == paper.inter,
                )
            rows.append(row)
    return rows


def bench_gap(seed: int, time_limit: float) -> list[dict[str, Any]]:
    """Two-stage vs CP-SAT joint (modelled time) on small instances, 2 nodes x 4 GPUs."""
    from netmoe.solver import Topology, solve
    from netmoe.solver.synthetic import planted_counts

    rows = []
    topo = Topology(2, 4, 16, bw_intra=400e9, bw_inter=100e9)
    for samples in (16, 32, 64):
        counts = planted_counts(np.random.default_rng(seed), samples, 16, domains=4)
        two = solve(topo, counts[0], counts[1])
        joint = solve(
            topo, counts[0], counts[1], method="joint", time_limit=time_limit, workers=2
        )
        rows.append({
            "samples": samples, "devices": 8, "experts": 16,
            "two_stage_seconds": two.after.seconds, "joint_seconds": joint.after.seconds,
            "gap": 0.0 if joint.after.seconds == 0
            else two.after.seconds / joint.after.seconds - 1.0,
            "joint_proven_optimal": joint.optimal, "joint_solve_ms": joint.solve_seconds * 1e3,
        })
    return rows


def run(args: argparse.Namespace) -> int:
    sizes_i = tuple(args.samples) if args.samples else SIZES_I
    sizes_j = tuple(args.devices) if args.devices else SIZES_J
    rows = bench_sizes(sizes_i, sizes_j, args.repeats, args.max_expanded, args.seed)
    gap = bench_gap(args.seed, args.time_limit) if not args.no_gap else []
    if args.json:
        print(json.dumps({"sizes": rows, "two_stage_gap": gap}))
        return 0
    print("solve time, ms (median / p99): exact two-stage min-cost flow vs the paper's expanded "
          "I x I assignment")
    head = ("I", "J", "E", "two-stage", "expanded", "speedup")
    print("{:>6} {:>5} {:>5} {:>18} {:>20} {:>8} same inter".format(*head))
    for r in rows:
        ours = f"{r['two_stage_ms_median']:.3f} / {r['two_stage_ms_p99']:.3f}"
        if "expanded_ms_median" in r:
            exp = f"{r['expanded_ms_median']:.2f} / {r['expanded_ms_p99']:.2f}"
            extra = f"{r['speedup']:>7.1f}x {r['same_inter']}"
        else:
            exp, extra = "skipped", ""
        print(f"{r['samples']:>6} {r['devices']:>5} {r['experts']:>5} {ours:>18} {exp:>20} {extra}")
    if gap:
        print("two-stage gap to the CP-SAT joint optimum (modelled All-to-All time, 2 x 4 GPUs)")
        for r in gap:
            print(f"  I={r['samples']:>3}: two-stage {r['two_stage_seconds'] * 1e6:.2f} us, "
                  f"joint {r['joint_seconds'] * 1e6:.2f} us, gap {r['gap']:.2%}, "
                  f"proven optimal: {r['joint_proven_optimal']} "
                  f"({r['joint_solve_ms']:.0f} ms)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("solver", help="solver time vs the paper's expanded assignment")
    p.add_argument("--samples", type=int, nargs="*", help=f"values of I (default {SIZES_I})")
    p.add_argument("--devices", type=int, nargs="*", help=f"values of J (default {SIZES_J})")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--max-expanded", type=int, default=1024,
                   help="largest I for the expanded I x I assignment (it grows as I^2 arcs)")
    p.add_argument("--time-limit", type=float, default=10.0, help="CP-SAT seconds for the gap")
    p.add_argument("--no-gap", action="store_true", help="skip the CP-SAT gap instances")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
