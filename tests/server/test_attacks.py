"""The service under attack: impostor ranks, stale job generations, bounds (issue 12's rows),
against a real server on a loopback port."""

from __future__ import annotations

import time

import grpc
import pytest

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.server.app import ServerHandle
from netmoe.server.jobs import MAX_STEP

from support import MARGIN_S, Worker, check_round, job_spec, round_reports, wait_for

U64_MAX = (1 << 64) - 1


@pytest.fixture
def stub(server: ServerHandle) -> placement_pb2_grpc.PlacementServiceStub:
    channel = grpc.insecure_channel(server.address)
    yield placement_pb2_grpc.PlacementServiceStub(channel)
    channel.close()


def refused(worker: Worker, report: pb.Report) -> grpc.RpcError:
    worker.send(report)
    with pytest.raises(grpc.RpcError) as err:
        worker.recv()
    worker.hang_up()
    return err.value


def test_second_stream_for_a_bound_rank_is_refused_and_never_joins_a_round(
    server: ServerHandle, stub: placement_pb2_grpc.PlacementServiceStub
) -> None:
    spec = job_spec(nodes=2, gpus=2, experts=8, spd=2, deadline_ms=2000)
    stub.RegisterJob(pb.RegisterJobRequest(job="id", spec=spec), timeout=10)
    workers = [Worker(stub) for _ in range(4)]
    reports = round_reports("id", spec, 0, 0, seed=1)
    workers[2].send(reports[2])  # rank 2 binds first
    coord = server.server.coordinator
    assert coord is not None
    wait_for(lambda: coord.pending_rounds("id") == 1)
    # The impostor claims rank 2 with other ids, and with a step that would block rank 2 for good.
    fake = round_reports("id", spec, 0, 0, seed=9, id_base=10_000)[2]
    err = refused(Worker(stub), fake)
    assert err.code() == grpc.StatusCode.ABORTED
    assert "rank 2 of job 'id' is already bound" in err.details()
    huge = pb.Report(job="id", step=MAX_STEP, layer=0, rank=2)
    assert refused(Worker(stub), huge).code() == grpc.StatusCode.ABORTED
    for r in (0, 1, 3):
        workers[r].send(reports[r])
    check_round(spec, reports, [w.recv() for w in workers])  # the real ranks' round, untouched
    # The next round is solved at once: nothing of the impostor stayed behind.
    reports = round_reports("id", spec, 1, 0, seed=2)
    t0 = time.monotonic()
    for w, r in zip(workers, reports, strict=True):
        w.send(r)
    check_round(spec, reports, [w.recv() for w in workers])
    assert time.monotonic() - t0 < 2.0 + MARGIN_S
    # Rank 2's own stream ends: the rank is free again for its next stream.
    assert workers[2].close() == []
    wait_for(lambda: not coord._jobs["id"].bound.get(2))
    workers[2] = Worker(stub)
    reports = round_reports("id", spec, 2, 0, seed=3)
    for w, r in zip(workers, reports, strict=True):
        w.send(r)
    check_round(spec, reports, [w.recv() for w in workers])
    for w in workers:
        assert w.close() == []


def test_invalid_report_with_a_huge_step_does_not_block_its_rank(
    server: ServerHandle, stub: placement_pb2_grpc.PlacementServiceStub
) -> None:
    spec = job_spec(nodes=2, gpus=1, experts=4, spd=2, deadline_ms=2000)
    stub.RegisterJob(pb.RegisterJobRequest(job="s", spec=spec), timeout=10)
    workers = [Worker(stub) for _ in range(2)]
    bad = pb.Report(job="s", step=MAX_STEP, layer=0, rank=1, sample_ids=[1])  # too few ids
    plan = workers[1].ask(bad)
    assert plan.status == pb.PLAN_STATUS_INVALID and "sample_ids" in plan.error
    reports = round_reports("s", spec, 0, 0, seed=4)
    for w, r in zip(workers, reports, strict=True):
        w.send(r)
    check_round(spec, reports, [w.recv() for w in workers])
    for w in workers:
        assert w.close() == []


def test_old_generation_never_touches_the_reregistered_job(
    server: ServerHandle, stub: placement_pb2_grpc.PlacementServiceStub
) -> None:
    spec = job_spec(nodes=2, gpus=1, experts=4, spd=2, deadline_ms=2000)
    first = stub.RegisterJob(pb.RegisterJobRequest(job="g", spec=spec), timeout=10)
    again = stub.RegisterJob(pb.RegisterJobRequest(job="g", spec=spec), timeout=10)
    assert first.generation > 0 and again.generation == first.generation
    old = [Worker(stub) for _ in range(2)]
    reports = round_reports("g", spec, 0, 0, seed=5)
    for w, r in zip(old, reports, strict=True):
        r.generation = first.generation
        w.send(r)
    assert {w.recv().status for w in old} == {pb.PLAN_STATUS_OPTIMAL}
    stub.UnregisterJob(pb.UnregisterJobRequest(job="g"), timeout=10)
    new = stub.RegisterJob(pb.RegisterJobRequest(job="g", spec=spec), timeout=10)
    assert new.created and new.generation != first.generation
    # A stale worker's report (same shape, same job id) is refused, its stream ended.
    stale = round_reports("g", spec, 1, 0, seed=6)
    err = refused(old[0], stale[0])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"generation {first.generation} of job 'g' was unregistered" in err.details()
    # A new stream naming the old generation is refused at once; Solve too.
    for r in stale:
        r.generation = first.generation
    err = refused(Worker(stub), stale[1])
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as solve_err:
        stub.Solve(pb.SolveRequest(reports=stale), timeout=10)
    assert solve_err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The new generation's round sees only its own ranks.
    workers = [Worker(stub) for _ in range(2)]
    reports = round_reports("g", spec, 1, 0, seed=7)
    t0 = time.monotonic()
    for w, r in zip(workers, reports, strict=True):
        r.generation = new.generation
        w.send(r)
    check_round(spec, reports, [w.recv() for w in workers])
    assert time.monotonic() - t0 < 2.0 + MARGIN_S
    for w in workers:
        assert w.close() == []
    old[1].hang_up()


def test_layer_and_step_bounds_touch_no_round(
    server: ServerHandle, stub: placement_pb2_grpc.PlacementServiceStub
) -> None:
    spec = job_spec(nodes=2, gpus=1, experts=4, spd=2, deadline_ms=2000, layers=2)
    stub.RegisterJob(pb.RegisterJobRequest(job="b", spec=spec), timeout=10)
    coord = server.server.coordinator
    assert coord is not None
    workers = [Worker(stub) for _ in range(2)]
    reports = round_reports("b", spec, 0, 0, seed=8)
    workers[0].send(reports[0])
    wait_for(lambda: coord.pending_rounds("b") == 1)
    for layer, step, error in ((2, 0, "layer 2 is outside [0, 2) for job 'b' (spec.layers)"),
                               ((1 << 32) - 1, 0, "layer 4294967295 is outside"),
                               (0, U64_MAX, f"step {U64_MAX} exceeds {MAX_STEP}")):
        bad = pb.Report(**{**{f.name: v for f, v in reports[1].ListFields()},
                           "layer": layer, "step": step})
        plan = workers[1].ask(bad)
        assert plan.status == pb.PLAN_STATUS_INVALID and error in plan.error, plan.error
    assert coord.pending_rounds("b") == 1  # no round opened, the real one still waits
    workers[1].send(reports[1])
    check_round(spec, reports, [w.recv() for w in workers])
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterJob(pb.RegisterJobRequest(job="c", spec=job_spec(layers=1025)), timeout=10)
    assert "spec.layers must be in [1, 1024], got 1025" in err.value.details()
    for w in workers:
        assert w.close() == []


@pytest.mark.parametrize(("field", "value", "error"), [
    ("alpha_intra", 1e308, "spec.topology.alpha_intra must be in [0, 60] seconds, got 1e+308"),
    ("alpha_inter", float("inf"), "spec.topology.alpha_inter must be in [0, 60] seconds"),
    ("bw_inter", 5e-324, "spec.topology.bw_inter=5e-324 bytes/s makes the modelled time"),
    ("bytes_per_route", U64_MAX, f"spec.topology.bytes_per_route must be at most {1 << 32}"),
])
def test_modelled_time_overflow_refused_at_registration(
    stub: placement_pb2_grpc.PlacementServiceStub, field: str, value: float, error: str
) -> None:
    spec = job_spec()
    setattr(spec.topology, field, value)
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterJob(pb.RegisterJobRequest(job="o", spec=spec), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error in err.value.details()


def test_deadline_error_names_the_spec_field(
    stub: placement_pb2_grpc.PlacementServiceStub
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.RegisterJob(pb.RegisterJobRequest(job="d", spec=job_spec(deadline_ms=60001)),
                         timeout=10)
    assert err.value.details() == "spec.deadline_ms must be in (0, 60] seconds, got 60001 ms"
