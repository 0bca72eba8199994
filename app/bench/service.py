"""`netmoe bench service`: what the solver service adds on top of the pure solve.

J ranks (one gRPC channel and one long-lived stream each, all driven from one asyncio loop) report
their counts for many rounds in lockstep, like training workers do per MoE layer. With --ep-size
the ranks form expert-parallel groups of consecutive ranks, each its own placement problem of
--samples / groups samples; with --report-by node the ranks of a group on one node send one node
report on one stream (2N messages per round instead of 2J). The server runs in its own process
(as a sidecar would) or, with --embedded, in a thread of this process. With --services S, S
server processes each serve the groups assigned to them round-robin (group g to service g mod S,
``netmoe.client.services.round_robin``), the job registered with each, every stream talking to its
group's service only: a service per group (or set of groups), as next to each group's nodes.
Per round: round trip = last plan received (of any group) - last report sent; solve = the slowest
group's pure solve time as the server measured it; overhead = round trip - solve. The JSON also
gives per service its groups and CPU per round, and per group its round trip and solve.
--counts devices registers the job with device_counts: each report carries [n, J] routes per
device (the same rounds' counts summed by the default expert map) instead of [n, E] per expert.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from netmoe.app.bench.stats import spread, tail
from netmoe.app.cli import non_negative, positive
from netmoe.app.service import check_server
from netmoe.app.text import plural
from netmoe.client.services import round_robin
from netmoe.groups import EPGroups
from netmoe.round import RoundCounts


def _serve_child(conn: Connection, config: Any) -> None:
    """Runs the server in a child process until the parent says stop; answers "cpu" with the
    process's CPU seconds so far (user + system, all threads)."""
    from netmoe.server.app import start

    handle = start(config)
    conn.send(handle.port)
    while conn.recv() == "cpu":
        conn.send(time.process_time())
    handle.stop()


def make_rounds(
    distinct: int, nodes: int, gpus: int, experts: int, spd: int, seed: int
) -> list[list[RoundCounts]]:
    """distinct rounds of per-rank counts (ids, gather and scatter [spd, experts] int64 with
    node locality)."""
    rng = np.random.default_rng(seed)
    j = nodes * gpus
    samples, per_node = j * spd, experts // nodes
    out = []
    for _ in range(distinct):
        mats = []
        for _ in range(2):
            c = rng.poisson(1.0, size=(samples, experts))
            for i, n in enumerate(rng.integers(0, nodes, samples)):
                c[i, n * per_node:(n + 1) * per_node] += rng.poisson(6.0, per_node)
            mats.append(c)
        ids = rng.permutation(samples)
        rows = [slice(r * spd, (r + 1) * spd) for r in range(j)]
        out.append([RoundCounts(ids[k], mats[0][k], mats[1][k]) for k in rows])
    return out


def device_rounds(rounds: list[list[RoundCounts]], nodes: int, gpus: int, experts: int
                  ) -> list[list[RoundCounts]]:
    """The same rounds with gather and scatter summed by device under the default expert map
    ([spd, J] int64 each): what ranks of a device_counts job report."""
    from netmoe.solver import Topology
    from netmoe.solver.cost import device_counts

    topo = Topology(nodes, gpus, experts)
    return [[RoundCounts(c.sample_ids, device_counts(topo, c.gather),
                         None if c.scatter is None else device_counts(topo, c.scatter))
             for c in parts] for parts in rounds]


def _spec(args: argparse.Namespace) -> Any:
    from netmoe.protos.convert import job_spec

    spd = args.samples // (args.nodes * args.gpus_per_node)
    return job_spec(args.nodes, args.gpus_per_node, args.experts, spd, hidden_size=4096,
                    deadline_ms=args.deadline_ms, ep_size=args.ep_size,
                    device_counts=args.counts == "devices")


def _streams(args: argparse.Namespace) -> list[tuple[int, ...]]:
    """The ranks each stream reports for: one each, or (--report-by node) the ranks of a group
    on one node, its first rank the reporting one."""
    groups = _groups(args)
    if args.report_by == "rank":
        return [(r,) for r in range(groups.world)]
    gpn = groups.gpus_per_node
    return [tuple(r for r in ranks if r // gpn == node)
            for ranks in groups.ranks for node in sorted({r // gpn for r in ranks})]


def _groups(args: argparse.Namespace) -> EPGroups:
    """The job's EP groups; ValueError naming --ep-size when they do not fit the machine."""
    try:
        return EPGroups.contiguous(args.nodes * args.gpus_per_node, args.gpus_per_node,
                                   args.ep_size)
    except ValueError as err:
        raise ValueError(f"--ep-size {args.ep_size}: {err}") from None


async def _drive(
    services: dict[int, str], args: argparse.Namespace, streams: list[tuple[int, ...]],
    barrier: Any = None,
) -> dict[str, Any]:
    """Runs `streams` (one channel and stream each, reporting for its ranks to their group's
    service, services: {group: address}) in lockstep on one event loop.

    Returns per round and stream the send time of the report, the receive time of the plan
    (time.perf_counter, CLOCK_MONOTONIC: comparable across processes of one machine) and the
    report's wire bytes, and per round and group whose first rank is among them, the server's
    pure solve seconds (NaN for the other groups) and the outcomes of the timed rounds."""
    import asyncio

    import grpc.aio

    from netmoe.protos import placement_pb2 as pb
    from netmoe.protos import placement_pb2_grpc
    from netmoe.protos.convert import report_to_proto

    groups = _groups(args)
    spd = args.samples // groups.world
    # Each group's own counts, with locality to the nodes of that group.
    data = [make_rounds(args.distinct, groups.nodes, groups.gpus, args.experts, spd,
                        args.seed + g) for g in range(groups.count)]
    if args.counts == "devices":
        data = [device_rounds(d, groups.nodes, groups.gpus, args.experts) for d in data]
    total = args.warmup + args.rounds
    sent = np.zeros((total, len(streams)))
    size = np.zeros((total, len(streams)), dtype=np.int64)
    got = np.zeros((total, len(streams)))
    solve_s = np.full((total, groups.count), np.nan)
    reasons: dict[str, int] = {}
    channels = [grpc.aio.insecure_channel(services[groups.locate(m[0])[0]]) for m in streams]
    try:
        stubs = [placement_pb2_grpc.PlacementServiceStub(c) for c in channels]
        # The job's whole spec on each service its streams use (registering is idempotent).
        stub_of = {services[groups.locate(m[0])[0]]: k for k, m in enumerate(streams)}
        for k in stub_of.values():
            await stubs[k].RegisterJob(pb.RegisterJobRequest(job="bench", spec=_spec(args)))
        calls = [s.Stream() for s in stubs]
        if barrier is not None:
            # Client processes start at different times; round 0's deadline must not catch one.
            barrier.wait()

        async def rank(slot: int, members: tuple[int, ...]) -> None:
            stream = calls[slot]
            g, d = groups.locate(members[0])
            devices = [groups.locate(r)[1] for r in members]
            for k in range(total):
                # Built per round from arrays, as a training rank (or a node's first) does.
                parts = [data[g][k % args.distinct][e] for e in devices]
                counts = parts[0] if len(parts) == 1 else RoundCounts(
                    *(np.concatenate([getattr(p, f) for p in parts])
                      for f in ("sample_ids", "gather", "scatter")))
                report = report_to_proto("bench", k // args.layers, k % args.layers, members[0],
                                         counts, members if len(members) > 1 else ())
                size[k, slot] = report.ByteSize()
                sent[k, slot] = time.perf_counter()
                await stream.write(report)
                plan = await stream.read()
                got[k, slot] = time.perf_counter()
                if d == 0:
                    solve_s[k, g] = plan.solve_seconds
                    if k >= args.warmup:  # outcomes of the timed rounds only
                        key = plan.reason or "solved"
                        reasons[key] = reasons.get(key, 0) + 1
            await stream.done_writing()

        await asyncio.gather(*(rank(slot, m) for slot, m in enumerate(streams)))
    finally:
        for c in channels:
            await c.close()
    return {"sent": sent, "got": got, "size": size, "solve_s": solve_s, "reasons": reasons}


def _client_child(conn: Connection, services: dict[int, str], args: argparse.Namespace,
                  streams: list[tuple[int, ...]], barrier: Any) -> None:
    import asyncio

    conn.send(asyncio.run(_drive(services, args, streams, barrier)))


def _measure(services: dict[int, str], args: argparse.Namespace) -> dict[str, Any]:
    """Drives all streams from --client-procs processes and summarizes the timed rounds.
    services: {group: address}."""
    import asyncio

    j = args.nodes * args.gpus_per_node
    streams = _streams(args)
    groups = [streams[p::args.client_procs] for p in range(args.client_procs)]
    start = time.perf_counter()
    if args.client_procs == 1:
        parts = [asyncio.run(_drive(services, args, groups[0]))]
    else:
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(args.client_procs)
        pipes, procs = [], []
        for part in groups:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_child,
                               args=(child, services, args, part, barrier))
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        parts = [p.recv() for p in pipes]
        for proc in procs:
            proc.join(30)
    wall = time.perf_counter() - start
    sent = np.concatenate([p["sent"] for p in parts], axis=1)
    got = np.concatenate([p["got"] for p in parts], axis=1)
    size = np.concatenate([p["size"] for p in parts], axis=1)
    keep = slice(args.warmup, None)
    rtt = (got.max(axis=1) - sent.max(axis=1))[keep] * 1e3
    # Every group's first rank is in exactly one part: the others hold NaN there.
    solve_g = np.nanmax(np.stack([p["solve_s"] for p in parts]), axis=0)[keep] * 1e3
    solve_ms = solve_g.max(axis=1)
    # The streams' groups, in the column order of sent and got.
    ep = _groups(args)
    of = np.array([ep.locate(m[0])[0] for part in groups for m in part])
    per_group = []
    for g, address in sorted(services.items()):
        cols = of == g
        g_rtt = (got[:, cols].max(axis=1) - sent[:, cols].max(axis=1))[keep] * 1e3
        per_group.append({"group": g, "service": address,
                          "rtt_ms_median": float(np.median(g_rtt)),
                          "solve_ms_median": float(np.median(solve_g[:, g]))})
    outcomes: dict[str, int] = {}
    for p in parts:
        for key, count in p["reasons"].items():
            outcomes[key] = outcomes.get(key, 0) + count
    overhead = rtt - solve_ms
    total = args.warmup + args.rounds
    stats = {name: spread(values) for name, values in
             (("rtt", rtt), ("solve", solve_ms), ("overhead", overhead))}
    return {
        "ranks": j, "samples": args.samples, "experts": args.experts, "rounds": args.rounds,
        "server": args.server or ("embedded" if args.embedded else "process"),
        "client_procs": args.client_procs, "ep_size": _groups(args).size,
        "report_by": args.report_by, "streams": len(streams),
        "counts": args.counts,
        # Wire bytes of one report (ids, gather, scatter, coordinates), mean over the timed ones.
        "report_bytes": float(size[keep].mean()),
        # Set when the servers run in their own processes (the only ones it can measure).
        "server_cpu_ms_per_round": None,
        "server_cpu_ms_per_group_round": None,
        **{f"{name}_ms_{k}": v for name, st in stats.items() for k, v in st.items() if k != "n"},
        # Includes starting the client processes: a lower bound on steady throughput.
        "rounds_per_s": total / wall,
        # One per group and timed round.
        "outcomes": outcomes,
        "groups": per_group,
        # Filled by _measure_processes: per service its address, groups and CPU per round.
        "services": [],
    }


def _measure_processes(args: argparse.Namespace, config: Any, groups: int) -> dict[str, Any]:
    """``_measure`` against --services server processes (groups round-robin), each measured for
    its CPU seconds (user + system) over the run."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    try:
        for _ in range(args.services):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve_child, args=(child, config), daemon=True)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        addresses = []
        for parent in pipes:
            # Generous: on a loaded machine importing the server (grpc, OR-Tools) takes a while.
            if not parent.poll(300):
                raise RuntimeError("a server process did not start within 300 s")
            addresses.append(f"127.0.0.1:{parent.recv()}")
        cpu = []
        for parent in pipes:
            parent.send("cpu")
            cpu.append(parent.recv())
        services = round_robin(addresses, groups)
        result = _measure(services, args)
        total = args.warmup + args.rounds
        for k, parent in enumerate(pipes):
            parent.send("cpu")
            # Registration and warm-up included: CPU per round over every round driven.
            result["services"].append({
                "address": addresses[k],
                "groups": [g for g, a in services.items() if a == addresses[k]],
                "server_cpu_ms_per_round": (parent.recv() - cpu[k]) * 1e3 / total})
    finally:
        for parent in pipes:
            parent.send("stop")
        for proc in procs:
            proc.join(30)
    cpu_ms = sum(s["server_cpu_ms_per_round"] for s in result["services"])
    result["server_cpu_ms_per_round"] = cpu_ms
    result["server_cpu_ms_per_group_round"] = cpu_ms / groups
    return result


def run(args: argparse.Namespace) -> int:
    from netmoe.server.config import ServerConfig

    j = args.nodes * args.gpus_per_node
    streams = len(_streams(args))
    if args.client_procs > streams:
        raise ValueError(f"--client-procs {args.client_procs}: more processes than the {streams} "
                         f"streams (--nodes x --gpus-per-node, or nodes with --report-by node)")
    if args.samples % j:
        raise ValueError(f"--samples {args.samples} must be a multiple of --nodes x "
                         f"--gpus-per-node = {j}")
    groups = _groups(args)
    if args.experts % groups.size:
        raise ValueError(f"--experts {args.experts} must be a multiple of the EP size "
                         f"{groups.size}")
    if args.services > 1 and (args.server or args.embedded):
        used = f"--server {args.server}" if args.server else "--embedded"
        raise ValueError(f"--services {args.services} starts its own service processes; it "
                         f"excludes {used}")
    if args.services > groups.count:
        raise ValueError(f"--services {args.services}: more services than the {groups.count} "
                         f"EP groups (--ep-size {args.ep_size} of {j} ranks)")
    config = ServerConfig(port=0, metrics_port=None, drain_seconds=0.0, grace_seconds=1.0)
    if args.server:
        check_server(args.server)
        result = _measure(dict.fromkeys(range(groups.count), args.server), args)
    elif args.embedded:
        from netmoe.server.app import start

        handle = start(config)
        try:
            result = _measure(dict.fromkeys(range(groups.count), handle.address), args)
        finally:
            handle.stop()
    else:
        result = _measure_processes(args, config, groups.count)
    if args.json:
        print(json.dumps(result))
        return 0
    r = result
    groups = r["ranks"] // r["ep_size"]
    print(f"solver service, {r['ranks']} ranks in lockstep from "
          f"{plural(r['client_procs'], 'client process', 'client processes')}, I={r['samples']}, "
          f"E={r['experts']}, {plural(groups, 'EP group')} of {r['ep_size']}, "
          f"{plural(r['streams'], 'stream')} ({r['report_by']} reports), "
          f"{plural(r['rounds'], 'round')}, server: {r['server']}")
    shape = "[n, J] routes per device" if r["counts"] == "devices" else "[n, E] per expert"
    print(f"  reports: {shape}, {r['report_bytes']:.0f} bytes each")
    for name, text in (("rtt", "round trip (last report -> last plan)"),
                       ("solve", "pure solve (server-measured)"),
                       ("overhead", "service overhead (round trip - solve)")):
        st = {k: r[f"{name}_ms_{k}"] for k in ("median", "p99", "max")} | {"n": r["rounds"]}
        print(f"  {text + ':':<39} median {st['median']:.2f} ms, {tail(st, 2)} ms")
    if r["server_cpu_ms_per_round"] is not None:
        print(f"  server CPU per round (warm-up included): {r['server_cpu_ms_per_round']:.2f} ms"
              f" in {plural(len(r['services']), 'service process', 'service processes')}, "
              f"{r['server_cpu_ms_per_group_round']:.2f} ms per group")
    if len(r["services"]) > 1:
        for k, svc in enumerate(r["services"]):
            rtts = [g["rtt_ms_median"] for g in r["groups"] if g["service"] == svc["address"]]
            print(f"  service {k} ({svc['address']}): groups {svc['groups']}, CPU "
                  f"{svc['server_cpu_ms_per_round']:.2f} ms per round, its groups' round trip "
                  f"median {min(rtts):.2f} to {max(rtts):.2f} ms")
    print(f"  throughput: {r['rounds_per_s']:.1f} rounds/s; outcomes {r['outcomes']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("service", help="round trip and overhead of the gRPC solver service")
    p.add_argument("--nodes", type=positive, default=4, help="nodes of the emulated job")
    p.add_argument("--gpus-per-node", type=positive, default=8, help="GPUs (ranks) per node")
    p.add_argument("--samples", type=positive, default=128,
                   help="I, the job's samples per round (split evenly over its EP groups)")
    p.add_argument("--ep-size", type=non_negative, default=0,
                   help="ranks per expert-parallel group, consecutive ranks (0: all one group)")
    p.add_argument("--experts", type=positive, default=64, help="E, experts per layer")
    p.add_argument("--layers", type=positive, default=4,
                   help="MoE layers per step (rounds per step)")
    p.add_argument("--rounds", type=positive, default=200, help="timed rounds")
    p.add_argument("--warmup", type=non_negative, default=20,
                   help="rounds before the timed ones (not counted in any figure)")
    p.add_argument("--distinct", type=positive, default=16, help="distinct count sets, cycled")
    p.add_argument("--deadline-ms", type=positive, default=1000,
                   help="the job's plan deadline per round")
    p.add_argument("--report-by", choices=("rank", "node"), default="rank",
                   help="one stream per rank, or per node and group (node reports)")
    p.add_argument("--embedded", action="store_true", help="server in a thread of this process")
    p.add_argument("--server", default="", metavar="HOST:PORT",
                   help="measure a running service (default: start one in a child process)")
    p.add_argument("--services", type=positive, default=1,
                   help="service processes to start, EP groups assigned round-robin (a service "
                        "per group or set of groups; at most the groups)")
    p.add_argument("--client-procs", type=positive, default=1,
                   help="processes the ranks are spread over (training ranks are processes)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic counts")
    p.add_argument("--counts", choices=("experts", "devices"), default="experts",
                   help="what a report carries: [n, E] routes per expert, or [n, J] per device "
                        "(a job registered with device_counts)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)
