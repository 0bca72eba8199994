"""`netmoe bench cluster`: real All-to-All time with and without placement on an emulated cluster.

Default workload "training": the reference MoE (the demo's model, data and cached warm-up
checkpoint) trains K steps in the node namespaces in four modes, home, sample placement, expert +
sample placement, and the latter plus expert copies ("replicas", --replica-budget, with their
gradient sync timed and the model's verdict on them) (netmoe.app.cluster.train). Workload
"synthetic" replays planted routing:

Builds the testbed (netmoe.app.cluster.testbed: node namespaces, shaped veths, ``lo`` shaped to
``ratio`` times the inter-node rate), calibrates the alpha-beta model there
(netmoe.app.cluster.calibrate), then runs the All-to-Alls of K training steps per mode through real
gloo ranks (netmoe.app.cluster.probe), modes interleaved, and reports measured vs predicted time,
link bytes from the veth counters, and the speedups. The workload is the routing of a synthetic
MoE with planted domain locality
(netmoe.solver.synthetic); the placement of each layer pair is solved from the real gather of
layer l and the real scatter of layer l+1 (training predicts the latter).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CALIBRATION_SIZES = (65536, 262144, 1048576)
QUICK_SIZES = (131072, 524288)
# bytes per peer; a training All-to-All sends about 20 KB per peer (demo model, 4 samples/rank)
TRAINING_SIZES = (8192, 32768, 131072)
# a wide size range: under load (tens of ms of noise) a narrow one fitted negative slopes
TRAINING_QUICK_SIZES = (8192, 262144)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="measured All-to-All time on an emulated multi-node "
                                       "cluster (needs root)", description=__doc__)
    p.add_argument("--nodes", type=int, default=2, help="emulated nodes (network namespaces)")
    p.add_argument("--gpus-per-node", type=int, default=4, help="training ranks per node")
    p.add_argument("--ratio", type=float, default=4.0,
                   help="intra-node : inter-node bandwidth (lo of each node is shaped to "
                        "ratio x rate)")
    p.add_argument("--workload", choices=("training", "synthetic"), default="training",
                   help="real training of the demo model or synthetic routing")
    p.add_argument("--rate", type=float, default=None,
                   help="inter-node link rate per node and direction, Mbit/s (default: 40 for "
                        "training, 200 for synthetic, so the link, not the 2 CPU cores, is the "
                        "bottleneck)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per mode and repeat")
    p.add_argument("--repeats", type=int, default=3,
                   help="training: launches of each mode, interleaved (home, sample, experts, "
                        "home, ...); figures are medians over repeats")
    p.add_argument("--objective", choices=("volume", "bottleneck", "both"), default="volume",
                   help="placement objective; 'both' runs each placed mode under each objective "
                        "and reports which wins on measured time (training only)")
    p.add_argument("--samples-per-device", type=int, default=4,
                   help="samples each rank holds per step")
    p.add_argument("--layers", type=int, default=4, help="MoE layers per step")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sample (default 64 for training, the demo's, 128 synthetic)")
    p.add_argument("--bytes-per-route", type=int, default=1024,
                   help="synthetic: bytes of one (token, top-k slot); training uses d_model x 4")
    p.add_argument("--warmup-steps", type=int, default=150,
                   help="training: steps of the demo's cached single-process checkpoint (0: none)")
    p.add_argument("--fit-steps", type=int, default=8,
                   help="training: recorded steps the expert map is fitted on (before the "
                        "measured ones)")
    p.add_argument("--fit-starts", type=int, default=4,
                   help="training: random starts of the expert fit besides the current map")
    p.add_argument("--replica-budget", type=int, default=1,
                   help="training: expert copies per device and layer of the 'replicas' mode "
                        "(the experts mode plus copies chosen by the replica solver on the fit "
                        "steps; 0: no replicas mode)")
    p.add_argument("--replica-fit", choices=("sync", "routes"), default="sync",
                   help="training: choose copies whose saved routes outweigh their gradient "
                        "sync (sync), or fill the budget on routes alone (routes)")
    p.add_argument("--cache-dir", default="",
                   help="training: cache of corpus, checkpoint, expert fit and calibration")
    p.add_argument("--locality", type=float, default=0.6,
                   help="share of routes to the sample's domain experts (synthetic routing)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data and routing")
    p.add_argument("--out", type=Path, default=None, help="folder for report.md and plots")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true",
                   help="short configuration (under 3 minutes): 4 steps, one launch per mode, "
                        "the cached calibration when there is one")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    training = args.workload == "training"
    if args.rate is None:
        args.rate = 40.0 if training else 200.0
    if args.seq_len is None:
        args.seq_len = 64 if training else 128
    for name in ("nodes", "gpus_per_node", "steps", "samples_per_device", "layers", "seq_len",
                 "bytes_per_route", "fit_steps", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_steps", "fit_starts", "replica_budget"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.ratio > 0 or not args.rate > 0:
        raise ValueError(f"--ratio and --rate must be > 0, got {args.ratio}, {args.rate}")
    if training and args.replica_budget:
        from netmoe.app.reference.train import TrainConfig
        from netmoe.solver import Topology
        from netmoe.solver.replicas import check_slots

        world = args.nodes * args.gpus_per_node
        topo = Topology(args.nodes, args.gpus_per_node, TrainConfig.experts_per_device * world)
        try:
            check_slots(args.replica_budget, topo, np.tile(topo.expert_device, (args.layers, 1)))
        except ValueError as err:
            raise ValueError(f"--replica-budget {args.replica_budget}: {err}") from None
    if args.objective == "both" and not training:
        raise ValueError("--objective both needs --workload training")


def summarize(result: dict, cal: Any, modes: dict[str, Any]) -> dict[str, Any]:
    """Per mode: median step time (sum of its calls per iteration), per-call medians, link bytes,
    predicted time. result: probe output; modes: mode -> StepTraffic."""
    from netmoe.app.cluster.calibrate import channel_bytes, durations

    g = int(result["gpus_per_node"])
    by_name = {c["name"]: c for c in result["calls"]}
    out: dict[str, Any] = {}
    for mode, step in modes.items():
        per_iter, calls, inter_total = None, [], 0
        for name, send in step.calls:
            call = by_name[f"{mode}:{name}"]
            secs = durations(np.asarray(call["starts"]), np.asarray(call["ends"]))
            per_iter = secs if per_iter is None else per_iter + secs
            intra_b, inter_b = channel_bytes(send, g)
            tx = np.median(np.asarray(call["tx"]), axis=1)  # per node, median over iterations
            inter_total += int(tx.sum())
            calls.append({"name": name, "measured_seconds": float(np.median(secs)),
                          "predicted_seconds": cal.predict(intra_b, inter_b),
                          "payload_intra_bytes": intra_b, "payload_inter_bytes": inter_b,
                          "link_tx_bytes": [int(x) for x in tx]})
        measured = float(np.median(per_iter))
        predicted = float(sum(c["predicted_seconds"] for c in calls))
        out[mode] = {"a2a_seconds_per_step": measured, "a2a_seconds_iterations":
                     per_iter.tolist(), "step_seconds": measured, "inter_node_bytes": inter_total,
                     "payload_inter_bytes": sum(c["payload_inter_bytes"] for c in calls),
                     "payload_intra_bytes": sum(c["payload_intra_bytes"] for c in calls),
                     "predicted_a2a_seconds": predicted,
                     "model_error": predicted / measured - 1.0, "loss": [], "calls": calls}
        if step.solve_seconds:
            # Synthetic steps solve offline; in training the solve overlaps the expert compute,
            # so this is an upper bound on the wait.
            out[mode]["plan_wait_seconds_per_step"] = float(sum(step.solve_seconds))
            out[mode]["moved_samples_per_step"] = step.moved
    return out


def run(args: argparse.Namespace) -> int:
    _check(args)
    from netmoe.app.cluster.testbed import TestbedError, require_root

    try:
        require_root()
    except TestbedError as err:
        print(f"netmoe bench cluster: {err}", file=sys.stderr)
        return 1
    if args.workload == "training":
        return _run_training(args)
    return _run_synthetic(args)


def _emit(args: argparse.Namespace, report: dict[str, Any]) -> int:
    """Writes the report folder (--out) and prints the result (--json or text)."""
    if args.out is not None:
        from netmoe.app.cluster.report import write_report

        write_report(args.out, report)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0


def _run_training(args: argparse.Namespace) -> int:
    from netmoe.app.cluster.testbed import TestbedError
    from netmoe.app.cluster.train import run_bench
    from netmoe.app.reference.train import TrainConfig

    # --quick: fewer steps, one repeat, fewer fit rounds and starts, and the cached calibration
    # (and cached expert fit, like every run) when there is one.
    steps = min(args.steps, 4) if args.quick else args.steps
    base = TrainConfig(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, steps=steps,
        samples_per_device=args.samples_per_device, seq_len=args.seq_len, layers=args.layers,
        seed=args.seed, cache_dir=args.cache_dir,
    )  # fmt: skip
    objectives = ("volume", "bottleneck") if args.objective == "both" else (args.objective,)
    try:
        report = run_bench(
            base, rate_mbit=args.rate, ratio=args.ratio, warmup_steps=args.warmup_steps,
            fit_steps=min(args.fit_steps, 4) if args.quick else args.fit_steps,
            objectives=objectives, starts=min(args.fit_starts, 1) if args.quick
            else args.fit_starts, sizes=TRAINING_QUICK_SIZES if args.quick
            else TRAINING_SIZES, calibration_iters=5 if args.quick else 6,
            repeats=1 if args.quick else args.repeats, reuse_calibration=args.quick,
            replica_slots=args.replica_budget, replica_weigh_sync=args.replica_fit == "sync",
        )  # fmt: skip
    except TestbedError as err:
        print(f"netmoe bench cluster: {err}", file=sys.stderr)
        return 1
    return _emit(args, report)


def _run_synthetic(args: argparse.Namespace) -> int:
    from netmoe.app.cluster.calibrate import calibrate, calibration_calls, calibration_dict
    from netmoe.app.cluster.probe import write_workload
    from netmoe.app.cluster.testbed import Testbed, TestbedConfig, TestbedError
    from netmoe.app.cluster.workload import MODES, step_traffic
    from netmoe.solver import Topology
    from netmoe.solver.synthetic import planted_counts

    steps = min(args.steps, 5) if args.quick else args.steps
    sizes = QUICK_SIZES if args.quick else CALIBRATION_SIZES
    g, world = args.gpus_per_node, args.nodes * args.gpus_per_node
    topo = Topology(nodes=args.nodes, gpus_per_node=g, experts=2 * world,
                    bytes_per_route=args.bytes_per_route)
    rng = np.random.default_rng(args.seed)
    counts = planted_counts(rng, args.samples_per_device * world, topo.experts,
                            layers=args.layers, tokens=args.seq_len, top_k=2,
                            domains=args.nodes * 2, locality=args.locality)
    modes = {m: step_traffic(topo, counts, m, args.objective) for m in MODES}
    calls = calibration_calls(args.nodes, g, sizes)
    calls += [(f"{m}:{name}", m, send) for m, st in modes.items() for name, send in st.calls]
    cfg = TestbedConfig(nodes=args.nodes, rate_mbit=args.rate,
                        intra_rate_mbit=args.rate * args.ratio)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="netmoe-cluster-") as tmp:
        work = Path(tmp)
        write_workload(work / "workload.json", calls, g)
        try:
            with Testbed(cfg) as tb:
                procs = tb.launch_ranks(g, [sys.executable, "-m", "netmoe.app.cluster.probe",
                                            "--workload", str(work / "workload.json"),
                                            "--iters", str(steps),
                                            "--out", str(work / "result.json")], work / "logs")
                tb.wait(procs, timeout=1800, log_dir=work / "logs")
        except TestbedError as err:
            print(f"netmoe bench cluster: {err}", file=sys.stderr)
            return 1
        result = json.loads((work / "result.json").read_text())
    cal = calibrate(result)
    summary = summarize(result, cal, modes)
    home, net = summary["home"], summary["netmoe"]
    report: dict[str, Any] = {
        **summary,
        "speedup_a2a": home["a2a_seconds_per_step"] / net["a2a_seconds_per_step"],
        "inter_bytes_reduction": 1.0 - net["inter_node_bytes"] / home["inter_node_bytes"],
        "modes": {m: {k: v for k, v in summary[m].items() if k != "calls"} for m in MODES},
        "workload": "synthetic",
        "objective": args.objective,
        "config": {"nodes": args.nodes, "gpus_per_node": g, "rate_mbit": args.rate,
                   "intra_rate_mbit": args.rate * args.ratio, "steps": steps,
                   "samples_per_device": args.samples_per_device, "layers": args.layers,
                   "tokens": args.seq_len, "bytes_per_route": args.bytes_per_route,
                   "locality": args.locality, "seed": args.seed},
        "calibration": calibration_dict(cal),
        "measured_ratio": cal.intra.bandwidth / cal.inter.bandwidth,
        "wall_seconds": time.monotonic() - started,
    }
    return _emit(args, report)


def _print(r: dict[str, Any]) -> None:
    c, cal = r["config"], r["calibration"]
    print(f"emulated cluster: {c['nodes']} nodes x {c['gpus_per_node']} ranks, inter "
          f"{c['rate_mbit']:.0f} Mbit/s per link and direction, intra {c['intra_rate_mbit']:.0f} "
          f"Mbit/s per node; workload {r['workload']}, {c['steps']} steps per mode")
    print(f"calibration: intra alpha {cal['intra']['alpha'] * 1e3:.2f} ms, "
          f"{cal['intra']['bandwidth'] / 1e6:.1f} MB/s; inter alpha "
          f"{cal['inter']['alpha'] * 1e3:.2f} ms, {cal['inter']['bandwidth'] / 1e6:.1f} MB/s "
          f"(measured ratio {r['measured_ratio']:.2f})")
    home = r["modes"]["home"]
    for mode, m in r["modes"].items():
        line = (f"{mode:>18}: a2a {m['a2a_seconds_per_step'] * 1e3:8.1f} ms/step (model "
                f"{m['predicted_a2a_seconds'] * 1e3:.1f}, error {m['model_error']:+.1%}), "
                f"inter-node link bytes {m['inter_node_bytes'] / 1e6:.2f} MB/step")
        if r["workload"] == "training":
            cut = 1 - m["inter_node_bytes"] / home["inter_node_bytes"]
            line += (f", step {m['step_seconds'] * 1e3:.0f} ms, speedup a2a "
                     f"{home['a2a_seconds_per_step'] / m['a2a_seconds_per_step']:.2f}x, "
                     f"inter bytes {-cut:+.1%}")
            if "plan_wait_fraction" in m:
                line += (f", plan wait {m['plan_wait_seconds_per_step'] * 1e3:.1f} ms/step "
                         f"({m['plan_wait_fraction']:.1%} of step)")
            if m["copy_sync_seconds_per_step"]:
                line += f", copies' sync {m['copy_sync_seconds_per_step'] * 1e3:.0f} ms/step"
        print(line)
    if r["workload"] == "training":
        print(f"best mode {r['best_mode']}; losses equal across modes within "
              f"{max(m['max_loss_rel_diff'] for m in r['modes'].values()):.1e} relative; "
              f"objective winner {r['objective_winner'] or r['objective']}; targets "
              f"{r['targets']}")
        if "replicas" in r:
            from netmoe.app.cluster.train import replica_verdict

            rep = r["replicas"]
            print(f"replicas: {rep['n_copies']} copies (at most {rep['slots']} per device and "
                  f"layer); {replica_verdict(rep)}")
        b = r["locality_bound"]
        print(f"locality bound (exact optimum on the held-out steps): inter-node routes "
              f"-{b['sample_inter_reduction']:.1%} sample, -{b['experts_inter_reduction']:.1%} "
              f"experts; {r['repeats']} interleaved launch(es) per mode; load average "
              f"{r['load_average']['start']:.1f} -> {r['load_average']['end']:.1f}")
    print(f"speedup {r['speedup_a2a']:.2f}x, inter-node bytes -{r['inter_bytes_reduction']:.1%}, "
          f"objective {r['objective']}, {r['wall_seconds']:.0f} s")
