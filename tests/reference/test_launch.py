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

from support import alive, wait_for

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


def test_sigterm_to_launcher_kills_its_ranks(tmp_path: Path) -> None:
    (tmp_path / "fake_rank.py").write_text(RANK.format(steps=100000, pace=0.1, then=0))
    pids = tmp_path / "pids"
    pids.mkdir()
    code = textwrap.dedent("""
        from netmoe.app.reference.launch import run_ranks
        from netmoe.app.reference.train import TrainConfig
        run_ranks(TrainConfig(nodes=1, gpus_per_node=2, steps=100000), module="fake_rank")
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), PID_DIR=str(pids))
    launcher = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        wait_for(lambda: len([p for p in pids.iterdir() if p.read_text()]) == 2,
                 what="the launcher's two ranks")
        ranks = [int(p.read_text()) for p in pids.iterdir()]
        assert all(alive(pid) for pid in ranks)
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=30) != 0
        # Both ranks end (they would run 100000 steps if the launcher left them behind).
        wait_for(lambda: not any(alive(pid) for pid in ranks), what="the ranks to exit")
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


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
    assert len(pids) == 2 and not any(alive(pid) for pid in pids)


def _report(out: str) -> None:
    import json

    import probe_module  # found only through PYTHONPATH

    Path(out).write_text(json.dumps([os.environ.get("NETMOE_PROBE"), os.getcwd(),
                                     probe_module.VALUE]))


def test_a_started_process_sees_the_environment_of_now_not_of_the_fork_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fork server keeps the environment, directory and sys.path of when it started; a
    process started later gets the launcher's current ones, as a new interpreter would."""
    import json

    from netmoe.app.reference.launch import start_process

    first = start_process(time.sleep, 0)  # the fork server runs from here on
    first.join()
    assert first.exitcode == 0
    (tmp_path / "probe_module.py").write_text("VALUE = 7\n")
    monkeypatch.setenv("NETMOE_PROBE", "now")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    proc = start_process(_report, str(tmp_path / "out.json"))
    proc.join(60)
    assert proc.exitcode == 0
    assert json.loads((tmp_path / "out.json").read_text()) == ["now", str(tmp_path), 7]
