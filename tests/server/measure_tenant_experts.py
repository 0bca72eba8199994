"""Figures of issue 28 rows 3, 4, 9 and 10 (docs/service.md's reliability table) against a real
`netmoe serve` process: per hostile request, the status and seconds until it answered, the
server's RSS before and after, and a bystander job's rounds meanwhile (report to last plan,
statuses). Not a test: run it by hand, on an idle machine if possible.

    ./run python tests/server/measure_tenant_experts.py            # this tree's server
    PYTHONPATH=/path/to/a/package/tree ./run python tests/server/measure_tenant_experts.py
                                                                   # another tree's server
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.protos.convert import report_to_proto
from netmoe.round import RoundCounts

from support import (
    ServerProcess,
    Worker,
    counts,
    job_spec,
    round_reports,
    shuffled_reports,
)

NODES, GPUS, EXPERTS, SPD = 2, 2, 8, 2


class Bystander:
    """A 4-rank job playing rounds on its streams in a thread: latencies and statuses."""

    def __init__(self, stub: placement_pb2_grpc.PlacementServiceStub) -> None:
        self.stub = stub
        self.spec = job_spec(nodes=2, gpus=2, experts=8, spd=4, deadline_ms=2000)
        stub.RegisterJob(pb.RegisterJobRequest(job="bystander", spec=self.spec), timeout=30)
        self.workers = [Worker(stub) for _ in range(4)]
        self.step = 0
        self.took: list[float] = []
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def round(self) -> None:
        reports = round_reports("bystander", self.spec, self.step, 0, seed=self.step)
        self.step += 1
        t0 = time.monotonic()
        for w, r in zip(self.workers, reports, strict=True):
            w.send(r)
        plans = [w.recv() for w in self.workers]
        self.took.append(time.monotonic() - t0)
        self.statuses += [p.status for p in plans]

    def start(self) -> None:
        self.took, self.statuses = [], []
        self._stop.clear()

        def loop() -> None:
            while not self._stop.is_set():
                self.round()

        self._thread = threading.Thread(target=loop)
        self._thread.start()

    def stop(self) -> str:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        ms = sorted(1000 * t for t in self.took)
        optimal = sum(s == pb.PLAN_STATUS_OPTIMAL for s in self.statuses)
        return (f"bystander {len(ms)} rounds, {optimal}/{len(self.statuses)} plans optimal, "
                f"median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms")


def feed(stub: placement_pb2_grpc.PlacementServiceStub, job: str, steps: range, layers: int,
         nodes: int = NODES, gpus: int = GPUS, experts: int = EXPERTS, spd: int = SPD) -> None:
    j, n = nodes * gpus, spd
    rows = [slice(r * n, (r + 1) * n) for r in range(j)]
    for step in steps:
        rng = np.random.default_rng(step)
        routes = np.stack([counts(rng, j * n, nodes, experts) for _ in range(layers)])
        for layer, (ids, g, s) in enumerate(shuffled_reports(routes, step)):
            reports = [report_to_proto(job, step, layer, r, RoundCounts(
                ids[rows[r]], g[rows[r]], None if s is None else s[rows[r]])) for r in range(j)]
            stub.Solve(pb.SolveRequest(reports=reports), timeout=60)


def timed(call: Callable[[], object]) -> tuple[str, float]:
    t0 = time.monotonic()
    try:
        call()
        outcome = "OK"
    except grpc.RpcError as err:
        outcome = f"{err.code().name}: {err.details()[:110]}"
    return outcome, time.monotonic() - t0


def attack(server: ServerProcess, by: Bystander, name: str, call: Callable[[], object]) -> None:
    rss = server.rss_kib() / 1024
    by.start()
    outcome, took = timed(call)
    time.sleep(0.5)  # a few bystander rounds after the answer too
    print(f"{name}: {outcome} after {took:.3f} s; RSS {rss:.1f} -> "
          f"{server.rss_kib() / 1024:.1f} MiB; {by.stop()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[3, 4, 9, 10])
    rows = set(parser.parse_args().rows)
    server = ServerProcess(0)
    channel = grpc.insecure_channel(server.address,
                                    options=[("grpc.max_send_message_length", 64 << 20)])
    stub = placement_pb2_grpc.PlacementServiceStub(channel)
    by = Bystander(stub)
    try:
        by.start()
        time.sleep(2.0)
        print(f"idle: {by.stop()}", flush=True)

        # Row 3: a job of 4 layers confirms 1e5 and 1e6 layers of maps.
        stub.RegisterJob(pb.RegisterJobRequest(job="t", spec=job_spec(
            nodes=NODES, gpus=GPUS, experts=EXPERTS, spd=SPD, layers=4)), timeout=30)
        for layers in (100_000, 1_000_000, 1_000_000) if 3 in rows else ():
            req = pb.ConfirmExpertsRequest(job="t", step=1, maps=[pb.ExpertMap(
                device=[e // 2 for e in range(EXPERTS)])] * layers)
            attack(server, by, f"row 3: ConfirmExperts of {layers} layers (job layers 4)",
                   lambda req=req: stub.ConfirmExperts(req, timeout=120))

        # Rows 9 and 10 on a window of 2 layers.
        stub.RegisterJob(pb.RegisterJobRequest(job="w", spec=job_spec(
            nodes=NODES, gpus=GPUS, experts=EXPERTS, spd=SPD)), timeout=30)
        feed(stub, "w", range(4), layers=2)
        for value in (1 << 63, (1 << 64) - 1) if 9 in rows else ():
            attack(server, by, f"row 9: RecommendExperts bytes_per_expert={value}",
                   lambda value=value: stub.RecommendExperts(pb.RecommendExpertsRequest(
                       job="w", horizon_steps=100, bytes_per_expert=value), timeout=60))
        three = [pb.ExpertMap(device=[e // 2 for e in range(EXPERTS)])] * 3
        if 10 in rows:
            attack(server, by, "row 10: ConfirmExperts of 3 layers (window 2)",
                   lambda: stub.ConfirmExperts(pb.ConfirmExpertsRequest(
                       job="w", step=4, maps=three), timeout=30))
            attack(server, by, "row 10: the job's RecommendExperts afterwards",
                   lambda: stub.RecommendExperts(pb.RecommendExpertsRequest(
                       job="w", horizon_steps=100, bytes_per_expert=1 << 20), timeout=60))

        if 4 not in rows:
            return
        # Row 4: a real fit (64 starts on a bigger window) while another job asks for its
        # advice and unregisters; then starts = 2^32 - 1 (5 s deadline).
        big = dict(nodes=2, gpus=4, experts=64, spd=32)
        stub.RegisterJob(pb.RegisterJobRequest(job="big", spec=job_spec(**big)), timeout=30)
        feed(stub, "big", range(16), layers=8, **big)
        stub.RegisterJob(pb.RegisterJobRequest(job="other", spec=job_spec(
            nodes=NODES, gpus=GPUS, experts=EXPERTS, spd=SPD)), timeout=30)
        feed(stub, "other", range(4), layers=2)
        for name, call in (
                ("RecommendExperts", lambda: stub.RecommendExperts(pb.RecommendExpertsRequest(
                    job="other", horizon_steps=100, bytes_per_expert=1 << 20), timeout=600)),
                ("UnregisterJob", lambda: stub.UnregisterJob(pb.UnregisterJobRequest(
                    job="other"), timeout=600))):
            slow = stub.RecommendExperts.future(pb.RecommendExpertsRequest(
                job="big", horizon_steps=100, bytes_per_expert=1 << 20, starts=64), timeout=600)
            time.sleep(1.0)
            attack(server, by, f"row 4: another job's {name} 1 s into a 64-start fit", call)
            outcome, took = timed(slow.result)
            print(f"row 4: the 64-start fit: {outcome[:40]}, done {took:.3f} s after that",
                  flush=True)
        attack(server, by, "row 4: RecommendExperts starts=2^32-1 (deadline 5 s)",
               lambda: stub.RecommendExperts(pb.RecommendExpertsRequest(
                   job="big", horizon_steps=100, bytes_per_expert=1 << 20, starts=(1 << 32) - 1),
                   timeout=5))
        time.sleep(5)
        print(f"row 4: RSS 5 s after that deadline {server.rss_kib() / 1024:.1f} MiB", flush=True)
    finally:
        for w in by.workers:
            w.close()
        channel.close()
        try:
            print(f"server exit {server.stop()}", flush=True)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            print("server still running 30 s after SIGTERM: killed", flush=True)


if __name__ == "__main__":
    main()
