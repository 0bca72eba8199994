"""`netmoe evaluate --expert-placement fit --replica-budget K` on the FLAME fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from netmoe.cli import main
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
    assert "with the copies (--replica-budget)" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--replica-budget", "-1"], "--replica-budget: must be a non-negative integer, got '-1'"),
    (["--replica-budget", "57"], "--replica-budget=57: slots=57 copies per device do not fit"),
])
def test_bad_budget_exits_2(capsys: pytest.CaptureFixture[str], extra: list[str],
                            message: str) -> None:
    try:
        code = main([*ARGS, *extra])
    except SystemExit as exit_:  # argparse's own checks
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_budget_needs_fitted_experts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate", "--trace", str(FLAME), "--tokens-per-sample", "64",
                 "--replica-budget", "1"]) == 2
    assert "--replica-budget needs --expert-placement fit" in capsys.readouterr().err
