"""A tenant with a token against the expert advisor and job identity (issue 28 rows 3, 4, 6, 9,
10), on a real server on a loopback port: each hostile request is refused naming the field, the
value and the limit, and a bystander job's rounds stay optimal within their deadline meanwhile."""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import pytest

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.protos.convert import report_to_proto
from netmoe.round import RoundCounts
from netmoe.server.advisor import MAX_BYTES, AdviceArgs, ExpertAdvisor, WindowLimits
from netmoe.server.app import ServerHandle, start
from netmoe.server.config import ServerConfig
from netmoe.solver import Topology

from support import (
    MARGIN_S,
    Bystander,
    counts,
    job_spec,
    make_ca,
    make_leaf,
    round_reports,
    short_and_long,
    shuffled_reports,
    wait_for,
)

NODES, GPUS, EXPERTS, SPD = 2, 2, 8, 2
TOPO = Topology(NODES, GPUS, EXPERTS)
T = TypeVar("T")


@pytest.fixture
def stub(server: ServerHandle) -> Iterator[placement_pb2_grpc.PlacementServiceStub]:
    channel = grpc.insecure_channel(server.address)
    yield placement_pb2_grpc.PlacementServiceStub(channel)
    channel.close()


# --- an expert job with a window ----------------------------------------------------------------

def expert_job(stub: placement_pb2_grpc.PlacementServiceStub, job: str, layers: int = 0
               ) -> None:
    stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=job_spec(
        nodes=NODES, gpus=GPUS, experts=EXPERTS, spd=SPD, layers=layers)), timeout=30)


def feed(stub: placement_pb2_grpc.PlacementServiceStub, job: str, steps: range, layers: int
         ) -> None:
    """Solves steps of `layers` MoE layers (unary Solve); ids follow the samples across layers,
    so every step is complete in the job's window."""
    j, n = NODES * GPUS, SPD
    rows = [slice(r * n, (r + 1) * n) for r in range(j)]
    for step in steps:
        rng = np.random.default_rng(step)
        routes = np.stack([counts(rng, j * n, NODES, EXPERTS) for _ in range(layers)])
        for layer, (ids, g, s) in enumerate(shuffled_reports(routes, step)):
            reports = [report_to_proto(job, step, layer, r, RoundCounts(
                ids[rows[r]], g[rows[r]], None if s is None else s[rows[r]])) for r in range(j)]
            stub.Solve(pb.SolveRequest(reports=reports), timeout=30)


def refusal(call: Callable[[], object]) -> tuple[grpc.RpcError, float]:
    """The error a call fails with and the seconds until it did."""
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value, time.monotonic() - t0


def recommend(job: str, **fields: object) -> pb.RecommendExpertsRequest:
    return pb.RecommendExpertsRequest(**{"job": job, "horizon_steps": 100,
                                         "bytes_per_expert": 1 << 20, **fields})


# --- row 3: ConfirmExperts sized by the job, not by the request -------------------------------

@short_and_long("layers", 100_000, 1_000_000)
def test_confirm_with_more_layers_than_the_job_is_refused_before_reading_them(
    stub: placement_pb2_grpc.PlacementServiceStub, bystander: Bystander, layers: int
) -> None:
    expert_job(stub, "t", layers=4)
    request = pb.ConfirmExpertsRequest(
        job="t", step=1, maps=[pb.ExpertMap(device=TOPO.expert_device.tolist())] * layers)
    err, took = refusal(lambda: stub.ConfirmExperts(request, timeout=60))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"maps has {layers} layers, the job's spec.layers allows 1 to 4" in err.details()
    assert took < MARGIN_S
    # Copies and route tables are sized by the maps and the job before any is read.
    four = [pb.ExpertMap(device=TOPO.expert_device.tolist())] * 4
    copies = [pb.LayerCopies(copies=[pb.ExpertCopy(expert=1, device=3)] * 1000)] * 4
    cases = [
        (pb.ConfirmExpertsRequest(job="t", step=1, maps=four, copies=copies[:3]),
         "copies has 3 layers, need 0 or one per map layer (4)"),
        (pb.ConfirmExpertsRequest(job="t", step=1, maps=four, route_tables=[pb.RouteTable()] * 5),
         "route_tables has 5 layers, need 0 or one per map layer (4)"),
        (pb.ConfirmExpertsRequest(job="t", step=1, maps=four, copies=copies),
         "copies lists 4000 copies, 4 layers of 8 experts on 4 devices hold at most 96"),
    ]
    for bad, needle in cases:
        err, _ = refusal(lambda bad=bad: stub.ConfirmExperts(bad, timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.details()
    stub.ConfirmExperts(pb.ConfirmExpertsRequest(job="t", step=1, maps=four), timeout=30)
    bystander.wait_rounds(1)


def test_a_confirmed_version_is_bounded_in_bytes(
    stub: placement_pb2_grpc.PlacementServiceStub, bystander: Bystander
) -> None:
    """On a 1024-GPU job, route tables of 8 layers would hold 8 x 1024 x 1024 x 9 bytes: refused
    RESOURCE_EXHAUSTED from the request's layer counts alone (its maps are empty)."""
    stub.RegisterJob(pb.RegisterJobRequest(job="wide", spec=job_spec(
        nodes=128, gpus=8, experts=1024, spd=1, layers=8)), timeout=30)
    big = pb.ConfirmExpertsRequest(job="wide", step=1, maps=[pb.ExpertMap()] * 8,
                                   route_tables=[pb.RouteTable()] * 8)
    err, took = refusal(lambda: stub.ConfirmExperts(big, timeout=30))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    size = 8 * 1024 * 8 + 9 * 8 * 1024 * 1024
    assert (f"hold {size} bytes, over the server's max_confirmed_bytes={64 << 20} per confirmed "
            f"version") in err.details()
    assert took < MARGIN_S
    # Within the bound the maps themselves are checked next.
    small = pb.ConfirmExpertsRequest(job="wide", step=1, maps=[pb.ExpertMap()] * 4,
                                     route_tables=[pb.RouteTable()] * 4)
    err, _ = refusal(lambda: stub.ConfirmExperts(small, timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maps: layers [0, 1, 2, 3] list [0] experts, need 1024" in err.details()
    bystander.wait_rounds(1)


# --- row 10: a confirmation disagreeing with the window ---------------------------------------

def test_confirm_disagreeing_with_the_window_is_refused_and_the_advisor_goes_on(
    stub: placement_pb2_grpc.PlacementServiceStub, bystander: Bystander
) -> None:
    expert_job(stub, "w")
    feed(stub, "w", range(4), layers=2)
    three = [pb.ExpertMap(device=TOPO.expert_device.tolist())] * 3
    err, _ = refusal(lambda: stub.ConfirmExperts(
        pb.ConfirmExpertsRequest(job="w", step=4, maps=three), timeout=30))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maps has 3 layers of 8 experts, the job reported 2 layers" in err.details()
    rec = stub.RecommendExperts(recommend("w"), timeout=60)
    assert len(rec.maps) == 2 and (rec.fit_first_step, rec.held_out_last_step) == (0, 3)
    stub.ConfirmExperts(pb.ConfirmExpertsRequest(job="w", step=4, maps=rec.maps), timeout=30)
    again = stub.RecommendExperts(recommend("w"), timeout=60)
    assert [list(m.device) for m in again.current] == [list(m.device) for m in rec.maps]
    bystander.wait_rounds(1)


def test_a_window_that_disagrees_with_earlier_confirmed_maps_never_wedges_a_fit() -> None:
    """Maps confirmed before any report (3 layers, within the job's 4) and a window of 2: the
    fit starts from the confirmed maps' first 2 layers instead of failing on their shape."""
    adv = ExpertAdvisor(TOPO, WindowLimits(), layers=4)
    swapped = np.array([[0, 0, 2, 2, 1, 1, 3, 3], [1, 1, 0, 0, 3, 3, 2, 2], [0, 1, 2, 3] * 2])
    adv.confirm(0, swapped)
    rng = np.random.default_rng(0)
    for step in range(4):
        routes = np.stack([counts(rng, NODES * GPUS * SPD, NODES, EXPERTS) for _ in range(2)])
        for layer, (ids, g, s) in enumerate(shuffled_reports(routes, step)):
            adv.observe((step, layer), ids, g, s is not None)
    advice = adv.advise(horizon_steps=100, bytes_per_expert=1 << 20)
    assert np.array(advice.evaluation.current).tolist() == swapped[:2].tolist()


# --- rows 9 and 4: RecommendExperts' numbers within the server's limits -----------------------

U32, U64 = (1 << 32) - 1, (1 << 64) - 1


OUT_OF_RANGE = [
    ("bytes_per_expert", 1 << 63, f"bytes_per_expert={1 << 63} is over the server's limit "
                                  f"{1 << 40}"),
    ("bytes_per_expert", U64, f"bytes_per_expert={U64} is over the server's limit {1 << 40}"),
    ("grad_bytes_per_expert", 1 << 63, f"grad_bytes_per_expert={1 << 63} is over the server's "
                                       f"limit {1 << 40}"),
    ("starts", U32, f"starts={U32} is over the server's limit 64"),
    ("horizon_steps", U32, f"horizon_steps={U32} is over the server's limit {1 << 30}"),
    ("held_out_steps", U32, f"held_out_steps={U32} is over the server's limit 32"),
    ("replica_slots", U32, f"replica_slots={U32}: slots={U32} copies per device do not fit"),
    ("max_load_ratio", math.nan, "max_load_ratio must be a number >= 1"),
]


def test_recommend_numbers_out_of_range_are_invalid_argument(
    stub: placement_pb2_grpc.PlacementServiceStub, bystander: Bystander,
    caplog: pytest.LogCaptureFixture
) -> None:
    """Each refused at once, nothing logged (2^63 gave UNKNOWN and a traceback per call); the
    window was there, so a fit would have run."""
    expert_job(stub, "n")
    feed(stub, "n", range(4), layers=2)
    for field, value, needle in OUT_OF_RANGE:
        with caplog.at_level(logging.ERROR):
            err, took = refusal(lambda field=field, value=value: stub.RecommendExperts(
                recommend("n", **{field: value}), timeout=30))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert needle in err.details()
        assert took < MARGIN_S
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(stub.RecommendExperts(recommend("n"), timeout=60).maps) == 2


def test_bytes_at_the_limit_answer_in_range(
    server: ServerHandle, stub: placement_pb2_grpc.PlacementServiceStub
) -> None:
    expert_job(stub, "n")
    feed(stub, "n", range(4), layers=2)
    rec = stub.RecommendExperts(recommend("n", bytes_per_expert=1 << 40, replica_slots=1,
                                          grad_bytes_per_expert=1 << 40), timeout=60)
    assert rec.migration_bytes == rec.moved_experts << 40
    assert rec.replicas.memory_bytes % (1 << 40) == 0


def test_bytes_times_the_jobs_experts_stay_64_bit() -> None:
    adv = ExpertAdvisor(Topology(1, 8, 8192), WindowLimits(), layers=1024)
    with pytest.raises(ValueError, match=rf"bytes_per_expert={1 << 40} times the job's layers x "
                                         rf"experts \(8388608\) exceeds {MAX_BYTES} bytes"):
        adv.check(AdviceArgs(horizon_steps=1, bytes_per_expert=1 << 40))
    adv.check(AdviceArgs(horizon_steps=1, bytes_per_expert=1 << 39))


# --- row 4: fits per job -------------------------------------------------------------------------

def test_one_jobs_fit_never_delays_another_job_and_unregister_drops_it(
    server: ServerHandle, stub: placement_pb2_grpc.PlacementServiceStub, bystander: Bystander
) -> None:
    """Job a's fit thread is held (a fit that does not end); job b's RecommendExperts and
    UnregisterJob answer meanwhile, the bystander's rounds stay optimal, and a's own
    unregistration answers at once: a's queued RecommendExperts then fails NOT_FOUND and a's fit
    thread ends."""
    for job in ("a", "b"):
        expert_job(stub, job)
        feed(stub, job, range(4), layers=3)
    advisors = server.server.advisors
    gate = threading.Event()
    held = advisors.fit("a", lambda: gate.wait(120))
    try:
        queued = stub.RecommendExperts.future(recommend("a"), timeout=120)
        rec = stub.RecommendExperts(recommend("b"), timeout=60)
        assert len(rec.maps) == 3
        bystander.wait_rounds(1)
        stub.UnregisterJob(pb.UnregisterJobRequest(job="b"), timeout=30)
        assert not queued.done() and not held.done()
        stub.UnregisterJob(pb.UnregisterJobRequest(job="a"), timeout=30)
        assert not held.done()
    finally:
        gate.set()
    with pytest.raises(grpc.RpcError) as err:
        queued.result()
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "job 'a' was unregistered before its fit answered" in err.value.details()
    with pytest.raises(KeyError):
        held.result(timeout=60)
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("netmoe-fit-a")])
    bystander.wait_rounds(1)


# --- row 6: certificate identity -----------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca signs the server, "client" (CN=client) and three certificates naming nobody: two
    without a common name (other O each) and one whose common name is blank (a space; the
    openssl CLI refuses an empty one, and gRPC reports a missing one as empty)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI to make a throwaway CA")
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth")
    client = "extendedKeyUsage=clientAuth"
    make_leaf(d, "client", "ca", client)
    make_leaf(d, "tenant-a", "ca", client, subject="/O=tenant-a")
    make_leaf(d, "tenant-b", "ca", client, subject="/O=tenant-b")
    make_leaf(d, "blank", "ca", client, subject="/O=tenant-c/CN=\\ ")
    return d


def _channel(address: str, pki: Path, client: str) -> grpc.Channel:
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        private_key=(pki / f"{client}.key").read_bytes(),
        certificate_chain=(pki / f"{client}.pem").read_bytes()))


def every_call(them: placement_pb2_grpc.PlacementServiceStub, spec: pb.JobSpec,
               reports: list[pb.Report]) -> list[Callable[[], object]]:
    """Every method, on job "nameless" (to register) or the bystander (to touch)."""
    return [
        lambda: them.RegisterJob(pb.RegisterJobRequest(job="nameless", spec=spec)),
        lambda: them.UnregisterJob(pb.UnregisterJobRequest(job="bystander")),
        lambda: them.Solve(pb.SolveRequest(reports=reports)),
        lambda: them.RecommendExperts(recommend("bystander")),
        lambda: them.ConfirmExperts(pb.ConfirmExpertsRequest(job="bystander")),
        lambda: next(them.Stream(iter([reports[0]]))),
    ]


def test_certificates_naming_nobody_are_refused_when_jobs_are_bound(pki: Path) -> None:
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0,
                                tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                                tls_client_ca=str(pki / "ca.pem"), bind_jobs_to_certs=True))
    spec = job_spec(nodes=2, gpus=2, experts=8, spd=4)
    reports = round_reports("nameless", spec, 0, 0, seed=0)
    try:
        with _channel(handle.address, pki, "client") as owner_channel, Bystander(
                handle.address, channel=_channel(handle.address, pki, "client")) as bystander:
            owner = placement_pb2_grpc.PlacementServiceStub(owner_channel)
            bystander.wait_rounds(1)
            nobody = "has none or a blank one"
            for name, why in (("tenant-a", f"(subject 'O=tenant-a') {nobody} (CN='')"),
                              ("tenant-b", f"(subject 'O=tenant-b') {nobody} (CN='')"),
                              ("blank", f"{nobody} (CN=' ')")):
                with _channel(handle.address, pki, name) as channel:
                    them = placement_pb2_grpc.PlacementServiceStub(channel)
                    for call in every_call(them, spec, reports):
                        err, _ = refusal(call)
                        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, name
                        assert why in err.details() and "--bind-jobs-to-certs" in err.details()
            # Nothing of theirs was registered; the owner's job and rounds are untouched.
            assert owner.RegisterJob(pb.RegisterJobRequest(job="nameless", spec=spec)).created
            bystander.wait_rounds(1)
            bystander.stop()
    finally:
        handle.stop()
