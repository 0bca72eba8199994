"""`netmoe evaluate`: what sample placement would save on a recorded routing trace."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from netmoe.trace import load_trace, sample_counts


@dataclass(frozen=True)
class PairResult:
    """One layer pair (l, l+1): gather of l + scatter of l+1 (just l for a one-layer trace)."""

    layer: int
    placement: tuple[int, ...]  # device of each sample, by sample id
    baseline: tuple[int, int]  # (inter, intra) routes at home
    netmoe: tuple[int, int]
    solve_ms: float
    joint: dict[str, Any] | None = None  # with fitted experts: inter, intra, experts, placement


def evaluate(
    counts: np.ndarray, nodes: int, gpus_per_node: int, objective: str = "volume"
) -> list[PairResult]:
    """counts: [L, I, E] int64 routes per layer, sample and expert. Experts on device e // (E/J),
    sample i at home on device i // (I/J)."""
    from netmoe.solver import Topology, solve

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


def evaluate_joint(
    counts: np.ndarray, nodes: int, gpus_per_node: int, objective: str = "volume"
) -> tuple[np.ndarray, list[PairResult]]:
    """Fits expert placement on the samples with the lower half of the ids and evaluates home,
    sample-only and joint placement on the rest (held out, in id order, the k-th of them home
    on device k // (held-out count / J)). counts: [L, I, E] int64.
    Returns the held-out counts [L, I - I/2, E] and the held-out pair results."""
    from netmoe.solver import Topology
    from netmoe.solver.experts import evaluate_experts, fit_experts

    samples = counts.shape[1]
    topo = Topology(nodes, gpus_per_node, counts.shape[2])
    half = samples // 2
    if half == 0 or half % topo.devices or (samples - half) % topo.devices:
        raise ValueError(
            f"--expert-placement fit splits samples={samples} into two halves that must each "
            f"be a multiple of devices={topo.devices}; choose --tokens-per-sample so they are"
        )
    held = counts[:, half:]
    fit = fit_experts(topo, [counts[:, :half]])
    ev = evaluate_experts(topo, [held], fit.array())
    pairs = evaluate(held, nodes, gpus_per_node, objective)
    out = []
    for pair, pe in zip(pairs, ev.pairs, strict=True):
        first, second = pe.layers
        joint = {
            "inter": pe.joint.inter,
            "intra": pe.joint.intra,
            "experts": [list(ev.maps[first]), list(ev.maps[second])],
            "placement": list(ev.joint_devices[0][first]),
        }
        out.append(PairResult(pair.layer, pair.placement, pair.baseline, pair.netmoe,
                              pair.solve_ms, joint))
    return held, out


def evaluate_replicated(
    counts: np.ndarray, nodes: int, gpus_per_node: int, pairs: list[PairResult], budget: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Adds copies to evaluate_joint's result: chosen on the fit half (the lower sample ids of
    counts [L, I, E]) with `budget` copies per device and layer, replayed on the held-out half.
    Returns each pair's `replicated` (inter, intra, placement) and the top-level `expert_maps`
    and `replicas`."""
    from netmoe.solver import Topology
    from netmoe.solver.replicas import evaluate_replicas, fit_replicas

    topo = Topology(nodes, gpus_per_node, counts.shape[2])
    if isinstance(pairs[0].joint, dict) and len(pairs) + 1 == counts.shape[0]:
        maps = [p.joint["experts"][0] for p in pairs] + [pairs[-1].joint["experts"][1]]
    else:
        raise ValueError("--replica-budget needs a trace with at least 2 MoE layers")
    half = counts.shape[1] // 2
    try:
        fit = fit_replicas(topo, [counts[:, :half]], np.array(maps), slots=budget)
    except ValueError as err:
        raise ValueError(f"--replica-budget={budget}: {err}") from None
    ev = evaluate_replicas(topo, [counts[:, half:]], np.array(maps), fit.copies)
    per_pair = [{"inter": r.inter, "intra": r.intra, "placement": list(dev)}
                for r, dev in zip(ev.replicated, ev.replicated_devices[0], strict=True)]
    extra = {"expert_maps": [list(m) for m in maps],
             "replicas": [[list(c) for c in layer] for layer in fit.copies]}
    return per_pair, extra


def add_replicated(rep: dict[str, Any], per_pair: list[dict[str, Any]],
                   extra: dict[str, Any]) -> dict[str, Any]:
    """The --json object with evaluate_replicated's result: `replicated` in every pair and in
    the total (with its inter-node reduction against home), `expert_maps` and `replicas`."""
    for pair, replicated in zip(rep["pairs"], per_pair, strict=True):
        pair["replicated"] = replicated
    total = rep["total"]
    inter = sum(r["inter"] for r in per_pair)
    base = total["baseline"]["inter"]
    total["replicated"] = {"inter": inter, "intra": sum(r["intra"] for r in per_pair)}
    total["replicated_inter_reduction"] = 0.0 if base == 0 else 1.0 - inter / base
    return rep | extra


def report(counts: np.ndarray, nodes: int, gpus: int, pairs: list[PairResult]) -> dict[str, Any]:
    """The --json object. counts: [L, I, E] of the samples the pairs describe."""
    base = sum(p.baseline[0] for p in pairs)
    placed = sum(p.netmoe[0] for p in pairs)
    total: dict[str, Any] = {
        "baseline": {"inter": base, "intra": sum(p.baseline[1] for p in pairs)},
        "netmoe": {"inter": placed, "intra": sum(p.netmoe[1] for p in pairs)},
        "inter_reduction": 0.0 if base == 0 else 1.0 - placed / base,
    }
    if pairs and pairs[0].joint is not None:
        joint = sum(p.joint["inter"] for p in pairs)
        total["joint"] = {"inter": joint, "intra": sum(p.joint["intra"] for p in pairs)}
        total["joint_inter_reduction"] = 0.0 if base == 0 else 1.0 - joint / base
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
            | ({} if p.joint is None else {"joint": p.joint})
            for p in pairs
        ],
        "total": total,
    }


def _text(rep: dict[str, Any]) -> str:
    lines = [
        f"{rep['samples']} samples, {rep['experts']} experts, {rep['nodes']} nodes x "
        f"{rep['devices'] // rep['nodes']} GPUs",
        f"{'pair':>8} {'inter home':>11} {'inter netmoe':>13} {'saved':>7} "
        f"{'intra home':>11} {'intra netmoe':>13} {'solve ms':>9}"
        + (f" {'inter joint':>11}" if "joint" in rep["total"] else ""),
    ]
    for p in rep["pairs"]:
        b, n = p["baseline"], p["netmoe"]
        saved = 0.0 if b["inter"] == 0 else 1 - n["inter"] / b["inter"]
        joint = f" {p['joint']['inter']:>11}" if "joint" in p else ""
        lines.append(
            f"{p['layer']:>3},{p['layer'] + 1:<4} {b['inter']:>11} {n['inter']:>13} "
            f"{saved:>7.1%} {b['intra']:>11} {n['intra']:>13} {p['solve_ms']:>9.2f}{joint}"
        )
    t = rep["total"]
    lines.append(
        f"total: inter-node routes {t['baseline']['inter']} -> {t['netmoe']['inter']} "
        f"({t['inter_reduction']:.1%} less), intra-node {t['baseline']['intra']} -> "
        f"{t['netmoe']['intra']}"
    )
    if "joint" in t:
        lines.append(
            f"held-out samples only; with experts fitted on the other half (joint): inter-node "
            f"routes {t['baseline']['inter']} -> {t['joint']['inter']} "
            f"({t['joint_inter_reduction']:.1%} less), intra-node {t['joint']['intra']}"
        )
    if "replicated" in t:
        lines.append(
            f"with the copies (--replica-budget): inter-node routes {t['baseline']['inter']} -> "
            f"{t['replicated']['inter']} ({t['replicated_inter_reduction']:.1%} less), "
            f"intra-node {t['replicated']['intra']}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    experts = args.experts or trace.num_experts or int(trace.topk_ids.max()) + 1
    counts = sample_counts(trace, experts, args.tokens_per_sample)
    budget = args.replica_budget
    if budget is not None and args.expert_placement != "fit":
        raise ValueError("--replica-budget needs --expert-placement fit")
    if budget is not None and budget < 0:
        raise ValueError(f"--replica-budget must be >= 0 copies per device, got {budget}")
    full = counts
    if args.expert_placement == "fit":
        counts, pairs = evaluate_joint(counts, args.nodes, args.gpus_per_node, args.objective)
    else:
        pairs = evaluate(counts, args.nodes, args.gpus_per_node, args.objective)
    rep = report(counts, args.nodes, args.gpus_per_node, pairs)
    if budget is not None:
        rep = add_replicated(rep, *evaluate_replicated(full, args.nodes, args.gpus_per_node,
                                                       pairs, budget))
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
    p.add_argument("--expert-placement", choices=("current", "fit"), default="current",
                   help="fit: fit expert placement on the lower half of the sample ids and "
                   "report home, sample-only and joint placement on the held-out rest")
    p.add_argument("--replica-budget", type=int, default=None, metavar="K",
                   help="with --expert-placement fit: also choose up to K expert copies per "
                   "device and layer on the fit half (0 = none) and report the held-out routes "
                   "with them (`replicated` per pair, `expert_maps`, `replicas`)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
