"""The emulated cluster for real: namespaces, shaped veths, gloo ranks, counters, cleanup."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from netmoe.app.cluster.calibrate import channel_bytes, pattern
from netmoe.app.cluster.probe import write_workload
from netmoe.app.cluster.testbed import Testbed, TestbedConfig, TestbedError, existing_namespaces

from support import alive, leaked_links, root_links, run_bench

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None
                       or shutil.which("tc") is None,
                       reason="needs root and iproute2 (ip, tc) for network namespaces"),
]

NODES, G = 2, 2


def _assert_gone(namespaces: tuple[str, ...], pids: tuple[int, ...], links: set[str]) -> None:
    assert not set(namespaces) & set(existing_namespaces())
    assert not [pid for pid in pids if alive(pid)]
    assert not leaked_links(links)


def test_all_to_all_bytes_on_veths_match_inter_node_payload(tmp_path: Path) -> None:
    links = root_links()
    per_peer = 256 * 1024
    inter = pattern(NODES, G, per_peer, "inter")
    intra = pattern(NODES, G, per_peer, "intra")
    workload = tmp_path / "workload.json"
    write_workload(workload, [("inter", "a", inter), ("intra", "a", intra)], G)
    iters = 2
    with Testbed(TestbedConfig(nodes=NODES, rate_mbit=1000, intra_rate_mbit=4000)) as tb:
        assert set(tb.namespaces) <= set(existing_namespaces())
        base = tb.link_bytes()
        procs = tb.launch_ranks(G, [sys.executable, "-m", "netmoe.app.cluster.probe", "--workload",
                                    str(workload), "--iters", str(iters), "--warmup", "0",
                                    "--out", str(tmp_path / "out.json")], tmp_path / "logs")
        tb.wait(procs, timeout=120, log_dir=tmp_path / "logs")
        end = tb.link_bytes()
        namespaces, pids = tb.namespaces, tb.pids
    _assert_gone(namespaces, pids, links)

    result = json.loads((tmp_path / "out.json").read_text())
    calls = {c["name"]: c for c in result["calls"]}
    node = np.arange(NODES * G) // G
    for n in range(NODES):
        sent = int(inter[node == n][:, node != n].sum())  # payload node n puts on its link
        assert sent == channel_bytes(inter, G)[1] // NODES
        for tx, rx in zip(calls["inter"]["tx"][n], calls["inter"]["rx"][n], strict=True):
            # headers (GSO: one per super-packet), ACKs of the other direction and barrier
            # bytes: a few percent, up to 12% with retransmissions when the 2 cores are busy;
            # a rank sending its payload twice would show 100%
            assert sent <= tx <= sent * 1.25
            assert sent <= rx <= sent * 1.25
        # intra-node bytes go over lo, never the veth: only barriers and ACK-sized noise
        assert max(calls["intra"]["tx"][n]) < 64 * 1024
        total = end[n].tx - base[n].tx
        assert iters * sent <= total <= iters * sent * 1.05 + 2 * 1024 * 1024
    starts, ends = np.asarray(calls["inter"]["starts"]), np.asarray(calls["inter"]["ends"])
    assert starts.shape == (NODES * G, iters) and (ends > starts).all()


def test_failing_rank_ends_all_and_cleans_up(tmp_path: Path) -> None:
    links = root_links()
    # Ranks 0, 2, 3 block in the rendezvous waiting for rank 1, which fails.
    code = textwrap.dedent("""
        import os, sys, torch.distributed as dist
        if os.environ["RANK"] == "1":
            sys.exit(3)
        dist.init_process_group("gloo")
    """)
    with pytest.raises(TestbedError, match="rank 1 exited with 3"):  # noqa: SIM117
        with Testbed(TestbedConfig(nodes=NODES)) as tb:
            namespaces = tb.namespaces
            procs = tb.launch_ranks(G, [sys.executable, "-c", code], tmp_path)
            pids = tb.pids
            tb.wait(procs, timeout=60, log_dir=tmp_path)
    assert all(p.poll() is not None for p in procs)
    _assert_gone(namespaces, pids, links)


def test_sigterm_tears_down(tmp_path: Path) -> None:
    links = root_links()
    script = textwrap.dedent("""
        import json, sys, time
        from netmoe.app.cluster.testbed import Testbed, TestbedConfig
        with Testbed(TestbedConfig(nodes=2)) as tb:
            tb.launch(1, [sys.executable, "-c", "import time; time.sleep(300)"])
            print(json.dumps({"ns": tb.namespaces, "pids": tb.pids}), flush=True)
            time.sleep(300)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        info = json.loads(proc.stdout.readline())
        assert set(info["ns"]) <= set(existing_namespaces())
        assert all(alive(pid) for pid in info["pids"])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    _assert_gone(tuple(info["ns"]), tuple(info["pids"]), links)


def test_build_failure_removes_what_was_built() -> None:
    links = root_links()
    before = set(existing_namespaces())
    # an unknown congestion control fails after the first namespace exists
    with pytest.raises(TestbedError, match="congestion_control"), \
            Testbed(TestbedConfig(nodes=2, congestion="nosuchcc")):
        pass
    assert set(existing_namespaces()) <= before  # nothing of this run is left
    assert not leaked_links(links)


def test_bench_cluster_cli_measures_both_modes_and_cleans_up(tmp_path: Path) -> None:
    links = root_links()
    out = run_bench(
        [sys.executable, "-m", "netmoe.app.cli", "bench", "cluster", "--workload", "synthetic",
         "--quick", "--json", "--gpus-per-node", "2", "--steps", "2", "--layers", "2",
         "--seq-len", "64", "--rate", "300", "--locality", "0.9",
         "--out", str(tmp_path / "report")])
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    home, net = r["home"], r["netmoe"]
    for m in (home, net):
        assert m["a2a_seconds_per_step"] > 0
        # counters: payload plus a few percent of headers, ACKs and barriers
        assert m["payload_inter_bytes"] <= m["inter_node_bytes"] <= 1.1 * m["payload_inter_bytes"]
    assert net["payload_inter_bytes"] < home["payload_inter_bytes"]
    assert r["inter_bytes_reduction"] > 0
    assert net["plan_wait_seconds_per_step"] >= 0
    assert r["calibration"]["inter"]["bandwidth"] > 0
    assert {p.name for p in (tmp_path / "report").iterdir()} == {
        "report.md", "result.json", "step_time.png", "inter_bytes.png", "predicted.png"}
    # nothing of this run is left (other benches may run meanwhile: theirs carry their pid)
    assert not [ns for ns in existing_namespaces() if ns.startswith(f"netmoe{out.pid}x")]
    assert not leaked_links(links)
