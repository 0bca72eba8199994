"""Load-aware expert placement in the service: RecommendExperts with a load bound, ConfirmExperts
with route tables, rounds routed by them, load metrics; pure advisor and a real grpc.aio server
on an ephemeral loopback port."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from test_replica_service import (
    EXPERTS,
    GPUS,
    LAYERS,
    NODES,
    TOPO,
    _fill,
    _recount,
    _solve_step,
    step_reports,
    step_routes,
)

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.protos.convert import tables_from_proto
from netmoe.server.advisor import ExpertAdvisor, WindowLimits
from netmoe.server.app import ServerHandle
from netmoe.server.errors import FieldError
from netmoe.solver.balance import check_tables, load_summary
from netmoe.solver.replicas import check_copies

from support import advisor_settled, scrape

J = NODES * GPUS


def test_advice_under_a_load_bound_reports_tables_loads_and_costs() -> None:
    adv = ExpertAdvisor(TOPO, WindowLimits())
    _fill(adv, 6)
    advice = adv.advise(horizon_steps=100, bytes_per_expert=1 << 20, replica_slots=1,
                        unit="bytes", max_load_ratio=1.05)
    ev = advice.replica_evaluation
    maps = np.array(advice.recommendation.maps)
    holders = check_copies("copies", ev.copies, TOPO, maps)
    check_tables("tables", ev.tables, TOPO, holders)  # every entry a holder, within the rule
    assert advice.load == load_summary(ev.loads)
    assert advice.joint_load is not None and advice.load[0] <= advice.load[1]
    assert "the load bound costs" in advice.replicas.reason
    assert "routes only would leave the busiest device at" in advice.replicas.reason
    frozen = adv.advise(horizon_steps=100, bytes_per_expert=1 << 20, replica_slots=1,
                        migration_budget=0)
    assert frozen.recommendation.moved_experts == 0
    for kwargs, message in (({"max_load_ratio": 0.5}, "max_load_ratio must be a number >= 1"),
                            ({"migration_budget": -1}, "migration_budget must be an integer")):
        with pytest.raises(ValueError, match=message):
            adv.advise(horizon_steps=100, bytes_per_expert=1, **kwargs)


def test_confirmed_tables_route_the_rounds() -> None:
    adv = ExpertAdvisor(TOPO, WindowLimits())
    adv.saw_step(2)
    maps = np.tile(TOPO.expert_device, (LAYERS, 1))
    copies = [[(0, 1)], [], [(7, 0)]]
    # Default rule, [L][J][E]: owners, except expert 0 of layer 0 on node 0 and expert 7 of
    # layer 2 on node 0, where copies sit.
    tables = np.tile(TOPO.expert_device, (LAYERS, J, 1))
    tables[2, :2, 7] = 0
    balanced = tables.copy()
    balanced[0, 1, 0] = 1  # device 1 holds its copy: serves itself
    for bad, message in (
        ((0, 0, 5, 3), r"route_tables\[0\]\[0\]\[5\]=3 names a device that does not hold "
                       r"expert 5 of layer 0 \(its owner and copies: \[2\]\)"),
        ((0, 1, 0, 0), r"route_tables\[0\]\[1\]\[0\]=0: device 1 holds expert 0 and must serve "
                       r"its own samples"),
        ((2, 1, 7, 3), r"route_tables\[2\]\[1\]\[7\]=3: node 0 holds expert 7, the table sends "
                       r"its routes to node 1"),
    ):
        wrong = balanced.copy()
        wrong[bad[:3]] = bad[3]
        with pytest.raises(FieldError, match=message) as err:
            adv.confirm(3, maps, copies, wrong)
        assert err.value.field == "route_tables"
    adv.confirm(3, maps, copies, balanced)
    gather, scatter = adv.tables((3, 1))
    assert gather.shape == (EXPERTS, J) and scatter[7, 1] == 0
    routes = step_routes(3)
    home = np.repeat(np.arange(J), 2)
    plan = adv.solve_with_copies((3, 0), routes[0], routes[1], home)
    device = np.array(plan.dest)
    assert plan.after.inter == (_recount(routes[0], maps[0], copies[0], device)
                                + _recount(routes[1], maps[1], [], device))


def test_recommend_confirm_tables_and_load_metrics(server: ServerHandle) -> None:
    job = "balanced"
    with grpc.insecure_channel(server.address) as channel:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)
        stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=pb.JobSpec(
            topology=pb.Topology(nodes=NODES, gpus_per_node=GPUS, experts=EXPERTS,
                                 bw_intra=400e9, bw_inter=100e9, bytes_per_route=8192),
            world_size=J, samples_per_device=2, deadline_ms=5000)))
        for step in range(6):
            _solve_step(stub, job, step)
        with pytest.raises(grpc.RpcError) as err:
            stub.RecommendExperts(pb.RecommendExpertsRequest(
                job=job, horizon_steps=10, bytes_per_expert=1000, max_load_ratio=0.5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_load_ratio must be a number >= 1" in err.value.details()
        assert "got 0.5" in err.value.details()

        rec = stub.RecommendExperts(pb.RecommendExpertsRequest(
            job=job, horizon_steps=1000, bytes_per_expert=1 << 20, replica_slots=1,
            max_load_ratio=1.05, unit="bytes"))
        rep = rec.replicas
        assert len(rep.route_tables) == LAYERS
        assert rep.HasField("load") and rep.HasField("joint_load")
        assert "the load bound costs" in rep.reason
        maps = np.array([list(m.device) for m in rec.maps])
        copies = [[(c.expert, c.device) for c in layer.copies] for layer in rep.copies]
        tables = tables_from_proto(rep.route_tables, J, EXPERTS)  # [L, J, E]

        wrong = tables.copy()
        e = int(np.flatnonzero(maps[0] != 3)[0])
        held = check_copies("c", copies, TOPO, maps)[0, e]
        d = next(d for d in range(J) if not held[d])
        wrong[0, d, e] = d
        bad = pb.ConfirmExpertsRequest(job=job, step=6, maps=rec.maps, copies=rep.copies,
                                       route_tables=[pb.RouteTable(device=t.ravel().tolist())
                                                     for t in wrong])
        with pytest.raises(grpc.RpcError) as err:
            stub.ConfirmExperts(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"route_tables[0][{d}][{e}]={d} names a device that does not hold" in \
            err.value.details()
        short = pb.ConfirmExpertsRequest(job=job, step=6, maps=rec.maps, copies=rep.copies,
                                         route_tables=[pb.RouteTable(device=[0])] * LAYERS)
        with pytest.raises(grpc.RpcError) as err:
            stub.ConfirmExperts(short)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "need devices x experts = 32" in err.value.details()
        stub.ConfirmExperts(pb.ConfirmExpertsRequest(job=job, step=6, maps=rec.maps,
                                                     copies=rep.copies,
                                                     route_tables=rep.route_tables))

        # Step 6 is routed by the confirmed tables: the realised load of each round's gather
        # layer recounts from its plan and the tables.
        responses = _solve_step(stub, job, 6)
        ratios = []
        for layer, (resp, (_, g, _)) in enumerate(zip(responses, step_reports(6), strict=True)):
            device = np.concatenate([list(p.dest) for p in resp.plans])
            load = np.zeros(J)
            for i, e in zip(*np.nonzero(g), strict=True):
                load[tables[layer, device[i], e]] += g[i, e]
            ratios.append(load.max() / load.mean())
        advisor_settled(server)  # realised figures are counted on the advisor thread
        metrics = scrape(server.metrics_port)
        key = (("job", job),)
        assert metrics[("netmoe_expert_predicted_load_ratio", key)] == pytest.approx(
            rep.load.mean)
        assert metrics[("netmoe_expert_realized_load_ratio_count", key)] == LAYERS
        assert metrics[("netmoe_expert_realized_load_ratio_sum", key)] == pytest.approx(
            sum(ratios))
        stub.UnregisterJob(pb.UnregisterJobRequest(job=job))
        advisor_settled(server)
        assert not any("load_ratio" in name and dict(labels).get("job") == job
                       for name, labels in scrape(server.metrics_port))
