"""The solver service end to end: a real grpc.aio server on an ephemeral loopback port."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from netmoe.protos import placement_pb2 as pb
from netmoe.protos.convert import counts_from_pb, counts_to_pb
from netmoe.server.app import SERVICE_NAME, ServerHandle, start
from netmoe.server.config import ServerConfig
from netmoe.solver import solve

from support import (
    MARGIN_S,
    Worker,
    ask_rounds,
    check_invalid_round,
    check_round,
    job_spec,
    round_reports,
    run_ranks,
    scrape,
    stub_for,
)


def test_32_streams_get_consistent_balanced_plans(server: ServerHandle) -> None:
    spec = job_spec(nodes=4, gpus=8, experts=64, spd=4)
    channel, stub = stub_for(server)
    assert stub.RegisterJob(pb.RegisterJobRequest(job="big", spec=spec)).created
    keys = [(step, layer) for step in range(3) for layer in range(2)]
    rounds = {k: round_reports("big", spec, *k, seed=100 * k[0] + k[1]) for k in keys}

    def per_rank(rank: int, worker: Worker) -> dict:
        return {k: worker.ask(rounds[k][rank]) for k in keys}

    results = run_ranks(server, per_rank, 32)
    for k in keys:
        plans = [results[r][k] for r in range(32)]
        assert all((p.step, p.layer, p.rank) == (*k, r) for r, p in enumerate(plans))
        check_round(spec, rounds[k], plans)
    channel.close()


def test_pipelined_rounds_on_one_stream(server: ServerHandle) -> None:
    """A worker may report several layers before reading plans; each is matched by key."""
    spec = job_spec()
    channel, stub = stub_for(server)
    stub.RegisterJob(pb.RegisterJobRequest(job="pipe", spec=spec))
    keys = [(0, layer) for layer in range(4)]
    rounds = {k: round_reports("pipe", spec, *k, seed=k[1]) for k in keys}

    def per_rank(rank: int, worker: Worker) -> dict:
        for k in keys:
            worker.send(rounds[k][rank])
        got = [worker.recv() for _ in keys]
        return {(p.step, p.layer): p for p in got}

    results = run_ranks(server, per_rank, spec.world_size)
    for k in keys:
        check_round(spec, rounds[k], [results[r][k] for r in range(spec.world_size)])
    channel.close()


def test_missing_rank_gets_everyone_home_within_deadline(server: ServerHandle) -> None:
    spec = job_spec(deadline_ms=300)
    channel, stub = stub_for(server)
    stub.RegisterJob(pb.RegisterJobRequest(job="gap", spec=spec))
    reports = round_reports("gap", spec, 0, 0, seed=1)
    j = spec.world_size

    def per_rank(rank: int, worker: Worker) -> tuple[pb.Plan, float] | None:
        if rank == j - 1:
            return None
        start = time.monotonic()
        plan = worker.ask(reports[rank])
        return plan, time.monotonic() - start

    results = run_ranks(server, per_rank, j)
    for rank, res in enumerate(results[:-1]):
        plan, waited = res
        assert plan.status == pb.PLAN_STATUS_FALLBACK and plan.reason == "incomplete"
        assert f"ranks [{j - 1}]" in plan.error
        assert list(plan.dest) == [rank] * spec.samples_per_device
        assert list(plan.held_ids) == list(reports[rank].sample_ids)
        assert plan.moved == 0 and not plan.HasField("before")
        assert waited < 0.3 + MARGIN_S
    # The straggler is answered too, with the same (home) outcome as the others.
    straggler = Worker(stub)
    late = straggler.ask(reports[j - 1])
    assert straggler.close() == []
    assert late.status == pb.PLAN_STATUS_FALLBACK and late.reason == "incomplete"
    assert "its round had already ended before this report" in late.error
    assert list(late.held_ids) == list(reports[j - 1].sample_ids)
    channel.close()


def test_slow_solve_times_out_to_home_placement() -> None:
    release = threading.Event()

    def slow_solve(*args: object, **kwargs: object):
        release.wait(10)
        return solve(*args, **kwargs)

    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0),
                   solve_fn=slow_solve)
    try:
        spec = job_spec(deadline_ms=200)
        channel, stub = stub_for(handle)
        stub.RegisterJob(pb.RegisterJobRequest(job="slow", spec=spec))
        reports = round_reports("slow", spec, 0, 0, seed=2)

        def per_rank(rank: int, worker: Worker) -> tuple[pb.Plan, float]:
            start_t = time.monotonic()
            return worker.ask(reports[rank]), time.monotonic() - start_t

        results = run_ranks(handle, per_rank, spec.world_size)
        for rank, (plan, waited) in enumerate(results):
            assert plan.status == pb.PLAN_STATUS_FALLBACK and plan.reason == "timeout"
            assert list(plan.held_ids) == list(reports[rank].sample_ids)
            # All reports were in, so the home traffic is known; no move means no saving.
            assert plan.before.inter > 0 and plan.after == plan.before
            assert waited < 0.2 + MARGIN_S
        # The unary call obeys the same deadline.
        solved = stub.Solve(pb.SolveRequest(reports=round_reports("slow", spec, 0, 1, seed=3)))
        assert {p.reason for p in solved.plans} == {"timeout"}
        release.set()
        channel.close()
    finally:
        release.set()
        handle.stop()


def test_unary_solve_matches_streamed_contract(server: ServerHandle) -> None:
    spec = job_spec()
    channel, stub = stub_for(server)
    stub.RegisterJob(pb.RegisterJobRequest(job="unary", spec=spec))
    reports = round_reports("unary", spec, 7, 3, seed=4)
    shuffled = reports[::-1]
    reply = stub.Solve(pb.SolveRequest(reports=shuffled))
    assert [p.rank for p in reply.plans] == [r.rank for r in shuffled]  # request order
    check_round(spec, reports, sorted(reply.plans, key=lambda p: p.rank))
    channel.close()


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_malformed_job_specs_are_rejected(server: ServerHandle) -> None:
    channel, stub = stub_for(server)
    bad = {
        "world_size=7": pb.JobSpec(
            topology=job_spec().topology, world_size=7, samples_per_device=4, deadline_ms=100),
        "objective": job_spec(objective="fastest"),
        "method": job_spec(method="magic"),
        "samples_per_device": job_spec(spd=0),
        "deadline_ms": job_spec(deadline_ms=0),
        "experts must be a positive integer, got 0": job_spec(experts=0),
        "expert_device[1]=99": pb.JobSpec(
            topology=pb.Topology(nodes=1, gpus_per_node=2, experts=2, expert_device=[0, 99],
                                 bw_intra=1.0, bw_inter=1.0, bytes_per_route=1),
            world_size=2, samples_per_device=1, deadline_ms=100),
        "topology is missing": pb.JobSpec(world_size=2, samples_per_device=1, deadline_ms=100),
    }
    for needle, spec in bad.items():
        code, details = _code(lambda s=spec: stub.RegisterJob(
            pb.RegisterJobRequest(job="j", spec=s)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, needle
        assert needle in details, details
    code, details = _code(lambda: stub.RegisterJob(pb.RegisterJobRequest(job="", spec=job_spec())))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "job" in details
    assert stub.RegisterJob(pb.RegisterJobRequest(job="j", spec=job_spec())).created
    assert not stub.RegisterJob(pb.RegisterJobRequest(job="j", spec=job_spec())).created
    code, _ = _code(lambda: stub.RegisterJob(pb.RegisterJobRequest(job="j", spec=job_spec(spd=8))))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = _code(lambda: stub.UnregisterJob(pb.UnregisterJobRequest(job="nope")))
    assert code == grpc.StatusCode.NOT_FOUND
    channel.close()


def test_malformed_reports_on_a_stream_get_invalid_plans_and_stream_goes_on(
    server: ServerHandle,
) -> None:
    spec = job_spec(deadline_ms=2000)
    channel, stub = stub_for(server)
    stub.RegisterJob(pb.RegisterJobRequest(job="m", spec=spec))
    stub.RegisterJob(pb.RegisterJobRequest(job="other", spec=spec))
    good = round_reports("m", spec, 5, 0, seed=5)[0]
    worker = Worker(stub)

    def variant(**fields: object) -> pb.Report:
        r = pb.Report()
        r.CopyFrom(good)
        for name, value in fields.items():
            if isinstance(value, list):
                r.ClearField(name)
                getattr(r, name).extend(value)
            elif isinstance(value, pb.Counts):
                getattr(r, name).CopyFrom(value)
            elif value is None:
                r.ClearField(name)
            else:
                setattr(r, name, value)
        return r

    # Binds the stream to ("m", rank 0); its round will end early as invalid (below).
    first = worker.ask(variant(sample_ids=[1, 2, 3]))
    assert first.status == pb.PLAN_STATUS_INVALID
    assert "sample_ids has 3 ids" in first.error and "samples_per_device=4" in first.error
    cases = {
        "repeats id 9": variant(step=6, sample_ids=[9, 9, 10, 11]),
        "gather.shape is [5, 16], need [samples_per_device, experts] = [4, 16] for job 'm'":
            variant(step=7, gather=counts_to_pb(np.ones((5, 16), dtype=np.int64))),
        "scatter.shape is [4, 3]": variant(step=8, scatter=counts_to_pb(np.ones((4, 3), int))),
        "gather is missing": variant(step=10, gather=None),
        "job/rank ('other', 0)": variant(step=9, job="other"),
        "job/rank ('m', 1)": variant(step=9, rank=1),
    }
    for needle, report in cases.items():
        plan = worker.ask(report)
        assert plan.status == pb.PLAN_STATUS_INVALID, needle
        assert needle in plan.error, plan.error
        assert (plan.step, plan.rank) == (report.step, report.rank)
        assert not plan.held_ids
    # A valid report for a later round is accepted (answered when that round ends) ...
    worker.send(variant(step=20))
    # ... after which going back, or repeating the round, is rejected ...
    for step in (19, 20):
        plan = worker.ask(variant(step=step))
        assert plan.status == pb.PLAN_STATUS_INVALID
        need = f"(step, micro_batch, layer) ({step}, 0, 0) of rank 0 does not come after (20, 0, 0)"
        assert need in plan.error, plan.error
    # ... while the step's next micro-batch is a round of its own, and its layer 0 comes after
    # micro-batch 0's layer 1, not before.
    worker.send(variant(step=20, layer=1))
    worker.send(variant(step=20, micro_batch=1))
    plan = worker.ask(variant(step=20, micro_batch=0, layer=2))
    assert plan.status == pb.PLAN_STATUS_INVALID
    assert "does not come after (20, 1, 0)" in plan.error, plan.error
    plans = worker.close()
    assert sorted((p.step, p.micro_batch, p.layer, p.reason) for p in plans) == [
        (20, 0, 0, "incomplete"), (20, 0, 1, "incomplete"), (20, 1, 0, "incomplete")]
    for report, needle in ((variant(job="ghost"), "'ghost' is not registered"),
                           (variant(rank=8), "rank 8 is outside [0, 8)")):
        doomed = Worker(stub)
        code, details = _code(lambda r=report, w=doomed: w.ask(r))
        doomed.hang_up()
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in details, details
    assert _health(server, "") == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_invalid_report_ends_its_round_for_everyone_and_next_round_solves(
    server: ServerHandle,
) -> None:
    spec = job_spec(deadline_ms=5000)
    channel, stub = stub_for(server)
    stub.RegisterJob(pb.RegisterJobRequest(job="r", spec=spec))
    bad_round = round_reports("r", spec, 0, 0, seed=6)
    bad_round[3].gather.data += b"\x01"
    dup_round = round_reports("r", spec, 0, 1, seed=7)
    dup_round[5].sample_ids[0] = dup_round[2].sample_ids[1]
    good_round = round_reports("r", spec, 1, 0, seed=8)

    def per_rank(rank: int, worker: Worker) -> list[tuple[pb.Plan, float]]:
        out = []
        for reports in (bad_round, dup_round, good_round):
            start_t = time.monotonic()
            out.append((worker.ask(reports[rank]), time.monotonic() - start_t))
        return out

    results = run_ranks(server, per_rank, spec.world_size)
    for rank, ((bad, t_bad), (dup, _), _) in enumerate(results):
        if rank == 3:
            assert bad.status == pb.PLAN_STATUS_INVALID and (
                "gather.data has 65 bytes, shape [4, 16] x uint8 needs 64" in bad.error)
        else:
            assert bad.status == pb.PLAN_STATUS_FALLBACK and bad.reason == "invalid"
            assert "rank 3" in bad.error and list(bad.held_ids) == list(bad_round[rank].sample_ids)
            assert t_bad < 5.0  # ended early, not at the deadline
        assert dup.status == pb.PLAN_STATUS_FALLBACK and dup.reason == "invalid"
        assert f"id {dup_round[2].sample_ids[1]} is reported by ranks [2, 5]" in dup.error
    check_round(spec, good_round, [res[2][0] for res in results])
    channel.close()


def _widened(counts: pb.Counts, dtype: int) -> pb.Counts:
    """The same counts sent in a wider dtype than the narrowest (allowed)."""
    wide = {pb.COUNTS_DTYPE_UINT16: "<u2", pb.COUNTS_DTYPE_UINT32: "<u4"}[dtype]
    arr = counts_from_pb(counts, "counts").astype(wide)
    return pb.Counts(data=arr.tobytes(), dtype=dtype, shape=arr.shape)


# Faults of one report's counts: (field, change, what the INVALID plan's error says).
COUNTS_FAULTS = [
    ("gather", lambda c: setattr(c, "data", c.data + b"\0"),
     "gather.data has 17 bytes, shape [2, 8] x uint8 needs 16"),
    ("scatter", lambda c: setattr(c, "data", c.data[:-2]),
     "scatter.data has 14 bytes, shape [2, 8] x uint8 needs 16"),
    ("gather", lambda c: setattr(c, "dtype", pb.COUNTS_DTYPE_UINT16),
     "gather.data has 16 bytes, shape [2, 8] x uint16 needs 32"),
    ("gather", lambda c: setattr(c, "dtype", 0),
     "gather.dtype=0 (COUNTS_DTYPE_UNSPECIFIED), need one of COUNTS_DTYPE_UINT8, "
     "COUNTS_DTYPE_UINT16, COUNTS_DTYPE_UINT32"),
    ("scatter", lambda c: setattr(c, "dtype", 9), "scatter.dtype=9 (not a CountsDtype)"),
    ("gather", lambda c: c.shape.append(1), "gather.shape [2, 8, 1] has 3 dimensions, need 2"),
    ("gather", lambda c: c.ClearField("shape"), "gather.shape [] has 0 dimensions"),
    ("scatter", lambda c: c.shape.__setitem__(slice(None), [2**32 - 1] * 2),
     f"scatter.data has 16 bytes, shape [{2**32 - 1}, {2**32 - 1}] x uint8 needs "
     f"{(2**32 - 1) ** 2}"),
    ("gather", lambda c: c.shape.__setitem__(slice(None), [1, 16]),
     "gather.shape is [1, 16], need [samples_per_device, experts] = [2, 8] for job 'c'"),
]


def test_bad_counts_end_their_round_early_and_every_stream_goes_on(server: ServerHandle) -> None:
    """One counts fault per round, each from another rank: that rank gets INVALID naming the
    field and the value, the others the home placement ("invalid") at once, and every stream
    carries on to the next round, which solves (with counts sent wider than needed, too)."""
    spec = job_spec(nodes=2, gpus=2, experts=8, spd=2, deadline_ms=5000)
    channel, stub = stub_for(server)
    stub.RegisterJob(pb.RegisterJobRequest(job="c", spec=spec))
    rounds = []
    for step, (field, change, _) in enumerate(COUNTS_FAULTS):
        reports = round_reports("c", spec, step, 0, seed=step)
        change(getattr(reports[step % 4], field))
        rounds.append(reports)
    good = round_reports("c", spec, len(COUNTS_FAULTS), 0, seed=99)
    good[1].gather.CopyFrom(_widened(good[1].gather, pb.COUNTS_DTYPE_UINT16))
    good[2].scatter.CopyFrom(_widened(good[2].scatter, pb.COUNTS_DTYPE_UINT32))

    results = ask_rounds(server, [*rounds, good], spec.world_size)
    for step, (_, _, needle) in enumerate(COUNTS_FAULTS):
        check_invalid_round([res[step] for res in results], rounds[step], step % 4, needle, 5.0)
    check_round(spec, good, [res[-1][0] for res in results])
    channel.close()


def test_malformed_unary_solve_is_invalid_argument(server: ServerHandle) -> None:
    spec = job_spec()
    channel, stub = stub_for(server)
    stub.RegisterJob(pb.RegisterJobRequest(job="u", spec=spec))
    reports = round_reports("u", spec, 0, 0, seed=9)

    def with_change(k: int, **fields: object) -> list[pb.Report]:
        out = [pb.Report() for _ in reports]
        for o, r in zip(out, reports, strict=True):
            o.CopyFrom(r)
        for name, value in fields.items():
            setattr(out[k], name, value)
        return out

    cases = {
        "reports is empty": [],
        "job 'zz' is not registered": [pb.Report(job="zz", rank=0)],
        "reports[2].step=4 differs from reports[0].step=0": with_change(2, step=4),
        "reports[5].micro_batch=1 differs from reports[0].micro_batch=0":
            with_change(5, micro_batch=1),
        "reports[3].rank=1 repeats reports[1].rank": with_change(3, rank=1),
        "reports[1].rank 9 is outside [0, 8)": with_change(1, rank=9),
        "reports lacks ranks [7]": reports[:7],
    }
    for needle, reqs in cases.items():
        code, details = _code(lambda r=reqs: stub.Solve(pb.SolveRequest(reports=r)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, needle
        assert needle in details, details
    short = with_change(4)
    short[4].gather.shape[1] = 15
    code, details = _code(lambda: stub.Solve(pb.SolveRequest(reports=short)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "reports[4].gather.data has 64 bytes, shape [4, 15] x uint8 needs 60" in details
    assert _health(server, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    channel.close()


def test_two_jobs_do_not_see_each_other(server: ServerHandle) -> None:
    spec_a = job_spec(nodes=2, gpus=4, spd=4)
    spec_b = job_spec(nodes=2, gpus=2, experts=8, spd=2)
    channel, stub = stub_for(server)
    stub.RegisterJob(pb.RegisterJobRequest(job="a", spec=spec_a))
    stub.RegisterJob(pb.RegisterJobRequest(job="b", spec=spec_b))
    # Same (step, layer) keys and overlapping sample ids in both jobs.
    ra = round_reports("a", spec_a, 0, 0, seed=10)
    rb = round_reports("b", spec_b, 0, 0, seed=11)
    ja, jb = spec_a.world_size, spec_b.world_size

    def per_rank(rank: int, worker: Worker) -> pb.Plan:
        return worker.ask(ra[rank] if rank < ja else rb[rank - ja])

    plans = run_ranks(server, per_rank, ja + jb)
    assert {p.job for p in plans[:ja]} == {"a"} and {p.job for p in plans[ja:]} == {"b"}
    check_round(spec_a, ra, plans[:ja])
    check_round(spec_b, rb, plans[ja:])
    channel.close()


def _health(handle: ServerHandle, service: str) -> int:
    with grpc.insecure_channel(handle.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_reflection_and_draining() -> None:
    handle = start(ServerConfig(port=0, metrics_port=None, drain_seconds=1.5, grace_seconds=1))
    try:
        assert _health(handle, "") == health_pb2.HealthCheckResponse.SERVING
        assert _health(handle, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(handle.address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = list(stub.ServerReflectionInfo(iter([request])))
            names = {s.name for s in reply.list_services_response.service}
            assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
            request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
            (reply,) = list(stub.ServerReflectionInfo(iter([request])))
            assert reply.file_descriptor_response.file_descriptor_proto
        stopper = threading.Thread(target=handle.stop)
        stopper.start()
        deadline = time.monotonic() + 1.0
        status = health_pb2.HealthCheckResponse.SERVING
        while status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            status = _health(handle, SERVICE_NAME)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopper.join(10)
        assert not stopper.is_alive()
        with pytest.raises(grpc.RpcError):
            _health(handle, "")
    finally:
        handle.stop()


def test_metrics_endpoint_counts_rounds_routes_and_rpcs(server: ServerHandle) -> None:
    spec = job_spec(deadline_ms=300)
    channel, stub = stub_for(server)
    before = scrape(server.metrics_port)
    assert before[("netmoe_active_jobs", ())] == 0
    stub.RegisterJob(pb.RegisterJobRequest(job="met", spec=spec))
    _code(lambda: stub.RegisterJob(pb.RegisterJobRequest(job="bad", spec=job_spec(spd=0))))
    solved = round_reports("met", spec, 0, 0, seed=12)
    lonely = round_reports("met", spec, 0, 1, seed=13)

    def per_rank(rank: int, worker: Worker) -> pb.Plan:
        plan = worker.ask(solved[rank])
        if rank == 0:
            worker.ask(lonely[0])
        return plan

    plans = run_ranks(server, per_rank, spec.world_size)
    after = scrape(server.metrics_port)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("netmoe_rounds_total", job="met", outcome="solved") == 1
    assert moved("netmoe_rounds_total", job="met", outcome="incomplete") == 1
    assert moved("netmoe_predicted_routes_total", job="met", channel="inter",
                 placement="home") == plans[0].before.inter
    assert moved("netmoe_predicted_routes_total", job="met", channel="inter",
                 placement="planned") == plans[0].after.inter
    assert moved("netmoe_solve_seconds_count") == 1
    assert after[("netmoe_solve_seconds_bucket", (("le", "1.0"),))] >= 1
    assert ("netmoe_solve_seconds_bucket", (("le", "5e-05"),)) in after
    assert after[("netmoe_active_jobs", ())] == 1
    assert after[("netmoe_active_streams", ())] == 0
    rpc = {"grpc_service": "netmoe.v1.PlacementService"}
    assert moved("grpc_server_started_total", grpc_type="bidi_stream", grpc_method="Stream",
                 **rpc) == spec.world_size
    assert moved("grpc_server_handled_total", grpc_type="bidi_stream", grpc_method="Stream",
                 grpc_code="OK", **rpc) == spec.world_size
    assert moved("grpc_server_handled_total", grpc_type="unary", grpc_method="RegisterJob",
                 grpc_code="INVALID_ARGUMENT", **rpc) == 1
    assert moved("grpc_server_handling_seconds_count", grpc_type="unary",
                 grpc_method="RegisterJob", **rpc) == 2
    assert not any("sample" in str(labels) for _, labels in after)
    stub.UnregisterJob(pb.UnregisterJobRequest(job="met"))
    gone = scrape(server.metrics_port)
    assert gone[("netmoe_active_jobs", ())] == 0
    assert not any(dict(labels).get("job") == "met" for _, labels in gone)
    channel.close()
