"""The documented training-loop example runs as a user would run it: 4 ranks, real service."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "training_loop.py"


def test_training_loop_example_plans_every_layer_and_exits_cleanly() -> None:
    assert len(EXAMPLE.read_text().splitlines()) < 90  # the docs promise a short example
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # 3 AdamW steps of 2 micro-batches: 12 rounds (2 layers each), every block recomputed.
    losses = [float(v) for v in re.findall(r"step \d: loss ([\d.]+)", done.stdout)]
    assert len(losses) == 3 and all(v > 0 for v in losses), done.stdout
    lines = sorted(re.findall(r"rank (\d): (\d+) plans, (\d+) recomputed, (\d+) fallbacks",
                              done.stdout))
    assert [rank for rank, *_ in lines] == ["0", "1", "2", "3"], done.stdout
    assert all(line[1:] == ("12", "12", "0") for line in lines), done.stdout
    assert "Traceback" not in done.stderr and "terminate called" not in done.stderr
