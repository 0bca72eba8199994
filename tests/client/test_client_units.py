"""Pure parts of the client: plans, histograms, configs (no process groups)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from netmoe.app.reference.train import TrainConfig
from netmoe.client.dispatcher import Layout
from netmoe.client.histogram import device_route_counts, route_counts, token_samples
from netmoe.client.planning import Placement, RandomPlans, agree
from netmoe.round import SamplePlan
from netmoe.solver import Topology
from netmoe.solver.cost import device_counts

from support import run_without


def test_route_counts_match_a_python_count() -> None:
    gen = torch.Generator().manual_seed(3)
    samples, seq, experts, k = 5, 7, 6, 2
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(samples * seq)])
    tok = token_samples(samples, seq)
    counts = route_counts(ids, tok, samples, experts)
    want = np.zeros((samples, experts), dtype=np.int64)
    for t in range(samples * seq):
        for e in ids[t].tolist():
            want[t // seq, e] += 1
    assert counts.dtype == torch.int64
    assert counts.numpy().tolist() == want.tolist()
    assert int(counts.sum()) == samples * seq * k


def test_route_counts_rejects_bad_shapes_and_ids() -> None:
    tok = token_samples(2, 3)
    with pytest.raises(ValueError, match="topk_ids must be"):
        route_counts(torch.zeros(6, dtype=torch.int64), tok, 2, 4)
    with pytest.raises(ValueError, match="token_sample"):
        route_counts(torch.zeros(5, 2, dtype=torch.int64), tok, 2, 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        route_counts(torch.full((6, 2), 4, dtype=torch.int64), tok, 2, 4)


@pytest.mark.parametrize("owner", [[0, 0, 1, 1, 2, 2], [2, 0, 1, 0, 2, 1]],
                         ids=["default", "moved"])
def test_device_route_counts_equal_expert_counts_summed_by_owner(owner: list[int]) -> None:
    gen = torch.Generator().manual_seed(4)
    samples, seq, experts, k = 5, 7, 6, 2
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(samples * seq)])
    tok = token_samples(samples, seq)
    got = device_route_counts(ids, tok, samples, torch.tensor(owner), 3)
    topo = Topology(1, 3, experts, np.array(owner))
    want = device_counts(topo, route_counts(ids, tok, samples, experts).numpy())
    assert got.dtype == torch.int64 and got.shape == (samples, 3)
    assert got.numpy().tolist() == want.tolist()


def test_device_route_counts_reject_bad_owners_and_ids() -> None:
    tok = token_samples(2, 3)
    ids = torch.zeros(6, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"owner must lie in \[0, 2\), got \[0, 2\]"):
        device_route_counts(ids, tok, 2, torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match=r"owner must be \[experts\], got shape \(1, 2\)"):
        device_route_counts(ids, tok, 2, torch.tensor([[0, 1]]), 2)
    with pytest.raises(ValueError, match=r"topk_ids must lie in \[0, 2\)"):
        device_route_counts(ids + 2, tok, 2, torch.tensor([0, 1]), 2)


def test_train_config_validation_names_field_and_value() -> None:
    with pytest.raises(ValueError, match=r"placement must be one of .* 'magic'"):
        TrainConfig(placement="magic")
    with pytest.raises(ValueError, match="needs server"):
        TrainConfig(placement="service")
    with pytest.raises(ValueError, match="samples_per_device must be a positive integer, got 0"):
        TrainConfig(samples_per_device=0)
    with pytest.raises(ValueError, match="unknown TrainConfig fields: \\['bogus'\\]"):
        TrainConfig.from_dict({"bogus": 1})
    assert TrainConfig(nodes=2, gpus_per_node=4).experts == 16
    with pytest.raises(ValueError, match=r"device_counts=True excludes adopt_experts_at and "
                                         r"copies .*got adopt_experts_at=2"):
        TrainConfig(placement="service", server="x:1", device_counts=True, adopt_experts_at=2)


def _offers(plan: SamplePlan, ids: np.ndarray) -> np.ndarray:
    """Every rank's offer [J, 1 + 2n] for a consistent plan (held ids as sample ids)."""
    return np.array([[1, *plan.dest_of(r), *ids[plan.rows_held(r)]] for r in range(plan.devices)])


def test_agree_applies_a_consistent_plan_or_no_move_for_all() -> None:
    plan = SamplePlan((2, 0, 0, 1, 2, 1), 3)
    ids = np.array([10, 11, 12, 13, 14, 15])  # sample ids travel with the rows across layers
    offers = _offers(plan, ids)
    assert agree(offers, ids, 3) == (plan, "")
    silent = offers.copy()
    silent[1] = 0  # one rank has no plan: nobody moves
    assert agree(silent, ids, 3) == (None, "peer fallback")
    unbalanced = offers.copy()
    unbalanced[0, 1] = 1  # device 1 would receive 3 samples, device 2 only 1
    assert agree(unbalanced, ids, 3) == (None, "inconsistent plan")
    wrong_holds = offers.copy()
    wrong_holds[2, -1] = 99  # the service thinks another sample ends up on rank 2
    assert agree(wrong_holds, ids, 3) == (None, "inconsistent held ids")
    with pytest.raises(ValueError, match=r"offers must be \[3, 1 \+ 2n\]"):
        agree(offers[:2], ids, 3)


def test_the_client_and_trainer_import_without_the_server_extras() -> None:
    """The trainer image installs netmoe[client] only: no OR-Tools, no prometheus-client."""
    out = run_without(("ortools", "prometheus_client"), (
        "import netmoe.client.layer, netmoe.client.node_reports, netmoe.client.placement_client\n"
        "import netmoe.client.hf, netmoe.client.job, netmoe.groups, netmoe.app.reference.train\n"
        "print('ok')\n"))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_job_shape_states_the_sizes_once_and_names_bad_ones() -> None:
    from netmoe.client.job import JobShape
    from netmoe.client.planning import timeout_for

    shape = JobShape(nodes=2, gpus_per_node=2, experts=8, samples_per_device=3, seq_len=5,
                     hidden_size=16, dtype_bytes=2, deadline_ms=200)
    assert shape.layout(3) == Layout(3, 4, 2, 8, 3, 5)
    spec = shape.spec(objective="time")
    assert (spec.world_size, spec.samples_per_device, spec.deadline_ms, spec.objective) == (
        4, 3, 200, "time")
    assert (spec.topology.nodes, spec.topology.gpus_per_node, spec.topology.experts,
            spec.topology.bytes_per_route) == (2, 2, 8, 32)
    home = shape.expert_parallel(1)
    assert home.placement is None and home.layout == shape.layout(1)
    assert timeout_for(200) == pytest.approx(0.35)
    with pytest.raises(ValueError, match="timeout must be given"):
        Placement(RandomPlans(0, 4, 3), 0, 4, 3)
    for field, value, need in (("nodes", 0, "nodes must be a positive integer, got 0"),
                               ("deadline_ms", -5, "deadline_ms must be a positive integer"),
                               ("experts", 6, "experts=6 is not divisible by the group's 4")):
        with pytest.raises(ValueError, match=need):
            JobShape(**{**shape.__dict__, field: value})
    with pytest.raises(ValueError, match="job must name the job"):
        shape.expert_parallel(0, "127.0.0.1:1")
    with pytest.raises(ValueError, match="ep_size=2: a JobShape states one expert-parallel "
                       "group of 4 devices"):
        shape.spec(ep_size=2)
