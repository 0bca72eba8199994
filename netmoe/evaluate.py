"""`netmoe evaluate`: what sample placement would save on a recorded routing trace."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from netmoe.cli import non_negative, positive, positive_float
from netmoe.convert import add_source_arguments, read_trace
from netmoe.round import BW_INTER, BW_INTRA
from netmoe.text import human_bytes, plural, table
from netmoe.trace import Trace, sample_counts

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class Links:
    """What one route costs in the alpha-beta model: bytes_per_route = hidden size x dtype size,
    bandwidths in bytes/s per channel (the paper's cluster: 400 GB/s intra, 100 GB/s inter)."""

    bytes_per_route: int = 4096 * 2
    bw_intra: float = BW_INTRA
    bw_inter: float = BW_INTER

    def topology(self, nodes: int, gpus_per_node: int, experts: int) -> Any:
        from netmoe.solver import Topology

        return Topology(nodes, gpus_per_node, experts, bw_intra=self.bw_intra,
                        bw_inter=self.bw_inter, bytes_per_route=self.bytes_per_route)


@dataclass(frozen=True)
class PairResult:
    """One layer pair (l, l+1): gather of l + scatter of l+1 (just l for a one-layer trace)."""

    layer: int
    placement: tuple[int, ...]  # device of each sample, by sample id
    baseline: tuple[int, int]  # (inter, intra) routes at home
    netmoe: tuple[int, int]
    solve_ms: float
    joint: dict[str, Any] | None = None  # fitted experts: inter, intra, ms, experts, placement
    ms: tuple[float, float] = (0.0, 0.0)  # modelled All-to-All ms (home, netmoe), Links


def evaluate(
    counts: np.ndarray, nodes: int, gpus_per_node: int, objective: str = "volume",
    links: Links = Links(),
) -> list[PairResult]:
    """counts: [L, I, E] int64 routes per layer, sample and expert. Experts on device e // (E/J),
    sample i at home on device i // (I/J)."""
    from netmoe.solver import solve

    layers, samples, experts = counts.shape
    topo = links.topology(nodes, gpus_per_node, experts)
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
                placement=plan.dest,
                baseline=(plan.before.inter, plan.before.intra),
                netmoe=(plan.after.inter, plan.after.intra),
                solve_ms=plan.solve_seconds * 1e3,
                ms=(plan.before.seconds * 1e3, plan.after.seconds * 1e3),
            )
        )
    return results


def evaluate_joint(
    counts: np.ndarray, nodes: int, gpus_per_node: int, objective: str = "volume",
    links: Links = Links(),
) -> tuple[np.ndarray, list[PairResult]]:
    """Fits expert placement on the samples with the lower half of the ids and evaluates home,
    sample-only and joint placement on the rest (held out, in id order, the k-th of them home
    on device k // (held-out count / J)). counts: [L, I, E] int64.
    Returns the held-out counts [L, I - I/2, E] and the held-out pair results."""
    from netmoe.solver.experts import evaluate_experts, fit_experts

    samples = counts.shape[1]
    topo = links.topology(nodes, gpus_per_node, counts.shape[2])
    half = samples // 2
    if half == 0 or half % topo.devices or (samples - half) % topo.devices:
        raise ValueError(
            f"--expert-placement fit splits samples={samples} into two halves that must each "
            f"be a multiple of devices={topo.devices}; choose --tokens-per-sample so they are"
        )
    held = counts[:, half:]
    fit = fit_experts(topo, [counts[:, :half]])
    ev = evaluate_experts(topo, [held], fit.array())
    pairs = evaluate(held, nodes, gpus_per_node, objective, links)
    out = []
    for pair, pe in zip(pairs, ev.pairs, strict=True):
        first, second = pe.layers
        joint = {
            "inter": pe.joint.inter,
            "intra": pe.joint.intra,
            "ms": pe.joint.seconds * 1e3,
            "experts": [list(ev.maps[first]), list(ev.maps[second])],
            "placement": list(ev.joint_devices[0][first]),
        }
        out.append(dataclasses.replace(pair, joint=joint))
    return held, out


def evaluate_replicated(
    counts: np.ndarray, nodes: int, gpus_per_node: int, pairs: list[PairResult], budget: int,
    *, method: str = "routes", max_load_ratio: float | None = None,
    migration_budget: int | None = None, groups: int = 1,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Adds copies to evaluate_joint's result: chosen on the fit half (the lower sample ids of
    counts [L, I, E]) with `budget` copies per device and layer by `method` (routes: on the
    joint maps, routes only; balanced: maps and copies under max_load_ratio and
    migration_budget from home; eplb: EPLB with `groups` groups, see solver.balance.choose),
    replayed on the held-out half. Returns each pair's `replicated` (inter, intra, placement,
    loads [2][J]) and the top-level `expert_maps`, `migration` (experts off home, of them across
    nodes, copies), `replicas`, `route_tables` [L][J][E],
    `load` (home / joint / replicated max/mean load, mean and worst layer) and `fit_half` (the
    same loads and the inter-node routes replayed on the fit half)."""
    from netmoe.solver import Topology
    from netmoe.solver.balance import choose, load_summary, owner_loads
    from netmoe.solver.experts import evaluate_experts, migration
    from netmoe.solver.replicas import evaluate_replicas

    topo = Topology(nodes, gpus_per_node, counts.shape[2])
    if isinstance(pairs[0].joint, dict) and len(pairs) + 1 == counts.shape[0]:
        maps = [p.joint["experts"][0] for p in pairs] + [pairs[-1].joint["experts"][1]]
    else:
        raise ValueError("--replica-budget needs a trace with at least 2 MoE layers")
    half = counts.shape[1] // 2
    start = maps if method == "routes" else np.tile(topo.expert_device, (len(maps), 1))
    try:
        fit = choose(topo, [counts[:, :half]], np.array(start), method=method, slots=budget,
                     max_load_ratio=max_load_ratio, migration_budget=migration_budget,
                     groups=groups)
    except ValueError as err:
        raise ValueError(f"--replica-budget={budget}: {err}") from None
    held = [counts[:, half:]]
    ev = evaluate_replicas(topo, held, np.array(fit.maps), fit.copies, tables=fit.tables)
    per_pair = [{"inter": r.inter, "intra": r.intra, "placement": list(dev),
                 "loads": [list(k) for k in loads]}
                for r, dev, loads in zip(ev.replicated, ev.replicated_devices[0], ev.loads,
                                         strict=True)]

    def summary(rounds: list[np.ndarray], replayed: Any) -> dict[str, Any]:
        return {kind: dict(zip(("mean", "worst"), load_summary(loads), strict=True))
                for kind, loads in (("home", owner_loads(topo, rounds, topo.expert_device)),
                                    ("joint", owner_loads(topo, rounds, np.array(maps))),
                                    ("replicated", replayed.loads))}

    fit_half = [counts[:, :half]]
    on_fit = evaluate_replicas(topo, fit_half, np.array(fit.maps), fit.copies, tables=fit.tables)
    moved, moved_inter, _ = migration(topo, np.array(fit.maps),
                                      np.tile(topo.expert_device, (len(maps), 1)), 1)
    extra = {"expert_maps": [list(m) for m in fit.maps],
             "migration": {"moved_experts": moved, "moved_inter": moved_inter,
                           "copies": sum(len(c) for c in fit.copies)},
             "replicas": [[list(c) for c in layer] for layer in fit.copies],
             "route_tables": [[list(row) for row in t] for t in fit.tables],
             "load": summary(held, ev),
             "fit_half": {"load": summary(fit_half, on_fit),
                          "inter": {"baseline": on_fit.experts.home.inter,
                                    "joint": evaluate_experts(topo, fit_half,
                                                              np.array(maps)).joint.inter,
                                    "replicated": on_fit.total.inter}}}
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


def _routes(inter: int, intra: int, ms: float, links: Links) -> dict[str, Any]:
    return {"inter": inter, "intra": intra, "inter_bytes": inter * links.bytes_per_route,
            "intra_bytes": intra * links.bytes_per_route, "ms": round(ms, 6)}


def report(
    counts: np.ndarray, nodes: int, gpus: int, pairs: list[PairResult], links: Links = Links(),
    layer_ids: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """The --json object. counts: [L, I, E] of the samples the pairs describe; layer_ids: the
    trace's number of each of the L layers (default 0..L-1)."""
    ids = layer_ids or tuple(range(counts.shape[0]))
    kinds = {"baseline": lambda p: (*p.baseline, p.ms[0]),
             "netmoe": lambda p: (*p.netmoe, p.ms[1])}
    if pairs and pairs[0].joint is not None:
        kinds["joint"] = lambda p: (p.joint["inter"], p.joint["intra"], p.joint["ms"])
    total: dict[str, Any] = {
        kind: _routes(*(sum(get(p)[c] for p in pairs) for c in range(3)), links)
        for kind, get in kinds.items()
    }
    base = total["baseline"]["inter"]
    total["inter_reduction"] = _saved(base, total["netmoe"]["inter"])
    if "joint" in total:
        total["joint_inter_reduction"] = _saved(base, total["joint"]["inter"])
    return {
        "devices": nodes * gpus,
        "nodes": nodes,
        "samples": int(counts.shape[1]),
        "experts": int(counts.shape[2]),
        "bytes_per_route": links.bytes_per_route,
        "bw_intra": links.bw_intra,
        "bw_inter": links.bw_inter,
        "pairs": [
            {
                "layer": p.layer,
                "layers": [ids[p.layer]] + ([ids[p.layer + 1]] if len(ids) > 1 else []),
                "placement": list(p.placement),
                "baseline": _routes(*p.baseline, p.ms[0], links),
                "netmoe": _routes(*p.netmoe, p.ms[1], links),
                "solve_ms": round(p.solve_ms, 3),
            }
            | ({} if p.joint is None else {"joint": p.joint})
            for p in pairs
        ],
        "total": total,
    }


def _saved(before: float, after: float) -> float:
    return 0.0 if before == 0 else 1.0 - after / before


def _text(rep: dict[str, Any]) -> str:
    gpus = rep["devices"] // rep["nodes"]
    lines = [
        f"{plural(rep['samples'], 'sample')}, {plural(rep['experts'], 'expert')}, "
        f"{plural(rep['nodes'], 'node')} x {plural(gpus, 'GPU')}; one route carries "
        f"{human_bytes(rep['bytes_per_route'])}, links {rep['bw_intra'] / 1e9:g} GB/s intra-node, "
        f"{rep['bw_inter'] / 1e9:g} GB/s inter-node",
        "per layer pair (gather of l + scatter of l+1, one forward pass; backward repeats it):",
    ]
    joint = "joint" in rep["total"]
    head = ["layers", "inter home", "inter netmoe", "saved", "intra home", "intra netmoe",
            "ms home", "ms netmoe", "solve ms"]
    if joint:
        head += ["inter fit", "fit saved", "ms fit"]
    rows = []
    for p in rep["pairs"]:
        b, n = p["baseline"], p["netmoe"]
        row = [",".join(map(str, p["layers"])), b["inter"], n["inter"],
               f"{_saved(b['inter'], n['inter']):.1%}", b["intra"], n["intra"],
               f"{b['ms']:.3f}", f"{n['ms']:.3f}", f"{p['solve_ms']:.2f}"]
        if joint:
            j = p["joint"]
            row += [j["inter"], f"{_saved(b['inter'], j['inter']):.1%}", f"{j['ms']:.3f}"]
        rows.append(row)
    lines += table(head, rows)
    t = rep["total"]
    b, n = t["baseline"], t["netmoe"]
    lines.append(
        f"total: inter-node {human_bytes(b['inter_bytes'])} -> {human_bytes(n['inter_bytes'])} "
        f"({t['inter_reduction']:.1%} less; {b['inter']} -> {n['inter']} routes), intra-node "
        f"{human_bytes(b['intra_bytes'])} -> {human_bytes(n['intra_bytes'])}; modelled "
        f"All-to-All time {b['ms']:.3f} -> {n['ms']:.3f} ms"
    )
    if joint:
        j = t["joint"]
        lines.append(
            f"held-out samples only; with experts fitted on the other half (fit): inter-node "
            f"{human_bytes(j['inter_bytes'])} ({t['joint_inter_reduction']:.1%} less than home), "
            f"intra-node {human_bytes(j['intra_bytes'])}; modelled time {j['ms']:.3f} ms"
        )
    if "replicated" in t:
        lines.append(
            f"with the copies (--replica-budget): inter-node routes {t['baseline']['inter']} -> "
            f"{t['replicated']['inter']} ({t['replicated_inter_reduction']:.1%} less), "
            f"intra-node {t['replicated']['intra']}"
        )
        lines.append("busiest device / mean load, mean over layers (worst layer): " + ", ".join(
            f"{kind} {v['mean']:.3f} ({v['worst']:.3f})" for kind, v in rep["load"].items()))
    return "\n".join(lines)


def check_args(args: argparse.Namespace, trace: Trace) -> int:
    """The experts per layer to count with; ValueError names the flag that disagrees with the
    trace."""
    top = int(trace.topk_ids.max())
    if args.experts is not None:
        if trace.num_experts is not None and args.experts != trace.num_experts:
            raise ValueError(f"--experts {args.experts} disagrees with the trace's "
                             f"num_experts={trace.num_experts} (leave --experts out)")
        if top >= args.experts:
            raise ValueError(f"--experts {args.experts}, but the trace names expert {top}")
    if trace.sample_ids is None:
        tps = args.tokens_per_sample
        if tps is None:
            raise ValueError("the trace has no sample_ids: pass --tokens-per-sample")
        if trace.tokens % tps:
            raise ValueError(f"--tokens-per-sample {tps} does not divide the trace's "
                             f"{trace.tokens} tokens")
    return args.experts or trace.num_experts or top + 1


def _method(args: argparse.Namespace) -> str:
    """How the copies are chosen (solver.balance.choose); ValueError names a flag that does not
    fit --expert-placement."""
    from netmoe.solver.balance import check_ratio

    placement = args.expert_placement
    if args.replica_budget is not None and placement == "current":
        raise ValueError("--replica-budget needs --expert-placement fit or eplb")
    for flag, value in (("--max-load-ratio", args.max_load_ratio),
                        ("--migration-budget", args.migration_budget)):
        if value is not None and placement != "fit":
            raise ValueError(f"{flag} needs --expert-placement fit")
    if args.eplb_groups != 1 and placement != "eplb":
        raise ValueError("--eplb-groups needs --expert-placement eplb")
    check_ratio("--max-load-ratio", args.max_load_ratio)
    if placement == "eplb":
        return "eplb"
    balanced = args.max_load_ratio is not None or args.migration_budget is not None
    return "balanced" if balanced else "routes"


def run(args: argparse.Namespace) -> int:
    trace = read_trace(args)
    experts = check_args(args, trace)
    links = Links(args.hidden_size * DTYPE_BYTES[args.dtype], args.bw_intra * 1e9,
                  args.bw_inter * 1e9)
    counts = sample_counts(trace, experts, args.tokens_per_sample)
    devices = args.nodes * args.gpus_per_node
    if experts % devices:
        raise ValueError(f"{experts} experts do not spread evenly over --nodes {args.nodes} x "
                         f"--gpus-per-node {args.gpus_per_node} = {devices} devices")
    budget, method = args.replica_budget, _method(args)
    if method != "routes" and budget is None:
        budget = 0
    full = counts
    if args.expert_placement in ("fit", "eplb"):
        counts, pairs = evaluate_joint(counts, args.nodes, args.gpus_per_node, args.objective,
                                       links)
    else:
        pairs = evaluate(counts, args.nodes, args.gpus_per_node, args.objective, links)
    rep = report(counts, args.nodes, args.gpus_per_node, pairs, links, trace.layer_ids)
    if budget is not None:
        rep = add_replicated(rep, *evaluate_replicated(
            full, args.nodes, args.gpus_per_node, pairs, budget, method=method,
            max_load_ratio=args.max_load_ratio, migration_budget=args.migration_budget,
            groups=args.eplb_groups))
    print(json.dumps(rep) if args.json else _text(rep))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="replay a routing trace and report what sample placement would save",
        description="Replays a recorded routing trace (.npz: topk_ids [L, T, K], optional "
        "sample_ids [T], num_experts and layer_ids [L]) and reports, per consecutive layer pair, "
        "the inter- and intra-node routes, bytes and modelled All-to-All time (alpha-beta model, "
        "max of the two channels) of the home placement and of the optimal placement.",
    )
    p.add_argument("--trace", required=True,
                   help="trace file (.npz), or a directory with --trace-format megatron")
    add_source_arguments(p)
    p.add_argument("--nodes", type=positive, default=2, help="nodes of the modelled cluster")
    p.add_argument("--gpus-per-node", type=positive, default=4, help="GPUs per node")
    p.add_argument("--tokens-per-sample", type=positive, default=None,
                   help="cut the token stream into samples of this many tokens "
                   "(needed when the trace has no sample_ids)")
    p.add_argument("--experts", type=positive, default=None,
                   help="experts per layer (default: the trace's num_experts, else its largest "
                   "expert id + 1); must agree with the trace's num_experts")
    p.add_argument("--hidden-size", type=positive, default=4096,
                   help="hidden size of the model: elements one route carries")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default="bf16",
                   help="element type of the All-to-All payload")
    p.add_argument("--bw-intra", type=positive_float, default=400.0,
                   help="intra-node bandwidth, GB/s (NVLink)")
    p.add_argument("--bw-inter", type=positive_float, default=100.0,
                   help="inter-node bandwidth, GB/s (InfiniBand)")
    p.add_argument("--objective", choices=("volume", "bottleneck"), default="volume",
                   help="volume: fewest inter-node routes over the machine; bottleneck: the "
                   "busiest node's inter-node routes")
    p.add_argument("--expert-placement", choices=("current", "fit", "eplb"), default="current",
                   help="current: experts where expert parallelism puts them (expert e on device "
                   "e // (E/J)); fit: fit expert placement on the lower half of the sample ids "
                   "and report home, sample-only and joint placement on the held-out rest; "
                   "eplb: as fit, and the copies (`replicated`) are DeepSeek EPLB's maps and "
                   "K x devices redundant experts per layer for the fit half's loads")
    p.add_argument("--replica-budget", type=non_negative, default=None, metavar="K",
                   help="with --expert-placement fit: also choose up to K expert copies per "
                   "device and layer on the fit half (0 = none) and report the held-out routes "
                   "with them (`replicated` per pair, `expert_maps`, `replicas`)")
    p.add_argument("--max-load-ratio", type=float, default=None, metavar="R",
                   help="with --expert-placement fit: choose maps, copies and route tables for "
                   "routes with every layer's busiest device serving at most R x the mean load "
                   "on the fit half (R >= 1; default: no bound, routes only)")
    p.add_argument("--migration-budget", type=non_negative, default=None, metavar="M",
                   help="with --expert-placement fit: at most M experts (all layers) leave their "
                   "home device (default: no budget)")
    p.add_argument("--eplb-groups", type=positive, default=1, metavar="G",
                   help="with --expert-placement eplb: expert groups (EPLB's hierarchical policy "
                   "when G is a multiple of --nodes; default 1: its global policy)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
