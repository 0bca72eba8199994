"""netmoe.protos.convert: the round contract to netmoe.v1 and back, field by field."""

from __future__ import annotations

import numpy as np
import pytest

from netmoe.protos import placement_pb2 as pb
from netmoe.protos.convert import (
    job_spec,
    maps_from_proto,
    maps_to_proto,
    plan_from_proto,
    plan_to_proto,
    report_arrays,
    report_to_proto,
)
from netmoe.round import RankPlan, RoundCounts, Traffic


def test_report_round_trip_keeps_ids_and_counts_row_major() -> None:
    counts = RoundCounts(np.array([7, 2**63], dtype=np.uint64),
                         np.arange(6, dtype=np.int64).reshape(2, 3), None)
    msg = report_to_proto("job", 5, 1, 3, counts)
    wire = pb.Report.FromString(msg.SerializeToString())
    assert (wire.job, wire.step, wire.layer, wire.rank) == ("job", 5, 1, 3)
    ids, gather, scatter = report_arrays(wire)
    assert ids.dtype == np.uint64 and ids.tolist() == [7, 2**63]
    assert gather.tolist() == [0, 1, 2, 3, 4, 5] and scatter.size == 0
    with_next = report_to_proto("job", 5, 1, 3, RoundCounts(counts.sample_ids, counts.gather,
                                                            counts.gather + 1))
    assert report_arrays(with_next)[2].tolist() == [1, 2, 3, 4, 5, 6]


def test_plan_round_trip_for_solved_fallback_and_invalid() -> None:
    before, after = Traffic(9, 4, 1, 0.0, 0.0, 2.5), Traffic(5, 7, 2, 0.0, 0.0, 1.5)
    solved = RankPlan(3, 1, 2, "optimal", np.array([0, 3]), np.array([11, 4], dtype=np.uint64),
                      solve_seconds=0.002, moved=6, before=before, after=after)
    for plan in (solved, RankPlan.stay(3, 1, 2, np.array([5, 6]), "timeout", before=before),
                 RankPlan.rejected(3, 1, 2, "gather has 3 counts")):
        msg = plan_to_proto("job", plan)
        back = plan_from_proto(pb.Plan.FromString(msg.SerializeToString()))
        assert msg.job == "job"
        assert (back.step, back.layer, back.rank, back.status, back.reason, back.error) == (
            plan.step, plan.layer, plan.rank, plan.status, plan.reason, plan.error)
        assert back.dest.tolist() == plan.dest.tolist()
        assert back.held_ids.tolist() == plan.held_ids.tolist()
        assert (back.solve_seconds, back.moved) == (plan.solve_seconds, plan.moved)
        for got, want in ((back.before, plan.before), (back.after, plan.after)):
            assert (got is None) == (want is None)
            if want is not None:
                assert (got.inter, got.intra, got.local, got.seconds) == (
                    want.inter, want.intra, want.local, want.seconds)
    with pytest.raises(ValueError, match=r"plan.status=0 is not a known PlanStatus"):
        plan_from_proto(pb.Plan(step=1))


def test_maps_round_trip_and_ragged_layers_are_named() -> None:
    maps = np.array([[0, 1, 1, 0], [1, 0, 0, 1]])
    assert maps_from_proto(maps_to_proto(maps), 4).tolist() == maps.tolist()
    ragged = [pb.ExpertMap(device=[0, 1, 1, 0]), pb.ExpertMap(device=[0, 1])]
    with pytest.raises(ValueError, match=r"layers \[1\] list \[2\] experts, need 4"):
        maps_from_proto(ragged, 4)


def test_job_spec_from_plain_numbers() -> None:
    spec = job_spec(2, 4, 16, 3, hidden_size=1024, objective="bottleneck", deadline_ms=20)
    t = spec.topology
    assert (t.nodes, t.gpus_per_node, t.experts, spec.world_size) == (2, 4, 16, 8)
    assert t.bytes_per_route == 2048  # bf16 by default
    assert (t.bw_intra, t.bw_inter) == (400e9, 100e9)
    assert (spec.samples_per_device, spec.objective, spec.deadline_ms) == (3, "bottleneck", 20)
