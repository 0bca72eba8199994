"""Expert placement adopted mid-run: 4 real gloo ranks, a real placement service on loopback.

After the first ADOPT_AT steps rank 0 asks the service for expert maps, the ranks move experts
and Adam state, and plans come solved for the new maps; the model computes the same function, so
losses, parameters (by original expert id) and routing equal the home run's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from netmoe.app.cli import build_parser
from netmoe.app.reference.data import load_corpus
from netmoe.app.reference.launch import run_ranks
from netmoe.app.reference.results import RankResult
from netmoe.app.reference.train import TrainConfig
from netmoe.server.cli import config_from_args
from netmoe.trace import load_trace

from support import advisor_settled, scrape

STEPS, ADOPT_AT, WINDOW = 6, 4, 3
TINY = dict(nodes=2, gpus_per_node=2, steps=STEPS, samples_per_device=2, seq_len=16, d_model=32,
            heads=2, layers=3, ffn=32, vocab=512)  # fmt: skip


def _merged(results: list[RankResult]) -> dict[str, list[float]]:
    """Checksums of every parameter of the job: experts from their rank, replicas from rank 0."""
    out: dict[str, list[float]] = {}
    for r in reversed(results):
        out.update(r.param_checksum)
    return out


def test_adopting_experts_mid_run_keeps_training_identical(tmp_path: Path) -> None:
    from netmoe.server.app import start
    from netmoe.server.config import ServerConfig

    cache = tmp_path / "cache"
    load_corpus(512, cache)
    cfg = TrainConfig(cache_dir=str(cache), **TINY)  # type: ignore[arg-type]
    home = run_ranks(dataclasses.replace(cfg, record_trace=str(tmp_path / "home.npz")))
    job = "adopt-mid-run"
    with start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=0,
                            expert_window_steps=WINDOW)) as server:
        joint = run_ranks(dataclasses.replace(
            cfg, placement="service", server=server.address, job=job, adopt_experts_at=ADOPT_AT,
            expert_placement="force", record_trace=str(tmp_path / "joint.npz"),
            unregister=False))  # fmt: skip
        advisor_settled(server)
        metrics = scrape(server.metrics_port)
        advisor = server.server.advisors.get(job)
        window = {step: advisor._rounds(per_step, cfg.layers)[0]  # [L, I, E] rows by sample id
                  for step, per_step in advisor._window.items()}

    info = joint[0].expert_moves
    assert info.adopted and not info.error, info
    advice = info.advice
    assert all(r.expert_moves.advice.maps == advice.maps for r in joint)
    maps = np.array(advice.maps)
    assert maps.shape == (cfg.layers, cfg.experts)
    assert (np.stack([np.bincount(m, minlength=cfg.world) for m in maps]) == 2).all()
    # The window kept the latest WINDOW steps before the move: fit 1..2, held out 3.
    assert advice.fit_steps == [ADOPT_AT - WINDOW, ADOPT_AT - 2]
    assert advice.held_out_steps == [ADOPT_AT - 1, ADOPT_AT - 1]
    # The ranks moved exactly what the service priced: the moved experts' params + Adam state.
    assert advice.moved_experts > 0
    assert sum(r.expert_moves.sent_bytes for r in joint) == advice.migration_bytes
    assert advice.migration_bytes == advice.moved_experts * info.bytes_per_expert
    per_expert = 2 * (cfg.d_model * cfg.ffn) + cfg.ffn + cfg.d_model  # fc1, fc2 with biases
    assert info.bytes_per_expert == 3 * 4 * per_expert + 4 * 4  # fp32 param, 2 moments, steps

    # Same function: losses, parameters by original expert id, routing by original expert id.
    np.testing.assert_allclose(joint[0].loss, home[0].loss, rtol=1e-5)
    want = _merged(home)
    got = _merged(joint)
    assert got.keys() == want.keys()
    for name, (s, sq) in want.items():
        if name.endswith("attn.qkv.bias"):
            # The key bias has zero true gradient (softmax ignores it), so Adam blows float
            # summation noise up to lr-sized steps there, in any two runs.
            continue
        assert got[name][1] == pytest.approx(sq, rel=1e-4), name
        if ".experts." in name:  # dense sums cancel to near zero; experts' do not
            assert got[name][0] == pytest.approx(s, rel=1e-3, abs=1e-4), name
    a, b = load_trace(tmp_path / "home.npz"), load_trace(tmp_path / "joint.npz")
    assert np.array_equal(a.topk_ids, b.topk_ids)
    # The service kept getting counts by original expert id after the move (OriginalIds): its
    # window equals the home run's routing, step by step.
    assert sorted(window) == list(range(STEPS - WINDOW, STEPS))
    big_i = cfg.global_samples
    for step, routes in window.items():
        ids = a.topk_ids[:, step * big_i * cfg.seq_len:(step + 1) * big_i * cfg.seq_len]
        ids = ids.reshape(cfg.layers, big_i, -1)
        want_counts = (ids[..., None] == np.arange(cfg.experts)).sum(axis=2)
        assert routes is not None and np.array_equal(routes, want_counts), step

    # Every round planned, none fell back; the ones after the move under the confirmed maps.
    assert all(r.placement.fallbacks == 0 for r in joint), joint[0].placement.fallback_reasons
    assert joint[0].placement.plans == STEPS * cfg.layers
    realized = {p: metrics[("netmoe_expert_realized_routes_total",
                            (("job", job), ("placement", p)))]
                for p in ("joint", "sample_only")}
    assert realized["joint"] > 0 and realized["sample_only"] > 0
    assert metrics[("netmoe_expert_window_steps", (("job", job),))] == WINDOW
    # The routes the ranks counted cover exactly the steps' dispatches and combines.
    steps = np.asarray([r.step_routes for r in joint])  # [ranks, steps, layers, 3]
    assert steps.shape == (cfg.world, STEPS, cfg.layers, 3)
    assert (steps.sum(axis=1) == np.asarray([r.routes for r in joint])).all()


def test_a_window_too_thin_keeps_the_experts_and_trains_on(tmp_path: Path) -> None:
    from netmoe.server.app import start
    from netmoe.server.config import ServerConfig

    cache = tmp_path / "cache"
    load_corpus(512, cache)
    cfg = TrainConfig(cache_dir=str(cache), **{**TINY, "steps": 2, "layers": 2})  # type: ignore[arg-type]
    with start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None)) as server:
        # After one step the window holds one step: nothing to hold out.
        runs = run_ranks(dataclasses.replace(cfg, placement="service", server=server.address,
                                             job="thin", adopt_experts_at=1,
                                             expert_placement="force"))  # fmt: skip
    info = runs[0].expert_moves
    assert not info.adopted and info.sent_bytes == 0 and info.advice is None
    assert info.error.startswith("RecommendExperts: FAILED_PRECONDITION: the window holds 1 "
                                 "complete step"), info.error
    assert all(r.expert_moves == info for r in runs)
    assert all(r.placement.fallbacks == 0 for r in runs) and len(runs[0].loss) == 2


def test_expert_options_are_checked() -> None:
    with pytest.raises(ValueError, match="adopt_experts_at=3 needs placement='service'"):
        TrainConfig(adopt_experts_at=3)
    with pytest.raises(ValueError, match="expert_placement must be one of"):
        TrainConfig(placement="service", server="x:1", adopt_experts_at=3,
                    expert_placement="always")
    with pytest.raises(ValueError, match="expert_horizon must be a positive integer, got 0"):
        TrainConfig(expert_horizon=0)


def test_serve_sets_the_expert_window_limits() -> None:
    args = build_parser().parse_args(["serve", "--expert-window-steps", "5"])
    cfg = config_from_args(args, {"NETMOE_EXPERT_WINDOW_BYTES": "4096"})
    assert (cfg.expert_window_steps, cfg.expert_window_bytes) == (5, 4096)
    with pytest.raises(ValueError, match="expert_window_bytes must be a positive integer, got 0"):
        config_from_args(build_parser().parse_args(["serve"]),
                         {"NETMOE_EXPERT_WINDOW_BYTES": "0"})


def test_demo_compares_only_the_steps_after_the_move() -> None:
    from netmoe.app.demo_report import routes_between

    # 2 ranks, 3 steps, 1 layer: [inter, intra, local] per step.
    per_rank = [[[[100, 0, 0]], [[1, 2, 3]], [[4, 5, 6]]],
                [[[100, 0, 0]], [[10, 20, 30]], [[40, 50, 60]]]]
    ranks = [RankResult(rank=r, loss=[0.0] * 3, step_seconds=[0.0] * 3, a2a_seconds=0.0,
                        control_seconds=0.0, allreduce_seconds=0.0,
                        routes=np.sum(steps, axis=0).tolist(), step_routes=steps)
             for r, steps in enumerate(per_rank)]
    got = routes_between(ranks, 1, 2)
    assert (got["inter"], got["intra"], got["local"]) == (55, 77, 99)
    assert got["per_layer"] == [{"inter": 55, "intra": 77, "local": 99}]


def test_demo_rejects_an_adoption_step_without_fit_or_comparison() -> None:
    from netmoe.app.demo import run

    args = build_parser().parse_args(["demo", "--expert-placement", "--steps", "4",
                                      "--adopt-after", "4"])
    with pytest.raises(ValueError, match=r"--adopt-after must .* in \[2, 3\] for --steps 4, got 4"):
        run(args)
