"""The service under overload: memory bounded in bytes (stream backlog, streams, idle streams,
pending report bytes) against real servers on loopback. Figures are printed (``pytest -s``)."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.protos.convert import counts_to_pb
from netmoe.server.app import start
from netmoe.server.config import ServerConfig
from netmoe.solver import solve

from support import (
    MARGIN_S,
    ServerProcess,
    Worker,
    job_spec,
    round_reports,
    scrape,
    short_and_long,
    wait_for,
)


@short_and_long("reports", 1500, 6000)
def test_client_that_never_reads_is_cut_with_a_reason(reports: int) -> None:
    backlog = 1 << 20
    server = ServerProcess(0, "--stream-backlog-bytes", str(backlog))
    channel = grpc.insecure_channel(server.address)
    try:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)
        spd = 2000  # one-device job: every report is a round solved at once, a ~10 kB plan
        stub.RegisterJob(pb.RegisterJobRequest(job="deaf", spec=job_spec(
            nodes=1, gpus=1, experts=1, spd=spd)), timeout=10)
        deaf = Worker(stub)
        rss0 = server.rss_kib()
        ids, gather = list(range(spd)), counts_to_pb(np.ones((spd, 1), dtype=np.uint8))
        for step in range(reports):
            deaf.send(pb.Report(job="deaf", step=step, layer=0, rank=0, sample_ids=ids,
                                gather=gather))
        # Let the server take in what the client sent, however busy the machine: until it cuts
        # the stream (its log says so; then it reads no more of it).
        wait_for(lambda: "disconnected: the client did not read its plans" in "".join(server.log),
                 timeout=300, what="the server to cut the stream")
        grown = (server.rss_kib() - rss0) / 1024
        got = 0
        with pytest.raises(grpc.RpcError) as err:
            while True:
                deaf.recv()
                got += 1
        deaf.hang_up()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"more than stream_backlog_bytes={backlog} bytes queued" in err.value.details()
        assert got < reports
        # Unbounded, the server held every plan it could not write (~10 kB each).
        assert grown < 64, grown
        # The job's rank is free again and the server still serves it.
        plan = Worker(stub).ask(pb.Report(job="deaf", step=reports, layer=0, rank=0,
                                          sample_ids=ids, gather=gather))
        assert plan.status == pb.PLAN_STATUS_OPTIMAL
        print(f"\nclient not reading, {reports} reports: cut after {got} plans read, server RSS "
              f"+{grown:.1f} MiB (backlog bound {backlog >> 20} MiB)")
    finally:
        channel.close()
        server.stop()


def test_stream_cap_and_idle_streams_closed() -> None:
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0,
                                max_streams=3, stream_idle_seconds=0.5))
    channel = grpc.insecure_channel(handle.address)
    try:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)
        silent = [Worker(stub) for _ in range(3)]
        servicer_streams = handle.server.metrics.active_streams
        wait_for(lambda: servicer_streams._value.get() == 3, timeout=10)
        extra = Worker(stub)
        with pytest.raises(grpc.RpcError) as err:
            extra.recv()
        extra.hang_up()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams=3" in err.value.details()
        t0 = time.monotonic()
        for w in silent:
            with pytest.raises(grpc.RpcError) as idle:
                w.recv()
            w.hang_up()
            assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "stream_idle_seconds=0.5" in idle.value.details()
        assert time.monotonic() - t0 < 0.5 + MARGIN_S
        wait_for(lambda: servicer_streams._value.get() == 0, timeout=10)
    finally:
        channel.close()
        handle.stop()


def test_pending_report_bytes_bounded_per_job_and_in_total() -> None:
    spec = job_spec(nodes=2, gpus=2, experts=16, spd=4, deadline_ms=5000)
    per_report = 4 * 8 + 2 * 4 * 16  # ids uint64 + gather, scatter compacted to uint8
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0,
                                max_job_pending_bytes=2 * per_report,
                                max_pending_bytes=3 * per_report))
    channel = grpc.insecure_channel(handle.address)
    try:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)
        for job in ("a", "b"):
            stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=spec), timeout=10)
        coord = handle.server.coordinator
        assert coord is not None
        ra = round_reports("a", spec, 0, 0, seed=1)
        wa = [Worker(stub) for _ in range(3)]
        wa[0].send(ra[0])
        wa[1].send(ra[1])
        wait_for(lambda: coord.pending_bytes == 2 * per_report)
        plan = wa[2].ask(ra[2])
        assert plan.status == pb.PLAN_STATUS_INVALID
        assert f"exceed max_job_pending_bytes={2 * per_report}" in plan.error
        rb = round_reports("b", spec, 0, 0, seed=2)
        wb = [Worker(stub) for _ in range(2)]
        wb[0].send(rb[0])
        wait_for(lambda: coord.pending_bytes == 3 * per_report)
        plan = wb[1].ask(rb[1])
        assert plan.status == pb.PLAN_STATUS_INVALID
        assert f"exceed max_pending_bytes={3 * per_report}" in plan.error
        with pytest.raises(grpc.RpcError) as err:
            stub.Solve(pb.SolveRequest(reports=round_reports("b", spec, 1, 0, seed=3)),
                       timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_job_pending_bytes" in err.value.details()
        stub.UnregisterJob(pb.UnregisterJobRequest(job="a"), timeout=10)
        assert coord.pending_bytes == per_report  # b's one report
        for w in (*wa[:2], wb[0]):
            assert w.recv().reason in ("unregistered", "incomplete")
        for w in (*wa, *wb):
            w.close()
    finally:
        channel.close()
        handle.stop()


@short_and_long("ranks", 8, 64)
def test_rss_per_pending_report_near_its_wire_bytes(ranks: int) -> None:
    """All ranks but one report rounds that stay open. After a first round (which warms each
    connection's buffers), the server's RSS grows per report by about its wire bytes."""
    spd, experts, rounds = 1024, 1024, 3  # 2 MB reports at the default max_report_cells
    spec = job_spec(nodes=ranks // 4, gpus=4, experts=experts, spd=spd, deadline_ms=60000)
    server = ServerProcess()
    channels = [grpc.insecure_channel(server.address) for _ in range(ranks - 1)]
    try:
        stubs = [placement_pb2_grpc.PlacementServiceStub(c) for c in channels]
        stubs[0].RegisterJob(pb.RegisterJobRequest(job="big", spec=spec), timeout=10)
        rng = np.random.default_rng(0)
        workers = [Worker(s) for s in stubs]
        rss, wire = [], []
        for step in range(rounds):
            ids = rng.permutation(ranks * spd)
            reports = [pb.Report(job="big", step=step, layer=0, rank=r,
                                 sample_ids=ids[r * spd:(r + 1) * spd].tolist(),
                                 gather=counts_to_pb(rng.poisson(0.5, (spd, experts))),
                                 scatter=counts_to_pb(rng.poisson(0.5, (spd, experts))))
                       for r in range(ranks - 1)]
            wire.append(sum(r.ByteSize() for r in reports))
            for w, r in zip(workers, reports, strict=True):
                w.send(r)
            held = (ranks - 1) * (step + 1) * (spd * 8 + 2 * spd * experts)  # counts in uint8
            wait_for(lambda n=held: pending_bytes(server) == n, timeout=120)
            rss.append(settled_rss(server))
        ratio = (rss[-1] - rss[0]) / sum(wire[1:])
        print(f"\n{ranks - 1} ranks x {rounds - 1} pending reports of "
              f"{wire[-1] / (ranks - 1) / 2**20:.2f} MiB wire each: server RSS "
              f"+{(rss[-1] - rss[0]) / 2**20:.1f} MiB after the first round = {ratio:.2f} x the "
              f"wire bytes")
        assert ratio < 2.5, ratio
        for w in workers:
            w.hang_up()
    finally:
        for c in channels:
            c.close()
        server.stop()


def settled_rss(server: ServerProcess) -> int:
    """The server's RSS in bytes once it stops changing (a busy machine frees the parsed
    messages late), read every 0.25 s until four reads agree within 1 MiB."""
    reads = [server.rss_kib() * 1024]
    deadline = time.monotonic() + 60
    while len(reads) < 4 or max(reads[-4:]) - min(reads[-4:]) > 2**20:
        assert time.monotonic() < deadline, reads[-8:]
        time.sleep(0.25)
        reads.append(server.rss_kib() * 1024)
    return reads[-1]


def pending_bytes(server: ServerProcess) -> int:
    return int(server.samples("netmoe_pending_report_bytes")[()])


@short_and_long("rounds", 12, 60)
def test_slow_solves_of_other_jobs_never_delay_a_job(rounds: int) -> None:
    """As many slow jobs as solver threads (4), each with three 2 s solves queued: they share
    three threads, one solve per job at a time, and job "fast" (200 ms deadline) keeps getting
    its rounds solved at once on the fourth; every time limit leaves a margin before the
    deadline."""
    limits: dict[int, list[float]] = {12: [], 16: []}
    running: list[int] = [0, 0]  # solves of slow jobs running now, most at once
    lock = threading.Lock()

    def solve_fn(topology, gather, scatter, **kw):
        limits[topology.experts].append(kw["time_limit"])
        if topology.experts == 12:
            with lock:
                running[0] += 1
                running[1] = max(running)
            time.sleep(2.0)
            with lock:
                running[0] -= 1
        return solve(topology, gather, scatter, **kw)

    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0),
                   solve_fn=solve_fn)
    channel = grpc.insecure_channel(handle.address)
    try:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)
        slow = job_spec(nodes=2, gpus=2, experts=12, spd=2, deadline_ms=10000)
        fast = job_spec(nodes=2, gpus=2, experts=16, spd=2, deadline_ms=200)
        slow_jobs = [f"slow{k}" for k in range(4)]
        for job in slow_jobs:
            stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=slow), timeout=10)
        stub.RegisterJob(pb.RegisterJobRequest(job="fast", spec=fast), timeout=10)
        slow_workers = {job: [Worker(stub) for _ in range(4)] for job in slow_jobs}
        for job, ws in slow_workers.items():
            for step in range(3):
                for w, r in zip(ws, round_reports(job, slow, step, 0, seed=step), strict=True):
                    w.send(r)
        wait_for(lambda: len(limits[12]) == 3)  # three slow solves hold three threads
        workers = [Worker(stub) for _ in range(4)]
        took = []
        for step in range(rounds):
            reports = round_reports("fast", fast, step, 0, seed=100 + step)
            t0 = time.monotonic()
            for w, r in zip(workers, reports, strict=True):
                w.send(r)
            plans = [w.recv() for w in workers]
            took.append(time.monotonic() - t0)
            assert {p.status for p in plans} == {pb.PLAN_STATUS_OPTIMAL}, plans[0].reason
        slow_plans = [[w.recv() for w in ws] for ws in slow_workers.values() for _ in range(3)]
        assert all(p.status == pb.PLAN_STATUS_OPTIMAL for ps in slow_plans for p in ps)
        assert running[1] == 3  # the slow jobs never held the thread kept for short rounds
        assert len(limits[12]) == 12
        assert all(0 < t <= 0.2 - 0.04 for t in limits[16])  # 200 ms deadline, 40 ms margin
        assert all(0 < t <= 10.0 - 2.0 for t in limits[12])
        print(f"\ncross-job latency while 4 other jobs' 2 s solves run on 3 of 4 threads: "
              f"median {np.median(took) * 1000:.1f} ms, max {max(took) * 1000:.1f} ms over "
              f"{rounds} rounds (report to last plan, in-process server)")
        for w in (*(w for ws in slow_workers.values() for w in ws), *workers):
            assert w.close() == []
    finally:
        channel.close()
        handle.stop()


@short_and_long("ids", 200, 1000)
def test_metrics_bounded_when_jobs_go_with_solves_in_flight(ids: int) -> None:
    """Each job id: a unary Solve in flight (a 20 ms solve), then UnregisterJob. No series of a
    gone job stays on /metrics, whatever was in flight."""
    from concurrent.futures import ThreadPoolExecutor

    def solve_fn(*args, **kw):
        time.sleep(0.02)
        return solve(*args, **kw)

    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=0, grace_seconds=1.0),
                   solve_fn=solve_fn)
    channel = grpc.insecure_channel(handle.address)
    spec = job_spec(nodes=2, gpus=1, experts=4, spd=2, deadline_ms=5000)
    try:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)

        def one(k: int) -> str:
            job = f"job-{k}"
            stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=spec), timeout=30)
            call = stub.Solve.future(pb.SolveRequest(reports=round_reports(job, spec, 0, 0, k)),
                                     timeout=30)
            time.sleep(0.01 * (k % 3))  # before, during or after the solve
            stub.UnregisterJob(pb.UnregisterJobRequest(job=job), timeout=30)
            try:
                return call.result().plans[0].reason or "solved"
            except grpc.RpcError as err:  # the job was gone before the call reached it
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
                return "not registered"

        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(one, range(ids)))
        samples = scrape(handle.metrics_port)
        left = {labels for (name, labels) in samples if any(k == "job" for k, _ in labels)}
        assert not left, sorted(left)[:5]
        with urllib.request.urlopen(f"http://127.0.0.1:{handle.metrics_port}/metrics",
                                    timeout=10) as resp:
            size = len(resp.read())
        assert size < 32_000, size
        counts = {o: outcomes.count(o) for o in set(outcomes)}
        print(f"\n{ids} job ids, Solve in flight at unregister: outcomes {counts}; /metrics "
              f"{size / 1000:.1f} kB after, no per-job series left")
    finally:
        channel.close()
        handle.stop()


def test_time_limited_joint_solve_returns_feasible_before_the_deadline() -> None:
    """A CP-SAT (joint, bottleneck) round that may not be proven optimal in its 3 s deadline: the
    solver stops at the margin and the ranks get its plan (FEASIBLE), not a "timeout" fallback."""
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0))
    channel = grpc.insecure_channel(handle.address)
    try:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)
        spec = job_spec(nodes=2, gpus=4, experts=64, spd=64, deadline_ms=3000, method="joint",
                        objective="bottleneck")
        stub.RegisterJob(pb.RegisterJobRequest(job="cp", spec=spec), timeout=10)
        workers = [Worker(stub) for _ in range(8)]
        t0 = time.monotonic()
        for w, r in zip(workers, round_reports("cp", spec, 0, 0, seed=1), strict=True):
            w.send(r)
        plans = [w.recv() for w in workers]
        took = time.monotonic() - t0
        assert {p.status for p in plans} <= {pb.PLAN_STATUS_FEASIBLE, pb.PLAN_STATUS_OPTIMAL}, (
            plans[0].reason, plans[0].error)
        assert took < 3.0 + MARGIN_S
        print(f"\njoint bottleneck round, 3 s deadline: {pb.PlanStatus.Name(plans[0].status)} "
              f"after {took:.2f} s (solve {plans[0].solve_seconds:.2f} s)")
        for w in workers:
            assert w.close() == []
    finally:
        channel.close()
        handle.stop()


def test_client_gone_mid_write_logs_no_traceback() -> None:
    server = ServerProcess()
    try:
        spd = 2000
        with grpc.insecure_channel(server.address) as channel:
            stub = placement_pb2_grpc.PlacementServiceStub(channel)
            stub.RegisterJob(pb.RegisterJobRequest(job="gone", spec=job_spec(
                nodes=1, gpus=1, experts=1, spd=spd)), timeout=10)
            worker = Worker(stub)
            ids, gather = list(range(spd)), counts_to_pb(np.ones((spd, 1), dtype=np.uint8))
            for step in range(300):
                worker.send(pb.Report(job="gone", step=step, layer=0, rank=0, sample_ids=ids,
                                      gather=gather))
            worker.recv()
            # Every round answered (solved, or evicted as incomplete when the reports come
            # faster than the solves): the server is writing plans the client never reads.
            wait_for(lambda: sum(v for labels, v in server.samples("netmoe_rounds_total").items()
                                 if ("job", "gone") in labels) == 300, timeout=120)
        wait_for(lambda: server.samples("netmoe_active_streams") == {(): 0.0}, timeout=30)
    finally:
        assert server.stop() == 0
    log = "".join(server.log)
    assert "Traceback" not in log and "ExecuteBatchError" not in log, log
