"""run_ranks: no rank process left behind when its launcher is terminated; a run fails when its
ranks stop making progress, never because it is slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from netmoe.app.reference.results import RankResult

from support import wait_for


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie whose parent is gone is reaped by init shortly; count it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:  # reaped since the kill(0)
        return False


def test_sigterm_to_launcher_kills_its_ranks() -> None:
    code = textwrap.dedent("""
        from netmoe.app.reference.launch import run_ranks
        from netmoe.app.reference.train import TrainConfig
        run_ranks(TrainConfig(nodes=1, gpus_per_node=2, steps=100000, vocab=64, layers=1))
    """)
    launcher = subprocess.Popen([sys.executable, "-c", code])
    try:
        wait_for(lambda: len(_children(launcher.pid)) >= 2, what="the launcher's two ranks")
        ranks = _children(launcher.pid)
        assert len(ranks) == 2
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) != 0
        # Both ranks end (they would train 100000 steps if the launcher left them behind).
        wait_for(lambda: not any(_alive(pid) for pid in ranks), what="the ranks to exit")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


# A rank that finishes `steps` steps of `pace` seconds each (writing its progress as the training
# ranks do), then sleeps `then` seconds before writing its result: the launcher's view of a rank.
RANK = """
import os, sys, time
from pathlib import Path

from netmoe.app.reference.results import RankResult

steps, pace, then = {steps}, {pace}, {then}
Path(os.environ["PID_DIR"], os.environ["RANK"]).write_text(str(os.getpid()))
for step in range(1, steps + 1):
    time.sleep(pace)
    Path(os.environ["NETMOE_PROGRESS_FILE"]).write_text(str(step))
time.sleep(then)
Path(sys.argv[sys.argv.index("--out") + 1]).write_text(RankResult(
    rank=int(os.environ["RANK"]), loss=[], step_seconds=[], a2a_seconds=0.0,
    control_seconds=0.0, allreduce_seconds=0.0, routes=[], step_routes=[]).to_json())
"""


def _launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stall: float, **rank: float
            ) -> list[RankResult]:
    from netmoe.app.reference.launch import run_ranks
    from netmoe.app.reference.train import TrainConfig

    (tmp_path / "fake_rank.py").write_text(RANK.format(**rank))
    (tmp_path / "pids").mkdir()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("PID_DIR", str(tmp_path / "pids"))
    return run_ranks(TrainConfig(nodes=1, gpus_per_node=2, steps=int(rank["steps"])),
                     stall_seconds=stall, module="fake_rank")


def test_a_run_slower_than_the_stall_limit_finishes_while_it_makes_progress(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.monotonic()
    results = _launch(tmp_path, monkeypatch, stall=6, steps=6, pace=1.5, then=0)
    assert time.monotonic() - started > 6  # longer than the limit in all, never stalled
    assert [r.rank for r in results] == [0, 1]


def test_ranks_that_stop_making_progress_fail_the_run_and_are_ended(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError, match=r"made no progress for 10 s \(steps finished per "
                                           r"rank: \[1, 1\]\)"):
        _launch(tmp_path, monkeypatch, stall=10, steps=1, pace=0, then=3600)
    pids = [int(p.read_text()) for p in (tmp_path / "pids").iterdir()]
    assert len(pids) == 2 and not any(_alive(pid) for pid in pids)
