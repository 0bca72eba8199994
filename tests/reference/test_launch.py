"""run_ranks leaves no rank process behind when its launcher is terminated."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

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
