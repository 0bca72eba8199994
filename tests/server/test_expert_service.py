"""Expert placement in the service: the window (pure) and RecommendExperts / ConfirmExperts on a
real grpc.aio server on an ephemeral loopback port, with metrics scraped over HTTP."""

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
from netmoe.server.errors import FieldError, NotEnoughData
from netmoe.solver import Topology, solve, traffic

from support import scrape, shuffled_reports

NODES, GPUS, EXPERTS, SPD, LAYERS = 2, 2, 8, 2, 3
TOPO = Topology(NODES, GPUS, EXPERTS, bw_intra=400e9, bw_inter=100e9, bytes_per_route=8192)
# Two domains; each uses two experts of every node under the default map (expert e on device
# e // 2), so wherever a sample sits, half its routes leave its node: only moving experts helps.
DOMAIN_EXPERTS = ([0, 1, 4, 5], [2, 3, 6, 7])


def domain_counts(rng: np.random.Generator, samples: int) -> np.ndarray:
    """[samples, E] routes: sample i of domain i % 2 routes mostly to its domain's experts."""
    c = rng.poisson(0.3, size=(samples, EXPERTS))
    for i in range(samples):
        c[i, DOMAIN_EXPERTS[i % 2]] += rng.poisson(6.0, 4)
    return c


def step_routes(step: int) -> np.ndarray:
    """[L, I, E] routes of one step, row i = sample id 10 * i (ids are not row numbers)."""
    rng = np.random.default_rng(step)
    return np.stack([domain_counts(rng, NODES * GPUS * SPD) for _ in range(LAYERS)])


def step_reports(step: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    return shuffled_reports(step_routes(step), step)


# ------------------------------------------------------------------------------- pure advisor


def test_window_is_bounded_in_steps_and_bytes() -> None:
    adv = ExpertAdvisor(TOPO, WindowLimits(max_steps=3, max_bytes=10_000))
    for step in range(5):
        for layer, (ids, g, s) in enumerate(step_reports(step)):
            adv.observe((step, layer), ids, g, s is not None)
    assert adv.window_steps == 3
    # Per layer: 8 uint64 ids and 8 x 8 counts kept as uint8 (all below 256).
    assert adv.window_bytes == 3 * LAYERS * (64 + 64)
    small = ExpertAdvisor(TOPO, WindowLimits(max_steps=100, max_bytes=1000))
    for step in range(5):
        for layer, (ids, g, s) in enumerate(step_reports(step)):
            small.observe((step, layer), ids, g, s is not None)
    assert small.window_bytes <= 1000 and small.window_steps == 2
    # An old step arriving late is not let in once the window is full.
    ids, g, _ = step_reports(0)[0]
    adv.observe((0, 0), ids, g, True)
    assert adv.window_steps == 3 and adv.window_bytes == 3 * LAYERS * 128


def test_advice_matches_rows_by_sample_id_across_layers() -> None:
    adv = ExpertAdvisor(TOPO, WindowLimits())
    for step in range(6):
        for layer, (ids, g, s) in enumerate(step_reports(step)):
            adv.observe((step, layer), ids, g, s is not None)
    adv.observe((6, 0), *step_reports(6)[0][:2], True)  # an incomplete step is left out
    advice = adv.advise(horizon_steps=100, bytes_per_expert=1 << 20, held_out_steps=2)
    assert advice.fit_steps == (0, 3) and advice.held_out_steps == (4, 5)
    # Held-out routes equal per-pair solves on the routes by sample: sample-only with the
    # default map, joint with the fitted maps of the pair's two layers.
    maps = np.array(advice.recommendation.maps)
    want_alone = want_joint = want_home = 0
    for step in (4, 5):
        routes = step_routes(step)
        for layer in range(LAYERS - 1):
            g, s = routes[layer], routes[layer + 1]
            want_alone += solve(TOPO, g, s).after.inter
            want_home += solve(TOPO, g, s).before.inter
            want_joint += solve(TOPO.with_experts(maps[layer]), g, s,
                                scatter_topology=TOPO.with_experts(maps[layer + 1])).after.inter
    ev = advice.evaluation
    assert (ev.home.inter, ev.sample_only.inter, ev.joint.inter) == (
        want_home, want_alone, want_joint)
    assert ev.joint.inter < 0.5 * ev.sample_only.inter  # the domains fit on one node each
    assert advice.predicted_inter_saving_per_step == (want_alone - want_joint) / 2
    rec = advice.recommendation
    assert rec.adopt and rec.moved_experts > 0
    for m in maps:  # two experts per device, like the registered map
        assert np.bincount(m, minlength=4).tolist() == [2, 2, 2, 2]


def test_advice_needs_a_fit_part_and_a_held_out_part() -> None:
    adv = ExpertAdvisor(TOPO, WindowLimits())
    with pytest.raises(NotEnoughData, match="reported 0 MoE layer"):
        adv.advise(horizon_steps=1, bytes_per_expert=1)
    for layer, (ids, g, s) in enumerate(step_reports(0)):
        adv.observe((0, layer), ids, g, s is not None)
    with pytest.raises(NotEnoughData, match="holds 1 complete step"):
        adv.advise(horizon_steps=1, bytes_per_expert=1)
    # Ids that do not follow the samples: the step cannot be used.
    for layer, (ids, g, s) in enumerate(step_reports(1)):
        adv.observe((1, layer), ids + layer, g, s is not None)
    with pytest.raises(NotEnoughData, match=r"holds 1 complete step.* of 2"):
        adv.advise(horizon_steps=1, bytes_per_expert=1)
    for layer, (ids, g, s) in enumerate(step_reports(2)):
        adv.observe((2, layer), ids, g, s is not None)
    with pytest.raises(ValueError, match="held_out_steps=2 leaves nothing to fit"):
        adv.advise(horizon_steps=1, bytes_per_expert=1, held_out_steps=2)
    with pytest.raises(ValueError, match="horizon_steps must be a positive integer, got 0"):
        adv.advise(horizon_steps=0, bytes_per_expert=1)
    with pytest.raises(ValueError, match="unit must be one of"):
        adv.advise(horizon_steps=1, bytes_per_expert=1, unit="joules")


def test_confirmed_maps_apply_from_their_step() -> None:
    adv = ExpertAdvisor(TOPO, WindowLimits())
    adv.saw_step(3)
    swapped = np.array([[0, 0, 2, 2, 1, 1, 3, 3]] * LAYERS)
    with pytest.raises(FieldError, match="step=3 must come after step 3"):
        adv.confirm(3, swapped)
    with pytest.raises(FieldError,
                       match=r"maps\[0\] puts 8 experts on device 0, the job.s topology has 2"):
        adv.confirm(4, np.zeros((LAYERS, EXPERTS), dtype=np.int64))
    with pytest.raises(FieldError, match=r"maps\[1\]\[0\]=9 is not a device"):
        adv.confirm(4, np.array([swapped[0], [9] * 8, swapped[0]]))
    adv.confirm(5, swapped)
    assert adv.topologies((4, 0)) == (TOPO, None)
    gtopo, stopo = adv.topologies((5, 1))
    assert gtopo.expert_device.tolist() == swapped[1].tolist() and stopo is not None
    assert adv.topologies((5, LAYERS - 1))[1] is None  # the last layer has no scatter
    assert adv.current_maps().tolist() == np.tile(TOPO.expert_device, (2, 1)).tolist()
    adv.saw_step(5)
    assert adv.current_maps().tolist() == swapped.tolist()


# ------------------------------------------------------------------------------- over gRPC


def _register(stub: placement_pb2_grpc.PlacementServiceStub, job: str) -> None:
    topo = pb.Topology(nodes=NODES, gpus_per_node=GPUS, experts=EXPERTS, bw_intra=400e9,
                       bw_inter=100e9, bytes_per_route=8192)
    stub.RegisterJob(pb.RegisterJobRequest(job=job, spec=pb.JobSpec(
        topology=topo, world_size=NODES * GPUS, samples_per_device=SPD, deadline_ms=5000)))


def _solve_step(stub: placement_pb2_grpc.PlacementServiceStub, job: str, step: int
                ) -> list[pb.SolveResponse]:
    out = []
    j, n = NODES * GPUS, SPD
    for layer, (ids, g, s) in enumerate(step_reports(step)):
        rows = [slice(r * n, (r + 1) * n) for r in range(j)]
        reports = [report_to_proto(job, step, layer, r, RoundCounts(
            ids[rows[r]], g[rows[r]], None if s is None else s[rows[r]])) for r in range(j)]
        out.append(stub.Solve(pb.SolveRequest(reports=reports)))
    return out


def test_recommend_confirm_and_plans_under_new_maps(server: ServerHandle) -> None:
    job = "experts"
    with grpc.insecure_channel(server.address) as channel:
        stub = placement_pb2_grpc.PlacementServiceStub(channel)
        _register(stub, job)
        with pytest.raises(grpc.RpcError) as err:
            stub.RecommendExperts(pb.RecommendExpertsRequest(job=job, horizon_steps=10,
                                                             bytes_per_expert=1000))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "reported 0 MoE layer" in err.value.details()
        for step in range(6):
            _solve_step(stub, job, step)
        with pytest.raises(grpc.RpcError) as err:
            stub.RecommendExperts(pb.RecommendExpertsRequest(job=job, horizon_steps=0,
                                                             bytes_per_expert=1000))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "horizon_steps must be a positive integer, got 0" in err.value.details()

        rec = stub.RecommendExperts(pb.RecommendExpertsRequest(
            job=job, horizon_steps=1000, bytes_per_expert=3 * 4 * 64 * 128))
        assert rec.adopt, rec.reason
        assert (rec.fit_first_step, rec.fit_last_step) == (0, 2)
        assert (rec.held_out_first_step, rec.held_out_last_step) == (3, 5)
        assert rec.joint.inter < rec.sample_only.inter <= rec.home.inter
        assert rec.moved_experts > 0 and rec.migration_bytes == rec.moved_experts * 3 * 4 * 64 * 128
        assert rec.saving_per_step > 0 and math.isfinite(rec.break_even_steps)
        assert [list(m.device) for m in rec.current] == [TOPO.expert_device.tolist()] * LAYERS
        maps = np.array([list(m.device) for m in rec.maps])
        assert maps.shape == (LAYERS, EXPERTS)

        with pytest.raises(grpc.RpcError) as err:
            stub.ConfirmExperts(pb.ConfirmExpertsRequest(job=job, step=5, maps=rec.maps))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "step=5 must come after step 5" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ConfirmExperts(pb.ConfirmExpertsRequest(job=job, step=6, maps=rec.maps[:1]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "maps has 1 layers" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            stub.ConfirmExperts(pb.ConfirmExpertsRequest(job="nope", step=6, maps=rec.maps))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        stub.ConfirmExperts(pb.ConfirmExpertsRequest(job=job, step=6, maps=rec.maps))

        # Step 6 is solved with each layer's new map: the plan's routes match the solver run
        # with the gather costed on layer l's map and the scatter on layer l+1's.
        responses = _solve_step(stub, job, 6)
        for layer, (resp, (_, g, s)) in enumerate(zip(responses, step_reports(6),
                                                       strict=True)):
            stopo = None if s is None else TOPO.with_experts(maps[layer + 1])
            want = solve(TOPO.with_experts(maps[layer]), g, s, scatter_topology=stopo)
            plan = resp.plans[0]
            assert (plan.after.inter, plan.after.intra) == (want.after.inter, want.after.intra)
            device = np.concatenate([list(p.dest) for p in resp.plans])
            got = traffic(TOPO.with_experts(maps[layer]), device, g)
            if s is not None:
                got_s = traffic(TOPO.with_experts(maps[layer + 1]), device, s)
                assert plan.after.inter == got.inter + got_s.inter

        metrics = scrape(server.metrics_port)
        key = (("job", job),)
        assert metrics[("netmoe_expert_window_bytes", key)] == 7 * LAYERS * 128
        assert metrics[("netmoe_expert_window_steps", key)] == 7
        assert metrics[("netmoe_expert_predicted_saving_routes", key)] == pytest.approx(
            (rec.sample_only.inter - rec.joint.inter) / 3)
        joint = metrics[("netmoe_expert_realized_routes_total",
                         (("job", job), ("placement", "joint")))]
        alone = metrics[("netmoe_expert_realized_routes_total",
                         (("job", job), ("placement", "sample_only")))]
        assert joint == sum(r.plans[0].after.inter for r in responses)
        assert joint < alone
