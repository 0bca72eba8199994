"""Expert maps and copies adopted mid-run: 4 real gloo ranks, a real placement service on
loopback. The copies serve their node's routes and sync their gradients; the model computes the
same function, so losses and parameters (by original expert id) equal the home run's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from netmoe.app.cli import main
from netmoe.app.reference.data import load_corpus
from netmoe.app.reference.launch import run_ranks
from netmoe.app.reference.train import TrainConfig

from support import advisor_settled, scrape

STEPS, ADOPT_AT = 6, 4
TINY = dict(nodes=2, gpus_per_node=2, steps=STEPS, samples_per_device=2, seq_len=16, d_model=32,
            heads=2, layers=3, ffn=32, vocab=512)  # fmt: skip


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, list]:
    """The run without placement both tests compare with (the same config), trained once."""
    cache = tmp_path_factory.mktemp("cache")
    load_corpus(512, cache)
    cfg = TrainConfig(cache_dir=str(cache), **TINY)  # type: ignore[arg-type]
    return cfg, run_ranks(cfg)


def test_copies_adopted_mid_run_keep_training_identical(home: tuple[TrainConfig, list]) -> None:
    from netmoe.server.app import start
    from netmoe.server.config import ServerConfig

    cfg, home_runs = home
    job = "copies-mid-run"
    with start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=0)) as server:
        runs = run_ranks(dataclasses.replace(
            cfg, placement="service", server=server.address, job=job, adopt_experts_at=ADOPT_AT,
            expert_placement="force", replica_budget=1,
            unregister=False))  # fmt: skip  (its metrics are read below)
        advisor_settled(server)
        metrics = scrape(server.metrics_port)

    info = runs[0].expert_moves
    assert info.adopted and info.copies_adopted and not info.error, info
    assert info.grad_bytes_weighed == 0  # force: copies chosen on routes alone
    copies, maps = info.copies, np.array(info.advice.maps)
    assert len(copies) == cfg.layers and 0 < sum(map(len, copies)) <= cfg.layers * cfg.world
    for layer, pairs in enumerate(copies):
        devices = [d for _, d in pairs]
        assert len(set(devices)) == len(devices)  # at most one copy per device and layer
        assert all(maps[layer][e] != d for e, d in pairs)
    # Each copy came once from its owner: its parameters and Adam state.
    sent = sum(r.expert_moves.copy_sent_bytes for r in runs)
    assert sent == sum(map(len, copies)) * info.bytes_per_expert
    assert all(r.copy_sync_seconds > 0 for r in runs)

    np.testing.assert_allclose(runs[0].loss, home_runs[0].loss, rtol=1e-5)
    want = {k: v for r in reversed(home_runs) for k, v in r.param_checksum.items()}
    got = {k: v for r in reversed(runs) for k, v in r.param_checksum.items()}
    assert got.keys() == want.keys()  # copies are not part of the checkpoint
    for name, (_, sq) in want.items():
        if ".experts." in name:
            assert got[name][1] == pytest.approx(sq, rel=1e-4), name
    # Every round planned; those after the move knowing the copies, which never cost routes.
    assert all(r.placement.fallbacks == 0 for r in runs), runs[0].placement.fallback_reasons
    realized = {p: metrics[("netmoe_replica_realized_routes_total",
                            (("job", job), ("placement", p)))] for p in ("replicated", "joint")}
    assert realized["replicated"] <= realized["joint"]


def test_balanced_copies_route_by_the_confirmed_tables(home: tuple[TrainConfig, list]) -> None:
    from netmoe.server.app import start
    from netmoe.server.config import ServerConfig

    cfg, home_runs = home
    job = "balanced-mid-run"
    with start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=0)) as server:
        runs = run_ranks(dataclasses.replace(
            cfg, placement="service", server=server.address, job=job, adopt_experts_at=ADOPT_AT,
            expert_placement="force", replica_budget=1, max_load_ratio=1.0,
            unregister=False))  # fmt: skip  (its metrics are read below)
        advisor_settled(server)
        metrics = scrape(server.metrics_port)

    info = runs[0].expert_moves
    assert info.adopted and info.copies_adopted and not info.error, info
    tables, maps = np.array(info.route_tables), np.array(info.advice.maps)
    assert tables.shape == (cfg.layers, cfg.world, cfg.experts)
    for layer, pairs in enumerate(info.copies):
        holders = {e: {int(maps[layer][e])} | {d for c, d in pairs if c == e}
                   for e in range(cfg.experts)}
        assert all(tables[layer, d, e] in holders[e]
                   for d in range(cfg.world) for e in range(cfg.experts))
    # Whichever holder serves a route, the model computes the same function.
    np.testing.assert_allclose(runs[0].loss, home_runs[0].loss, rtol=1e-5)
    assert all(r.placement.fallbacks == 0 for r in runs), runs[0].placement.fallback_reasons
    key = (("job", job),)
    assert metrics[("netmoe_expert_realized_load_ratio_count", key)] == (
        (STEPS - ADOPT_AT) * cfg.layers)
    assert metrics[("netmoe_expert_predicted_load_ratio", key)] == pytest.approx(
        info.load["predicted"][0])


def test_replica_options_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"max_load_ratio=0\.5 must be 0 or >= 1"):
        TrainConfig(max_load_ratio=0.5)
    with pytest.raises(ValueError, match="replica_budget=1 needs adopt_experts_at"):
        TrainConfig(replica_budget=1)
    with pytest.raises(ValueError, match="replica_budget must be a non-negative integer"):
        TrainConfig(replica_budget=-1)
    assert main(["demo", "--replica-budget", "1"]) == 2
    assert "--replica-budget needs --expert-placement" in capsys.readouterr().err
    assert main(["demo", "--expert-placement", "--max-load-ratio", "1.05"]) == 2
    assert "--max-load-ratio needs --replica-budget" in capsys.readouterr().err
    assert main(["demo", "--expert-placement", "--replica-budget", "1",
                 "--max-load-ratio", "0.5"]) == 2
    assert "--max-load-ratio must be >= 1 (busiest device / mean load), got 0.5" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit) as exit_:  # argparse's own check
        main(["demo", "--expert-placement", "--replica-budget", "-1"])
    assert exit_.value.code == 2
    assert "--replica-budget: must be a non-negative integer, got '-1'" in (
        capsys.readouterr().err)
