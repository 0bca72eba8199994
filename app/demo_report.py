"""``netmoe demo``: train the reference MoE on N x G emulated GPUs, without and with placement.

Starts an embedded placement service (unless --server), optionally pre-trains a checkpoint once in
one process (cached outside the repository, so experts have specialised before the comparison),
then trains the same steps twice with the same seed: home placement, then netmoe placement. Route
counts come from the split sizes of the real All-to-All calls of every rank.

With --expert-placement a third run (joint placement) asks the service for expert maps after
--adopt-after steps, moves the experts and goes on with plans for the new maps; home, sample-only
and joint are then compared on the steps after the move. With --replica-budget K a fourth run
also creates the expert copies the service recommends (K per device and layer) with the maps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from typing import Any

import numpy as np

from netmoe.app.cli import non_negative, positive
from netmoe.app.progress import Progress
from netmoe.app.service import check_server, placement_service
from netmoe.app.text import human_bytes, plural


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small MoE on emulated GPUs with and without sample placement",
        description="Spawns nodes x gpus-per-node training processes (gloo on 127.0.0.1), trains "
        "the reference MoE with home placement and then with plans from the placement service, "
        "and compares inter-/intra-node routes, All-to-All time and losses.",
    )
    p.add_argument("--nodes", type=positive, default=2, help="emulated nodes")
    p.add_argument("--gpus-per-node", type=positive, default=4,
                   help="emulated GPUs (training processes) per node")
    p.add_argument("--steps", type=positive, default=12, help="compared training steps per run")
    p.add_argument(
        "--warmup-steps",
        type=non_negative,
        default=150,
        help="single-process pre-training steps of the cached checkpoint (0: none)",
    )
    p.add_argument("--samples-per-device", type=positive, default=4,
                   help="samples (sequences) each GPU holds per step")
    p.add_argument("--seq-len", type=positive, default=64, help="tokens per sample")
    p.add_argument("--layers", type=positive, default=4, help="MoE layers of the model")
    p.add_argument("--objective", choices=("volume", "bottleneck"), default="volume",
                   help="volume: fewest inter-node routes over the machine; bottleneck: the "
                   "busiest node's inter-node routes")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data and plans")
    p.add_argument("--server", default="", metavar="HOST:PORT",
                   help="use this placement service (default: start one inside the demo)")
    p.add_argument(
        "--record-trace",
        default="",
        metavar="PATH",
        help="save the home run's routing as a trace .npz for `netmoe evaluate`",
    )
    p.add_argument("--cache-dir", default="",
                   help="corpus and checkpoint cache (default: $NETMOE_CACHE, else "
                   "$XDG_CACHE_HOME/netmoe, else ~/.cache/netmoe)")
    p.add_argument(
        "--expert-placement",
        nargs="?",
        const="auto",
        choices=("auto", "force"),
        default=None,
        help="also train with joint placement: after --adopt-after steps the service fits expert "
        "maps and the ranks move their experts; auto: if the saving over --expert-horizon steps "
        "pays for the move, force: always. Compares home, sample-only and joint on the steps "
        "after adoption",
    )
    p.add_argument("--adopt-after", type=int, default=None,
                   help="steps before the experts move (default: half of --steps)")
    p.add_argument("--expert-horizon", type=positive, default=1000,
                   help="steps the saving must pay for the move within (auto)")
    p.add_argument("--hf-model", default="", metavar="DIR",
                   help="train this local Hugging Face MoE checkpoint instead (config + weights; "
                   "see docs/huggingface.md)")
    p.add_argument("--torchtitan", choices=("qwen3", "deepseek_v3"), default="",
                   help="train a tiny torchtitan model of this family instead (2 experts per "
                   "GPU), also on torchtitan's own EP path (see docs/torchtitan.md)")
    p.add_argument("--replica-budget", type=non_negative, default=None, metavar="K",
                   help="with --expert-placement: a fourth run that also creates up to K expert "
                   "copies per device and layer with the maps (as the service recommends; "
                   "force: always), compared on the same steps")
    p.add_argument("--max-load-ratio", type=float, default=0.0, metavar="R",
                   help="with --replica-budget: the service chooses maps, copies and route tables "
                   "with every layer's busiest device at most R x the mean load (R >= 1; "
                   "default 0: no bound) and the ranks route by the confirmed tables")
    p.add_argument("--micro-batches", type=positive, default=1, metavar="N",
                   help="forward passes per step (gradient accumulation); each has its own "
                   "placement rounds")
    p.add_argument("--recompute", action="store_true",
                   help="recompute every block in the backward pass (activation checkpointing); "
                   "the recompute applies the plan its forward applied")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: bf16 hidden states and All-to-All payloads (autocast), fp32 "
                   "parameters and router weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Merges the per-rank results of one run (routes summed over ranks, times averaged)."""
    layers = len(results[0]["routes"])
    per_layer = [[sum(r["routes"][layer][c] for r in results) for c in range(3)]
                 for layer in range(layers)]  # fmt: skip
    out: dict[str, Any] = {
        "loss": results[0]["loss"],
        "inter_routes": sum(x[0] for x in per_layer),
        "intra_routes": sum(x[1] for x in per_layer),
        "local_routes": sum(x[2] for x in per_layer),
        "per_layer": [{"inter": x[0], "intra": x[1], "local": x[2]} for x in per_layer],
        "a2a_seconds": statistics.fmean(r["a2a_seconds"] for r in results),
        "step_seconds": statistics.fmean(sum(r["step_seconds"]) for r in results),
        # The small exchanges before each All-to-All (split sizes; with placement also the plan
        # agreement): the ranks' compute skew shows up here, in both runs alike.
        "control_seconds": statistics.fmean(r["control_seconds"] for r in results),
        # Bytes each All-to-All route carries (hidden state, metadata; router weight in the
        # dispatch), from the dispatcher's counts of what the ranks sent.
        "bytes_per_route": {phase: statistics.fmean(r["bytes_per_route"][phase]
                                                    for r in results)
                            for phase in ("dispatch", "combine")},
    }
    if "plan_wait_seconds" in results[0]:
        solve = [s for s in results[0]["solve_seconds"] if s > 0]
        out.update(
            plan_wait_seconds=statistics.fmean(r["plan_wait_seconds"] for r in results),
            submit_seconds=statistics.fmean(r["submit_seconds"] for r in results),
            fallbacks=max(r["fallbacks"] for r in results),
            fallback_reasons=results[0]["fallback_reasons"],
            moved_per_plan=results[0]["moved"] / max(results[0]["plans"], 1),
            solve_ms=[1000 * s for s in solve],
        )
    return out


def routes_between(results: list[dict[str, Any]], first: int, last: int) -> dict[str, Any]:
    """Routes of steps first..last (inclusive) summed over ranks: inter, intra, local and per
    layer (dispatch + combine, from the All-to-All split sizes)."""
    per = np.asarray([r["step_routes"] for r in results], dtype=np.int64)  # [ranks, steps, L, 3]
    layer = per[:, first:last + 1].sum(axis=(0, 1))
    total = layer.sum(axis=0)
    return {"inter": int(total[0]), "intra": int(total[1]), "local": int(total[2]),
            "per_layer": [{"inter": int(x[0]), "intra": int(x[1]), "local": int(x[2])}
                          for x in layer]}


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / abs(x) for x, y in zip(a, b, strict=True))


def placement_report(home_ranks: list[dict[str, Any]], net_ranks: list[dict[str, Any]],
                     config: dict[str, Any]) -> dict[str, Any]:
    """The --json keys every model family's demo has: both runs summarized, the solver's median,
    the inter-node reduction, the loss agreement and the bytes per route."""
    home, net = summarize(home_ranks), summarize(net_ranks)
    solve = net.pop("solve_ms")
    return {
        "home": home,
        "netmoe": net,
        "solver_ms_median": statistics.median(solve) if solve else 0.0,
        "inter_reduction": _saved(home["inter_routes"], net["inter_routes"]),
        "max_loss_rel_diff": max_rel_diff(home["loss"], net["loss"]),
        "bytes_per_route": net["bytes_per_route"],
        "config": config,
    }


def _train(label: str, cfg: Any) -> list[dict[str, Any]]:
    """run_ranks(cfg) with its progress on stderr."""
    from netmoe.app.reference.launch import run_ranks

    return run_ranks(cfg, progress=Progress(f"netmoe demo: {label}", cfg.steps).update)


def run(args: argparse.Namespace) -> int:
    if args.server:
        check_server(args.server)  # before anything slow: a wrong address fails in seconds
    if args.torchtitan:
        from netmoe.app.reference.torchtitan_demo import run_demo as run_torchtitan

        return run_torchtitan(args)
    if args.hf_model:
        from netmoe.app.reference.hf_demo import run_demo

        return run_demo(args)
    from netmoe.app.reference.data import load_corpus
    from netmoe.app.reference.pretrain import pretrain
    from netmoe.app.reference.train import TrainConfig

    cfg = TrainConfig(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, steps=args.steps,
        samples_per_device=args.samples_per_device, seq_len=args.seq_len, layers=args.layers,
        objective=args.objective, seed=args.seed, cache_dir=args.cache_dir,
        data_offset=args.warmup_steps, micro_batches=args.micro_batches,
        recompute=args.recompute, dtype=args.dtype,
    )  # fmt: skip
    adopt_at = args.steps // 2 if args.adopt_after is None else args.adopt_after
    if args.expert_placement and not 2 <= adopt_at < args.steps:
        raise ValueError(f"--adopt-after must leave at least 2 steps before the move (one to fit, "
                         f"one held out) and 1 after it, in [2, {args.steps - 1}] for --steps "
                         f"{args.steps}, got {adopt_at}")
    if args.replica_budget is not None and not args.expert_placement:
        raise ValueError("--replica-budget needs --expert-placement")
    if args.max_load_ratio and args.replica_budget is None:
        raise ValueError("--max-load-ratio needs --replica-budget")
    if args.max_load_ratio and not args.max_load_ratio >= 1:
        raise ValueError(f"--max-load-ratio must be >= 1 (busiest device / mean load), got "
                         f"{args.max_load_ratio}")
    if args.replica_budget is not None and args.replica_budget < 0:
        raise ValueError(f"--replica-budget must be >= 0 copies per device, got "
                         f"{args.replica_budget}")
    load_corpus(cfg.vocab, cfg.cache_dir or None)  # build once here, ranks read the cache
    if args.warmup_steps:
        cfg = dataclasses.replace(cfg, init_checkpoint=pretrain(cfg, args.warmup_steps))
    with placement_service(args.server) as (address, metrics_url):
        if metrics_url:
            print(f"netmoe demo: placement service on {address}, metrics on {metrics_url} until "
                  f"the demo ends", file=sys.stderr)
        home_ranks = _train("home run", dataclasses.replace(cfg, record_trace=args.record_trace))
        job = f"demo-{cfg.nodes}x{cfg.gpus_per_node}-s{cfg.seed}"
        sample_ranks = _train("netmoe run", dataclasses.replace(
            cfg, placement="service", server=address, job=job))  # fmt: skip
        joint_ranks = None
        if args.expert_placement:
            # A fresh job: its window and confirmed maps must start at step 0.
            joint_ranks = _train("joint run", dataclasses.replace(
                cfg, placement="service", server=address, job=f"{job}-joint-{os.getpid()}",
                adopt_experts_at=adopt_at, expert_placement=args.expert_placement,
                expert_horizon=args.expert_horizon))  # fmt: skip
        replica_ranks = None
        if args.replica_budget is not None:
            replica_ranks = _train("replicas run", dataclasses.replace(
                cfg, placement="service", server=address, job=f"{job}-replicas-{os.getpid()}",
                adopt_experts_at=adopt_at, expert_placement=args.expert_placement,
                expert_horizon=args.expert_horizon, replica_budget=args.replica_budget,
                max_load_ratio=args.max_load_ratio))
    report = placement_report(home_ranks, sample_ranks, dataclasses.asdict(cfg))
    if joint_ranks is not None:
        report["expert_placement"] = _expert_report(home_ranks, sample_ranks, joint_ranks,
                                                    adopt_at, cfg.steps - 1)
    if replica_ranks is not None:
        report["replicas"] = _replica_report(home_ranks, replica_ranks, adopt_at, cfg.steps - 1)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    runs = [("netmoe", sample_ranks)] + ([("joint", joint_ranks)] if joint_ranks else [])
    return check_planned(address, runs)


def _saved(home: int, placed: int) -> float:
    return 0.0 if home == 0 else 1 - placed / home


def check_planned(address: str, runs: list[tuple[str, list[dict[str, Any]]]]) -> int:
    """Says loudly on stderr when layers ran without a plan; exit code 1 when a run got no plan
    at all (the service was unreachable or refused the job), else 0."""
    code = 0
    for name, ranks in runs:
        st = ranks[0]
        if not st["fallbacks"]:
            continue
        layers = st["fallbacks"] + st["plans"]
        why = ", ".join(f"{reason}: {n}" for reason, n in sorted(st["fallback_reasons"].items()))
        if st["plans"] == 0:
            print(f"netmoe demo: error: the {name} run got no plan from the placement service at "
                  f"{address}: all {plural(layers, 'layer')} fell back to home placement ({why}); "
                  f"is the service running there?", file=sys.stderr)
            code = 1
        else:
            print(f"netmoe demo: warning: the {name} run fell back to home placement in "
                  f"{st['fallbacks']} of {plural(layers, 'layer')} ({why})", file=sys.stderr)
    return code


def _expert_report(home: list[dict[str, Any]], sample: list[dict[str, Any]],
                   joint: list[dict[str, Any]], first: int, last: int) -> dict[str, Any]:
    """Home, sample-only and joint routes on steps first..last (after the move), the service's
    recommendation as rank 0 got it, and the loss check."""
    runs = {"home": home, "sample_only": sample, "joint": joint}
    routes = {name: routes_between(rs, first, last) for name, rs in runs.items()}
    info = dict(joint[0]["experts"])
    info.pop("sent_bytes", None)
    info.pop("adopt_seconds", None)
    return {
        "steps": [first, last],
        **routes,
        "sample_only_reduction": _saved(routes["home"]["inter"], routes["sample_only"]["inter"]),
        "joint_reduction": _saved(routes["home"]["inter"], routes["joint"]["inter"]),
        "recommendation": info,
        "moved_bytes": sum(r["experts"].get("sent_bytes", 0) for r in joint),
        "adopt_seconds": max(r["experts"].get("adopt_seconds", 0.0) for r in joint),
        "fallbacks": max(r["fallbacks"] for r in joint),
        "max_loss_rel_diff": max(max_rel_diff(home[0]["loss"], rs[0]["loss"])
                                 for rs in (sample, joint)),
    }


def _replica_report(home: list[dict[str, Any]], replicated: list[dict[str, Any]], first: int,
                    last: int) -> dict[str, Any]:
    """Routes with maps and copies on steps first..last, the service's answer about the copies
    as rank 0 got it, bytes and time to create them, gradient sync time, the loss check."""
    routes = routes_between(replicated, first, last)
    base = max(routes_between(home, first, last)["inter"], 1)
    info = replicated[0]["experts"]
    return {
        "steps": [first, last],
        "replicated": routes,
        "replicated_reduction": 1 - routes["inter"] / base,
        "recommendation": info.get("replicas", {}),
        "grad_bytes_weighed": info.get("grad_bytes_weighed", 0),
        "error": info.get("error", ""),
        "adopted": bool(info.get("copies_adopted")),
        "copies": info.get("copies", []),
        "copy_bytes": sum(r["experts"].get("copy_sent_bytes", 0) for r in replicated),
        "copy_seconds": max(r["experts"].get("copy_seconds", 0.0) for r in replicated),
        "sync_seconds": statistics.fmean(r["copy_sync_seconds"] for r in replicated),
        "a2a_seconds": statistics.fmean(r["a2a_seconds"] for r in replicated),
        "max_loss_rel_diff": max_rel_diff(home[0]["loss"], replicated[0]["loss"]),
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


def _print(r: dict[str, Any]) -> None:
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
    if "expert_placement" in r:
        _print_experts(r["expert_placement"])
    if "replicas" in r:
        _print_replicas(r["replicas"])
