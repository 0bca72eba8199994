"""`netmoe demo` as a user runs it: progress while training, a wrong --server refused before any
work, a loud failure when the placement service refuses the job, and Ctrl-C ending with exit code
130 and no traceback or stray ranks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from support import alive, children, free_port, wait_for

TINY = ["--warmup-steps", "0", "--nodes", "1", "--gpus-per-node", "2", "--layers", "1",
        "--seq-len", "8", "--samples-per-device", "2"]


def demo(*args: str) -> list[str]:
    return [sys.executable, "-m", "netmoe.app.cli", "demo", *TINY, *args]


def test_an_unreachable_server_is_refused_before_anything_else(tmp_path: Path) -> None:
    port = free_port()  # nothing listens on it
    # The default run (pre-training included) into an empty cache: the check comes first.
    args = [sys.executable, "-m", "netmoe.app.cli", "demo", "--cache-dir", str(tmp_path),
            "--server", f"127.0.0.1:{port}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith(f"netmoe demo: error: --server 127.0.0.1:{port}: no placement "
                                 f"service answers there (UNAVAILABLE: "), out.stderr
    assert len(out.stderr.splitlines()) == 1 and not out.stdout
    assert list(tmp_path.iterdir()) == []  # no corpus, no checkpoint: nothing ran


def test_a_service_that_refuses_the_job_is_an_error_and_progress_is_shown() -> None:
    from netmoe.server.app import start
    from netmoe.server.config import ServerConfig

    # Health answers without the token; every placement call is refused without it.
    with start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None,
                            auth_token="not-given")) as handle:
        env = {k: v for k, v in os.environ.items() if k != "NETMOE_AUTH_TOKEN"}
        out = subprocess.run(demo("--steps", "2", "--server", handle.address),
                             capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 1, out.stderr
    err = out.stderr.splitlines()
    assert "netmoe demo: home run: step 2/2" in "\n".join(err)
    assert "netmoe demo: netmoe run: step 2/2" in "\n".join(err)
    assert err[-1].startswith(f"netmoe demo: error: the netmoe run got no plan from the "
                              f"placement service at {handle.address}: all 2 layers fell back")
    assert "Traceback" not in out.stderr
    assert "0.0% fewer than home" in out.stdout and "2 fallbacks" in out.stdout


def test_ctrl_c_ends_with_130_without_traceback_or_stray_ranks() -> None:
    proc = subprocess.Popen(demo("--steps", "500"), stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stderr is not None
    seen = ""
    try:
        while "netmoe demo: home run: step " not in seen:
            line = proc.stderr.readline()
            assert line, f"demo ended early: {seen}"
            seen += line
        forker = children(proc.pid)  # the fork server (and multiprocessing's resource tracker)
        ranks = set().union(*(children(pid) for pid in forker))
        assert len(ranks) == 2
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        rest = proc.stderr.read()
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 130, seen + rest
    # The embedded service's metrics URL is given while it is alive, not after the end.
    assert re.search(r"^netmoe demo: placement service on 127\.0\.0\.1:\d+, metrics on "
                     r"http://127\.0\.0\.1:\d+/metrics until the demo ends$", seen, re.M)
    assert "Traceback" not in rest
    assert rest.splitlines()[-1] == "netmoe demo: interrupted"
    wait_for(lambda: not any(alive(pid) for pid in ranks | forker),
             what="the ranks and the fork server to exit")


def test_demo_trains_with_recompute_micro_batches_and_bf16_like_home() -> None:
    """bf16 hidden states cross the All-to-Alls as bf16 (2 bytes per element plus metadata), the
    recompute and the micro-batches get every plan they ask for, and losses equal home's."""
    import json

    args = [sys.executable, "-m", "netmoe.app.cli", "demo", "--warmup-steps", "0", "--nodes", "2",
            "--gpus-per-node", "1", "--layers", "2", "--seq-len", "8", "--samples-per-device",
            "2", "--steps", "2", "--recompute", "--micro-batches", "2", "--dtype", "bf16",
            "--json"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    d = report["config"]["d_model"]
    # Dispatch: bf16 state, int64 (expert, token, slot), fp32 weight; combine: state, (token,
    # first slot).
    assert report["bytes_per_route"] == {"dispatch": d * 2 + 24 + 4, "combine": d * 2 + 16}
    assert report["home"]["bytes_per_route"]["dispatch"] == d * 2 + 28
    assert report["netmoe"]["fallbacks"] == 0, report["netmoe"]["fallback_reasons"]
    assert report["max_loss_rel_diff"] <= 1e-2, report["max_loss_rel_diff"]
    assert set(report) >= {"home", "netmoe", "solver_ms_median", "inter_reduction", "config"}
