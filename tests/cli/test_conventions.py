"""CLI conventions of every subcommand: help with defaults, --version, one spelling per concept,
one-line usage errors, and the output helpers."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from netmoe import __version__
from netmoe.app.cli import build_parser, has_default, main
from netmoe.app.progress import Progress
from netmoe.app.text import human_bytes, plural, table


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from parsers(sub)


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if action.option_strings and not isinstance(
                action, (argparse._HelpAction, argparse._VersionAction)):
            yield action


ALL = list(parsers(build_parser()))


@pytest.mark.parametrize("parser", ALL, ids=[p.prog for p in ALL])
def test_every_flag_has_help_and_shows_its_default(parser: argparse.ArgumentParser) -> None:
    formatter = parser._get_formatter()
    for action in options(parser):
        text = formatter._expand_help(action) if action.help else ""
        assert text.strip(), f"{parser.prog} {action.option_strings[0]} has no help"
        if has_default(action):
            assert "default" in text, f"{parser.prog} {action.option_strings[0]}: {text}"


def test_one_spelling_per_concept() -> None:
    flags = {flag for p in ALL for a in options(p) for flag in a.option_strings}
    assert not flags & {"--gpus", "--addr", "--address", "--gpus_per_node"}
    for p in ALL:
        names = {flag for a in options(p) for flag in a.option_strings}
        if "--nodes" in names:
            assert "--gpus-per-node" in names, p.prog
        for a in options(p):
            if a.metavar == "HOST:PORT":
                assert a.option_strings == ["--server"], p.prog


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as end:
        main(["--version"])
    assert end.value.code == 0
    assert capsys.readouterr().out.strip() == f"netmoe {__version__}"


def test_usage_errors_are_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "netmoe.app.cli", "evaluate", "--nodes", "x"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "netmoe evaluate: error: argument --nodes: invalid positive value: 'x' "
        "(see netmoe evaluate --help)"]


def test_text_helpers() -> None:
    assert [plural(n, "step") for n in (0, 1, 2)] == ["0 steps", "1 step", "2 steps"]
    assert plural(1, "node") == "1 node" and plural(3, "layer pair") == "3 layer pairs"
    assert human_bytes(1) == "1 byte" and human_bytes(512) == "512 bytes"
    assert human_bytes(11338896) == "10.8 MiB" and human_bytes(8192) == "8 KiB"
    lines = table(["name", "count"], [["a", 1], ["bbbbbb", 12345]], indent=0)
    assert lines == ["name    count", "a           1", "bbbbbb  12345"]


def test_bench_service_counts_only_timed_rounds(capsys: pytest.CaptureFixture[str]) -> None:
    reps = {}
    for counts in ("experts", "devices"):
        assert main(["bench", "service", "--embedded", "--nodes", "1", "--gpus-per-node", "2",
                     "--samples", "4", "--experts", "8", "--layers", "2", "--rounds", "6",
                     "--warmup", "4", "--distinct", "2", "--counts", counts, "--json"]) == 0
        rep = reps[counts] = json.loads(capsys.readouterr().out)
        assert sum(rep["outcomes"].values()) == rep["outcomes"]["solved"] == 6
        # Six rounds are too few for a 99th percentile: the maximum is reported instead.
        assert rep["rtt_ms_p99"] is None and rep["rtt_ms_max"] >= rep["rtt_ms_median"] > 0
        assert rep["counts"] == counts and rep["server_cpu_ms_per_round"] is None  # embedded
    # Two counts per sample (one per device) instead of eight, one byte each.
    assert reps["experts"]["report_bytes"] - reps["devices"]["report_bytes"] == 2 * 2 * 6


@pytest.mark.parametrize(("report_by", "streams"), [("rank", 8), ("node", 4)])
def test_bench_service_with_ep_groups_counts_every_groups_rounds(
        capsys: pytest.CaptureFixture[str], report_by: str, streams: int) -> None:
    # 4 nodes x 2, groups of 4 ranks on 2 nodes each: per node, 2 ranks share one stream.
    assert main(["bench", "service", "--embedded", "--nodes", "4", "--gpus-per-node", "2",
                 "--ep-size", "4", "--samples", "16", "--experts", "4", "--layers", "2",
                 "--rounds", "4", "--warmup", "2", "--distinct", "2", "--report-by", report_by,
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["ep_size"], rep["streams"], rep["report_by"]) == (4, streams, report_by)
    assert rep["outcomes"] == {"solved": 8}  # 4 timed rounds x 2 groups
    assert rep["solve_ms_median"] > 0


def test_bench_solver_reports_no_p99_over_few_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "solver", "--samples", "32", "--devices", "16", "--repeats", "3",
                 "--no-gap"]) == 0
    out = capsys.readouterr().out
    assert "max of 3: " in out and "p99 " not in out


def test_progress_lines_estimate_the_rest() -> None:
    stream = io.StringIO()
    progress = Progress("netmoe demo: home run", 4, stream=stream, every=0.0)
    for done in (0, 1, 1, 2, 4):
        progress.update(done)
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        f"netmoe demo: home run: step {n}/4" for n in (0, 1, 2, 4)]
    # The pace is known from the second finished step on, and nothing is left at the end.
    assert ["left" in line for line in lines] == [False, False, True, False]
