"""Reference MoE training on real gloo process groups: placement never changes results.

Runs the same seed with home placement, with plans from a real embedded placement service (ranks
reporting routes per expert or per device), with seeded random plans (every sample moves), and
with the service down; 4 and 8 processes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from netmoe.app.reference.data import load_corpus
from netmoe.app.reference.launch import free_port, run_ranks
from netmoe.app.reference.results import RankResult
from netmoe.app.reference.train import TrainConfig
from netmoe.trace import load_trace

from support import TINY_TRAIN, assert_planned, assert_same_training

TINY = TINY_TRAIN


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("netmoe-cache")
    load_corpus(512, path)
    return str(path)


@pytest.fixture(scope="module")
def server() -> Any:
    from netmoe.server.app import start
    from netmoe.server.config import ServerConfig

    with start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None)) as handle:
        yield handle


@pytest.fixture(scope="module")
def home4(cache: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainConfig, Any, Path]:
    trace = tmp_path_factory.mktemp("trace") / "home.npz"
    cfg = TrainConfig(nodes=2, gpus_per_node=2, cache_dir=cache, **TINY)  # type: ignore[arg-type]
    return cfg, run_ranks(dataclasses.replace(cfg, record_trace=str(trace))), trace


@pytest.mark.parametrize(("report_by", "device_counts"), [
    ("rank", False), ("rank", True), ("node", False)],
    ids=["expert-counts", "device-counts", "node"])
def test_service_plans_leave_losses_and_parameters_unchanged(home4: Any, server: Any,
                                                             report_by: str, device_counts: bool
                                                             ) -> None:
    cfg, home, _ = home4
    net = run_ranks(dataclasses.replace(cfg, placement="service", server=server.address,
                                        job=f"test-4-{report_by}-{device_counts}",
                                        report_by=report_by, device_counts=device_counts))
    assert_same_training(home, net)
    assert all(r.placement.fallbacks == 0 for r in net), net[0].placement.fallback_reasons
    assert net[0].placement.plans == cfg.steps * cfg.layers
    assert all(s > 0 for s in net[0].placement.solve_seconds)
    # The solver minimises inter-node routes of the gather and the next scatter: never more.
    inter = lambda rs: sum(np.asarray(r.routes)[:, 0].sum() for r in rs)  # noqa: E731
    assert inter(net) <= inter(home)


def test_random_plans_move_every_sample_and_trace_is_canonical(home4: Any, tmp_path: Path) -> None:
    cfg, home, home_trace = home4
    trace = tmp_path / "random.npz"
    rnd = run_ranks(dataclasses.replace(cfg, placement="random", record_trace=str(trace)))
    assert_same_training(home, rnd)
    assert rnd[0].placement.moved > 0 and rnd[0].placement.fallbacks == 0
    a, b = load_trace(home_trace), load_trace(trace)
    big_i, tokens = cfg.global_samples, cfg.seq_len
    assert a.topk_ids.shape == (cfg.layers, cfg.steps * big_i * tokens, cfg.top_k)
    assert np.array_equal(a.sample_ids, b.sample_ids)
    assert np.array_equal(a.topk_ids, b.topk_ids)
    # Each step is one round: sample row r of a step is at home on rank r // n.
    n = big_i // (cfg.nodes * cfg.gpus_per_node)
    assert a.step_ids[::tokens].tolist() == np.repeat(np.unique(a.step_ids), big_i).tolist()
    assert np.array_equal(a.dp_ranks[::tokens], np.tile(np.arange(big_i) // n, cfg.steps))
    assert not a.micro_batch_ids.any()
    assert np.array_equal(a.dp_ranks, b.dp_ranks) and np.array_equal(a.step_ids, b.step_ids)


def test_service_down_still_trains_with_identical_losses(home4: Any) -> None:
    cfg, home, _ = home4
    dead = f"127.0.0.1:{free_port()}"
    down = run_ranks(dataclasses.replace(cfg, placement="service", server=dead))
    np.testing.assert_allclose(down[0].loss, home[0].loss, rtol=1e-6)
    assert all(r.placement.fallbacks == cfg.steps * cfg.layers for r in down)
    assert down[0].placement.plans == 0


@pytest.fixture(scope="module")
def home8(cache: str) -> tuple[TrainConfig, Any]:
    cfg = TrainConfig(nodes=2, gpus_per_node=4, cache_dir=cache, **{**TINY, "steps": 2})  # type: ignore[arg-type]
    return cfg, run_ranks(cfg)


def test_eight_processes_random_plans_equal_home(home8: Any) -> None:
    cfg, home = home8
    rnd = run_ranks(dataclasses.replace(cfg, placement="random"))
    assert_same_training(home, rnd)
    assert rnd[0].placement.moved > 0


def test_eight_processes_node_reports_equal_home(home8: Any, server: Any) -> None:
    """2 nodes x 4: two reporting ranks, the six others learn their plans in the combine."""
    cfg, home = home8
    net = run_ranks(dataclasses.replace(cfg, placement="service", server=server.address,
                                        job="test-8-node", report_by="node"))
    assert_same_training(home, net)
    assert_planned(net, cfg.steps * cfg.layers)
    assert net[0].placement.moved > 0


def test_two_expert_parallel_groups_train_like_home_with_the_service(
        two_groups: tuple[TrainConfig, list[RankResult]], server: Any) -> None:
    """8 ranks on 4 nodes x 2 as two EP groups of 4 (2 nodes each), data parallel across them,
    one service for both, per-rank reports (node reports, one service per group:
    test_service_per_group): each group gets its own plans, losses and parameters equal home,
    and the ranks holding the same experts in the two groups end with the same weights (their
    gradients were summed)."""
    cfg, home = two_groups
    inter = lambda rs: sum(np.asarray(r.routes)[:, 0].sum() for r in rs)  # noqa: E731
    net = run_ranks(dataclasses.replace(cfg, placement="service", server=server.address,
                                        job="test-ep-rank", report_by="rank"))
    assert_same_training(home, net)
    assert_planned(net, cfg.steps * cfg.layers)
    for d in range(4):
        assert net[d].param_checksum == net[4 + d].param_checksum
    assert inter(net) <= inter(home)
