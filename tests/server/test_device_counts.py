"""Device-level counts (JobSpec.device_counts) end to end: a real grpc.aio server on an ephemeral
loopback port, jobs reporting [n, J] routes per device next to jobs reporting [n, E]."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from netmoe.protos import placement_pb2 as pb
from netmoe.protos.convert import counts_from_pb, counts_to_pb
from netmoe.server.app import ServerHandle, start
from netmoe.server.config import ServerConfig
from netmoe.solver import Topology, solve
from netmoe.solver.cost import device_counts

from support import (
    ask_rounds,
    check_invalid_round,
    job_spec,
    round_reports,
    run_ranks,
    stub_for,
)

NODES, GPUS, EXPERTS, SPD = 2, 4, 16, 4
J = NODES * GPUS
# Not the default layout: the expert job registers it, the device job's ranks count under it.
EXPERT_MAP = np.random.default_rng(3).permutation(np.arange(EXPERTS) // (EXPERTS // J))
KEYS = [(0, 0), (0, 1), (0, 2), (1, 0)]
LAST = (0, 2)  # a last MoE layer: no scatter


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[ServerHandle]:
    rows = getattr(request, "param", 0)  # > 0: rounds that large solve in a child process
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0,
                                process_solve_rows=rows, solver_threads=2 if rows else 4))
    yield handle
    handle.stop()


def _by_device(report: pb.Report, topo: Topology) -> pb.Report:
    """The same report with gather and scatter summed by the device holding each expert."""
    out = pb.Report()
    out.CopyFrom(report)
    for name in ("gather", "scatter"):
        if report.HasField(name):
            counts = counts_from_pb(getattr(report, name), name).astype(np.int64)
            getattr(out, name).CopyFrom(counts_to_pb(device_counts(topo, counts)))
    return out


def _rounds(job: str) -> dict[tuple[int, int], list[pb.Report]]:
    spec = job_spec(NODES, GPUS, EXPERTS, SPD)
    rounds = {}
    for step, layer in KEYS:
        reports = round_reports(job, spec, step, layer, seed=10 * step + layer)
        if (step, layer) == LAST:
            for r in reports:
                r.ClearField("scatter")
        rounds[(step, layer)] = reports
    return rounds


def _plan_fields(plan: pb.Plan) -> tuple:
    routes = lambda r: (r.inter, r.intra, r.local, r.seconds)  # noqa: E731
    return (plan.step, plan.layer, plan.rank, list(plan.dest), list(plan.held_ids),
            routes(plan.before), routes(plan.after), plan.status, plan.reason, plan.moved)


@pytest.mark.parametrize("server", [0, J * SPD], indirect=True, ids=["thread", "process"])
def test_device_count_plans_equal_expert_count_plans(server: ServerHandle) -> None:
    """The same rounds, once as [n, E] counts under an expert map and once as [n, J] counts
    summed under that map: every rank gets the same plan (placement, held ids, before and after
    routes and seconds), with or without a scatter, solved in the server's process or in its
    solver child process."""
    topo = Topology(NODES, GPUS, EXPERTS, EXPERT_MAP, bw_intra=400e9, bw_inter=100e9,
                    bytes_per_route=8192)
    experts = job_spec(NODES, GPUS, EXPERTS, SPD)
    experts.topology.expert_device.extend(EXPERT_MAP.tolist())
    channel, stub = stub_for(server)
    stub.RegisterJob(pb.RegisterJobRequest(job="e", spec=experts))
    stub.RegisterJob(pb.RegisterJobRequest(job="d", spec=job_spec(NODES, GPUS, EXPERTS, SPD,
                                                                  device_counts=True)))
    by_expert = _rounds("e")
    by_device = {k: [_by_device(r, topo) for r in reports]
                 for k, reports in _rounds("d").items()}
    assert by_device[KEYS[0]][0].gather.shape == [SPD, J]

    def ask(rounds: dict) -> list:
        return run_ranks(server, lambda rank, w: [w.ask(rounds[k][rank]) for k in KEYS], J)

    plans_e, plans_d = ask(by_expert), ask(by_device)
    for rank in range(J):
        for pe, pd in zip(plans_e[rank], plans_d[rank], strict=True):
            assert pe.status == pb.PLAN_STATUS_OPTIMAL, pe.error
            assert _plan_fields(pd) == _plan_fields(pe)
    assert sum(p.moved for p in plans_e[0]) > 0  # the rounds are worth placing
    # Unary Solve takes device counts alike.
    reply = stub.Solve(pb.SolveRequest(reports=[_by_device(r, topo) for r in
                                                round_reports("d", experts, 5, 0, seed=1)]))
    want = stub.Solve(pb.SolveRequest(reports=round_reports("e", experts, 5, 0, seed=1)))
    assert [list(p.dest) for p in reply.plans] == [list(p.dest) for p in want.plans]
    assert reply.plans[0].after == want.plans[0].after
    channel.close()


def test_bad_device_count_shapes_get_invalid_plans_and_streams_go_on(
        server: ServerHandle) -> None:
    """Expert-shaped counts sent for a device job (and a wrong scatter) get INVALID naming the
    field, the shape and the need; the round ends early for the other ranks, every stream goes
    on and the next round solves on the device counts."""
    spec = job_spec(NODES, GPUS, EXPERTS, SPD, deadline_ms=5000, device_counts=True)
    channel, stub = stub_for(server)
    stub.RegisterJob(pb.RegisterJobRequest(job="d", spec=spec))
    topo = Topology(NODES, GPUS, EXPERTS)
    rounds = [[_by_device(r, topo) for r in round_reports("d", spec, step, 0, seed=step)]
              for step in range(3)]
    rounds[0][1] = round_reports("d", spec, 0, 0, seed=0)[1]  # [n, E]: not what the job says
    rounds[1][2].scatter.CopyFrom(counts_to_pb(np.ones((SPD, 3), dtype=np.int64)))
    faults = {0: (1, f"gather.shape is [{SPD}, {EXPERTS}], need [samples_per_device, devices] "
                     f"= [{SPD}, {J}] for job 'd' (device_counts)"),
              1: (2, f"scatter.shape is [{SPD}, 3], need [samples_per_device, devices] = "
                     f"[{SPD}, {J}] for job 'd' (device_counts) (or absent: no next layer)")}

    results = ask_rounds(server, rounds, J)
    for step, (bad, needle) in faults.items():
        check_invalid_round([res[step] for res in results], rounds[step], bad, needle, 5.0)
    good = [results[rank][2][0] for rank in range(J)]
    gather = np.concatenate([counts_from_pb(r.gather, "gather") for r in rounds[2]])
    scatter = np.concatenate([counts_from_pb(r.scatter, "scatter") for r in rounds[2]])
    want = solve(topo.per_device(), gather, scatter)
    assert [d for p in good for d in p.dest] == list(want.dest)
    assert {p.status for p in good} == {pb.PLAN_STATUS_OPTIMAL}
    with pytest.raises(grpc.RpcError) as err:
        stub.Solve(pb.SolveRequest(reports=round_reports("d", spec, 9, 0, seed=9)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "reports[0].gather.shape is [4, 16], need [samples_per_device, devices]" in (
        err.value.details())
    channel.close()


def test_expert_advisor_refuses_device_count_jobs(server: ServerHandle) -> None:
    """RecommendExperts and ConfirmExperts on a device job fail FAILED_PRECONDITION saying why,
    before and after rounds (no window is kept); the same id registered anew with expert counts
    gets the advisor."""
    spec = job_spec(NODES, GPUS, EXPERTS, SPD, device_counts=True)
    channel, stub = stub_for(server)
    stub.RegisterJob(pb.RegisterJobRequest(job="d", spec=spec))
    topo = Topology(NODES, GPUS, EXPERTS)
    maps = [pb.ExpertMap(device=topo.expert_device.tolist())] * 2
    calls = {
        "RecommendExperts": lambda: stub.RecommendExperts(pb.RecommendExpertsRequest(
            job="d", horizon_steps=10, bytes_per_expert=1000)),
        "ConfirmExperts": lambda: stub.ConfirmExperts(pb.ConfirmExpertsRequest(
            job="d", step=50, maps=maps)),
    }
    for solved in (False, True):
        if solved:
            for layer in range(2):
                stub.Solve(pb.SolveRequest(reports=[
                    _by_device(r, topo) for r in round_reports("d", spec, 0, layer, seed=layer)]))
            assert server.server.advisors.get("d") is None  # no window behind the refusal
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, name
            assert "job 'd' reports device-level counts (spec.device_counts=true)" in (
                err.value.details()), name
            assert "register with device_counts=false to use the advisor" in err.value.details()
    stub.UnregisterJob(pb.UnregisterJobRequest(job="d"))
    stub.RegisterJob(pb.RegisterJobRequest(job="d", spec=job_spec(NODES, GPUS, EXPERTS, SPD)))
    with pytest.raises(grpc.RpcError) as err:
        calls["RecommendExperts"]()
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "reported 0 MoE layer" in err.value.details()  # the advisor's own answer now
    channel.close()
