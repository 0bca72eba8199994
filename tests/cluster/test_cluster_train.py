"""Real training on the emulated cluster (root only) and the pure parts of its bench."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from netmoe.app.cluster.train import (
    align_calls,
    expert_order,
    fit_copies,
    locality_bound,
    merge_repeats,
    replica_decision,
    replica_report,
    replica_verdict,
)
from netmoe.app.reference.model import relabel_state
from netmoe.app.reference.train import TrainConfig
from netmoe.trace import save_trace

from support import leaked_links, root_links, run_bench

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="needs root and iproute2 (ip, tc) for network namespaces")


def test_align_calls_spans_earliest_start_to_latest_end() -> None:
    rank0 = [(0, 1, "dispatch", 10.0, 10.5, [0, 8]), (0, 1, "combine", 11.0, 11.2, [4, 0])]
    rank1 = [(0, 1, "dispatch", 10.2, 10.9, [16, 0]), (0, 1, "combine", 11.1, 11.3, [0, 0])]
    calls = align_calls([rank0, rank1])
    assert [(c.layer, c.phase) for c in calls] == [(1, "dispatch"), (1, "combine")]
    assert calls[0].seconds == pytest.approx(0.9)
    assert calls[1].seconds == pytest.approx(0.3)
    assert calls[0].send.tolist() == [[0, 8], [16, 0]]
    with pytest.raises(ValueError, match="call 1 differs"):
        align_calls([rank0, [rank1[0], (0, 2, "combine", 11.1, 11.3, [0, 0])]])
    with pytest.raises(ValueError, match="different numbers"):
        align_calls([rank0, rank1[:1]])


def test_expert_order_puts_each_expert_on_its_mapped_device() -> None:
    maps = np.array([[3, 0, 1, 2, 0, 1, 2, 3], [0, 0, 1, 1, 2, 2, 3, 3]])  # 4 devices, 2 each
    order = expert_order(maps)
    for layer, perm in enumerate(order):
        assert sorted(perm) == list(range(8))
        assert [int(maps[layer][e]) for e in perm] == [v // 2 for v in range(8)]
    assert order[1] == tuple(range(8))


def _launch(a2a: float, loss: list[float], wait: float) -> dict:
    return {"a2a_seconds_per_step": a2a, "step_seconds": 2 * a2a, "inter_node_bytes": 100,
            "predicted_a2a_seconds": 1.0, "model_error": 1.0 / a2a - 1.0,
            "a2a_seconds_iterations": [a2a, a2a], "step_seconds_iterations": [2 * a2a] * 2,
            "inter_node_bytes_per_link": [40, 60], "loss": loss, "plan_wait_seconds_per_step": wait,
            "fallbacks": 0, "fallback_reasons": {},
            "calls": [{"name": "L0-dispatch", "measured_seconds": a2a / 2,
                       "predicted_seconds": 0.5, "payload_inter_bytes": 10}]}


def test_merge_repeats_takes_medians_over_launches() -> None:
    launches = [_launch(1.0, [2.0, 1.5], 0.1), _launch(4.0, [2.0, 1.5], 0.3),
                _launch(2.0, [2.0, 1.5 * (1 + 1e-6)], 0.2)]
    m = merge_repeats(launches)
    assert m["a2a_seconds_per_step"] == 2.0  # the median, not the mean (2.33)
    assert m["plan_wait_seconds_per_step"] == pytest.approx(0.2)
    assert m["model_error"] == pytest.approx(1.0 / 2.0 - 1.0)
    assert m["calls"][0]["measured_seconds"] == 1.0
    assert m["a2a_seconds_iterations"] == [1.0, 1.0, 4.0, 4.0, 2.0, 2.0]
    assert [r["a2a_seconds_per_step"] for r in m["repeats"]] == [1.0, 4.0, 2.0]
    assert m["repeat_loss_rel_diff"] == pytest.approx(1e-6)
    assert m["loss"] == [2.0, 1.5]


def test_locality_bound_finds_the_exact_cut_on_a_recorded_trace(tmp_path: Path) -> None:
    cfg = TrainConfig(nodes=2, gpus_per_node=2, samples_per_device=2, seq_len=4, layers=3)
    big_i, j, per_dev = cfg.global_samples, cfg.world, cfg.experts_per_device
    # every token of a sample on device d routes (top-2) to the experts of device (d + 2) % 4,
    # on the other node: at home all routes cross nodes, moving samples removes them all
    dev = np.arange(big_i) // (big_i // j)
    first = ((dev + 2) % j) * per_dev
    steps = 2
    topk = np.zeros((cfg.layers, steps * big_i * cfg.seq_len, 2), dtype=np.int64)
    tok_sample = np.repeat(np.arange(big_i), cfg.seq_len)
    topk[..., 0] = np.tile(first[tok_sample], steps)
    topk[..., 1] = np.tile(first[tok_sample] + 1, steps)
    sample_ids = np.repeat(np.arange(steps * big_i), cfg.seq_len)
    save_trace(tmp_path / "t.npz", topk, sample_ids, cfg.experts)
    home_map = [[e // per_dev for e in range(cfg.experts)]] * cfg.layers
    b = locality_bound(tmp_path / "t.npz", cfg, home_map)
    assert b["rounds"] == steps
    assert b["inter_routes"]["home"] == steps * (cfg.layers - 1) * 2 * big_i * cfg.seq_len * 2
    assert b["sample_inter_reduction"] == 1.0
    assert b["experts_inter_reduction"] == 1.0  # same map: same optimum


def _split_routing_trace(path: Path, cfg: TrainConfig, steps: int = 2) -> None:
    """Every token of every sample routes top-2 to experts 0 and E/2: whatever the placement,
    with the home map, half the routes cross nodes; copies of the two serve them locally."""
    big_i = cfg.global_samples
    topk = np.zeros((cfg.layers, steps * big_i * cfg.seq_len, 2), dtype=np.int64)
    topk[..., 1] = cfg.experts // 2
    sample_ids = np.repeat(np.arange(steps * big_i), cfg.seq_len)
    save_trace(path, topk, sample_ids, cfg.experts)


def test_fit_copies_names_each_copy_by_its_slot_in_the_expert_order(tmp_path: Path) -> None:
    cfg = TrainConfig(nodes=2, gpus_per_node=2, samples_per_device=2, seq_len=4, layers=3)
    _split_routing_trace(tmp_path / "t.npz", cfg)
    maps = np.array([[2, 2, 3, 3, 0, 0, 1, 1], [1, 0, 3, 2, 1, 0, 3, 2], [0, 0, 1, 1, 2, 2, 3, 3]])
    order = expert_order(maps)
    free = fit_copies(tmp_path / "t.npz", cfg, maps.tolist(), order, 1, 0)
    assert [sorted(e for e, _ in layer) for layer in free["copies"]] == [[0, 4]] * cfg.layers
    for layer, (pairs, labels) in enumerate(zip(free["copies"], free["labels"], strict=True)):
        assert sorted((order[layer][v], d) for v, d in labels) == sorted(map(tuple, pairs))
        # a copy sits on the node its expert is not on
        assert all(v // 2 // 2 != d // 2 for v, d in labels)
    # a sync dearer than every route a copy saves: no copy
    dear = fit_copies(tmp_path / "t.npz", cfg, maps.tolist(), order, 1, 10**9)
    assert dear["copies"] == [[]] * cfg.layers


def test_replica_decision_weighs_the_calibrated_sync(tmp_path: Path) -> None:
    from netmoe.app.cluster.calibrate import Calibration, ChannelFit

    cfg = TrainConfig(nodes=2, gpus_per_node=2, samples_per_device=2, seq_len=4, layers=3)
    _split_routing_trace(tmp_path / "t.npz", cfg)
    maps = [[e // 2 for e in range(cfg.experts)]] * cfg.layers
    copies = fit_copies(tmp_path / "t.npz", cfg, maps, expert_order(np.array(maps)), 1, 0)
    intra, inter = ChannelFit(0.0, 1e9, 1.0), ChannelFit(0.0, 1e6, 1.0)
    cheap = replica_decision(tmp_path / "t.npz", cfg, maps, copies["copies"],
                             Calibration(intra, inter, ()), 100, 1000)
    assert cheap["n_copies"] == cheap["cross_node_copies"] == 2 * cfg.layers
    assert cheap["held_out_inter_routes"]["replicated"] < cheap["held_out_inter_routes"]["joint"]
    assert cheap["predicted_sync_seconds_per_step"] == pytest.approx(
        cfg.layers * 2 * 2 * 100 / 1e6)  # per layer 2 cross-node copies, 2 x grad bytes each
    assert cheap["pays"] and cheap["predicted_net_seconds_per_step"] > 0
    slow = Calibration(intra, ChannelFit(1.0, 1e6, 1.0), ())  # a 1 s sync all-reduce
    dear = replica_decision(tmp_path / "t.npz", cfg, maps, copies["copies"], slow, 100, 1000)
    assert not dear["pays"] and "sync costs more than they save" in dear["reason"]


@pytest.mark.parametrize(("value", "message"), [
    ("-1", "--replica-budget must be >= 0, got -1"),
    ("15", "--replica-budget 15: slots=15 copies per device do not fit"),
])
def test_bad_replica_budget_exits_2_with_one_line(value: str, message: str) -> None:
    out = subprocess.run([sys.executable, "-m", "netmoe.app.cli", "bench", "cluster",
                          "--replica-budget", value], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_copies_of_a_run_must_cover_its_layers() -> None:
    with pytest.raises(ValueError, match="copies must list 4 layers"):
        TrainConfig(copies=[[(0, 2)]])
    with pytest.raises(ValueError, match="adopt_experts_at=1"):
        TrainConfig(copies=[[]] * 4, adopt_experts_at=1, placement="service", server="x:1")


def _replica_modes(experts_step: float, replicas_step: float) -> dict:
    def mode(step: float, sync: float) -> dict:
        return {"a2a_seconds_per_step": step / 2, "step_seconds": step,
                "predicted_a2a_seconds": step / 3, "copy_sync_seconds_per_step": sync,
                "between_steps_inter_node_bytes": int(sync * 1e6),
                "repeats": [{"step_seconds": step}, {"step_seconds": step * 1.1}]}

    return {"experts": mode(experts_step, 0.0), "replicas": mode(replicas_step, 0.05)}


def test_replica_verdict_states_the_model_and_whether_the_step_agrees() -> None:
    decision = {"pays": True, "reason": "why", "predicted_saving_seconds_per_step": 0.2,
                "predicted_sync_seconds_per_step": 0.05}
    copies = {"copies": [[[0, 2]], []], "decision": decision}
    faster = replica_report(_replica_modes(1.0, 0.8), copies)
    assert faster["n_copies"] == 1 and faster["step_faster"] and faster["agrees"]
    assert faster["measured_step_saving_seconds_per_step"] == pytest.approx(0.2)
    assert faster["step_launch_spread"] == pytest.approx(0.1 / 1.05)
    text = replica_verdict(faster)
    assert text.startswith("model: copies pay (per step 200.0 ms of All-to-All saved vs 50.0 ms")
    assert "step 200 ms faster" in text and text.endswith("agrees with the model")
    slower = replica_report(_replica_modes(1.0, 1.3), {**copies, "decision": {
        **decision, "pays": False}})
    assert not slower["step_faster"] and slower["agrees"]
    assert replica_verdict(slower).startswith("model: copies do not pay (")
    wrong = replica_report(_replica_modes(1.0, 1.3), copies)
    assert not wrong["agrees"] and replica_verdict(wrong).endswith("disagrees with the model")


def test_relabel_state_moves_experts_and_router_rows_to_slots() -> None:
    state = {
        "blocks.0.moe.router.weight": torch.arange(6.0).reshape(3, 2),
        "blocks.0.moe.experts.0.fc1.weight": torch.tensor([0.0]),
        "blocks.0.moe.experts.1.fc1.weight": torch.tensor([1.0]),
        "blocks.0.moe.experts.2.fc1.weight": torch.tensor([2.0]),
        "head.weight": torch.tensor([7.0]),
    }
    out = relabel_state(state, [(2, 0, 1)])  # slot 0 holds expert 2, slot 1 expert 0, ...
    assert out["blocks.0.moe.router.weight"].tolist() == [[4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]
    assert [float(out[f"blocks.0.moe.experts.{v}.fc1.weight"]) for v in range(3)] == [2, 0, 1]
    assert float(out["head.weight"]) == 7.0


@pytest.mark.root
@needs_root
def test_training_on_emulated_cluster_four_modes_equal_losses_and_cleanup(
        tmp_path: Path) -> None:
    from netmoe.app.cluster.testbed import existing_namespaces

    links = root_links()
    out = run_bench(
        [sys.executable, "-m", "netmoe.app.cli", "bench", "cluster", "--quick", "--json",
         "--gpus-per-node", "2", "--steps", "2", "--warmup-steps", "0", "--fit-steps", "2",
         "--replica-fit", "routes",  # a budget of copies whatever the sync costs
         "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "report")])
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert set(r["modes"]) == {"home", "sample", "experts", "replicas"}
    home = r["modes"]["home"]
    assert len(home["loss"]) == 2
    for name, m in r["modes"].items():
        np.testing.assert_allclose(m["loss"], home["loss"], rtol=1e-5, err_msg=name)
        assert m["a2a_seconds_per_step"] > 0 and m["step_seconds"] > m["a2a_seconds_per_step"]
        # the veth counters see at least the All-to-All payload that crossed nodes
        assert m["inter_node_bytes"] >= m["payload_inter_bytes"] > 0
        assert {c["phase"] for c in m["calls"]} >= {"dispatch", "combine", "dispatch_bwd",
                                                    "combine_bwd"}
    for name in ("sample", "experts", "replicas"):
        m = r["modes"][name]
        assert m["fallbacks"] == 0, m["fallback_reasons"]
        assert 0 <= m["plan_reply_seconds_per_step"] <= m["plan_wait_seconds_per_step"]
    assert r["netmoe"] == r["modes"][r["best_mode"]]
    assert r["repeats"] == 1 and r["locality_bound"]["rounds"] == 2  # the measured steps
    assert r["locality_bound"]["inter_routes"]["home"] > 0
    # the fitted map is in force: the experts run routes differently from the sample run
    assert r["modes"]["experts"]["payload_inter_bytes"] != r["modes"]["sample"][
        "payload_inter_bytes"]
    _check_replicas(r, (tmp_path / "report" / "report.md").read_text())
    assert {p.name for p in (tmp_path / "report").iterdir()} == {
        "report.md", "result.json", "step_time.png", "inter_bytes.png", "predicted.png"}
    assert "## Gaps to the targets" in (tmp_path / "report" / "report.md").read_text()
    # nothing of this run is left (other benches may run meanwhile: theirs carry their pid)
    assert not [ns for ns in existing_namespaces() if ns.startswith(f"netmoe{out.pid}x")]
    assert not leaked_links(links)


def _check_replicas(r: dict, report_md: str) -> None:
    """The replicas mode had copies in force, timed their sync, and its verdict follows the
    model's numbers (the losses are checked with every mode's)."""
    rep, modes = r["replicas"], r["modes"]
    assert rep["n_copies"] > 0 and rep["confirmed"] and not rep["error"]
    assert rep["n_copies"] == rep["decision"]["n_copies"]
    for name, m in modes.items():
        assert (m["copy_sync_seconds_per_step"] > 0) == (name == "replicas"), name
    # the copies serve routes where the experts mode crossed nodes or devices
    assert modes["replicas"]["payload_inter_bytes"] != modes["experts"]["payload_inter_bytes"]
    d = rep["decision"]
    assert d["predicted_net_seconds_per_step"] == pytest.approx(
        d["predicted_saving_seconds_per_step"] - d["predicted_sync_seconds_per_step"])
    pays = d["predicted_net_seconds_per_step"] > 0 and (
        d["predicted_net_seconds_per_step"] * d["horizon_steps"] > d["predicted_creation_seconds"])
    assert d["pays"] == pays
    assert rep["measured_step_saving_seconds_per_step"] == pytest.approx(
        modes["experts"]["step_seconds"] - modes["replicas"]["step_seconds"])
    assert rep["agrees"] == (d["pays"] == (rep["measured_step_saving_seconds_per_step"] > 0))
    assert replica_verdict(rep) in report_md
    assert ("model: copies pay (" in report_md) == d["pays"]
