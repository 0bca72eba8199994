"""`netmoe bench solver`: solve times of the exact two-stage solver against the paper's
formulation (balanced assignment on the I x I expanded matrix), and the two-stage gap to the
CP-SAT joint optimum on small instances."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

from netmoe.app.bench.stats import spread, tail
from netmoe.app.cli import non_negative, positive, positive_float
from netmoe.app.text import table

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


def _times(fn: Any, repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """netmoe.app.bench.stats.spread of the wall time and of the calling thread's CPU time of fn()
    in milliseconds. On a shared machine the CPU time is the steadier figure: waiting for a
    core adds to the wall time only."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.thread_time()
        fn()
        cpu.append((time.thread_time() - start_cpu) * 1e3)
        wall.append((time.perf_counter() - start) * 1e3)
    return spread(wall), spread(cpu)


def _rounded(prefix: str, stats: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}_ms_{k}": None if v is None else round(v, 3)
            for k, v in stats.items() if k != "n"} | {f"{prefix}_repeats": stats["n"]}


def bench_sizes(
    sizes_i: tuple[int, ...], sizes_j: tuple[int, ...], repeats: int, max_expanded: int, seed: int
) -> list[dict[str, Any]]:
    from netmoe.solver import Topology, solve, traffic
    from netmoe.solver.synthetic import planted_rounds

    rows = []
    for j in sizes_j:
        for samples in sizes_i:
            if samples % j or samples < j:
                continue
            topo = Topology(j // 8, 8, 2 * j)
            reps = repeats if samples <= 1024 else max(3, repeats // 10)
            # A job's alike rounds: the first (planted_counts with this seed) solved cold again
            # and again; each later one warm from the previous round's prices.
            job = planted_rounds(np.random.default_rng(seed), samples, 2 * j, domains=j // 8)
            counts = next(job)
            later = [next(job) for _ in range(reps)]
            ours, ours_cpu = _times(lambda t=topo, c=counts: solve(t, c[0], c[1]), reps)
            warm, warm_cpu = _times(_warm_rounds(topo, counts, later), reps)
            row: dict[str, Any] = {
                "samples": samples, "devices": j, "experts": 2 * j, **_rounded("two_stage", ours),
                **_rounded("two_stage_cpu", ours_cpu), **_rounded("warm", warm),
                **_rounded("warm_cpu", warm_cpu), "load_1min": round(os.getloadavg()[0], 2),
            }
            if samples <= max_expanded:
                ereps = max(3, reps // 5) if samples > 256 else reps
                theirs, _ = _times(
                    lambda t=topo, c=counts: expanded_two_stage(t, c[0] + c[1]), ereps
                )
                plan = solve(topo, counts[0], counts[1])
                paper = traffic(topo, expanded_two_stage(topo, counts[0] + counts[1]),
                                counts[0], counts[1])
                row.update(
                    **_rounded("expanded", theirs),
                    speedup=round(theirs["median"] / ours["median"], 1),
                    same_inter=plan.after.inter == paper.inter,
                )
            rows.append(row)
    return rows


def _warm_rounds(topo: Any, first: np.ndarray, rounds: list[np.ndarray]) -> Any:
    """A function that solves the next of rounds ([2, I, E] int64 counts each) warm from the
    previous one's prices, the first of them from first's (solved now, untimed)."""
    from netmoe.solver import solve

    prices = [solve(topo, first[0], first[1]).prices]
    todo = iter(rounds)

    def next_round() -> None:
        counts = next(todo)
        prices.append(solve(topo, counts[0], counts[1], warm=prices[-1]).prices)

    return next_round


def bench_gap(seed: int, time_limit: float) -> list[dict[str, Any]]:
    """Two-stage vs CP-SAT joint (modelled time) on small instances, 2 nodes x 4 GPUs."""
    from netmoe.solver import Topology, solve
    from netmoe.solver.synthetic import planted_counts

    rows = []
    topo = Topology(2, 4, 16)  # the default links: the paper's cluster
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
    for j in sizes_j:
        if j % 8:
            raise ValueError(f"--devices {j}: must be a multiple of 8 (nodes of 8 GPUs)")
    for i in sizes_i:
        if not any(i % j == 0 and i >= j for j in sizes_j):
            raise ValueError(f"--samples {i}: fits none of --devices {' '.join(map(str, sizes_j))}"
                             f" (I must be a multiple of J, at least J)")
    rows = bench_sizes(sizes_i, sizes_j, args.repeats, args.max_expanded, args.seed)
    gap = bench_gap(args.seed, args.time_limit) if not args.no_gap else []
    if args.json:
        print(json.dumps({"sizes": rows, "two_stage_gap": gap}))
        return 0
    print("solve time, ms (median, then p99, or the max when there are fewer than 100 repeats): "
          "exact two-stage vs the paper's expanded I x I assignment; two-stage CPU: the solving "
          "thread's CPU time, solving one round again and again (cold); warm CPU: solving a "
          "job's alike rounds (same experts preferred, new samples), each from the previous "
          "round's prices; load: 1-minute load average after the size")
    body = []
    for r in rows:
        row = [r["samples"], r["devices"], r["experts"],
               f"{r['two_stage_ms_median']:.3f}, {tail(_stats(r, 'two_stage'))}",
               f"{r['two_stage_cpu_ms_median']:.3f}, {tail(_stats(r, 'two_stage_cpu'))}",
               f"{r['warm_cpu_ms_median']:.3f}, {tail(_stats(r, 'warm_cpu'))}",
               f"{r['load_1min']:.2f}"]
        if "expanded_ms_median" in r:
            row += [f"{r['expanded_ms_median']:.2f}, {tail(_stats(r, 'expanded'), 2)}",
                    f"{r['speedup']:.1f}x", r["same_inter"]]
        else:
            row += ["skipped", "", ""]
        body.append(row)
    print("\n".join(table(("I", "J", "E", "two-stage", "two-stage CPU", "warm CPU", "load",
                           "expanded", "speedup", "same inter"), body, indent=0, left=0)))
    if gap:
        print("two-stage gap to the CP-SAT joint optimum (modelled All-to-All time, 2 x 4 GPUs)")
        for r in gap:
            print(f"  I={r['samples']:>3}: two-stage {r['two_stage_seconds'] * 1e6:.2f} us, "
                  f"joint {r['joint_seconds'] * 1e6:.2f} us, gap {r['gap']:.2%}, "
                  f"proven optimal: {r['joint_proven_optimal']} "
                  f"({r['joint_solve_ms']:.0f} ms)")
    return 0


def _stats(row: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {"p99": row[f"{prefix}_ms_p99"], "max": row[f"{prefix}_ms_max"],
            "n": row[f"{prefix}_repeats"]}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("solver", help="solver time vs the paper's expanded assignment")
    p.add_argument("--samples", type=positive, nargs="*", metavar="I",
                   help=f"values of I, samples per batch (default {' '.join(map(str, SIZES_I))})")
    p.add_argument("--devices", type=positive, nargs="*", metavar="J",
                   help=f"values of J, devices in nodes of 8 (default "
                        f"{' '.join(map(str, SIZES_J))})")
    p.add_argument("--repeats", type=positive, default=50,
                   help="timed solves per size (a tenth, at least 3, above I = 1024)")
    p.add_argument("--max-expanded", type=non_negative, default=1024,
                   help="largest I for the expanded I x I assignment (it grows as I^2 arcs)")
    p.add_argument("--time-limit", type=positive_float, default=10.0,
                   help="CP-SAT seconds for the gap")
    p.add_argument("--no-gap", action="store_true", help="skip the CP-SAT gap instances")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic counts")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
