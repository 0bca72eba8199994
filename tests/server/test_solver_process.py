"""Rounds solved in solver processes (--process-solve-rows): the same plans, a dead process costs
one round, shutdown kills what is in flight."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.server.app import start
from netmoe.server.config import ServerConfig

from support import Worker, check_round, job_spec, round_reports, stub_for, wait_for


def solver_children() -> list[int]:
    """Pids of this process's live solver processes."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):  # it exited meanwhile
            continue
        # stat: "pid (comm) state ppid ..."; comm may hold spaces, the last ")" ends it.
        state, ppid = stat[stat.rindex(")") + 2:].split()[:2]
        if int(ppid) == os.getpid() and state != "Z" and b"netmoe.server.solver_process" in cmd:
            pids.append(int(entry.name))
    return sorted(pids)


def heavy_round(stub: placement_pb2_grpc.PlacementServiceStub) -> tuple[list[Worker], int]:
    """Registers job "heavy" and reports a CP-SAT round that takes seconds (something in flight
    to kill) on a server with one solver thread; returns its ranks and the solver process."""
    spec = job_spec(nodes=2, gpus=4, experts=64, spd=64, deadline_ms=30000, method="joint",
                    objective="bottleneck")
    stub.RegisterJob(pb.RegisterJobRequest(job="heavy", spec=spec), timeout=10)
    ranks = [Worker(stub) for _ in range(spec.world_size)]
    for w, r in zip(ranks, round_reports("heavy", spec, 0, 0, seed=1), strict=True):
        w.send(r)
    wait_for(lambda: len(solver_children()) == 1)
    (child,) = solver_children()
    return ranks, child


def test_rounds_solved_in_solver_processes_match_the_solver() -> None:
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0,
                                process_solve_rows=1))
    channel, stub = stub_for(handle)
    try:
        # Deadlines a busy machine cannot overrun: the test is about the plans.
        specs = {"a": job_spec(nodes=2, gpus=2, experts=8, spd=4, deadline_ms=30000),
                 "b": job_spec(nodes=2, gpus=4, experts=16, spd=8, deadline_ms=30000)}
        for job, spec in specs.items():
            stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=spec), timeout=10)
        assert len(solver_children()) == 4  # one per solver thread, started at registration
        for job, spec in specs.items():
            workers = [Worker(stub) for _ in range(spec.world_size)]
            for step in range(3):
                reports = round_reports(job, spec, step, 0, seed=step)
                for w, r in zip(workers, reports, strict=True):
                    w.send(r)
                check_round(spec, reports, [w.recv() for w in workers])
            for w in workers:
                assert w.close() == []
    finally:
        channel.close()
        handle.stop()
    assert solver_children() == []


def test_killed_solver_process_fails_its_round_and_the_next_is_solved() -> None:
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0,
                                solver_threads=1, process_solve_rows=1))
    channel, stub = stub_for(handle)
    try:
        light = job_spec(nodes=2, gpus=2, experts=8, spd=4, deadline_ms=30000)
        stub.RegisterJob(pb.RegisterJobRequest(job="light", spec=light), timeout=10)
        heavy_ranks, killed = heavy_round(stub)
        os.kill(killed, signal.SIGKILL)
        plans = [w.recv() for w in heavy_ranks]
        assert {(p.status, p.reason) for p in plans} == {(pb.PLAN_STATUS_FALLBACK, "error")}
        assert "solver process exited (code -9)" in plans[0].error, plans[0].error
        # The thread starts a new process for the next round, of any job.
        light_ranks = [Worker(stub) for _ in range(light.world_size)]
        reports = round_reports("light", light, 0, 0, seed=2)
        for w, r in zip(light_ranks, reports, strict=True):
            w.send(r)
        check_round(light, reports, [w.recv() for w in light_ranks])
        assert solver_children() not in ([], [killed])
        for w in (*heavy_ranks, *light_ranks):
            assert w.close() == []
    finally:
        channel.close()
        handle.stop()


def test_shutdown_kills_a_solve_in_flight() -> None:
    handle = start(ServerConfig(port=0, metrics_port=None, drain_seconds=0.0, grace_seconds=1.0,
                                solver_threads=1, process_solve_rows=1))
    channel, stub = stub_for(handle)
    try:
        ranks, child = heavy_round(stub)
        handle.stop()
        plans = [w.recv() for w in ranks]
        assert {(p.status, p.reason) for p in plans} == {(pb.PLAN_STATUS_FALLBACK, "shutdown")}
        assert child not in solver_children()  # the abandoned CP-SAT search does not run on
    finally:
        channel.close()
        handle.stop()
