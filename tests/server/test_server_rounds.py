"""The data plane without gRPC: job specs, bounded memory, eviction, unregister, solver errors."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from netmoe.round import RankPlan
from netmoe.server.admission import Report
from netmoe.server.errors import FieldError, JobConflict, JobLimit
from netmoe.server.jobs import JobSpec
from netmoe.server.rounds import Coordinator
from netmoe.solver import Topology

TOPO = Topology(nodes=1, gpus_per_node=2, experts=4)


def spec(job: str = "j", deadline: float = 5.0, spd: int = 2) -> JobSpec:
    return JobSpec(job=job, topology=TOPO, world_size=2, samples_per_device=spd,
                   deadline=deadline)


def report(rank: int, step: int, layer: int = 0, job: str = "j") -> Report:
    ids = np.array([10 * rank, 10 * rank + 1], dtype=np.uint64)
    gather = (np.arange(8, dtype=np.uint8) + rank).reshape(2, 4)
    return Report(job=job, step=step, layer=layer, rank=rank, sample_ids=ids, gather=gather,
                  scatter=None)


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"world_size": 3}, "world_size=3 must equal nodes x gpus_per_node = 1 x 2 = 2"),
    ({"deadline": 0.0}, "deadline must be in (0, 60]"),
    ({"deadline": 61.0}, "got 61.0"),
    ({"job": ""}, "job must be a non-empty id"),
    ({"job": "a\nb"}, "job must be printable"),
    ({"samples_per_device": 0}, "samples_per_device must be a positive integer, got 0"),
    ({"objective": "speed"}, "objective must be one of"),
])
def test_job_spec_validation_names_field_and_value(kwargs: dict, needle: str) -> None:
    base = {"job": "j", "topology": TOPO, "world_size": 2, "samples_per_device": 2}
    with pytest.raises(ValueError) as info:
        JobSpec(**{**base, **kwargs})
    assert needle in str(info.value)


def test_register_is_idempotent_and_capped() -> None:
    coord = Coordinator(max_jobs=2)
    assert coord.register(spec("a"))
    assert not coord.register(spec("a"))
    with pytest.raises(JobConflict):
        coord.register(spec("a", spd=4))
    coord.register(spec("b"))
    with pytest.raises(JobLimit, match="max_jobs=2"):
        coord.register(spec("c"))
    coord.unregister("a")
    assert coord.register(spec("c"))
    with pytest.raises(KeyError):
        coord.unregister("a")
    coord.close()


def test_pending_rounds_are_capped_by_evicting_the_oldest() -> None:
    async def main() -> None:
        coord = Coordinator(max_pending=2)
        coord.register(spec())
        got: list[RankPlan] = []
        for step in range(3):
            coord.submit(report(0, step), got.append)
        assert coord.pending_rounds("j") == 2
        assert [(p.step, p.reason) for p in got] == [(0, "incomplete")]
        assert "evicted" in got[0].error and "max_pending=2" in got[0].error
        # Rank 1 catches up on the evicted round: answered at once with the same home placement.
        coord.submit(report(1, 0), got.append)
        last = got[-1]
        assert (last.step, last.reason, last.held_ids.tolist()) == (0, "incomplete", [10, 11])
        # ... and completes the rounds still open, which are solved.
        coord.submit(report(1, 1), got.append)
        for _ in range(3000):  # both ranks' plans of step 1, however busy the machine
            if len(got) == 4:
                break
            await asyncio.sleep(0.01)
        solved = [(p.step, p.rank, p.status) for p in got[2:]]
        assert solved == [(1, 0, "optimal"), (1, 1, "optimal")]
        coord.close()

    asyncio.run(main())


def test_finished_rounds_are_forgotten_beyond_memory() -> None:
    async def main() -> None:
        coord = Coordinator(max_pending=1, finished_memory=2)
        coord.register(spec())
        got: list[RankPlan] = []
        for step in range(5):  # each new round evicts the previous one
            coord.submit(report(0, step), got.append)
        assert len(got) == 4
        # Only steps 2 and 3 are remembered. Step 1 is forgotten: a new round opens for it, which
        # evicts the open step 4 (now remembered with step 3, step 2 forgotten).
        coord.submit(report(1, 1), got.append)
        assert got[-1].step == 4 and got[-1].rank == 0
        assert coord.pending_rounds("j") == 1
        coord.submit(report(1, 3), got.append)  # remembered: answered at once
        assert (got[-1].step, got[-1].rank, got[-1].reason) == (3, 1, "incomplete")
        coord.close()

    asyncio.run(main())


def test_unregister_answers_waiting_ranks() -> None:
    async def main() -> None:
        coord = Coordinator()
        coord.register(spec())
        got: list[RankPlan] = []
        coord.submit(report(0, 0), got.append)
        coord.unregister("j")
        assert [(p.reason, p.status) for p in got] == [("unregistered", "fallback")]
        with pytest.raises(FieldError, match="'j' is not registered") as info:
            coord.submit(report(1, 0), got.append)
        assert info.value.field == "job"
        coord.close()

    asyncio.run(main())


def test_solver_failure_answers_at_once_with_error_fallback() -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        coord = Coordinator(solve_fn=broken)
        coord.register(spec(deadline=30.0))
        got: list[RankPlan] = []
        coord.submit(report(0, 0), got.append)
        coord.submit(report(1, 0), got.append)
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        assert {(p.reason, p.status) for p in got} == {("error", "fallback")}
        assert "RuntimeError: boom" in got[0].error
        coord.close()

    asyncio.run(main())


def test_micro_batches_are_rounds_of_their_own_in_order() -> None:
    async def main() -> None:
        coord = Coordinator()
        coord.register(spec())
        got: list[RankPlan] = []
        for rank in (0, 1):
            for micro, layer in ((0, 0), (0, 1), (1, 0), (1, 1)):
                rep = dataclasses.replace(report(rank, 3, layer), micro_batch=micro)
                coord.submit(rep, got.append)
        with pytest.raises(FieldError, match=r"\(step, micro_batch, layer\) \(3, 0, 1\) of rank 0 "
                                             r"does not come after \(3, 1, 1\)") as info:
            coord.submit(dataclasses.replace(report(0, 3, 1), micro_batch=0), got.append)
        assert info.value.field == "step"
        for _ in range(500):
            if len(got) == 8:
                break
            await asyncio.sleep(0.01)
        assert sorted((p.micro_batch, p.layer, p.rank, p.status) for p in got) == [
            (m, layer, r, "optimal") for m in (0, 1) for layer in (0, 1) for r in (0, 1)]
        coord.close()

    asyncio.run(main())


def test_a_layers_next_round_starts_from_its_last_prices() -> None:
    """The coordinator hands solve the prices of the group's last solved round of the same layer
    (solve's warm), None for a layer's first round."""
    from netmoe.solver import Prices, solve

    warm: list[Prices | None] = []  # what each solve got, in order
    marks: list[Prices] = []  # what each solve answered

    def recording(topo, gather, scatter, **kwargs):
        warm.append(kwargs["warm"])
        # A marker per solve, so that the layer's next round must get this very object back.
        marks.append(Prices(np.array([[len(marks)]]), None))
        return dataclasses.replace(solve(topo, gather, scatter, **kwargs), prices=marks[-1])

    async def main() -> None:
        coord = Coordinator(solve_fn=recording, process_rows=0)
        coord.register(spec())
        got: list[RankPlan] = []
        for step, layer in ((0, 0), (0, 1), (1, 0), (1, 1)):
            for rank in (0, 1):
                coord.submit(report(rank, step, layer), got.append)
            for _ in range(200):  # one round at a time, so that the order is known
                if len(got) == 2 * len(warm) == 2 * (2 * step + layer + 1):
                    break
                await asyncio.sleep(0.01)
        coord.close()

    asyncio.run(main())
    assert warm == [None, None, marks[0], marks[1]]
