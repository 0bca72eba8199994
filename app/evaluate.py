"""`netmoe evaluate`: what sample placement would save on a recorded routing trace."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from netmoe.app.cli import non_negative, positive, positive_float
from netmoe.app.sources import add_source_arguments, read_trace
from netmoe.app.text import human_bytes, plural, table
from netmoe.batching import Round, plan_rounds, split_rounds
from netmoe.groups import EPGroups
from netmoe.round import BW_INTER, BW_INTRA
from netmoe.trace import Trace, sample_counts, sample_rounds

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
    fit: list[np.ndarray], held: list[np.ndarray], nodes: int, gpus_per_node: int,
    objective: str = "volume", links: Links = Links(),
) -> tuple[np.ndarray, list[list[PairResult]]]:
    """Fits expert placement on the fit rounds and evaluates home, sample-only and joint
    placement on each held-out round (its k-th sample at home on device k // (I_r/J)).
    fit, held: [L, I_r, E] int64 routes of each round. Returns the fitted maps [L, E] (device of
    each expert) and, per held-out round, its pair results."""
    from netmoe.solver.experts import evaluate_experts, fit_experts

    topo = links.topology(nodes, gpus_per_node, held[0].shape[2])
    maps = fit_experts(topo, fit).array()
    out = []
    for counts in held:
        ev = evaluate_experts(topo, [counts], maps)
        pairs = evaluate(counts, nodes, gpus_per_node, objective, links)
        joined = []
        for pair, pe in zip(pairs, ev.pairs, strict=True):
            first, second = pe.layers
            joint = {
                "inter": pe.joint.inter,
                "intra": pe.joint.intra,
                "ms": pe.joint.seconds * 1e3,
                "experts": [list(ev.maps[first]), list(ev.maps[second])],
                "placement": list(ev.joint_devices[0][first]),
            }
            joined.append(dataclasses.replace(pair, joint=joint))
        out.append(joined)
    return maps, out


def evaluate_replicated(
    fit: list[np.ndarray], held: list[np.ndarray], nodes: int, gpus_per_node: int,
    maps: np.ndarray, budget: int, *, method: str = "routes",
    max_load_ratio: float | None = None, migration_budget: int | None = None, groups: int = 1,
) -> tuple[list[list[dict[str, Any]]], dict[str, Any]]:
    """Adds copies to evaluate_joint's result: chosen on the fit rounds ([L, I_r, E] each) with
    `budget` copies per device and layer by `method` (routes: on the fitted maps [L, E], routes
    only; balanced: maps and copies under max_load_ratio and migration_budget from home; eplb:
    EPLB with `groups` groups, see solver.balance.choose), replayed on each held-out round.
    Returns per held-out round each pair's `replicated` (inter, intra, placement, loads [2][J])
    and the top-level `expert_maps`, `migration` (experts off home, of them across nodes,
    copies), `replicas`, `route_tables` [L][J][E], `load` (home / joint / replicated max/mean
    load over the held-out rounds, mean and worst layer) and `fit_half` (the same loads and the
    inter-node routes replayed on the fit rounds)."""
    from netmoe.solver import Topology
    from netmoe.solver.balance import choose, load_summary, owner_loads
    from netmoe.solver.experts import evaluate_experts, migration
    from netmoe.solver.replicas import evaluate_replicas

    if maps.shape[0] < 2:
        raise ValueError("--replica-budget needs a trace with at least 2 MoE layers")
    topo = Topology(nodes, gpus_per_node, held[0].shape[2])
    home = np.tile(topo.expert_device, (len(maps), 1))
    try:
        chosen = choose(topo, fit, maps if method == "routes" else home, method=method,
                        slots=budget, max_load_ratio=max_load_ratio,
                        migration_budget=migration_budget, groups=groups)
    except ValueError as err:
        raise ValueError(f"--replica-budget={budget}: {err}") from None
    chosen_maps = np.array(chosen.maps)

    def replay(rounds: list[np.ndarray]) -> Any:
        return evaluate_replicas(topo, rounds, chosen_maps, chosen.copies, tables=chosen.tables)

    def summary(rounds: list[np.ndarray], replicated: Any) -> dict[str, Any]:
        return {kind: dict(zip(("mean", "worst"), load_summary(loads), strict=True))
                for kind, loads in (("home", owner_loads(topo, rounds, topo.expert_device)),
                                    ("joint", owner_loads(topo, rounds, maps)),
                                    ("replicated", replicated))}

    per_round, held_loads = [], np.zeros((len(maps) - 1, 2, topo.devices), dtype=np.int64)
    for counts in held:
        ev = replay([counts])
        held_loads += np.array(ev.loads, dtype=np.int64)
        per_round.append([{"inter": r.inter, "intra": r.intra, "placement": list(dev),
                           "loads": [list(k) for k in loads]}
                          for r, dev, loads in zip(ev.replicated, ev.replicated_devices[0],
                                                   ev.loads, strict=True)])
    on_fit = replay(fit)
    moved, moved_inter, _ = migration(topo, chosen_maps, home, 1)
    extra = {"expert_maps": [list(m) for m in chosen.maps],
             "migration": {"moved_experts": moved, "moved_inter": moved_inter,
                           "copies": sum(len(c) for c in chosen.copies)},
             "replicas": [[list(c) for c in layer] for layer in chosen.copies],
             "route_tables": [[list(row) for row in t] for t in chosen.tables],
             "load": summary(held, held_loads),
             "fit_half": {"load": summary(fit, on_fit.loads),
                          "inter": {"baseline": on_fit.experts.home.inter,
                                    "joint": evaluate_experts(topo, fit, maps).joint.inter,
                                    "replicated": on_fit.total.inter}}}
    return per_round, extra


def combine(per_round: list[list[PairResult]]) -> list[PairResult]:
    """Each pair summed over the rounds: routes, modelled ms and solve time add up, placements
    (and joint placements) follow one another in round order."""
    out = []
    for parts in zip(*per_round, strict=True):
        first = parts[0]
        joint = None
        if first.joint is not None:
            joint = {key: sum(p.joint[key] for p in parts) for key in ("inter", "intra", "ms")}
            joint |= {"experts": first.joint["experts"],
                      "placement": [d for p in parts for d in p.joint["placement"]]}
        out.append(PairResult(
            layer=first.layer,
            placement=tuple(d for p in parts for d in p.placement),
            baseline=tuple(sum(p.baseline[c] for p in parts) for c in range(2)),
            netmoe=tuple(sum(p.netmoe[c] for p in parts) for c in range(2)),
            solve_ms=sum(p.solve_ms for p in parts),
            joint=joint,
            ms=tuple(sum(p.ms[c] for p in parts) for c in range(2)),
        ))
    return out


def combine_replicated(per_round: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """evaluate_replicated's pairs summed over the rounds (placements in round order, loads
    added up)."""
    return [{"inter": sum(p["inter"] for p in parts), "intra": sum(p["intra"] for p in parts),
             "placement": [d for p in parts for d in p["placement"]],
             "loads": np.sum([p["loads"] for p in parts], axis=0).tolist()}
            for parts in zip(*per_round, strict=True)]


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


def _totals(pairs: list[PairResult], links: Links) -> dict[str, Any]:
    """Routes, bytes and ms of home, netmoe (and joint) summed over pairs."""
    kinds = {"baseline": lambda p: (*p.baseline, p.ms[0]),
             "netmoe": lambda p: (*p.netmoe, p.ms[1])}
    if pairs and pairs[0].joint is not None:
        kinds["joint"] = lambda p: (p.joint["inter"], p.joint["intra"], p.joint["ms"])
    return {kind: _routes(*(sum(get(p)[c] for p in pairs) for c in range(3)), links)
            for kind, get in kinds.items()}


def report(
    counts: np.ndarray, nodes: int, gpus: int, pairs: list[PairResult], links: Links = Links(),
    layer_ids: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """The --json object. counts: [L, I, E] of the samples the pairs describe; layer_ids: the
    trace's number of each of the L layers (default 0..L-1)."""
    ids = layer_ids or tuple(range(counts.shape[0]))
    total = _totals(pairs, links)
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


def add_rounds(
    rep: dict[str, Any], rounds: list[Round], per_round: list[list[PairResult]],
    replicated: list[list[dict[str, Any]]] | None, micro_batch_size: int, ep_size: int,
    links: Links = Links(),
) -> dict[str, Any]:
    """The --json object with the rounds: `micro_batch_size`, `ep_size` and `rounds`, each
    with its step, micro-batch, EP group, sample ids (home order) and its totals over the layer
    pairs (the `total` figures are their sums)."""
    out = []
    for i, (rnd, pairs) in enumerate(zip(rounds, per_round, strict=True)):
        entry: dict[str, Any] = {
            "batch": rnd.batch, "step": rnd.step, "micro_batch": rnd.micro_batch,
            "ep_group": rnd.ep_group,
            "samples": list(rnd.samples),
        } | _totals(pairs, links)
        if replicated is not None:
            entry["replicated"] = {k: sum(p[k] for p in replicated[i])
                                   for k in ("inter", "intra")}
        out.append(entry)
    return rep | {"micro_batch_size": micro_batch_size, "ep_size": ep_size, "rounds": out}


def pooled(
    counts: np.ndarray, rounds: list[Round], micro_batch_size: int, nodes: int,
    gpus_per_node: int, objective: str = "volume", links: Links = Links(),
    maps: np.ndarray | None = None,
) -> dict[str, Any] | None:
    """What evaluating all of each EP group's samples as one All-to-All gives (sample i at home
    where its round had it): an upper bound on what placement saves, since training never
    dispatches more than one round at once. counts: [L, I, E]; rounds: those evaluated; maps:
    fitted experts [L, E] to replay too. None when each EP group has one round anyway."""
    groups = sorted({r.ep_group for r in rounds})
    if len(rounds) == len(groups):
        return None
    m = micro_batch_size
    kinds: dict[str, list[float]] = {k: [0, 0, 0.0] for k in ("baseline", "netmoe", "joint")}
    topo = links.topology(nodes, gpus_per_node, counts.shape[2])
    for g in groups:
        mine = [r for r in rounds if r.ep_group == g]
        ids = [i for j in range(topo.devices) for r in mine for i in r.samples[j * m:(j + 1) * m]]
        pairs = evaluate(counts[:, ids], nodes, gpus_per_node, objective, links)
        for p in pairs:
            for c, v in enumerate((*p.baseline, p.ms[0])):
                kinds["baseline"][c] += v
            for c, v in enumerate((*p.netmoe, p.ms[1])):
                kinds["netmoe"][c] += v
        if maps is not None:
            from netmoe.solver.experts import evaluate_experts

            joint = evaluate_experts(topo, [counts[:, ids]], maps).joint
            for c, v in enumerate((joint.inter, joint.intra, joint.seconds * 1e3)):
                kinds["joint"][c] += v
    if maps is None:
        del kinds["joint"]
    out: dict[str, Any] = {k: _routes(int(v[0]), int(v[1]), v[2], links)
                           for k, v in kinds.items()}
    base = out["baseline"]["inter"]
    out["inter_reduction"] = _saved(base, out["netmoe"]["inter"])
    if maps is not None:
        out["joint_inter_reduction"] = _saved(base, out["joint"]["inter"])
    return out


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
    if "rounds" in rep:
        lines.append(
            f"{plural(len(rep['rounds']), 'round')} (one All-to-All each: "
            f"{plural(rep['micro_batch_size'], 'sample')} per device, EP groups of "
            f"{plural(rep['ep_size'], 'device')}); the totals are sums over the rounds"
        )
    pool = rep.get("pooled")
    if pool is not None:
        line = (f"pooled upper bound, all of each EP group's samples in one All-to-All (not what "
                f"training runs): inter-node routes {pool['baseline']['inter']} -> "
                f"{pool['netmoe']['inter']} ({pool['inter_reduction']:.1%} less)")
        if "joint" in pool:
            line += f", with fitted experts {pool['joint_inter_reduction']:.1%} less"
        lines.append(line)
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


def micro_batch_size(args: argparse.Namespace, samples: int, devices: int,
                     rounds_in_trace: bool) -> int | None:
    """Samples per device per round: the trace's round fields (None; --micro-batch-size must
    agree with an npz trace's); else --micro-batch-size; else everything in one round (two with
    --expert-placement fit: fit, then held out)."""
    if args.trace_format == "megatron":
        return None  # --micro-batch-size described the run, the reader turned it into rounds
    if args.micro_batch_size is not None or rounds_in_trace:
        return args.micro_batch_size
    if args.expert_placement in ("fit", "eplb"):
        half = samples // 2
        if half == 0 or half % devices or (samples - half) % devices:
            raise ValueError(
                f"--expert-placement fit splits samples={samples} into two halves that must "
                f"each be a multiple of devices={devices}; choose --tokens-per-sample so they "
                f"are, or give --micro-batch-size")
        return half // devices
    if samples % devices:
        raise ValueError(f"samples={samples} is not divisible by devices={devices}; choose "
                         f"--tokens-per-sample so that it is")
    return samples // devices


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
    try:
        groups = EPGroups.contiguous(devices, args.gpus_per_node, args.ep_size or 0)
    except ValueError as err:
        raise ValueError(f"--ep-size {args.ep_size} with --nodes {args.nodes} x --gpus-per-node "
                         f"{args.gpus_per_node} = {devices} devices: {err}") from None
    ep, nodes, gpus = groups.size, groups.nodes, groups.gpus
    if experts % ep:
        where = f"--ep-size {ep}" if args.ep_size else \
            f"--nodes {args.nodes} x --gpus-per-node {args.gpus_per_node} ="
        raise ValueError(f"{experts} experts do not spread evenly over {where} {ep} devices")
    budget, method = args.replica_budget, _method(args)
    if method != "routes" and budget is None:
        budget = 0
    fields = sample_rounds(trace, args.tokens_per_sample)
    rounds = plan_rounds(counts.shape[1], groups,
                         micro_batch_size(args, counts.shape[1], devices, fields is not None),
                         fields)
    m = len(rounds[0].samples) // ep
    fitting = args.expert_placement in ("fit", "eplb")
    fit, held = split_rounds(rounds) if fitting else ([], rounds)
    held_counts = [counts[:, list(r.samples)] for r in held]
    maps = None
    if fit:
        maps, per_round = evaluate_joint([counts[:, list(r.samples)] for r in fit], held_counts,
                                         nodes, gpus, args.objective, links)
    else:
        per_round = [evaluate(c, nodes, gpus, args.objective, links) for c in held_counts]
    evaluated = counts[:, [i for r in held for i in r.samples]]
    rep = report(evaluated, args.nodes, args.gpus_per_node, combine(per_round), links,
                 trace.layer_ids)
    replicated = None
    if budget is not None:
        replicated, extra = evaluate_replicated(
            [counts[:, list(r.samples)] for r in fit], held_counts, nodes, gpus, maps, budget,
            method=method, max_load_ratio=args.max_load_ratio,
            migration_budget=args.migration_budget, groups=args.eplb_groups)
        rep = add_replicated(rep, combine_replicated(replicated), extra)
    rep = add_rounds(rep, held, per_round, replicated, m, ep, links)
    pool = pooled(counts, held, m, nodes, gpus, args.objective, links, maps)
    if pool is not None:
        rep["pooled"] = pool
    print(json.dumps(rep) if args.json else _text(rep))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="replay a routing trace and report what sample placement would save",
        description="Replays a recorded routing trace (.npz: topk_ids [L, T, K], optional "
        "sample_ids [T], num_experts, layer_ids [L] and the round fields step_ids, "
        "micro_batch_ids, dp_ranks [T]) and reports, per consecutive layer pair, the inter- and "
        "intra-node routes, bytes and modelled All-to-All time (alpha-beta model, max of the two "
        "channels) of the home placement and of the optimal placement, each round (one "
        "micro-batch of one EP group: --micro-batch-size samples per device) solved alone and "
        "summed; all samples pooled in one All-to-All is reported apart, as an upper bound.",
    )
    p.add_argument("--trace", required=True,
                   help="trace file (.npz), or a directory with --trace-format megatron")
    add_source_arguments(p)
    p.add_argument("--nodes", type=positive, default=2, help="nodes of the modelled cluster")
    p.add_argument("--gpus-per-node", type=positive, default=4, help="GPUs per node")
    p.add_argument("--ep-size", type=positive, default=None, metavar="G",
                   help="expert-parallel group size: data-parallel ranks g G .. g G + G - 1 "
                   "share one All-to-All (default: all devices); experts spread over G devices")
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
                   "e // (E/G)); fit: fit expert placement on the first half of the rounds and "
                   "report home, sample-only and joint placement on the held-out rest; eplb: as "
                   "fit, and the copies (`replicated`) are DeepSeek EPLB's maps and K x devices "
                   "redundant experts per layer for the fit rounds' loads")
    p.add_argument("--replica-budget", type=non_negative, default=None, metavar="K",
                   help="with --expert-placement fit: also choose up to K expert copies per "
                   "device and layer on the fit rounds (0 = none) and report the held-out routes "
                   "with them (`replicated` per pair, `expert_maps`, `replicas`)")
    p.add_argument("--max-load-ratio", type=float, default=None, metavar="R",
                   help="with --expert-placement fit: choose maps, copies and route tables for "
                   "routes with every layer's busiest device serving at most R x the mean load "
                   "on the fit rounds (R >= 1; default: no bound, routes only)")
    p.add_argument("--migration-budget", type=non_negative, default=None, metavar="M",
                   help="with --expert-placement fit: at most M experts (all layers) leave their "
                   "home device (default: no budget)")
    p.add_argument("--eplb-groups", type=positive, default=1, metavar="G",
                   help="with --expert-placement eplb: expert groups (EPLB's hierarchical policy "
                   "when G is a multiple of --nodes; default 1: its global policy)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
