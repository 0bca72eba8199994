"""The `run` script: usage without building anything, and the choice of the Python that builds
the virtualenv (the first of python3.11, python3 that is >= 3.11). Runs a copy of the script in
a scratch folder with a PATH of stand-in interpreters, so no virtualenv is built."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
TOOLS = ("bash", "cat", "sha256sum", "cut", "mkdir", "flock", "dirname", "grep", "env")


def fake_python(path: Path, version_ok: bool) -> None:
    """An interpreter that passes (or fails) the version check and reports any other call."""
    path.write_text("#!/bin/bash\n"
                    f'if [ "$1" = -c ]; then exit {0 if version_ok else 1}; fi\n'
                    f'echo "{path.name} called with: $*" >&2\nexit 3\n')
    path.chmod(0o755)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for name in ("run", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    return tmp_path


def run(checkout: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(checkout / "run"), *args], capture_output=True,
                          text=True, timeout=60, env={"PATH": str(checkout / "bin")})


def test_help_prints_usage_and_builds_nothing(checkout: Path) -> None:
    for flag in ("--help", "-h", "help"):
        out = run(checkout, flag)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("usage: ./run COMMAND [ARGS]")
        assert "./run demo" in out.stdout and "./run test" in out.stdout
    assert not (checkout / ".venv").exists()


def test_bare_run_prints_usage_and_exits_2(checkout: Path) -> None:
    out = run(checkout)
    assert out.returncode == 2
    assert out.stderr.startswith("usage: ./run COMMAND [ARGS]") and out.stdout == ""
    assert not (checkout / ".venv").exists()


def test_python3_is_used_when_it_is_new_enough(checkout: Path) -> None:
    fake_python(checkout / "bin" / "python3", version_ok=True)
    out = run(checkout, "test")
    assert "[run] setting up .venv with python3 " in out.stderr
    assert "python3 called with: -m venv .venv" in out.stderr


def test_python311_comes_first(checkout: Path) -> None:
    fake_python(checkout / "bin" / "python3.11", version_ok=True)
    fake_python(checkout / "bin" / "python3", version_ok=True)
    out = run(checkout, "test")
    assert "python3.11 called with: -m venv .venv" in out.stderr


def test_no_new_enough_python_is_a_clear_error(checkout: Path) -> None:
    fake_python(checkout / "bin" / "python3", version_ok=False)
    out = run(checkout, "test")
    assert out.returncode == 1
    assert out.stderr.strip() == ("[run] error: no Python >= 3.11 found (tried python3.11 "
                                  "python3); install one or set PYTHON=/path/to/python3.x")
