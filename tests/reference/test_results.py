"""RankResult, the per-rank record between the trainers and their readers: its JSON round trip
is exact, a rank's JSON that lacks or adds a field fails naming it, the demo's --json shows
rank 0's expert placement as the flat object it always has, and its expert and replica reports
sum the ranks' moves."""

from __future__ import annotations

import dataclasses
import json

import pytest

from netmoe.app.demo_report import expert_report, recommendation, replica_report
from netmoe.app.reference.results import (
    ExpertAdvice,
    ExpertMoves,
    ModelInfo,
    PlacementResult,
    RankResult,
    ReplicaAdvice,
)

BASE = RankResult(rank=1, loss=[2.5, 2.25], step_seconds=[0.5, 0.25], a2a_seconds=0.125,
                  control_seconds=0.0625, allreduce_seconds=0.03125,
                  routes=[[3, 2, 1], [6, 5, 4]],
                  step_routes=[[[1, 1, 0], [3, 2, 2]], [[2, 1, 1], [3, 3, 2]]],
                  bytes_per_route={"dispatch": 264.0, "combine": 260.0})  # fmt: skip
PLACED = PlacementResult(plan_wait_seconds=0.5, submit_seconds=0.25, reply_seconds=0.125,
                         exchange_seconds=0.0625, fallbacks=1,
                         fallback_reasons={"deadline": 1}, plans=3, moved=7,
                         solve_seconds=[0.001, 0.0], rejected="")  # fmt: skip
ADVICE = ExpertAdvice(recommended=True, reason="pays", maps=[[0, 1], [1, 0]], unit="routes",
                      saving_per_step=12.5, migration_cost=3.0, break_even_steps=None,
                      moved_experts=2, moved_inter=1, migration_bytes=4096,
                      held_out={"home": {"inter": 9, "intra": 4},
                                "sample_only": {"inter": 7, "intra": 5},
                                "joint": {"inter": 5, "intra": 6}},
                      fit_steps=[1, 2], held_out_steps=[3, 3])  # fmt: skip
REPLICAS = ReplicaAdvice(recommended=False, reason="sync outweighs", saving_per_step=1.5,
                         sync_per_step=2.0, memory_bytes=1024, held_out_inter=4,
                         cross_node_copies=1)  # fmt: skip
MOVES = ExpertMoves(step=4, bytes_per_expert=2048, grad_bytes_weighed=0, advice=ADVICE,
                    adopted=True, replicas=REPLICAS, copies=[[[0, 1]], []],
                    route_tables=[[[0, 1], [0, 1]], [[1, 0], [1, 0]]],
                    load={"predicted": [1.0, 1.5], "joint": [1.0, 2.0]}, copies_adopted=True,
                    sent_bytes=2048, adopt_seconds=0.5, copy_sent_bytes=2048,
                    copy_seconds=0.25)  # fmt: skip


@pytest.mark.parametrize("result", [
    BASE,
    dataclasses.replace(BASE, placement=PLACED, first_step=0, copy_sync_seconds=0.5,
                        expert_moves=MOVES, param_checksum={"w": [1.5, 2.25]},
                        a2a_calls=[[0, 1, "dispatch", 10.5, 10.75, [0, 64]]],
                        link_counters=[[100, 200], [150, 260]]),
    dataclasses.replace(BASE, bytes_per_route=None, stock=True,
                        model=ModelInfo(parameters=1000, layers=2, experts=8, top_k=2,
                                        model_type="qwen3")),
], ids=["common", "reference", "torchtitan-stock"])
def test_the_json_round_trip_is_exact(result: RankResult) -> None:
    text = result.to_json()
    back = RankResult.from_json(text)
    assert back == result
    assert back.to_json() == text


def test_a_missing_or_unknown_field_is_named() -> None:
    raw = json.loads(dataclasses.replace(BASE, placement=PLACED).to_json())
    missing = {k: v for k, v in raw.items() if k != "loss"}
    with pytest.raises(ValueError, match=r"^rank 3's result: missing field loss$"):
        RankResult.from_json(json.dumps(missing), "rank 3's result")
    with pytest.raises(ValueError, match=r"unknown field experts$"):
        RankResult.from_json(json.dumps({**raw, "experts": {}}))
    nested = {**raw, "placement": {k: v for k, v in raw["placement"].items() if k != "plans"}}
    with pytest.raises(ValueError, match=r"missing field placement\.plans$"):
        RankResult.from_json(json.dumps(nested))
    with pytest.raises(ValueError, match=r"placement must be a JSON object, got list"):
        RankResult.from_json(json.dumps({**raw, "placement": []}))
    # Optional fields may be left out: a rank of another family writes none of them.
    assert RankResult.from_json(json.dumps({k: raw[k] for k in (
        "rank", "loss", "step_seconds", "a2a_seconds", "control_seconds", "allreduce_seconds",
        "routes", "step_routes")})) == dataclasses.replace(BASE, bytes_per_route=None)


def test_the_demo_shows_rank_0s_expert_placement_as_one_flat_object() -> None:
    flat = recommendation(MOVES)
    assert list(flat) == [
        "step", "bytes_per_expert", "adopted", "error", "grad_bytes_weighed", "recommended",
        "reason", "maps", "unit", "saving_per_step", "migration_cost", "break_even_steps",
        "moved_experts", "moved_inter", "migration_bytes", "held_out", "fit_steps",
        "held_out_steps", "copies", "replicas", "route_tables", "load", "copies_adopted",
        "copy_sent_bytes", "copy_seconds"]
    assert flat["replicas"] == dataclasses.asdict(REPLICAS) and flat["break_even_steps"] is None
    # A failed call: the call and its error only.
    failed = ExpertMoves(error="RecommendExperts: FAILED_PRECONDITION: thin", step=1,
                         bytes_per_expert=2048, grad_bytes_weighed=0)
    assert recommendation(failed) == {"step": 1, "bytes_per_expert": 2048, "adopted": False,
                                      "error": "RecommendExperts: FAILED_PRECONDITION: thin",
                                      "grad_bytes_weighed": 0}


def test_the_expert_and_replica_reports_sum_the_ranks_moves() -> None:
    other = dataclasses.replace(MOVES, sent_bytes=1024, adopt_seconds=0.75, copy_sent_bytes=0,
                                copy_seconds=0.5)
    ranks = [dataclasses.replace(BASE, rank=r, placement=PLACED, copy_sync_seconds=s,
                                 expert_moves=m)
             for r, (m, s) in enumerate([(MOVES, 0.5), (other, 1.5)])]
    home = [dataclasses.replace(BASE, rank=r) for r in range(2)]
    x = expert_report(home, ranks, ranks, 1, 1)
    assert x["recommendation"] == recommendation(MOVES)
    assert (x["moved_bytes"], x["adopt_seconds"], x["fallbacks"]) == (3072, 0.75, 1)
    r = replica_report(home, ranks, 1, 1)
    assert r["recommendation"] == dataclasses.asdict(REPLICAS) and r["adopted"]
    assert (r["copy_bytes"], r["copy_seconds"], r["sync_seconds"]) == (2048, 0.5, 1.0)
    assert r["copies"] == MOVES.copies and r["grad_bytes_weighed"] == 0 and r["error"] == ""
