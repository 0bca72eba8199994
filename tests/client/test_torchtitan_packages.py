"""netmoe's client installs beside torchtitan without changing torchtitan's packages.

A trainer's environment: a fresh venv with torchtitan 0.3.0 and triton as the package index
resolves them today (its wandb and tensorboard bring protobuf 7). Installing ``netmoe[client]``
from this checkout must add netmoe and change nothing else; ``pip check`` must pass and the
client's generated protobuf code must load on that protobuf. Slow (it builds the venv from the
package index): ``--runslow``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _pip(venv: Path, *args: str) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", *args], check=True,
                         capture_output=True, text=True, timeout=1500)  # fmt: skip
    return out.stdout


def _frozen(venv: Path) -> dict[str, str]:
    lines = _pip(venv, "freeze", "--all").splitlines()
    return dict(line.split("==", 1) for line in lines if "==" in line)


@pytest.mark.slow
def test_client_extra_changes_none_of_torchtitans_packages(tmp_path: Path) -> None:
    venv = tmp_path / "trainer"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    _pip(venv, "install", "-q", "torch==2.13.0", "torchtitan==0.3.0", "triton")
    before = _frozen(venv)
    _pip(venv, "install", "-q", f"{ROOT}[client]")
    after = _frozen(venv)
    changed = {k: (before[k], after.get(k)) for k in before if after.get(k) != before[k]}
    assert changed == {}, changed
    assert set(after) - set(before) <= {"netmoe"}, set(after) - set(before)
    _pip(venv, "check")
    probe = ("import google.protobuf, netmoe.client.placement_client; "
             "from netmoe.protos import convert, placement_pb2 as pb; "
             "s = convert.job_spec(2, 2, 8, 2, hidden_size=32); "
             "assert pb.JobSpec.FromString(s.SerializeToString()) == s; "
             "print(google.protobuf.__version__)")  # fmt: skip
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], check=True,
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.stdout.strip() == before["protobuf"]
