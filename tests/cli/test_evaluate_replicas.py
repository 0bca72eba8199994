"""`netmoe evaluate --expert-placement fit --replica-budget K` on the FLAME fixture."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from netmoe.app.cli import main
from netmoe.trace import load_trace, sample_counts

FLAME = Path(__file__).parents[1] / "fixtures" / "flame_290m_2048tok_layers2-9.npz"
ARGS = ["evaluate", "--trace", str(FLAME), "--tokens-per-sample", "64", "--expert-placement",
        "fit"]


def _recount(counts: np.ndarray, owner: list[int], copies: list[list[int]],
             placement: np.ndarray, gpus: int) -> tuple[int, int]:
    """(inter, intra) routes of one layer [I, E] from the JSON alone: a route is local when its
    sample's device holds the expert, intra when a device of the sample's node does."""
    holders = [{d} for d in owner]
    for e, d in copies:
        holders[e].add(d)
    inter = intra = 0
    for i, dev in enumerate(placement):
        for e, n in enumerate(counts[i]):
            if dev in holders[e]:
                continue
            if any(d // gpus == dev // gpus for d in holders[e]):
                intra += int(n)
            else:
                inter += int(n)
    return inter, intra


def test_replicas_are_reported_and_recount(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, "--replica-budget", "1", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    maps, replicas = rep["expert_maps"], rep["replicas"]
    assert len(maps) == len(replicas) == 8 and all(len(m) == 64 for m in maps)
    for layer, copies in enumerate(replicas):
        devices = [d for _, d in copies]
        assert len(devices) == len(set(devices)) == 8  # one slot per device, all used here
        assert all(maps[layer][e] != d for e, d in copies)
    held = sample_counts(load_trace(FLAME), 64, 64)[:, 16:]
    for p in rep["pairs"]:
        layer, got = p["layer"], p["replicated"]
        placement = np.array(got["placement"])
        assert np.bincount(placement, minlength=8).tolist() == [2] * 8
        both = [_recount(held[q], maps[q], replicas[q], placement, 4) for q in (layer, layer + 1)]
        assert (got["inter"], got["intra"]) == tuple(map(sum, zip(*both, strict=True)))
        assert p["joint"]["experts"] == [maps[layer], maps[layer + 1]]
    total = rep["total"]
    assert total["replicated"]["inter"] < total["joint"]["inter"]
    assert total["replicated_inter_reduction"] > total["joint_inter_reduction"]


def test_budget_zero_is_joint_placement(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, "--replica-budget", "0", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["replicas"] == [[]] * 8
    for p in rep["pairs"]:
        got = p["replicated"]
        assert (got["inter"], got["intra"], got["placement"]) == (
            p["joint"]["inter"], p["joint"]["intra"], p["joint"]["placement"])


def test_text_output_names_the_copies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, "--replica-budget", "1"]) == 0
    out = capsys.readouterr().out
    assert "with the copies (--replica-budget)" in out
    assert "busiest device / mean load, mean over layers (worst layer): home " in out


def assert_one_error(capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    """ARGS + extra exit 2 with message on one line of stderr (argparse's checks or ours)."""
    try:
        code = main([*ARGS, *extra])
    except SystemExit as exit_:  # argparse's own checks
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--replica-budget", "-1"], "--replica-budget: must be a non-negative integer, got '-1'"),
    (["--replica-budget", "57"], "--replica-budget=57: slots=57 copies per device do not fit"),
])
def test_bad_budget_exits_2(capsys: pytest.CaptureFixture[str], extra: list[str],
                            message: str) -> None:
    assert_one_error(capsys, extra, message)


def test_budget_needs_fitted_experts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--trace", str(FLAME), "--tokens-per-sample", "64",
                 "--replica-budget", "1"]) == 2
    assert "--replica-budget needs --expert-placement fit" in capsys.readouterr().err


def _check_tables_and_loads(rep: dict) -> None:
    """Recounts routes and loads of every pair from the JSON alone: maps, copies, tables,
    placements and the held-out counts."""
    maps, replicas, tables = rep["expert_maps"], rep["replicas"], rep["route_tables"]
    assert np.array(tables).shape == (8, 8, 64)
    for layer in range(8):
        holders = [{maps[layer][e]} | {d for c, d in replicas[layer] if c == e}
                   for e in range(64)]
        for d, e in itertools.product(range(8), range(64)):
            served = tables[layer][d][e]
            assert served in holders[e]
            assert served == d if d in holders[e] else (
                served // 4 == d // 4 or all(h // 4 != d // 4 for h in holders[e]))
    held = sample_counts(load_trace(FLAME), 64, 64)[:, 16:]
    for p in rep["pairs"]:
        layer, got = p["layer"], p["replicated"]
        placement = np.array(got["placement"])
        both = [_recount(held[q], maps[q], replicas[q], placement, 4) for q in (layer, layer + 1)]
        assert (got["inter"], got["intra"]) == tuple(map(sum, zip(*both, strict=True)))
        for k, q in enumerate((layer, layer + 1)):
            load = [0] * 8
            for i, e in zip(*np.nonzero(held[q]), strict=True):
                load[tables[q][placement[i]][e]] += int(held[q, i, e])
            assert got["loads"][k] == load
    ratios = [max(v) / (sum(v) / 8) for p in rep["pairs"] for v in p["replicated"]["loads"]]
    assert rep["load"]["replicated"]["mean"] == pytest.approx(np.mean(ratios))
    assert rep["load"]["replicated"]["worst"] == pytest.approx(max(ratios))


def test_load_bound_reports_tables_and_loads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, "--replica-budget", "1", "--max-load-ratio", "1.05", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    _check_tables_and_loads(rep)
    assert set(rep["load"]) == {"home", "joint", "replicated"}
    # Balanced copies save inter-node routes against home, too.
    assert rep["total"]["replicated_inter_reduction"] > rep["total"]["joint_inter_reduction"]


def test_route_only_copies_report_tables_and_loads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, "--replica-budget", "1", "--json"]) == 0
    _check_tables_and_loads(json.loads(capsys.readouterr().out))


@pytest.mark.parametrize("groups", ["1", "8"])
def test_eplb_baseline(capsys: pytest.CaptureFixture[str], groups: str) -> None:
    assert main(["evaluate", "--trace", str(FLAME), "--tokens-per-sample", "64",
                 "--expert-placement", "eplb", "--replica-budget", "1", "--eplb-groups", groups,
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    _check_tables_and_loads(rep)
    # EPLB packs 72 physical experts, 9 per GPU; replicas sharing a GPU count once.
    assert sum(len(c) for c in rep["replicas"][0]) // 2 + 64 <= 72


def test_migration_budget_in_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, "--replica-budget", "1", "--migration-budget", "0", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["expert_maps"] == [[e // 8 for e in range(64)]] * 8
    assert rep["migration"] == {"moved_experts": 0, "moved_inter": 0, "copies": 64}
    assert main([*ARGS, "--replica-budget", "1", "--migration-budget", "10", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    off_home = sum(m != e // 8 for maps in rep["expert_maps"] for e, m in enumerate(maps))
    assert 0 < off_home == rep["migration"]["moved_experts"] <= 10


@pytest.mark.parametrize("extra, message", [
    (["--max-load-ratio", "0.99"], "--max-load-ratio must be a number >= 1 (busiest device / "
                                   "mean load), got 0.99"),
    (["--migration-budget", "-1"], "--migration-budget: must be a non-negative integer, "
                                   "got '-1'"),
    (["--eplb-groups", "8"], "--eplb-groups needs --expert-placement eplb"),
])
def test_bad_balance_flags_exit_2(capsys: pytest.CaptureFixture[str], extra: list[str],
                                  message: str) -> None:
    assert_one_error(capsys, extra, message)


def test_load_bound_needs_fitted_experts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--trace", str(FLAME), "--tokens-per-sample", "64",
                 "--max-load-ratio", "1.05"]) == 2
    assert "--max-load-ratio needs --expert-placement fit" in capsys.readouterr().err
