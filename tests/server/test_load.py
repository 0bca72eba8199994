"""Sustained load: 64 ranks for many rounds, nothing lost, the server's memory watched.

The short version runs by default; ``--runslow`` runs 64 ranks x 1000 rounds. Figures are
printed (``pytest -s``)."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.protos.convert import counts_to_pb

from support import ServerProcess, Worker, job_spec, short_and_long

# --- load: 64 ranks, many rounds, server memory ------------------------------------------------

@short_and_long("rounds", 30, 1000)
def test_load_64_ranks_memory_bounded_nothing_lost(rounds: int) -> None:
    ranks = 64
    warmup = min(10, rounds // 3)
    spec = job_spec(nodes=8, gpus=8, experts=128, spd=2, deadline_ms=30000)
    server = ServerProcess()
    rss = {"idle": server.rss_kib()}
    barrier = threading.Barrier(ranks + 1)
    results: list[list[pb.Plan]] = [[] for _ in range(ranks)]
    errors: list[BaseException] = []

    def rank_body(rank: int) -> None:
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = placement_pb2_grpc.PlacementServiceStub(channel)
                stub.RegisterJob(pb.RegisterJobRequest(job="load", spec=spec), timeout=30)
                worker = Worker(stub)
                for k in range(rounds):
                    if k == warmup:
                        barrier.wait(120)  # RSS after warm-up, then again at the end
                        barrier.wait(120)
                    rng = np.random.default_rng([k, rank])
                    n, e = spec.samples_per_device, spec.topology.experts
                    report = pb.Report(
                        job="load", step=k, layer=0, rank=rank,
                        sample_ids=(k * ranks * n + rank * n + np.arange(n)).tolist(),
                        gather=counts_to_pb(rng.poisson(1.0, (n, e))),
                        scatter=counts_to_pb(rng.poisson(1.0, (n, e))))
                    results[rank].append(worker.ask(report))
                assert worker.close() == []
        except BaseException as err:
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank_body, args=(r,)) for r in range(ranks)]
    t0 = time.monotonic()
    try:
        for t in threads:
            t.start()
        barrier.wait(300)
        rss["warm"] = server.rss_kib()
        t_warm = time.monotonic()
        barrier.wait(120)
        for t in threads:
            t.join(3600)
        assert not errors, errors[0]
        elapsed = time.monotonic() - t_warm
        rss["end"] = server.rss_kib()
        solved = server.samples("netmoe_rounds_total")
        jobs = server.samples("netmoe_active_jobs")
    finally:
        code = server.stop()
    assert code == 0
    # Nothing lost: every rank got one plan per round, all solved, each round a partition.
    for k in range(rounds):
        plans = [results[r][k] for r in range(ranks)]
        assert all((p.step, p.rank) == (k, r) for r, p in enumerate(plans))
        assert {p.status for p in plans} == {pb.PLAN_STATUS_OPTIMAL}
        held = np.sort(np.concatenate([np.asarray(p.held_ids) for p in plans]))
        assert np.array_equal(held, k * ranks * 2 + np.arange(ranks * 2))
    assert solved == {(("job", "load"), ("outcome", "solved")): float(rounds)}
    assert jobs == {(): 1.0}
    growth_mib = (rss["end"] - rss["warm"]) / 1024
    # The service keeps no per-round state once a round is answered; allocator noise is a few MiB.
    assert growth_mib < 32, rss
    print(f"\nload: {ranks} ranks x {rounds} rounds (I={ranks * 2}, E=128), "
          f"{(rounds - warmup) / elapsed:.1f} rounds/s after warm-up, total "
          f"{time.monotonic() - t0:.1f} s; server RSS idle {rss['idle'] / 1024:.1f} MiB, "
          f"after {warmup} rounds {rss['warm'] / 1024:.1f} MiB, end {rss['end'] / 1024:.1f} MiB "
          f"({growth_mib:+.1f} MiB)")


