"""Expert copies in the service: RecommendExperts with a replica budget, ConfirmExperts with
copies, rounds solved with replica-aware costs, metrics; pure advisor and a real grpc.aio server
on an ephemeral loopback port."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.protos.convert import report_to_proto
from netmoe.round import RoundCounts
from netmoe.server.advisor import ExpertAdvisor, WindowLimits
from netmoe.server.app import ServerHandle
from netmoe.server.errors import FieldError
from netmoe.solver import Topology, solve

from support import advisor_settled, scrape, shuffled_reports

NODES, GPUS, EXPERTS, SPD, LAYERS = 2, 2, 8, 2, 3
TOPO = Topology(NODES, GPUS, EXPERTS, bytes_per_route=8192)
# Two domains with three experts each, and expert 0 that every sample uses heavily: joint
# placement can put only one domain next to expert 0, a copy of it serves the other.
DOMAINS = ([1, 2, 3], [5, 6, 7])
HOT = 0


def step_routes(step: int) -> np.ndarray:
    """[L, I, E] routes of one step; sample i is of domain i % 2."""
    rng = np.random.default_rng(step)
    out = rng.poisson(0.2, size=(LAYERS, NODES * GPUS * SPD, EXPERTS))
    for i in range(out.shape[1]):
        out[:, i, DOMAINS[i % 2]] += rng.poisson(4.0, (LAYERS, 3))
        out[:, i, HOT] += rng.poisson(8.0, LAYERS)
    return out


def step_reports(step: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    return shuffled_reports(step_routes(step), step)


def _fill(adv: ExpertAdvisor, steps: int) -> None:
    for step in range(steps):
        for layer, (ids, g, s) in enumerate(step_reports(step)):
            adv.observe((step, layer), ids, g, s is not None)


def _recount(counts: np.ndarray, owners: np.ndarray, copies: list[tuple[int, int]],
             device: np.ndarray) -> int:
    """Inter-node routes of one layer [I, E] placed on device [I], route by route: a route
    crosses nodes unless its expert has a holder on the sample's node."""
    nodes = [{int(d) // GPUS} for d in owners]
    for e, d in copies:
        nodes[e].add(d // GPUS)
    return sum(int(n) for i, row in enumerate(counts) for e, n in enumerate(row)
               if device[i] // GPUS not in nodes[e])


# ------------------------------------------------------------------------------- pure advisor


def test_advice_copies_the_shared_expert() -> None:
    adv = ExpertAdvisor(TOPO, WindowLimits())
    _fill(adv, 6)
    plain = adv.advise(horizon_steps=100, bytes_per_expert=1 << 20)
    assert plain.replicas is None and plain.predicted_copies_saving_per_step is None
    advice = adv.advise(horizon_steps=100, bytes_per_expert=1 << 20, replica_slots=1,
                        unit="bytes")
    rec, ev = advice.replicas, advice.replica_evaluation
    maps = np.array(advice.recommendation.maps)
    for layer, copies in enumerate(rec.copies):
        # The shared expert gets a copy on the node its owner is not on.
        assert any(e == HOT and d // GPUS != maps[layer, HOT] // GPUS for e, d in copies)
    assert ev.total.inter < ev.experts.joint.inter
    # The copies' evaluation is the same held-out replay as the plain one for the maps.
    assert ev.experts.joint == plain.evaluation.joint
    assert advice.predicted_copies_saving_per_step == pytest.approx(
        (ev.experts.joint.inter - ev.total.inter) / 3)
    assert rec.adopt and rec.sync_per_step == 0 and "copies save" in rec.reason
    costly = adv.advise(horizon_steps=100, bytes_per_expert=1 << 20, replica_slots=1,
                        unit="bytes", grad_bytes=1 << 40)
    assert costly.replicas.n_copies == 0 and not costly.replicas.adopt
    with pytest.raises(ValueError, match="replica_slots=7: slots=7 copies per device do not"):
        adv.advise(horizon_steps=100, bytes_per_expert=1, replica_slots=7)


def test_confirmed_copies_apply_from_their_step() -> None:
    adv = ExpertAdvisor(TOPO, WindowLimits())
    adv.saw_step(2)
    maps = np.tile(TOPO.expert_device, (LAYERS, 1))
    copies = [[(0, 2)], [], [(7, 0), (6, 1)]]
    for bad, message in (
        ([[(0, 0)], [], []], r"copies\[0\]\[0\]: expert 0 of layer 0 is owned by device 0"),
        ([[(8, 2)], [], []], r"copies\[0\]\[0\] names expert 8"),
        ([[(1, 4)], [], []], r"copies\[0\]\[0\] names device 4"),
        ([[(1, 2)]], r"copies has 1 layers, need 0 or one per map layer \(3\)"),
    ):
        with pytest.raises(FieldError, match=message) as err:
            adv.confirm(3, maps, bad)
        assert err.value.field == "copies"
    adv.confirm(3, maps)
    assert adv.holders((3, 0)) is None
    adv.confirm(4, maps, copies)
    assert adv.holders((3, 1)) is None
    gather, scatter = adv.holders((4, 1))
    assert gather.sum() == EXPERTS and scatter[7, 0] and scatter[6, 1] and scatter.sum() == 10
    assert adv.holders((4, LAYERS - 1))[1] is None
    routes = step_routes(4)
    home = np.repeat(np.arange(4), SPD)
    plan = adv.solve_with_copies((4, 1), routes[1], routes[2], home)
    device = np.array(plan.dest)
    assert plan.after.inter == (_recount(routes[1], maps[1], [], device)
                                + _recount(routes[2], maps[2], copies[2], device))
    assert adv.solve_with_copies((3, 1), routes[1], routes[2], home) is None


# ------------------------------------------------------------------------------- over gRPC


def _solve_step(stub: placement_pb2_grpc.PlacementServiceStub, job: str, step: int
                ) -> list[pb.SolveResponse]:
    out = []
    for layer, (ids, g, s) in enumerate(step_reports(step)):
        rows = [slice(r * SPD, (r + 1) * SPD) for r in range(NODES * GPUS)]
        reports = [report_to_proto(job, step, layer, r, RoundCounts(
            ids[rows[r]], g[rows[r]], None if s is None else s[rows[r]]))
            for r in range(NODES * GPUS)]
        out.append(stub.Solve(pb.SolveRequest(reports=reports)))
    return out


def test_recommend_confirm_copies_and_replica_aware_rounds(server: ServerHandle) -> None:
    job = "replicas"
    with grpc.insecure_channel(server.address) as channel:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)
        stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=pb.JobSpec(
            topology=pb.Topology(nodes=NODES, gpus_per_node=GPUS, experts=EXPERTS,
                                 bw_intra=400e9, bw_inter=100e9, bytes_per_route=8192),
            world_size=NODES * GPUS, samples_per_device=SPD, deadline_ms=5000)))
        for step in range(6):
            _solve_step(stub, job, step)
        with pytest.raises(grpc.RpcError) as err:
            stub.RecommendExperts(pb.RecommendExpertsRequest(
                job=job, horizon_steps=10, bytes_per_expert=1000, replica_slots=7))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "replica_slots=7" in err.value.details()

        plain = stub.RecommendExperts(pb.RecommendExpertsRequest(
            job=job, horizon_steps=1000, bytes_per_expert=1 << 20))
        assert not plain.HasField("replicas")
        rec = stub.RecommendExperts(pb.RecommendExpertsRequest(
            job=job, horizon_steps=1000, bytes_per_expert=1 << 20, replica_slots=1,
            grad_bytes_per_expert=1 << 10, unit="bytes"))
        rep = rec.replicas
        assert rep.adopt, rep.reason
        assert rep.replicated.inter < rec.joint.inter
        assert rep.sync_per_step == 2 * (1 << 10) * rep.cross_node_copies
        assert rep.net_per_step == pytest.approx(rep.saving_per_step - rep.sync_per_step)
        assert math.isfinite(rep.break_even_steps) and rep.memory_bytes > 0
        maps = np.array([list(m.device) for m in rec.maps])
        copies = [[(c.expert, c.device) for c in layer.copies] for layer in rep.copies]
        assert len(copies) == LAYERS and all(copies)

        owner = int(maps[0, 1])
        with pytest.raises(grpc.RpcError) as err:
            stub.ConfirmExperts(pb.ConfirmExpertsRequest(
                job=job, step=6, maps=rec.maps,
                copies=[pb.LayerCopies(copies=[pb.ExpertCopy(expert=1, device=owner)])] * 3))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"expert 1 of layer 0 is owned by device {owner}" in err.value.details()
        stub.ConfirmExperts(pb.ConfirmExpertsRequest(job=job, step=6, maps=rec.maps,
                                                     copies=rep.copies))

        # Step 6 is solved knowing the copies: the plans' routes recount from their devices,
        # and never exceed what the same maps give without copies.
        responses = _solve_step(stub, job, 6)
        replicated = joint = 0
        for layer, (resp, (_, g, s)) in enumerate(zip(responses, step_reports(6), strict=True)):
            device = np.concatenate([list(p.dest) for p in resp.plans])
            want = _recount(g, maps[layer], copies[layer], device)
            stopo = None
            if s is not None:
                want += _recount(s, maps[layer + 1], copies[layer + 1], device)
                stopo = TOPO.with_experts(maps[layer + 1])
            after = resp.plans[0].after.inter
            assert after == want
            bare = solve(TOPO.with_experts(maps[layer]), g, s, scatter_topology=stopo)
            assert after <= bare.after.inter
            replicated, joint = replicated + after, joint + bare.after.inter
        assert replicated < joint

        advisor_settled(server)
        metrics = scrape(server.metrics_port)
        key = (("job", job),)
        assert metrics[("netmoe_replica_predicted_saving_routes", key)] == pytest.approx(
            (rec.joint.inter - rep.replicated.inter) / 3)
        got = {p: metrics[("netmoe_replica_realized_routes_total", (("job", job),
                                                                    ("placement", p)))]
               for p in ("replicated", "joint")}
        assert got == {"replicated": replicated, "joint": joint}
        stub.UnregisterJob(pb.UnregisterJobRequest(job=job))
        advisor_settled(server)
        assert not any(name.startswith("netmoe_replica") and dict(labels).get("job") == job
                       for name, labels in scrape(server.metrics_port))
