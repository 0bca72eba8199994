"""`netmoe evaluate`: what sample placement would save on a recorded routing trace."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .trace import load_trace, sample_counts


@dataclass(frozen=True)
class PairResult:
    """One layer pair (l, l+1): gather of l + scatter of l+1 (just l for a one-layer trace)."""

    layer: int
    placement: tuple[int, ...]  # device of each sample, by sample id
    baseline: tuple[int, int]  # (inter, intra) routes at home
    netmoe: tuple[int, int]
    solve_ms: float


def evaluate(
    counts: np.ndarray, nodes: int, gpus_per_node: int, objective: str = "volume"
) -> list[PairResult]:
    """counts: [L, I, E] int64 routes per layer, sample and expert. Experts on device e // (E/J),
    sample i at home on device i // (I/J)."""
    from .solver import Topology, solve

    layers, samples, experts = counts.shape
    topo = Topology(nodes, gpus_per_node, experts)
    if samples % topo.devices:
        raise ValueError(
            f"samples={samples} is not divisible by devices={topo.devices}; "
            f"choose --tokens-per-sample so that it is"
        )
    pairs = [(0, None)] if layers == 1 else [(layer, layer + 1) for layer in range(layers - 1)]
    results = []
    for layer, nxt in pairs:
        plan = solve(
            topo, counts[layer], None if nxt is None else counts[nxt], objective=objective
        )
        results.append(
            PairResult(
                layer=layer,
                placement=plan.device,
                baseline=(plan.before.inter, plan.before.intra),
                netmoe=(plan.after.inter, plan.after.intra),
                solve_ms=plan.solve_seconds * 1e3,
            )
        )
    return results


def report(counts: np.ndarray, nodes: int, gpus: int, pairs: list[PairResult]) -> dict[str, Any]:
    """The --json object."""
    base = sum(p.baseline[0] for p in pairs)
    placed = sum(p.netmoe[0] for p in pairs)
    return {
        "devices": nodes * gpus,
        "nodes": nodes,
        "samples": int(counts.shape[1]),
        "experts": int(counts.shape[2]),
        "pairs": [
            {
                "layer": p.layer,
                "placement": list(p.placement),
                "baseline": {"inter": p.baseline[0], "intra": p.baseline[1]},
                "netmoe": {"inter": p.netmoe[0], "intra": p.netmoe[1]},
                "solve_ms": round(p.solve_ms, 3),
            }
            for p in pairs
        ],
        "total": {
            "baseline": {"inter": base, "intra": sum(p.baseline[1] for p in pairs)},
            "netmoe": {"inter": placed, "intra": sum(p.netmoe[1] for p in pairs)},
            "inter_reduction": 0.0 if base == 0 else 1.0 - placed / base,
        },
    }


def _text(rep: dict[str, Any]) -> str:
    lines = [
        f"{rep['samples']} samples, {rep['experts']} experts, {rep['nodes']} nodes x "
        f"{rep['devices'] // rep['nodes']} GPUs",
        f"{'pair':>8} {'inter home':>11} {'inter netmoe':>13} {'saved':>7} "
        f"{'intra home':>11} {'intra netmoe':>13} {'solve ms':>9}",
    ]
    for p in rep["pairs"]:
        b, n = p["baseline"], p["netmoe"]
        saved = 0.0 if b["inter"] == 0 else 1 - n["inter"] / b["inter"]
        lines.append(
            f"{p['layer']:>3},{p['layer'] + 1:<4} {b['inter']:>11} {n['inter']:>13} "
            f"{saved:>7.1%} {b['intra']:>11} {n['intra']:>13} {p['solve_ms']:>9.2f}"
        )
    t = rep["total"]
    lines.append(
        f"total: inter-node routes {t['baseline']['inter']} -> {t['netmoe']['inter']} "
        f"({t['inter_reduction']:.1%} less), intra-node {t['baseline']['intra']} -> "
        f"{t['netmoe']['intra']}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    experts = args.experts or trace.num_experts or int(trace.topk_ids.max()) + 1
    counts = sample_counts(trace, experts, args.tokens_per_sample)
    pairs = evaluate(counts, args.nodes, args.gpus_per_node, args.objective)
    rep = report(counts, args.nodes, args.gpus_per_node, pairs)
    print(json.dumps(rep) if args.json else _text(rep))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="replay a routing trace and report what sample placement would save",
        description="Replays a recorded routing trace (.npz: topk_ids [L, T, K], optional "
        "sample_ids [T] and num_experts) and reports, per consecutive layer pair, the inter- and "
        "intra-node routes of the home placement and of the optimal placement.",
    )
    p.add_argument("--trace", required=True, help="trace file (.npz)")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus-per-node", type=int, default=4)
    p.add_argument("--tokens-per-sample", type=int, default=None,
                   help="cut the token stream into samples of this many tokens "
                   "(needed when the trace has no sample_ids)")
    p.add_argument("--experts", type=int, default=None,
                   help="experts per layer (default: from the trace)")
    p.add_argument("--objective", choices=("volume", "bottleneck"), default="volume")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
