"""The images built and run by a real engine (dockerd): docker/build.sh, the sidecar read-only
with every capability dropped, its HEALTHCHECK as the engine reports it, health, metrics and the
token from the host, a clean SIGTERM stop, and `docker compose up` with the minimal trainer.
Skips (with the reason) unless root with a running dockerd; .ci/run installs and starts one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from netmoe.app.reference.results import RankResult

from support import wait_for

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TAG = "test"
SIDECAR, TRAINER = f"netmoe-sidecar:{TAG}", f"netmoe-trainer:{TAG}"
TOKEN = "engine-test-token-0123456789abcdef"
DRAIN, GRACE = 2, 5  # the image's NETMOE_DRAIN_SECONDS and NETMOE_GRACE_SECONDS


def engine_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root to talk to dockerd"
    if shutil.which("docker") is None:
        return "no docker client (.ci/run installs docker.io)"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"dockerd is not running ({(info.stderr.strip().splitlines() or ['?'])[-1]})"
    return None


problem = engine_problem()
pytestmark = pytest.mark.skipif(problem is not None, reason=f"no container engine: {problem}")


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    assert not check or out.returncode == 0, f"docker {' '.join(args)}: {out.stderr}"
    return out.stdout.strip()


@pytest.fixture(scope="module")
def images() -> None:
    for kind in ("sidecar", "trainer"):
        out = subprocess.run([str(ROOT / "docker" / "build.sh"), TAG, kind],
                             capture_output=True, text=True, timeout=1800)
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.strip().splitlines()[-1] == f"netmoe-{kind}:{TAG}"


def test_no_pip_configuration_or_certificate_in_the_image(images: None) -> None:
    """build.sh hands pip its configuration as build secrets: no file of it in any layer."""
    found = docker("run", "--rm", "--user", "0", "--entrypoint", "sh", SIDECAR, "-c",
                   "find / -xdev \\( -name 'pip.conf' -o -name 'pip_cert' -o -name 'pip_conf' "
                   "-o -path '/etc/xdg/pip' -o -path '/run/secrets' \\) -print")
    assert found == ""
    bins = docker("run", "--rm", "--entrypoint", "ls", SIDECAR, "/opt/netmoe/bin").split()
    assert "netmoe" in bins and not {"pip", "pip3", "f2py"} & set(bins)
    cut = docker("run", "--rm", "--entrypoint", "python", SIDECAR, "-c",
                 "import importlib.util as u; print(u.find_spec('pandas.tests'), "
                 "u.find_spec('pip'), u.find_spec('ortools.sat.python.cp_model') is not None)")
    assert cut == "None None True"  # the test suites and pip are cut, the solver is not


def health(addr: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "netmoe"), "health", "--server", addr, "--timeout", "2"],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def sidecar(images: None) -> Iterator[str]:
    cid = docker(
        "run", "-d", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        "--health-interval", "1s",  # the image's check command, probed sooner than every 10 s
        "-e", "NETMOE_HOST=0.0.0.0", "-e", "NETMOE_METRICS_HOST=0.0.0.0",
        "-e", "NETMOE_ALLOW_REMOTE=1", "-e", f"NETMOE_AUTH_TOKEN={TOKEN}",
        "-p", "127.0.0.1::50051", "-p", "127.0.0.1::9464", SIDECAR,
    )
    try:
        yield cid
    finally:
        docker("rm", "-f", cid, check=False)


def published(cid: str, port: int) -> str:
    return docker("port", cid, f"{port}/tcp").splitlines()[0]


def test_sidecar_read_only_no_capabilities_healthy_token_and_clean_stop(sidecar: str) -> None:
    state = json.loads(docker("inspect", sidecar))[0]
    assert state["Config"]["User"] == "10001:10001"
    assert state["HostConfig"]["ReadonlyRootfs"] is True
    assert state["HostConfig"]["CapDrop"] == ["ALL"]
    assert state["HostConfig"]["SecurityOpt"] == ["no-new-privileges"]
    grpc_addr, metrics_addr = published(sidecar, 50051), published(sidecar, 9464)

    wait_for(lambda: health(grpc_addr).returncode == 0, 60, "SERVING from the host", every=0.2)
    assert health(grpc_addr).stdout.strip() == f"netmoe health: {grpc_addr}: SERVING"
    wait_for(lambda: docker("inspect", "-f", "{{.State.Health.Status}}", sidecar) == "healthy",
             60, "the engine's HEALTHCHECK", every=0.2)
    with urllib.request.urlopen(f"http://{metrics_addr}/metrics", timeout=10) as resp:
        assert b"netmoe_active_jobs 0.0" in resp.read()

    unregister = "/netmoe.v1.PlacementService/UnregisterJob"
    with grpc.insecure_channel(grpc_addr) as channel:
        call = channel.unary_unary(unregister)  # bytes in, bytes out
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        try:
            call(b"", timeout=10, metadata=[("authorization", f"Bearer {TOKEN}")])
        except grpc.RpcError as admitted:  # past authentication: refused for the empty job
            assert admitted.code() != grpc.StatusCode.UNAUTHENTICATED

    # docker stop sends STOPSIGNAL and kills after -t seconds: exit 0 means drained in time.
    docker("stop", "-t", str(DRAIN + GRACE), sidecar, timeout=60)
    stopped = json.loads(docker("inspect", sidecar))[0]["State"]
    assert (stopped["ExitCode"], stopped["OOMKilled"]) == (0, False)
    logs = subprocess.run(["docker", "logs", sidecar], capture_output=True, text=True,
                          timeout=30).stderr
    assert "got SIGTERM" in logs and "draining (health NOT_SERVING)" in logs
    assert logs.rstrip().endswith("netmoe serve: stopped")


def test_compose_trainer_trains_against_the_sidecar_and_exits_0(images: None) -> None:
    project = f"netmoe-test-{os.getpid()}"
    compose = [str(BIN / "docker-compose"), "-p", project, "-f", str(ROOT / "docker" /
                                                                      "compose.yaml")]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NETMOE_")},
           "NETMOE_AUTH_TOKEN": TOKEN, "NETMOE_TRAIN_STEPS": "3",
           "NETMOE_SIDECAR_IMAGE": SIDECAR, "NETMOE_TRAINER_IMAGE": TRAINER,
           "NETMOE_METRICS_HOST_PORT": "0"}  # an ephemeral host port
    try:
        up = subprocess.run([*compose, "up", "--no-build", "--abort-on-container-exit",
                             "--exit-code-from", "trainer"],
                            env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        copied = subprocess.run(["docker", "cp", f"{project}-trainer-1:/tmp/result.json", "-"],
                                capture_output=True, timeout=60)
        assert copied.returncode == 0, copied.stderr
        result = RankResult.from_json(_untar_one(copied.stdout).decode())
        placed = result.placement
        assert len(result.loss) == 3 and placed is not None
        assert placed.plans > 0 and placed.fallbacks == 0, placed.fallback_reasons
        assert "sidecar-1 exited with code 0" in up.stdout
    finally:
        subprocess.run([*compose, "down", "-t", "15"], env=env, capture_output=True,
                       timeout=120)


def _untar_one(data: bytes) -> bytes:
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.next()
        assert member is not None
        handle = tar.extractfile(member)
        assert handle is not None
        return handle.read()


def test_trainer_image_under_a_uid_without_passwd_entry_and_home_slash(images: None) -> None:
    """What compose's `user: "10001:10001"` gave before the image set HOME: HOME=/, so the
    default cache /.cache/netmoe is not creatable. The corpus loads uncached instead."""
    out = subprocess.run(
        ["docker", "run", "--rm", "--user", "10001:10001", "-e", "HOME=/", "--cap-drop", "ALL",
         TRAINER, "python", "-c",
         "import logging; logging.basicConfig(); "
         "from netmoe.app.reference.data import load_corpus; "
         "print(len(load_corpus(512).vocab))"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "512"
    assert "corpus cache /.cache/netmoe is not writable" in out.stderr
    assert "Permission denied" in out.stderr
    home = docker("run", "--rm", "--user", "4242:4242", TRAINER, "sh", "-c", "echo $HOME")
    assert home == "/tmp"  # the image's HOME, writable by any uid
