"""The sidecar image and compose file without a Docker engine: hadolint, `docker-compose config`,
the Dockerfile read as data, and its exact ENTRYPOINT run as a process probed by its HEALTHCHECK."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from support import free_port, run_without

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
BIN = Path(sys.executable).parent  # the venv's console scripts (netmoe, hadolint, ...)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [args for o, args in self.instructions if o == op]

    def last(self, op: str) -> str | None:
        found = self.all(op)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> list[Stage]:
    """Stages with their (INSTRUCTION, arguments) pairs; continuations joined, comments dropped."""
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[Stage] = []
    for line in logical:
        op, _, args = line.strip().partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.IGNORECASE)
            assert m, line
            stages.append(Stage(m[1], m[2]))
        else:
            stages[-1].instructions.append((op, args.strip()))
    return stages


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in stage.all("ENV"):
        for token in shlex.split(args):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def exec_form(args: str) -> list[str]:
    argv = json.loads(args)  # raises unless it is the JSON (exec) form
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.skip(f"{name} is not installed in the venv (dev extra)")
    return str(path)


def test_hadolint_passes() -> None:
    result = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_root_image(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(DOCKERFILE.read_text().replace("USER 10001:10001", "USER root"))
    result = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "DL3002" in result.stdout


def compose_config(path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NETMOE_")}
    return subprocess.run([tool("docker-compose"), "-f", str(path), "config", *extra],
                          capture_output=True, text=True, timeout=60, env=env)


def test_compose_file_is_valid_and_wires_trainer_to_a_healthy_sidecar() -> None:
    assert compose_config(COMPOSE, "-q").returncode == 0
    result = compose_config(COMPOSE, "--format", "json")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    sidecar, trainer = services["sidecar"], services["trainer"]
    assert sidecar["build"]["dockerfile"] == "docker/Dockerfile"
    assert sidecar["healthcheck"]["test"][:3] == ["CMD", "netmoe", "health"]
    assert trainer["network_mode"] == "service:sidecar"  # 127.0.0.1 is shared, as in a pod
    assert trainer["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert "127.0.0.1:50051" in trainer["environment"]["NETMOE_TRAIN_CONFIG"]
    # Unset secrets become empty strings, which `netmoe serve` reads as "not configured".
    assert sidecar["environment"]["NETMOE_AUTH_TOKEN"] == ""
    assert "NETMOE_HOST" not in sidecar["environment"]  # gRPC stays on the image's loopback


def test_compose_validation_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("condition: service_healthy",
                                               "condition: when_ready"))
    result = compose_config(bad, "-q")
    assert result.returncode != 0 and "depends_on.sidecar.condition" in result.stderr


def test_image_is_multi_stage_slim_non_root_and_server_only(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    assert {s.base for s in stages} == {"python:3.11-slim"}
    final = stages[-1]
    user = final.last("USER")
    assert user is not None
    uid = user.split(":")[0]
    assert uid not in ("root", "0") and int(uid) > 0
    assert any(f"--uid {uid}" in run for run in final.all("RUN"))  # the user exists
    # The server extra's pinned requirements, then netmoe alone (its sources copied after the
    # first, so that a change to them keeps the requirements' layer).
    installs = [r for s in stages for r in s.all("RUN") if "pip install" in r]
    assert len(installs) == 2
    assert all("-c constraints.txt" in run for run in installs)
    assert "requirements.py pyproject.toml server >requirements.txt" in installs[0]
    assert installs[0].endswith("-r requirements.txt")
    assert installs[1].endswith("--no-deps -c constraints.txt .")
    assert not re.search(r"client|dev|torch", " ".join(installs))
    build = stages[0].instructions
    assert build.index(("COPY", "app app")) > build.index(("RUN", installs[0]))
    assert final.all("COPY") == ["--from=build /opt/netmoe /opt/netmoe"]  # no sources, no tests


def probe(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], env=env, capture_output=True,
                          text=True, timeout=60)


def test_entrypoint_runs_and_answers_its_healthcheck(stages: list[Stage]) -> None:
    final = stages[-1]
    entrypoint = exec_form(final.last("ENTRYPOINT") or "[]")
    cmd = exec_form(final.last("CMD") or "[]")
    assert entrypoint == ["netmoe", "serve"]
    healthcheck = final.last("HEALTHCHECK")
    assert healthcheck is not None
    check = exec_form(re.sub(r"^(--\S+\s+)*CMD\s+", "", healthcheck))
    assert check[:2] == ["netmoe", "health"]
    image_env = env_of(final)
    exposed = set(" ".join(final.all("EXPOSE")).split())
    assert {image_env["NETMOE_PORT"], image_env["NETMOE_METRICS_PORT"]} <= exposed

    # The image's environment, minus PATH, with free ports instead of the fixed ones.
    env = {**os.environ, **{k: v for k, v in image_env.items() if k != "PATH"},
           "NETMOE_PORT": str(free_port()), "NETMOE_METRICS_PORT": str(free_port())}
    assert probe(check, env).returncode == 1  # nothing listens yet
    proc = subprocess.Popen([str(BIN / entrypoint[0]), *entrypoint[1:], *cmd], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while (result := probe(check, env)).returncode != 0:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, result.stdout + result.stderr
            time.sleep(0.3)
        assert result.stdout.strip() == f"netmoe health: 127.0.0.1:{env['NETMOE_PORT']}: SERVING"
        url = f"http://127.0.0.1:{env['NETMOE_METRICS_PORT']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert b"netmoe_active_jobs" in resp.read()
        proc.send_signal(signal.SIGTERM)  # docker stop; the image drains for a few seconds
        assert probe(check, env).returncode == 1  # NOT_SERVING while draining, then gone
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def test_server_side_imports_need_no_torch() -> None:
    """The image installs only the server extra: the CLI (every subcommand's parser) and the
    service must import with torch absent."""
    out = run_without(("torch",), "from netmoe.app.cli import build_parser\n"
                                  "parser = build_parser()\n"
                                  "import netmoe.server.app\n"
                                  "print(parser.format_help())\n")
    assert out.returncode == 0, out.stderr
    assert "serve" in out.stdout and "demo" in out.stdout


def test_requirements_of_an_extra_come_from_pyproject() -> None:
    def run(*extras: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"),
                               str(ROOT / "pyproject.toml"), *extras], capture_output=True,
                              text=True, timeout=60)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    server = run("server")
    assert server.returncode == 0, server.stderr
    assert server.stdout.splitlines() == [*project["dependencies"],
                                          *project["optional-dependencies"]["server"]]
    both = run("server", "client").stdout.splitlines()
    assert len(both) == len(set(both))  # a requirement both name (numpy, grpcio) once
    wrong = run("sever")
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == ("requirements.py: no extra 'sever' in "
                                    f"{ROOT / 'pyproject.toml'} (it has ['client', 'dev', 'hf', "
                                    "'server', 'torchtitan'])")
