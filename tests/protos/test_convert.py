"""netmoe.protos.convert: the round contract to netmoe.v1 and back, field by field."""

from __future__ import annotations

import numpy as np
import pytest

from netmoe.protos import placement_pb2 as pb
from netmoe.protos.convert import (
    counts_from_pb,
    counts_to_pb,
    job_spec,
    maps_from_proto,
    maps_to_proto,
    plan_from_proto,
    plan_to_proto,
    report_to_proto,
)
from netmoe.round import RankPlan, RoundCounts, Traffic


def test_report_round_trip_keeps_ids_and_counts_row_major() -> None:
    counts = RoundCounts(np.array([7, 2**63], dtype=np.uint64),
                         np.arange(6, dtype=np.int64).reshape(2, 3), None)
    msg = report_to_proto("job", 5, 1, 3, counts)
    wire = pb.Report.FromString(msg.SerializeToString())
    assert (wire.job, wire.step, wire.layer, wire.rank) == ("job", 5, 1, 3)
    assert list(wire.sample_ids) == [7, 2**63]
    assert wire.gather.data == bytes(range(6)) and list(wire.gather.shape) == [2, 3]
    assert counts_from_pb(wire.gather, "gather").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert not wire.HasField("scatter")  # absent: no next layer
    with_next = report_to_proto("job", 5, 1, 3, RoundCounts(counts.sample_ids, counts.gather,
                                                            counts.gather + 1))
    assert counts_from_pb(with_next.scatter, "scatter").tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize(("top", "dtype", "itemsize"), [
    (0, pb.COUNTS_DTYPE_UINT8, 1), (255, pb.COUNTS_DTYPE_UINT8, 1),
    (256, pb.COUNTS_DTYPE_UINT16, 2), (65535, pb.COUNTS_DTYPE_UINT16, 2),
    (65536, pb.COUNTS_DTYPE_UINT32, 4), (2**32 - 1, pb.COUNTS_DTYPE_UINT32, 4),
])
def test_counts_take_the_narrowest_dtype_little_endian(top: int, dtype: int, itemsize: int
                                                       ) -> None:
    counts = np.array([[top, 1, 0], [2, 0, top]], dtype=np.int64)
    msg = counts_to_pb(counts)
    assert msg.dtype == dtype and list(msg.shape) == [2, 3]
    assert len(msg.data) == 6 * itemsize
    assert msg.data[:itemsize] == top.to_bytes(itemsize, "little")  # row-major, little-endian
    back = counts_from_pb(pb.Counts.FromString(msg.SerializeToString()), "gather")
    assert back.tolist() == counts.tolist() and back.dtype.itemsize == itemsize


def test_counts_from_pb_is_a_read_only_view_of_the_wire_bytes() -> None:
    msg = counts_to_pb(np.full((64, 32), 3, dtype=np.int32))
    arr = counts_from_pb(msg, "gather")
    assert isinstance(arr.base.base, bytes) and not arr.flags.owndata  # no copy
    assert not arr.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        arr[0, 0] = 1
    empty = counts_from_pb(counts_to_pb(np.zeros((0, 4), dtype=np.int64)), "gather")
    assert empty.shape == (0, 4)


@pytest.mark.parametrize(("counts", "error"), [
    (np.array([[1, -1]]), r"^gather must lie in \[0, 4294967295\], got \[-1, 1\]"),
    (np.array([[2**32]]), r"got \[4294967296, 4294967296\]"),
    (np.arange(4), r"^gather must be a \[samples, experts\] integer array, got shape \[4\] of "
                   r"int64"),
    (np.ones((2, 2)), r"got shape \[2, 2\] of float64"),
])
def test_counts_to_pb_refuses_what_the_wire_cannot_carry(counts: np.ndarray, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        counts_to_pb(counts, "gather")


@pytest.mark.parametrize(("fields", "error"), [
    (dict(data=b"\0" * 1000, dtype=pb.COUNTS_DTYPE_UINT16, shape=[4, 64]),
     r"^gather.data has 1000 bytes, shape \[4, 64\] x uint16 needs 512$"),
    (dict(data=b"", dtype=pb.COUNTS_DTYPE_UINT8, shape=[2**32 - 1, 2**32 - 1]),
     r"gather.data has 0 bytes, shape \[4294967295, 4294967295\] x uint8 needs "
     r"18446744065119617025$"),
    (dict(data=b"\0" * 4, shape=[2, 2]),
     r"^gather.dtype=0 \(COUNTS_DTYPE_UNSPECIFIED\), need one of COUNTS_DTYPE_UINT8, "
     r"COUNTS_DTYPE_UINT16, COUNTS_DTYPE_UINT32$"),
    (dict(data=b"\0" * 4, dtype=17, shape=[2, 2]), r"^gather.dtype=17 \(not a CountsDtype\)"),
    (dict(data=b"\0" * 4, dtype=pb.COUNTS_DTYPE_UINT8, shape=[4]),
     r"^gather.shape \[4\] has 1 dimensions, need 2 \(\[samples, experts\]\)$"),
    (dict(data=b"\0" * 4, dtype=pb.COUNTS_DTYPE_UINT8, shape=[1] * 9),
     r"^gather.shape \[1, 1, 1, 1, \.\.\.\] \(9 values\) has 9 dimensions"),
])
def test_counts_from_pb_names_the_field_and_the_value(fields: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        counts_from_pb(pb.Counts(**fields), "gather")


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
