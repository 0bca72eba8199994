"""The demo's report: every run's per-rank results summarized (routes from the All-to-All split
sizes, timings, losses), the comparisons the --json object holds, and their printout."""

from __future__ import annotations

import dataclasses
import statistics
import sys
from typing import Any

import numpy as np

from netmoe.app.reference.results import ExpertMoves, RankResult
from netmoe.app.text import human_bytes, plural


def summarize(results: list[RankResult]) -> dict[str, Any]:
    """Merges the per-rank results of one run (routes summed over ranks, times averaged)."""
    layers = len(results[0].routes)
    per_layer = [[sum(r.routes[layer][c] for r in results) for c in range(3)]
                 for layer in range(layers)]  # fmt: skip
    out: dict[str, Any] = {
        "loss": results[0].loss,
        "inter_routes": sum(x[0] for x in per_layer),
        "intra_routes": sum(x[1] for x in per_layer),
        "local_routes": sum(x[2] for x in per_layer),
        "per_layer": [{"inter": x[0], "intra": x[1], "local": x[2]} for x in per_layer],
        "a2a_seconds": statistics.fmean(r.a2a_seconds for r in results),
        "step_seconds": statistics.fmean(sum(r.step_seconds) for r in results),
        # The small exchanges before each All-to-All (split sizes; with placement also the plan
        # agreement): the ranks' compute skew shows up here, in both runs alike.
        "control_seconds": statistics.fmean(r.control_seconds for r in results),
        # Bytes each All-to-All route carries (hidden state, metadata; router weight in the
        # dispatch), from the dispatcher's counts of what the ranks sent.
        "bytes_per_route": {phase: statistics.fmean(r.bytes_per_route[phase]
                                                    for r in results if r.bytes_per_route)
                            for phase in ("dispatch", "combine")},
    }
    placed = [r.placement for r in results if r.placement is not None]
    if placed:
        first = placed[0]
        solve = [s for s in first.solve_seconds if s > 0]
        out.update(
            plan_wait_seconds=statistics.fmean(p.plan_wait_seconds for p in placed),
            submit_seconds=statistics.fmean(p.submit_seconds for p in placed),
            fallbacks=max(p.fallbacks for p in placed),
            fallback_reasons=first.fallback_reasons,
            moved_per_plan=first.moved / max(first.plans, 1),
            solve_ms=[1000 * s for s in solve],
        )
    return out


def routes_between(results: list[RankResult], first: int, last: int) -> dict[str, Any]:
    """Routes of steps first..last (inclusive) summed over ranks: inter, intra, local and per
    layer (dispatch + combine, from the All-to-All split sizes)."""
    per = np.asarray([r.step_routes for r in results], dtype=np.int64)  # [ranks, steps, L, 3]
    layer = per[:, first:last + 1].sum(axis=(0, 1))
    total = layer.sum(axis=0)
    return {"inter": int(total[0]), "intra": int(total[1]), "local": int(total[2]),
            "per_layer": [{"inter": int(x[0]), "intra": int(x[1]), "local": int(x[2])}
                          for x in layer]}


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def placement_report(home_ranks: list[RankResult], net_ranks: list[RankResult],
                     config: dict[str, Any]) -> dict[str, Any]:
    """The --json keys every model family's demo has: both runs summarized, the solver's median,
    the inter-node reduction, the loss agreement and the bytes per route."""
    home, net = summarize(home_ranks), summarize(net_ranks)
    solve = net.pop("solve_ms")
    return {
        "home": home,
        "netmoe": net,
        "solver_ms_median": statistics.median(solve) if solve else 0.0,
        "inter_reduction": saved(home["inter_routes"], net["inter_routes"]),
        "max_loss_rel_diff": max_rel_diff(home["loss"], net["loss"]),
        "bytes_per_route": net["bytes_per_route"],
        "config": config,
    }


def saved(home: int, placed: int) -> float:
    return 0.0 if home == 0 else 1 - placed / home


def check_planned(address: str, runs: list[tuple[str, list[RankResult]]]) -> int:
    """Says loudly on stderr when layers ran without a plan; exit code 1 when a run got no plan
    at all (the service was unreachable or refused the job), else 0."""
    code = 0
    for name, ranks in runs:
        st = ranks[0].placement
        if st is None or not st.fallbacks:
            continue
        layers = st.fallbacks + st.plans
        why = ", ".join(f"{reason}: {n}" for reason, n in sorted(st.fallback_reasons.items()))
        if st.plans == 0:
            print(f"netmoe demo: error: the {name} run got no plan from the placement service at "
                  f"{address}: all {plural(layers, 'layer')} fell back to home placement ({why}); "
                  f"is the service running there?", file=sys.stderr)
            code = 1
        else:
            print(f"netmoe demo: warning: the {name} run fell back to home placement in "
                  f"{st.fallbacks} of {plural(layers, 'layer')} ({why})", file=sys.stderr)
    return code


def recommendation(moves: ExpertMoves) -> dict[str, Any]:
    """Rank 0's expert placement as the --json report shows it (one flat object): the call,
    the service's advice when it answered, the copies it proposed, the adoption, and rank 0's
    bytes and seconds creating copies when there were any."""
    out: dict[str, Any] = {"step": moves.step, "bytes_per_expert": moves.bytes_per_expert,
                           "adopted": moves.adopted, "error": moves.error,
                           "grad_bytes_weighed": moves.grad_bytes_weighed}
    if moves.advice is not None:
        out.update(dataclasses.asdict(moves.advice))
    if moves.replicas is not None:
        out.update(copies=moves.copies, replicas=dataclasses.asdict(moves.replicas))
    if moves.route_tables is not None:
        out.update(route_tables=moves.route_tables, load=moves.load)
    if moves.adopted:
        out["copies_adopted"] = moves.copies_adopted
    if moves.copies_adopted:
        out.update(copy_sent_bytes=moves.copy_sent_bytes, copy_seconds=moves.copy_seconds)
    return out


def _moves(ranks: list[RankResult]) -> list[ExpertMoves]:
    """Each rank's expert placement (an empty one for a rank without: it moved nothing)."""
    return [r.expert_moves or ExpertMoves() for r in ranks]


def expert_report(home: list[RankResult], sample: list[RankResult],
                   joint: list[RankResult], first: int, last: int) -> dict[str, Any]:
    """Home, sample-only and joint routes on steps first..last (after the move), the service's
    recommendation as rank 0 got it, and the loss check."""
    runs = {"home": home, "sample_only": sample, "joint": joint}
    routes = {name: routes_between(rs, first, last) for name, rs in runs.items()}
    moves = _moves(joint)
    return {
        "steps": [first, last],
        **routes,
        "sample_only_reduction": saved(routes["home"]["inter"], routes["sample_only"]["inter"]),
        "joint_reduction": saved(routes["home"]["inter"], routes["joint"]["inter"]),
        "recommendation": recommendation(moves[0]),
        "moved_bytes": sum(m.sent_bytes for m in moves),
        "adopt_seconds": max(m.adopt_seconds for m in moves),
        "fallbacks": max(r.placement.fallbacks for r in joint if r.placement is not None),
        "max_loss_rel_diff": max(max_rel_diff(home[0].loss, rs[0].loss)
                                 for rs in (sample, joint)),
    }


def replica_report(home: list[RankResult], replicated: list[RankResult], first: int,
                    last: int) -> dict[str, Any]:
    """Routes with maps and copies on steps first..last, the service's answer about the copies
    as rank 0 got it, bytes and time to create them, gradient sync time, the loss check."""
    routes = routes_between(replicated, first, last)
    base = max(routes_between(home, first, last)["inter"], 1)
    moves = _moves(replicated)
    info = moves[0]
    return {
        "steps": [first, last],
        "replicated": routes,
        "replicated_reduction": 1 - routes["inter"] / base,
        "recommendation": dataclasses.asdict(info.replicas) if info.replicas else {},
        "grad_bytes_weighed": info.grad_bytes_weighed or 0,
        "error": info.error,
        "adopted": info.copies_adopted,
        "copies": info.copies or [],
        "copy_bytes": sum(m.copy_sent_bytes for m in moves),
        "copy_seconds": max(m.copy_seconds for m in moves),
        "sync_seconds": statistics.fmean(r.copy_sync_seconds or 0.0 for r in replicated),
        "a2a_seconds": statistics.fmean(r.a2a_seconds for r in replicated),
        "max_loss_rel_diff": max_rel_diff(home[0].loss, replicated[0].loss),
    }


def _print_replicas(x: dict[str, Any]) -> None:
    first, last = x["steps"]
    rec = x["recommendation"]
    print(f"expert copies: created with the maps after step {first - 1}")
    if x["error"]:
        print(f"  service: {x['error']}")
    if rec:
        weighed = ("" if x["grad_bytes_weighed"] else
                   "; chosen and weighed without their gradient sync (force), measured below")
        print(f"  recommended: {'create' if rec['recommended'] else 'none'} ({rec['reason']})"
              f"{weighed}")
    print(f"  adopted: {'yes' if x['adopted'] else 'no'}; {sum(map(len, x['copies']))} copies, "
          f"{x['copy_bytes']} bytes sent in {x['copy_seconds']:.3f} s; gradient sync "
          f"{x['sync_seconds']:.3f} s per rank")
    r = x["replicated"]
    print(f"  routes on steps {first}..{last} with copies: inter {r['inter']}, intra "
          f"{r['intra']} ({100 * x['replicated_reduction']:.1f}% fewer inter-node routes than "
          f"home); losses equal within {x['max_loss_rel_diff']:.1e} relative")


def _print_experts(x: dict[str, Any]) -> None:
    rec = x["recommendation"]
    first, last = x["steps"]
    print(f"expert placement: fitted after step {first - 1}, compared on steps {first}..{last}")
    if rec.get("error"):
        print(f"  service: {rec['error']}")
    if "reason" in rec:
        held = rec["held_out"]
        print(f"  held-out steps {rec['held_out_steps'][0]}..{rec['held_out_steps'][1]} (fit on "
              f"{rec['fit_steps'][0]}..{rec['fit_steps'][1]}), inter-node routes: home "
              f"{held['home']['inter']}, sample-only {held['sample_only']['inter']}, joint "
              f"{held['joint']['inter']}")
        print(f"  saving {rec['saving_per_step']:.3g} {rec['unit']}/step; migration "
              f"{plural(rec['moved_experts'], 'expert')} ({rec['moved_inter']} across nodes), "
              f"{human_bytes(rec['migration_bytes'])} ({human_bytes(rec['bytes_per_expert'])} per "
              f"expert), "
              f"cost {rec['migration_cost']:.3g} {rec['unit']}")
        print(f"  recommended: {'adopt' if rec['recommended'] else 'keep'} ({rec['reason']})")
    print(f"  adopted: {'yes' if rec['adopted'] else 'no'}; {human_bytes(x['moved_bytes'])} moved "
          f"between ranks in {x['adopt_seconds']:.3f} s")
    print(f"  routes on steps {first}..{last}   home inter  intra   sample inter  intra   "
          f"joint inter  intra")
    for layer, (h, s, j) in enumerate(zip(x["home"]["per_layer"], x["sample_only"]["per_layer"],
                                          x["joint"]["per_layer"], strict=True)):
        print(f"    layer {layer:<23}{h['inter']:>10} {h['intra']:>6} {s['inter']:>14} "
              f"{s['intra']:>6} {j['inter']:>13} {j['intra']:>6}")
    h, s, j = x["home"], x["sample_only"], x["joint"]
    print(f"    {'total':<29}{h['inter']:>10} {h['intra']:>6} {s['inter']:>14} {s['intra']:>6} "
          f"{j['inter']:>13} {j['intra']:>6}")
    print(f"  inter-node routes vs home: sample-only {100 * x['sample_only_reduction']:.1f}% "
          f"fewer, joint {100 * x['joint_reduction']:.1f}% fewer; "
          f"{plural(x['fallbacks'], 'fallback')}; "
          f"losses equal within {x['max_loss_rel_diff']:.1e} relative")


def print_report(r: dict[str, Any]) -> None:
    home, net, cfg = r["home"], r["netmoe"], r["config"]
    world = cfg["nodes"] * cfg["gpus_per_node"]
    print(
        f"netmoe demo: {plural(cfg['nodes'], 'node')} x {plural(cfg['gpus_per_node'], 'GPU')}, "
        f"{plural(cfg['steps'], 'step')}, {plural(cfg['layers'], 'MoE layer')}, "
        f"E={cfg['experts_per_device'] * world}, top-{cfg['top_k']}"
    )
    print("routes (dispatch + combine, all steps)   home inter  intra   netmoe inter  intra")
    rows = [*zip(home["per_layer"], net["per_layer"], strict=True)]
    for layer, (h, n) in enumerate(rows):
        print(
            f"  layer {layer:<32}{h['inter']:>10} {h['intra']:>6} {n['inter']:>14} {n['intra']:>6}"
        )
    print(
        f"  {'total':<38}{home['inter_routes']:>10} {home['intra_routes']:>6} "
        f"{net['inter_routes']:>14} {net['intra_routes']:>6}"
    )
    print(f"inter-node routes with placement: {100 * r['inter_reduction']:.1f}% fewer than home")
    wait_share = net["plan_wait_seconds"] / max(net["step_seconds"], 1e-9)
    print(
        f"solver latency (median): {r['solver_ms_median']:.2f} ms; training waited "
        f"{net['plan_wait_seconds']:.3f} s for plans ({100 * wait_share:.1f}% of step time); "
        f"{plural(net['fallbacks'], 'fallback')}"
    )
    print(
        f"control exchanges before All-to-Alls (split sizes, plan agreement) per rank: home "
        f"{home['control_seconds']:.3f} s, netmoe {net['control_seconds']:.3f} s"
    )
    print(
        f"All-to-All seconds per rank: home {home['a2a_seconds']:.3f}, "
        f"netmoe {net['a2a_seconds']:.3f} (gloo over loopback on one machine: no network to "
        f"save on; `netmoe bench cluster` measures emulated links)"
    )
    b = r["bytes_per_route"]
    print(f"bytes per route (hidden state + metadata, router weight in the dispatch): "
          f"dispatch {b['dispatch']:.0f}, combine {b['combine']:.0f}")
    print(
        f"losses equal within {r['max_loss_rel_diff']:.1e} relative; last step: "
        f"home {home['loss'][-1]:.4f}, netmoe {net['loss'][-1]:.4f}"
    )
    if "stock" in r:
        stock = r["stock"]
        print(f"torchtitan's own EP path (stock AllToAllTokenDispatcher): inter-node routes "
              f"{stock['inter_routes']}; losses equal netmoe's within "
              f"{r['max_stock_loss_rel_diff']:.1e} relative; last step {stock['loss'][-1]:.4f}")
    if "expert_placement" in r:
        _print_experts(r["expert_placement"])
    if "replicas" in r:
        _print_replicas(r["replicas"])
