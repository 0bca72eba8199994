"""Expert-parallel groups: layouts, and a real server solving each group's rounds on its own."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import grpc
import numpy as np
import pytest

from netmoe.groups import EPGroups
from netmoe.protos import placement_pb2 as pb
from netmoe.server.app import ServerHandle

from support import MARGIN_S, Worker, check_round, job_spec, round_reports, scrape, stub_for


def test_contiguous_groups_follow_megatron_order() -> None:
    g = EPGroups.contiguous(16, 4, 8)
    assert g.ranks == (tuple(range(8)), tuple(range(8, 16)))
    assert (g.nodes, g.gpus, g.size, g.count) == (2, 4, 8, 2)
    assert g.locate(11) == (1, 3)
    inside = EPGroups.contiguous(16, 8, 4)  # groups inside a node
    assert (inside.nodes, inside.gpus, inside.count) == (1, 4, 4)
    one = EPGroups.contiguous(8, 4)
    assert one.ranks == (tuple(range(8)),) and (one.nodes, one.gpus) == (2, 4)


def test_explicit_groups_in_any_order_are_sorted() -> None:
    g = EPGroups.explicit(8, 2, [[6, 0, 4, 2], [1, 3, 5, 7]])
    assert g.ranks == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert (g.nodes, g.gpus) == (4, 1)  # one rank of each group on each of 4 nodes
    assert g.locate(4) == (0, 2)


@pytest.mark.parametrize(("groups", "message"), [
    ([[0, 1, 2, 3], [3, 4, 5, 6, 7]], "groups[1] holds rank 3 and in groups[0]"),
    ([[0, 1, 1, 2]], "groups[0] holds rank 1 twice"),
    ([[0, 1, 2, 3], [4, 5, 6]], "leaves rank 7 in no group"),
    ([[0, 1, 2, 3, 4, 5], [6, 7]], "groups[1] has 2 ranks, groups[0] has 6"),
    ([[0, 1, 2, 4], [3, 5, 6, 7]], "groups[0] has 1 ranks on node 1 (rank 2) but 2 on node 0"),
    ([[0, 1, 4, 5], [2, 3, 6, 7]], None),
    ([[0, 1, 2, 3], [4, 5, 6, 8]], "groups[1] names rank 8, outside [0, 8)"),
    ([[0, 2, 4, 6], [1, 3, 5], [7]], "groups[1] has 3 ranks"),
])
def test_layouts_that_do_not_tile_the_world_name_the_rank(
        groups: list[list[int]], message: str | None) -> None:
    if message is None:
        assert EPGroups.explicit(8, 2, groups).count == 2
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        EPGroups.explicit(8, 2, groups)


def test_groups_of_unequal_shape_are_refused() -> None:
    # Both groups have 4 ranks, but one spans 2 nodes x 2 and the other 4 nodes x 1.
    with pytest.raises(ValueError, match=r"groups\[1\] spans 4 nodes x 1 ranks, groups\[0\] "
                                         r"2 x 2"):
        EPGroups.explicit(16, 4, [[0, 1, 4, 5], [2, 6, 10, 14], [3, 7, 11, 15],
                                  [8, 9, 12, 13]])


@pytest.mark.parametrize(("extra", "message"), [
    ({"ep_size": 3}, "spec.ep_size=3 does not divide spec.world_size=8"),
    ({"ep_size": 6}, "spec.ep_size=6 does not divide"),
    ({"groups": [[0, 1, 2, 3], [3, 4, 5, 6]]}, "spec.groups[1] holds rank 3"),
    ({"groups": [[0, 1, 2, 3], [4, 5, 6]]}, "spec.groups leaves rank 7 in no group"),
    ({"groups": [[0, 1, 2, 3], [4, 5, 6, 7]], "ep_size": 2},
     "spec.ep_size=2 differs from the 4 ranks"),
])
def test_register_refuses_bad_layouts_naming_the_rank(
        server: ServerHandle, extra: dict[str, object], message: str) -> None:
    channel, stub = stub_for(server)
    with channel:
        spec = job_spec(nodes=4, gpus=2, experts=8, **extra)  # type: ignore[arg-type]
        with pytest.raises(grpc.RpcError) as err:
            stub.RegisterJob(pb.RegisterJobRequest(job="bad", spec=spec))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in err.value.details(), err.value.details()


def group_round(job: str, spec: pb.JobSpec, ranks: Sequence[int], step: int, layer: int,
                seed: int) -> tuple[pb.JobSpec, list[pb.Report]]:
    """One group's reports (rank fields the group's global ranks) and the spec of that group
    alone, which ``check_round`` compares the plans with."""
    nodes = len({r // spec.topology.gpus_per_node for r in ranks})
    alone = job_spec(nodes=nodes, gpus=len(ranks) // nodes, experts=spec.topology.experts,
                     spd=spec.samples_per_device)
    reports = round_reports(job, alone, step, layer, seed)
    for d, rep in enumerate(reports):
        rep.rank = ranks[d]
    return alone, reports


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_each_group_is_solved_alone_and_a_missing_rank_fails_only_its_group(
        server: ServerHandle, layout: str) -> None:
    # 4 nodes x 2 GPUs, two groups of 4: contiguous spans nodes 0-1 and 2-3 (2 x 2 each);
    # strided takes one rank of each node (4 x 1 each).
    groups = ([[0, 1, 2, 3], [4, 5, 6, 7]] if layout == "contiguous"
              else [[0, 2, 4, 6], [1, 3, 5, 7]])
    extra = {"ep_size": 4} if layout == "contiguous" else {"groups": groups}
    spec = job_spec(nodes=4, gpus=2, experts=8, spd=4, deadline_ms=400, **extra)
    channel, stub = stub_for(server)
    with channel:
        stub.RegisterJob(pb.RegisterJobRequest(job="ep", spec=spec))
        workers = {r: Worker(stub) for r in range(8)}
        # Round (0, 0): every rank reports; each group's plans are its own optimal placement.
        rounds = [group_round("ep", spec, g, 0, 0, seed=10 + k) for k, g in enumerate(groups)]
        for _, reports in rounds:
            for rep in reports:
                workers[rep.rank].send(rep)
        for alone, reports in rounds:
            plans = [workers[rep.rank].recv() for rep in reports]
            assert [p.rank for p in plans] == [rep.rank for rep in reports]
            check_round(alone, reports, plans)
        # Round (1, 0): the last rank of group 0 stays silent. Group 1 is solved at once;
        # group 0 falls back at its deadline, naming the missing rank.
        rounds = [group_round("ep", spec, g, 1, 0, seed=20 + k) for k, g in enumerate(groups)]
        silent = groups[0][-1]
        start = time.monotonic()
        for _, reports in rounds:
            for rep in reports:
                if rep.rank != silent:
                    workers[rep.rank].send(rep)
        alone, reports = rounds[1]
        plans = [workers[rep.rank].recv() for rep in reports]
        check_round(alone, reports, plans)
        assert time.monotonic() - start < 0.4 + MARGIN_S
        late = [workers[r].recv() for r in groups[0][:-1]]
        assert {p.status for p in late} == {pb.PLAN_STATUS_FALLBACK}
        assert {p.reason for p in late} == {"incomplete"}
        assert all(f"no report from ranks [{silent}]" in p.error for p in late)
        assert all(list(p.dest) == [groups[0].index(p.rank)] * 4 for p in late)
        for w in workers.values():
            w.close()
    rounds_total = {dict(labels)["outcome"]: v for (name, labels), v in
                    scrape(server.metrics_port).items()
                    if name == "netmoe_rounds_total" and dict(labels).get("job") == "ep"}
    assert rounds_total == {"solved": 3.0, "incomplete": 1.0}


def test_unary_solve_takes_whole_groups(server: ServerHandle) -> None:
    spec = job_spec(nodes=4, gpus=2, experts=8, spd=2, ep_size=4)
    channel, stub = stub_for(server)
    with channel:
        stub.RegisterJob(pb.RegisterJobRequest(job="unary", spec=spec))
        rounds = [group_round("unary", spec, g, 0, 0, seed=k)
                  for k, g in enumerate([[0, 1, 2, 3], [4, 5, 6, 7]])]
        both = rounds[0][1] + rounds[1][1]
        order = np.random.default_rng(0).permutation(len(both))
        reply = stub.Solve(pb.SolveRequest(reports=[both[k] for k in order]))
        by_rank = {p.rank: p for p in reply.plans}
        assert [p.rank for p in reply.plans] == [both[k].rank for k in order]
        for alone, reports in rounds:
            check_round(alone, reports, [by_rank[rep.rank] for rep in reports])
        # One group alone is a whole request too; part of a group is not.
        one = stub.Solve(pb.SolveRequest(reports=rounds[1][1]))
        check_round(rounds[1][0], rounds[1][1], list(one.plans))
        with pytest.raises(grpc.RpcError) as err:
            stub.Solve(pb.SolveRequest(reports=rounds[0][1][:3] + rounds[1][1]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "reports lacks ranks [3] of group 0 of job 'unary'" in err.value.details()


def test_expert_advice_fits_on_every_groups_rounds(server: ServerHandle) -> None:
    """RecommendExperts on a 2-group job: its held-out figures are those of the fitted maps
    replayed on both groups' rounds (fit on both groups' earlier rounds)."""
    from netmoe.protos.convert import report_to_proto
    from netmoe.round import RoundCounts
    from netmoe.solver import Topology
    from netmoe.solver.experts import evaluate_experts, fit_experts

    spec = job_spec(nodes=4, gpus=2, experts=8, spd=4, ep_size=4)
    groups, layers, steps, n = [[0, 1, 2, 3], [4, 5, 6, 7]], 2, 4, 4
    rng = np.random.default_rng(7)
    rounds: dict[int, list[np.ndarray]] = {}  # step -> per group [L, I, E] rows by sample id
    channel, stub = stub_for(server)
    with channel:
        stub.RegisterJob(pb.RegisterJobRequest(job="fit", spec=spec))
        for step in range(steps):
            rounds[step] = []
            reports = []
            for g, ranks in enumerate(groups):
                ids = np.arange(16, dtype=np.uint64) + 100 * g  # sorted: rows are by id
                per_layer = [rng.poisson(1.0, (16, 8)) + 6 * (rng.random((16, 8)) < 0.2)
                             for _ in range(layers + 1)]
                rounds[step].append(np.stack(per_layer[:layers]))
                for layer in range(layers):
                    scatter = per_layer[layer + 1] if layer + 1 < layers else None
                    for d, r in enumerate(ranks):
                        rows = slice(d * n, (d + 1) * n)
                        reports.append((layer, report_to_proto("fit", step, layer, r, RoundCounts(
                            ids[rows], per_layer[layer][rows],
                            None if scatter is None else scatter[rows]))))
            for layer in range(layers):
                stub.Solve(pb.SolveRequest(reports=[rep for k, rep in reports if k == layer]))
        rec = stub.RecommendExperts(pb.RecommendExpertsRequest(
            job="fit", horizon_steps=10, bytes_per_expert=1000, held_out_steps=2, starts=2))
    topo = Topology(2, 2, 8)
    current = np.tile(topo.expert_device, (layers, 1))
    fit = fit_experts(topo, rounds[0] + rounds[1], current=current, starts=2, seed=0)
    ev = evaluate_experts(topo, rounds[2] + rounds[3], fit.array(), current=current)
    assert [list(m.device) for m in rec.maps] == fit.array().tolist()
    for name in ("home", "sample_only", "joint"):
        got, want = getattr(rec, name), getattr(ev, name)
        assert (got.inter, got.intra) == (want.inter, want.intra), name
    assert (rec.fit_first_step, rec.held_out_last_step) == (0, 3)
