"""Node reports on a real server: one stream per node carries its ranks' rows and gets one plan."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from netmoe.protos import placement_pb2 as pb
from netmoe.protos.convert import counts_from_pb, counts_to_pb
from netmoe.server.app import ServerHandle

from support import Worker, check_round, job_spec, round_reports, scrape, stub_for, wait_for


def node_report(reports: Sequence[pb.Report]) -> pb.Report:
    """The ranks' reports as one node report of the first one's rank."""
    head = reports[0]
    join = lambda name: counts_to_pb(np.concatenate(  # noqa: E731
        [counts_from_pb(getattr(r, name), name) for r in reports]))
    return pb.Report(job=head.job, step=head.step, layer=head.layer, rank=head.rank,
                     ranks=[r.rank for r in reports],
                     sample_ids=[i for r in reports for i in r.sample_ids],
                     gather=join("gather"), scatter=join("scatter"))


def split(plan: pb.Plan, n: int) -> list[pb.Plan]:
    """A node plan as the per-rank plans check_round compares."""
    out = []
    for k, rank in enumerate(plan.ranks):
        part = pb.Plan()
        part.CopyFrom(plan)
        part.rank = rank
        del part.ranks[:]
        part.dest[:] = plan.dest[k * n:(k + 1) * n]
        part.held_ids[:] = plan.held_ids[k * n:(k + 1) * n]
        out.append(part)
    return out


def test_node_reports_get_the_plans_per_rank_reports_get(server: ServerHandle) -> None:
    spec = job_spec(nodes=2, gpus=4, experts=16, spd=4)
    channel, stub = stub_for(server)
    with channel:
        stub.RegisterJob(pb.RegisterJobRequest(job="nodes", spec=spec))
        leaders = {0: Worker(stub), 4: Worker(stub)}
        for step in range(3):
            reports = round_reports("nodes", spec, step, 0, seed=step)
            leaders[0].send(node_report(reports[:4]))
            # The ranks in any order after the reporting rank: rows follow the list.
            leaders[4].send(node_report([reports[4], reports[6], reports[5], reports[7]]))
            plans = {p.rank: p for w in leaders.values() for p in split(w.recv(), 4)}
            assert sorted(plans) == list(range(8))
            check_round(spec, reports, [plans[r] for r in range(8)])
        for w in leaders.values():
            w.close()
        # One node reports per rank, the other as a node: the same round.
        stub.RegisterJob(pb.RegisterJobRequest(job="mixed", spec=spec))
        reports = round_reports("mixed", spec, 0, 0, seed=3)
        singles = {r: Worker(stub) for r in range(4)}
        node = Worker(stub)
        for r, w in singles.items():
            w.send(reports[r])
        node.send(node_report(reports[4:]))
        plans = {r: w.recv() for r, w in singles.items()}
        plans.update({p.rank: p for p in split(node.recv(), 4)})
        check_round(spec, reports, [plans[r] for r in range(8)])
        assert list(plans[0].ranks) == []
        for w in [node, *singles.values()]:
            w.close()


def test_node_reports_of_ep_groups(server: ServerHandle) -> None:
    """4 nodes x 2 GPUs, two groups of 4 consecutive ranks: 4 node streams, 2 rounds per layer."""
    spec = job_spec(nodes=4, gpus=2, experts=8, spd=2, ep_size=4)
    alone = job_spec(nodes=2, gpus=2, experts=8, spd=2)
    channel, stub = stub_for(server)
    with channel:
        stub.RegisterJob(pb.RegisterJobRequest(job="ep-nodes", spec=spec))
        leaders = {r: Worker(stub) for r in (0, 2, 4, 6)}
        groups = []
        for g in range(2):
            reports = round_reports("ep-nodes", alone, 0, 0, seed=g)
            for d, rep in enumerate(reports):
                rep.rank = 4 * g + d
            groups.append(reports)
            for k in range(2):
                leaders[4 * g + 2 * k].send(node_report(reports[2 * k:2 * k + 2]))
        for g, reports in enumerate(groups):
            plans = [p for k in range(2) for p in split(leaders[4 * g + 2 * k].recv(), 2)]
            check_round(alone, reports, plans)
        for w in leaders.values():
            w.close()


@pytest.mark.parametrize(("ranks", "message"), [
    ([4, 5, 6], "ranks [4, 5, 6] must be the 4 ranks of group 0 on node 1, [4, 5, 6, 7]; "
                "missing [7]"),
    ([4, 5, 6, 7, 3], "; not those: [3]"),
    ([4, 5, 5, 6], "; not those: [5]; missing [7]"),
    ([5, 4, 6, 7], "ranks starts with 5, need the reporting rank 4 first"),
])
def test_node_reports_with_wrong_ranks_are_invalid_and_the_stream_goes_on(
        server: ServerHandle, ranks: list[int], message: str) -> None:
    spec = job_spec(nodes=2, gpus=4, experts=16, spd=4)
    channel, stub = stub_for(server)
    with channel:
        stub.RegisterJob(pb.RegisterJobRequest(job="bad-ranks", spec=spec))
        node0, node1 = Worker(stub), Worker(stub)
        reports = round_reports("bad-ranks", spec, 0, 0, seed=0)
        bad = node_report(reports[4:])
        del bad.ranks[:]
        bad.ranks.extend(ranks)
        node0.send(node_report(reports[:4]))
        reply = node1.ask(bad)
        assert reply.status == pb.PLAN_STATUS_INVALID and message in reply.error, reply.error
        assert list(reply.ranks) == ranks
        # The round ended invalid for node 0; both streams go on with the next round.
        assert node0.recv().reason == "invalid"
        reports = round_reports("bad-ranks", spec, 1, 0, seed=1)
        node0.send(node_report(reports[:4]))
        plans = split(node1.ask(node_report(reports[4:])), 4)
        check_round(spec, reports, split(node0.recv(), 4) + plans)
        node0.close(), node1.close()


def test_node_report_rows_must_match_its_ranks(server: ServerHandle) -> None:
    spec = job_spec(nodes=2, gpus=4, experts=16, spd=4)
    channel, stub = stub_for(server)
    with channel:
        stub.RegisterJob(pb.RegisterJobRequest(job="bad-rows", spec=spec))
        node = Worker(stub)
        reports = round_reports("bad-rows", spec, 0, 0, seed=0)
        short = node_report(reports[:4])
        del short.sample_ids[12:]
        reply = node.ask(short)
        assert reply.status == pb.PLAN_STATUS_INVALID
        assert ("sample_ids has 12 ids, job 'bad-rows' needs samples_per_device x ranks = 4 x 4 "
                "= 16") in reply.error
        rows = node_report(reports[:4])
        rows.step = 1
        rows.gather.CopyFrom(counts_to_pb(np.ones((12, 16), dtype=np.uint8)))
        rows.gather.shape[:] = [12, 16]
        reply = node.ask(rows)
        assert reply.status == pb.PLAN_STATUS_INVALID
        assert "gather.shape is [12, 16], need [samples_per_device x ranks, experts] = [16, 16]" \
            in reply.error, reply.error
        node.close()


def test_a_rank_cannot_report_twice_through_a_node_report(server: ServerHandle) -> None:
    spec = job_spec(nodes=2, gpus=4, experts=16, spd=4, deadline_ms=500)
    channel, stub = stub_for(server)
    with channel:
        stub.RegisterJob(pb.RegisterJobRequest(job="twice", spec=spec))
        own, node1 = Worker(stub), Worker(stub)
        # Rank 5 binds a stream of its own (a report outside the layers touches no round).
        probe = round_reports("twice", spec, 0, 5000, seed=0)[5]
        assert own.ask(probe).status == pb.PLAN_STATUS_INVALID
        reports = round_reports("twice", spec, 0, 0, seed=0)
        reply = node1.ask(node_report(reports[4:]))
        assert reply.status == pb.PLAN_STATUS_INVALID
        assert "rank 5 reports on a stream of its own" in reply.error, reply.error
        # Rank 5 reported step 1 itself: the node report of step 1 repeats it.
        nxt = round_reports("twice", spec, 1, 0, seed=1)
        own.send(nxt[5])
        wait_for(lambda: scrape(server.metrics_port)[("netmoe_pending_report_bytes", ())] > 0)
        reply = node1.ask(node_report(nxt[4:]))
        assert reply.status == pb.PLAN_STATUS_INVALID
        assert "of rank 5 does not come after (1, 0, 0), already reported" in reply.error
        # Ranks 4, 6 and 7 never counted as reported: rank 5's round times out without them.
        assert own.recv().error == "no report from ranks [0, 1, 2, 3, 4, 6, 7]"
        own.close(), node1.close()
