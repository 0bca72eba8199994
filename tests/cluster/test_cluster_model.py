"""Pure parts of the cluster bench: traffic patterns, the alpha-beta fit, workload matrices."""

from __future__ import annotations

import numpy as np
import pytest

from netmoe.app.cluster.calibrate import channel_bytes, durations, fit_channel, pattern
from netmoe.app.cluster.testbed import TestbedConfig, shaping_commands
from netmoe.app.cluster.workload import send_matrix, step_traffic
from netmoe.solver import Topology, home_placement, traffic
from netmoe.solver.synthetic import planted_counts


def test_patterns_load_one_channel() -> None:
    intra = pattern(2, 4, 100, "intra")
    inter = pattern(2, 4, 100, "inter")
    assert channel_bytes(intra, 4) == (8 * 3 * 100, 0)
    assert channel_bytes(inter, 4) == (0, 8 * 4 * 100)
    assert channel_bytes(pattern(2, 4, 100, "uniform"), 4) == (2400, 3200)
    assert (np.diag(pattern(2, 4, 100, "uniform")) == 0).all()
    with pytest.raises(ValueError, match="channel"):
        pattern(2, 4, 100, "nvlink")


def test_fit_recovers_alpha_and_bandwidth() -> None:
    nbytes = [1e6, 4e6, 16e6]
    fit = fit_channel(nbytes, [0.002 + b / 50e6 for b in nbytes])
    assert fit.alpha == pytest.approx(0.002)
    assert fit.bandwidth == pytest.approx(50e6)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.seconds(0) == 0.0
    # noise that makes the intercept negative: refit through the origin, never alpha < 0
    fit = fit_channel(nbytes, [b / 50e6 - 0.001 for b in nbytes])
    assert fit.alpha == 0.0 and fit.bandwidth > 50e6
    with pytest.raises(ValueError, match="distinct"):
        fit_channel([1e6, 1e6], [0.1, 0.1])


def test_durations_span_earliest_start_to_latest_end() -> None:
    starts = np.array([[0.0, 10.0], [1.0, 10.5]])  # [ranks, calls]
    ends = np.array([[2.0, 11.0], [5.0, 12.0]])
    assert durations(starts, ends).tolist() == [5.0, 2.0]


def test_send_matrix_matches_solver_traffic() -> None:
    topo = Topology(nodes=2, gpus_per_node=2, experts=8, bytes_per_route=10)
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 5, size=(8, 8))
    device = rng.permutation(home_placement(8, 4))
    t = traffic(topo, device, counts)
    for to_experts in (True, False):
        send = send_matrix(topo, device, counts, to_experts=to_experts)
        assert channel_bytes(send, 2) == (t.intra * 10, t.inter * 10)
        assert np.trace(send) == t.local * 10
    assert (send_matrix(topo, device, counts, to_experts=True)
            == send_matrix(topo, device, counts, to_experts=False).T).all()


def test_netmoe_steps_send_fewer_inter_node_bytes() -> None:
    topo = Topology(nodes=2, gpus_per_node=2, experts=8, bytes_per_route=4)
    counts = planted_counts(np.random.default_rng(0), 16, 8, layers=3, tokens=64, locality=0.8)
    home = step_traffic(topo, counts, "home")
    net = step_traffic(topo, counts, "netmoe")
    assert [n for n, _ in home.calls] == [n for n, _ in net.calls] == [
        "L0-dispatch", "L0-combine", "L1-dispatch", "L1-combine", "L2-dispatch", "L2-combine"]
    # the first dispatch happens before any plan
    assert (home.calls[0][1] == net.calls[0][1]).all()
    inter = [sum(channel_bytes(s, 2)[1] for _, s in st.calls) for st in (home, net)]
    assert inter[1] < inter[0]
    assert len(net.solve_seconds) == 3 and net.moved > 0 and home.solve_seconds == ()
    # every route is sent once per All-to-All whatever the placement
    for (_, a), (_, b) in zip(home.calls, net.calls, strict=True):
        assert a.sum() == b.sum()
    with pytest.raises(ValueError, match="mode"):
        step_traffic(topo, counts, "experts!")


def test_shaping_gives_small_packets_priority() -> None:
    cmds = shaping_commands("ns", "n0", 200.0, 1 << 25)
    flat = [" ".join(c) for c in cmds]
    assert any("u32 match u16 0x0000 0xff80 at 2 flowid 1:10" in c for c in flat)
    assert any("classid 1:10 htb rate 10000kbit ceil 200000kbit prio 0" in c for c in flat)
    assert any(f"bfifo limit {1 << 25}" in c for c in flat)


@pytest.mark.parametrize("bad", [{"nodes": 0}, {"rate_mbit": 0}, {"intra_rate_mbit": -1},
                                 {"queue_bytes": 10}, {"prefix": "a-b"}])
def test_testbed_config_rejects_bad_values(bad: dict) -> None:
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        TestbedConfig(**bad)
