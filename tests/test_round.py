"""The round contract (netmoe.round): plans, rows held, ids followed, validation."""

from __future__ import annotations

import numpy as np
import pytest

from netmoe.round import RankPlan, RoundCounts, SamplePlan, check_dest, home_placement, rows_held


def test_sample_plan_rows_held_follow_all_to_all_order() -> None:
    # 3 devices x 2 samples; rows 0,1 on dev 0, rows 2,3 on dev 1, rows 4,5 on dev 2.
    plan = SamplePlan((2, 0, 0, 1, 2, 1), 3)
    assert [plan.rows_held(r).tolist() for r in range(3)] == [[1, 2], [3, 5], [0, 4]]
    assert plan.dest_of(1) == (0, 1)
    assert plan.position().tolist() == [0, 0, 1, 0, 1, 1]
    assert plan.moved == 3 and plan.moves
    assert not SamplePlan.no_move(3, 2).moves
    assert plan.fingerprint() != SamplePlan.no_move(3, 2).fingerprint()
    ids = np.array([10, 11, 12, 13, 14, 15])
    assert plan.follow(ids).tolist() == [11, 12, 13, 15, 10, 14]


@pytest.mark.parametrize(
    ("dest", "devices", "match"),
    [
        ((0, 0, 0, 1), 2, "unbalanced: device 0 receives 3"),
        ((0, 1, 2), 2, "multiple of devices"),
        ((0, 3, 1, 1), 2, r"dest\[1\]=3 is not a device \(devices 0..1\)"),
        ((0, 1), 0, "devices must be a positive integer"),
    ],
)
def test_sample_plan_rejects_bad_input(dest: tuple[int, ...], devices: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplePlan(dest, devices)


def test_rows_held_orders_by_home_device_then_row() -> None:
    dest = np.array([1, 0, 1, 0])
    home = np.array([1, 1, 0, 0])  # not rank-major: row 2 starts on device 0
    assert [r.tolist() for r in rows_held(dest, 2, home)] == [[3, 1], [2, 0]]
    assert [r.tolist() for r in rows_held(dest, 2)] == [[1, 3], [0, 2]]
    assert home_placement(6, 2).tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="samples=7 is not divisible by devices=2"):
        home_placement(7, 2)


def test_check_dest_names_the_entry() -> None:
    with pytest.raises(ValueError, match=r"home\[2\]=-1 is not a device"):
        check_dest("home", [0, 1, -1, 0], devices=2)
    with pytest.raises(ValueError, match="integer device ids"):
        check_dest("home", [0.5, 1.0], devices=2)
    assert check_dest("home", np.array([1, 0], dtype=np.int32), devices=2, per_device=1
                      ).dtype == np.int64


def test_rank_plans_for_fallbacks_and_rejections() -> None:
    stay = RankPlan.stay(3, 1, 2, np.array([7, 9]), "timeout")
    assert stay.dest.tolist() == [2, 2] and stay.held_ids.tolist() == [7, 9]
    assert stay.status == "fallback" and not stay.solved
    bad = RankPlan.rejected(3, 1, 2, "gather has 3 counts")
    assert bad.status == "invalid" and bad.reason == "invalid" and not len(bad.dest)


def test_round_counts_concat_keeps_rank_major_rows() -> None:
    a = RoundCounts(np.array([1, 2], dtype=np.uint64), np.ones((2, 3), np.int64), None)
    b = RoundCounts(np.array([5, 6], dtype=np.uint64), np.zeros((2, 3), np.int64), None)
    both = RoundCounts.concat([a, b])
    assert both.sample_ids.tolist() == [1, 2, 5, 6] and both.gather.shape == (4, 3)
    assert both.scatter is None and both.experts == 3
    with pytest.raises(ValueError, match="all have a scatter or none"):
        RoundCounts.concat([a, RoundCounts(b.sample_ids, b.gather, b.gather)])
