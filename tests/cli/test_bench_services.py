"""`netmoe bench service --services S`: S real service processes, groups assigned round-robin."""

from __future__ import annotations

import json

import pytest

from netmoe.app.cli import main


def test_groups_go_round_robin_to_their_own_service_processes(
        capsys: pytest.CaptureFixture[str]) -> None:
    # 4 nodes x 2, four groups of 2 ranks (one node each), node reports: one stream per group.
    assert main(["bench", "service", "--services", "2", "--nodes", "4", "--gpus-per-node", "2",
                 "--ep-size", "2", "--samples", "16", "--experts", "4", "--layers", "2",
                 "--rounds", "4", "--warmup", "2", "--distinct", "2", "--report-by", "node",
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["outcomes"] == {"solved": 16}  # 4 timed rounds x 4 groups
    first, second = rep["services"]
    assert first["address"] != second["address"]
    assert (first["groups"], second["groups"]) == ([0, 2], [1, 3])
    assert [(g["group"], g["service"]) for g in rep["groups"]] == [
        (0, first["address"]), (1, second["address"]), (2, first["address"]),
        (3, second["address"])]
    assert all(g["rtt_ms_median"] > 0 and g["solve_ms_median"] > 0 for g in rep["groups"])
    # Each process served rounds (its CPU moved), and the total is split over the groups.
    assert first["server_cpu_ms_per_round"] > 0 and second["server_cpu_ms_per_round"] > 0
    total = first["server_cpu_ms_per_round"] + second["server_cpu_ms_per_round"]
    assert rep["server_cpu_ms_per_round"] == pytest.approx(total)
    assert rep["server_cpu_ms_per_group_round"] == pytest.approx(total / 4)
