"""Fuzzing the service: hypothesis over the proto fields, random bytes on every method
reflection lists; the server stays SERVING and a bystander job keeps being solved.

Short versions run by default; ``--runslow`` runs more examples."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.server.app import ServerHandle, start
from netmoe.server.config import ServerConfig

from support import Worker, job_spec, round_reports, serving, short_and_long

U32, U64 = 2**32 - 1, 2**64 - 1
# Codes a well-behaved server may answer garbage with; UNKNOWN / INTERNAL would be a bug.
EXPECTED_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                  grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED}



class Bystander:
    """A 2-rank job doing rounds on its own streams while something else hits the server."""

    def __init__(self, handle: ServerHandle) -> None:
        self.channel = grpc.insecure_channel(handle.address)
        stub = placement_pb2_grpc.PlacementServiceStub(self.channel)
        self.spec = job_spec(nodes=2, gpus=1, experts=4, spd=2, deadline_ms=20000)
        stub.RegisterJob(pb.RegisterJobRequest(job="bystander", spec=self.spec), timeout=10)
        self.workers = [Worker(stub), Worker(stub)]
        self.rounds = 0
        self.statuses: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = 0
        while not self._stop.is_set():
            reports = round_reports("bystander", self.spec, step, 0, seed=step)
            for w, r in zip(self.workers, reports, strict=True):
                w.send(r)
            plans = [w.recv() for w in self.workers]
            held = sorted(i for p in plans for i in p.held_ids)
            assert held == sorted(i for r in reports for i in r.sample_ids)
            self.statuses |= {p.status for p in plans}
            self.rounds += 1
            step += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive()
        for w in self.workers:
            assert w.close() == []
        self.channel.close()


@pytest.fixture
def fuzz_server(caplog: pytest.LogCaptureFixture) -> Iterator[ServerHandle]:
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0,
                                max_message_bytes=1 << 20))
    with caplog.at_level(logging.WARNING):
        yield handle
        handle.stop()
    # An exception the server did not handle shows up as an ERROR log (grpc or netmoe).
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[0].getMessage()


# --- fuzzing: hypothesis over the proto fields ------------------------------------------------

u32 = st.one_of(st.integers(0, 16), st.integers(0, U32))
u64 = st.one_of(st.integers(0, 64), st.integers(0, U64))
floats = st.floats(allow_nan=True, allow_infinity=True)
names = st.one_of(st.sampled_from(["", "fz", "volume", "joint", "bottleneck"]),
                  st.text(max_size=200))

topologies = st.builds(
    pb.Topology, nodes=u32, gpus_per_node=u32, experts=u32,
    expert_device=st.lists(u32, max_size=40), alpha_intra=floats, alpha_inter=floats,
    bw_intra=floats, bw_inter=floats, bytes_per_route=u64,
)
# Near-valid specs reach deeper than uniform noise: small shapes, sometimes consistent.
small_topologies = st.builds(
    pb.Topology, nodes=st.integers(0, 3), gpus_per_node=st.integers(0, 3),
    experts=st.integers(0, 12), expert_device=st.lists(st.integers(0, 9), max_size=12),
    bw_intra=st.sampled_from([0.0, -1.0, 400e9, float("nan")]),
    bw_inter=st.sampled_from([0.0, 100e9, float("inf")]), bytes_per_route=st.integers(0, 9000),
)
specs = st.builds(
    pb.JobSpec, topology=st.one_of(topologies, small_topologies), world_size=u32,
    samples_per_device=st.one_of(st.integers(0, 4), u32), objective=names, method=names,
    deadline_ms=st.one_of(st.integers(0, 300), u32),
)


ITEMSIZE = {pb.COUNTS_DTYPE_UINT8: 1, pb.COUNTS_DTYPE_UINT16: 2, pb.COUNTS_DTYPE_UINT32: 4}


@st.composite
def counts_msgs(draw: st.DrawFn) -> pb.Counts | None:
    """Absent, valid for the fuzz job ([2, 4] in a known dtype), or Counts whose dtype (known,
    UNSPECIFIED or any int32, as enums are), shape (any rank, huge sizes) and byte length (often
    consistent, sometimes off by a few) are drawn independently."""
    kind = draw(st.sampled_from(["absent", "valid", "valid", "fuzzed", "fuzzed", "fuzzed"]))
    if kind == "absent":
        return None
    if kind == "valid":
        dtype = draw(st.sampled_from(list(ITEMSIZE)))
        size = 8 * ITEMSIZE[dtype]
        return pb.Counts(data=draw(st.binary(min_size=size, max_size=size)), dtype=dtype,
                         shape=[2, 4])
    dim = st.one_of(st.integers(0, 6), u32)
    shape = draw(st.one_of(st.lists(dim, min_size=2, max_size=2), st.lists(dim, max_size=4)))
    dtype = draw(st.one_of(st.sampled_from([0, *ITEMSIZE]), st.integers(-(2**31), 2**31 - 1)))
    size = math.prod(shape) * ITEMSIZE.get(dtype, 1)
    if size <= 256 and draw(st.booleans()):
        size = max(size + draw(st.sampled_from([0, 0, -1, 1, 3])), 0)
        data = draw(st.binary(min_size=size, max_size=size))
    else:
        data = draw(st.binary(max_size=64))
    return pb.Counts(data=data, dtype=dtype, shape=shape)


def reports_for(job: st.SearchStrategy[str]) -> st.SearchStrategy[pb.Report]:
    return st.builds(
        pb.Report, job=job, step=st.one_of(st.integers(0, 3), u64),
        layer=st.one_of(st.integers(0, 3), u32), rank=st.one_of(st.integers(0, 3), u32),
        # Often the fuzz job's two unique ids, so the counts get checked too.
        sample_ids=st.one_of(st.lists(st.integers(0, 20), min_size=2, max_size=2, unique=True),
                             st.lists(st.one_of(st.integers(0, 20), u64), max_size=12)),
        gather=counts_msgs(), scatter=counts_msgs(),
    )


# The fuzz target job: 2 ranks x 2 samples x 4 experts, so [2, 4] counts can be valid.
FUZZ_SPEC = job_spec(nodes=2, gpus=1, experts=4, spd=2, deadline_ms=50)


def check_plan(plan: pb.Plan, seen: dict[str, int]) -> None:
    """Checks a plan's status and form; seen counts plans by status and, for INVALID ones, by
    the field their error names first."""
    kind = pb.PlanStatus.Name(plan.status)
    if plan.status == pb.PLAN_STATUS_INVALID:
        kind += " " + plan.error.split(" ", 1)[0].split("=")[0]
    seen[kind] = seen.get(kind, 0) + 1
    if plan.status == pb.PLAN_STATUS_INVALID:
        assert plan.error and not plan.held_ids
    else:
        assert plan.status in (pb.PLAN_STATUS_OPTIMAL, pb.PLAN_STATUS_FEASIBLE,
                               pb.PLAN_STATUS_FALLBACK), plan
        assert len(plan.held_ids) == FUZZ_SPEC.samples_per_device


def expect_handled(call: object) -> None:
    """Runs call(); an RpcError must carry an expected code and a message."""
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        assert err.code() in EXPECTED_CODES, (err.code(), err.details())
        assert err.details()


@short_and_long("examples", 120, 1500)
def test_fuzz_proto_fields(fuzz_server: ServerHandle, examples: int) -> None:
    bystander = Bystander(fuzz_server)
    channel = grpc.insecure_channel(fuzz_server.address)
    stub = placement_pb2_grpc.PlacementServiceStub(channel)
    counter = iter(range(10**9))
    tried = {"RegisterJob": 0, "Solve": 0, "Stream": 0, "UnregisterJob": 0, "valid specs": 0}
    plans: dict[str, int] = {}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        # Draw everything first: hypothesis may abandon an example inside a draw, which must not
        # happen between registering a job and unregistering it.
        job = f"fz{next(counter)}"  # a fresh job per example: steps never collide across them
        jobs = st.one_of(st.just(job), names)
        spec, spec_job = data.draw(specs), data.draw(names)
        reports = data.draw(st.lists(reports_for(jobs), max_size=3))
        stream = data.draw(st.lists(reports_for(jobs), min_size=1, max_size=4))
        gone = data.draw(names)
        created = [job]

        def register() -> None:
            reply = stub.RegisterJob(pb.RegisterJobRequest(job=spec_job, spec=spec), timeout=10)
            if reply.created:  # a fuzzed spec that happens to be valid
                created.append(reply.job)

        stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=FUZZ_SPEC), timeout=10)
        try:
            expect_handled(register)
            expect_handled(lambda: [check_plan(p, plans) for p in stub.Solve(
                pb.SolveRequest(reports=reports), timeout=10).plans])
            expect_handled(lambda: [check_plan(p, plans)
                                    for p in stub.Stream(iter(stream), timeout=10)])
            expect_handled(lambda: stub.UnregisterJob(pb.UnregisterJobRequest(job=gone),
                                                      timeout=10))
        finally:
            for name in created:  # the fuzzed UnregisterJob may have removed one already
                expect_handled(lambda name=name: stub.UnregisterJob(
                    pb.UnregisterJobRequest(job=name), timeout=10))
        tried["valid specs"] += len(created) - 1
        for name in ("RegisterJob", "Solve", "Stream", "UnregisterJob"):
            tried[name] += 1

    try:
        fuzz()
        assert serving(fuzz_server.address)
    finally:
        bystander.stop()
        channel.close()
    assert bystander.rounds > 0 and bystander.statuses == {pb.PLAN_STATUS_OPTIMAL}
    print(f"\nfuzz proto fields: {examples} examples, calls {tried}; plans {plans}; "
          f"bystander job solved {bystander.rounds} rounds meanwhile, all optimal")


# --- fuzzing: random bytes to every method reflection lists ------------------------------------

def reflected_methods(address: str) -> list[tuple[str, bool, bool]]:
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(db)
        return [(f"/{name}/{m.name}", m.client_streaming, m.server_streaming)
                for name in db.get_services()
                for m in pool.FindServiceByName(name).methods]


@short_and_long("examples", 100, 1000)
def test_fuzz_random_bytes_on_every_reflected_method(
    fuzz_server: ServerHandle, examples: int
) -> None:
    methods = reflected_methods(fuzz_server.address)
    assert {m for m, _, _ in methods} >= {
        "/netmoe.v1.PlacementService/Stream", "/netmoe.v1.PlacementService/Solve",
        "/netmoe.v1.PlacementService/RegisterJob", "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"}
    bystander = Bystander(fuzz_server)
    channel = grpc.insecure_channel(fuzz_server.address)
    codes: dict[str, int] = {}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(messages=st.lists(st.binary(max_size=600), min_size=1, max_size=3))
    def fuzz(messages: list[bytes]) -> None:
        for path, client_stream, server_stream in methods:
            kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                    (True, False): channel.stream_unary, (True, True): channel.stream_stream}
            call = kind[client_stream, server_stream](path)
            request_ = iter(messages) if client_stream else messages[0]
            try:
                result = call(request_, timeout=0.5 if server_stream else 10)
                if server_stream:
                    list(result)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
                # Health Watch streams until cancelled: the client deadline ends it.
                allowed = EXPECTED_CODES | (
                    {grpc.StatusCode.DEADLINE_EXCEEDED} if server_stream else set())
                assert code in allowed, (path, code, err.details())
            codes[code.name] = codes.get(code.name, 0) + 1

    try:
        fuzz()
        assert serving(fuzz_server.address)
    finally:
        bystander.stop()
        channel.close()
    assert codes.get("INVALID_ARGUMENT", 0) > 0  # garbage was seen as garbage
    assert bystander.rounds > 0 and bystander.statuses == {pb.PLAN_STATUS_OPTIMAL}
    print(f"\nfuzz random bytes: {examples} examples x {len(methods)} reflected methods, "
          f"codes {codes}; bystander solved {bystander.rounds} rounds, all optimal")


