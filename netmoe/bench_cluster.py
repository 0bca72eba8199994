"""`netmoe bench cluster`: real All-to-All time with and without placement on an emulated cluster.

Builds the testbed (netmoe.testbed: node namespaces, shaped veths, ``lo`` shaped to ``ratio``
times the inter-node rate), calibrates the alpha-beta model there (netmoe.calibrate), then runs
the All-to-Alls of K training steps per mode through real gloo ranks (netmoe.a2a_probe), modes
interleaved, and reports measured vs predicted time, link bytes from the veth counters, and the
speedups. The workload is the routing of a synthetic MoE with planted domain locality
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


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="measured All-to-All time on an emulated multi-node "
                                       "cluster (needs root)", description=__doc__)
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus-per-node", type=int, default=4)
    p.add_argument("--ratio", type=float, default=4.0,
                   help="intra-node : inter-node bandwidth (lo of each node is shaped to "
                        "ratio x rate)")
    p.add_argument("--rate", type=float, default=200.0,
                   help="inter-node link rate per node and direction, Mbit/s (default 200: "
                        "the link, not the 2 CPU cores, is the bottleneck)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per mode")
    p.add_argument("--objective", choices=("volume", "bottleneck"), default="volume")
    p.add_argument("--samples-per-device", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128, help="tokens per sample")
    p.add_argument("--bytes-per-route", type=int, default=1024,
                   help="bytes of one (token, top-k slot): hidden size x 4 (fp32)")
    p.add_argument("--locality", type=float, default=0.6,
                   help="share of routes to the sample's domain experts (synthetic routing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for report.md and plots")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quick", action="store_true", help="short configuration (under 3 minutes)")
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    for name in ("nodes", "gpus_per_node", "steps", "samples_per_device", "layers", "tokens",
                 "bytes_per_route"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not args.ratio > 0 or not args.rate > 0:
        raise ValueError(f"--ratio and --rate must be > 0, got {args.ratio}, {args.rate}")


def summarize(result: dict, cal: Any, modes: dict[str, Any]) -> dict[str, Any]:
    """Per mode: median step time (sum of its calls per iteration), per-call medians, link bytes,
    predicted time. result: a2a_probe output; modes: mode -> StepTraffic."""
    from netmoe.calibrate import channel_bytes, durations

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
    from netmoe.a2a_probe import write_workload
    from netmoe.calibrate import calibrate, calibration_calls, calibration_dict
    from netmoe.cluster_workload import MODES, step_traffic
    from netmoe.solver import Topology
    from netmoe.solver.synthetic import planted_counts
    from netmoe.testbed import Testbed, TestbedConfig, TestbedError, require_root

    _check(args)
    try:
        require_root()
    except TestbedError as err:
        print(f"netmoe bench cluster: {err}", file=sys.stderr)
        return 1
    steps = min(args.steps, 5) if args.quick else args.steps
    sizes = QUICK_SIZES if args.quick else CALIBRATION_SIZES
    g, world = args.gpus_per_node, args.nodes * args.gpus_per_node
    topo = Topology(nodes=args.nodes, gpus_per_node=g, experts=2 * world,
                    bytes_per_route=args.bytes_per_route)
    rng = np.random.default_rng(args.seed)
    counts = planted_counts(rng, args.samples_per_device * world, topo.experts,
                            layers=args.layers, tokens=args.tokens, top_k=2,
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
                procs = tb.launch_ranks(g, [sys.executable, "-m", "netmoe.a2a_probe",
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
                   "tokens": args.tokens, "bytes_per_route": args.bytes_per_route,
                   "locality": args.locality, "seed": args.seed},
        "calibration": calibration_dict(cal),
        "measured_ratio": cal.intra.bandwidth / cal.inter.bandwidth,
        "wall_seconds": time.monotonic() - started,
    }
    if args.out is not None:
        from netmoe.cluster_report import write_report

        write_report(args.out, report)
    if args.json:
        print(json.dumps(report))
    else:
        _print(report)
    return 0


def _print(r: dict[str, Any]) -> None:
    c, cal = r["config"], r["calibration"]
    print(f"emulated cluster: {c['nodes']} nodes x {c['gpus_per_node']} ranks, inter "
          f"{c['rate_mbit']:.0f} Mbit/s per link and direction, intra {c['intra_rate_mbit']:.0f} "
          f"Mbit/s per node")
    print(f"calibration: intra alpha {cal['intra']['alpha'] * 1e3:.2f} ms, "
          f"{cal['intra']['bandwidth'] / 1e6:.1f} MB/s; inter alpha "
          f"{cal['inter']['alpha'] * 1e3:.2f} ms, {cal['inter']['bandwidth'] / 1e6:.1f} MB/s "
          f"(measured ratio {r['measured_ratio']:.2f})")
    for mode in r["modes"]:
        m = r[mode]
        print(f"{mode:>7}: a2a {m['a2a_seconds_per_step'] * 1e3:8.1f} ms/step (model "
              f"{m['predicted_a2a_seconds'] * 1e3:.1f}, error {m['model_error']:+.1%}), inter-node "
              f"link bytes {m['inter_node_bytes'] / 1e6:.2f} MB/step")
    print(f"speedup {r['speedup_a2a']:.2f}x, inter-node bytes -{r['inter_bytes_reduction']:.1%}, "
          f"objective {r['objective']}, {r['wall_seconds']:.0f} s")
