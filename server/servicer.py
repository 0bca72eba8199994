"""PlacementService: proto <-> domain translation, validation errors -> gRPC status codes.

The data plane lives in ``rounds.Coordinator``; this module only converts messages and decides
what an error does to an RPC (see the service comments in placement.proto).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import numpy as np

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.protos.convert import plan_to_proto, report_arrays
from netmoe.round import RankPlan
from netmoe.solver import Topology

from .advisor import ExpertAdvisors
from .errors import FieldError, JobConflict, JobLimit, RankBound, StaleGeneration, abort, status_of
from .experts_service import ExpertPlacementRPCs
from .interceptors import MalformedRequest
from .metrics import Metrics
from .rounds import MAX_DEADLINE_S, MAX_LAYERS, Binding, Coordinator, JobSpec, Report

MAX_ALPHA_S = 60.0
MAX_BYTES_PER_ROUTE = 1 << 32
MAX_COUNT = (1 << 32) - 1  # a count on the wire is a uint32


def check_modelled_times(msg: pb.JobSpec) -> None:
    """Raises ValueError naming spec.topology.<field> unless the modelled time of the largest
    round the job can report (every count at its maximum, gather and scatter) is finite."""
    t = msg.topology
    for name in ("alpha_intra", "alpha_inter"):
        value = getattr(t, name)
        if not 0 <= value <= MAX_ALPHA_S:
            raise ValueError(f"spec.topology.{name} must be in [0, {MAX_ALPHA_S:g}] seconds, "
                             f"got {value!r}")
    if t.bytes_per_route > MAX_BYTES_PER_ROUTE:
        raise ValueError(f"spec.topology.bytes_per_route must be at most {MAX_BYTES_PER_ROUTE}, "
                         f"got {t.bytes_per_route}")
    routes = 2.0 * msg.world_size * msg.samples_per_device * t.experts * MAX_COUNT
    for name, alpha in (("bw_intra", t.alpha_intra), ("bw_inter", t.alpha_inter)):
        bw = getattr(t, name)
        if bw > 0 and not math.isfinite(2 * alpha + routes * t.bytes_per_route / bw):
            raise ValueError(f"spec.topology.{name}={bw!r} bytes/s makes the modelled time of a "
                             f"round overflow (infinite seconds)")


def spec_from_proto(job: str, msg: pb.JobSpec) -> JobSpec:
    """Raises ValueError naming the field and the value."""
    if not msg.HasField("topology"):
        raise ValueError("spec.topology is missing")
    if not 1 <= msg.deadline_ms <= MAX_DEADLINE_S * 1000:
        raise ValueError(f"spec.deadline_ms must be in [1, {MAX_DEADLINE_S * 1000:.0f}], "
                         f"got {msg.deadline_ms}")
    if msg.layers > MAX_LAYERS:
        raise ValueError(f"spec.layers must be in [1, {MAX_LAYERS}] (0: {MAX_LAYERS}), "
                         f"got {msg.layers}")
    check_modelled_times(msg)
    t = msg.topology
    topo = Topology(
        nodes=t.nodes, gpus_per_node=t.gpus_per_node, experts=t.experts,
        expert_device=np.asarray(t.expert_device, dtype=np.int64) if t.expert_device else None,
        alpha_intra=t.alpha_intra, alpha_inter=t.alpha_inter,
        bw_intra=t.bw_intra, bw_inter=t.bw_inter, bytes_per_route=t.bytes_per_route,
    )
    return JobSpec(
        job=job, topology=topo, world_size=msg.world_size,
        samples_per_device=msg.samples_per_device, objective=msg.objective or "volume",
        method=msg.method or "two_stage", deadline=msg.deadline_ms / 1000.0,
        layers=msg.layers or MAX_LAYERS,
    )


def report_from_proto(msg: pb.Report) -> Report:
    ids, gather, scatter = report_arrays(msg)
    return Report(job=msg.job, step=msg.step, layer=msg.layer, rank=msg.rank, sample_ids=ids,
                  gather=gather, scatter=scatter, generation=msg.generation)


def invalid_plan(msg: pb.Report, error: str, job: str) -> pb.Plan:
    """The answer to a report that failed validation (job: the stream's, never the caller's)."""
    return plan_to_proto(job, RankPlan.rejected(msg.step, msg.layer, msg.rank, error))


class _StreamEnd:
    """Queue sentinel: the client finished writing and every report was answered."""


class _StreamAbort:
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message


class PlacementServicer(ExpertPlacementRPCs, placement_pb2_grpc.PlacementServiceServicer):
    def __init__(self, coordinator: Coordinator, advisors: ExpertAdvisors,
                 metrics: Metrics) -> None:
        self._coord = coordinator
        self._advisors = advisors
        self._metrics = metrics

    async def RegisterJob(
        self, request: pb.RegisterJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterJobResponse:
        try:
            t = request.spec.topology
            self._coord.check_limits(
                request.job, world_size=request.spec.world_size,
                devices=t.nodes * t.gpus_per_node,
                samples_per_device=request.spec.samples_per_device, experts=t.experts,
            )
            spec = spec_from_proto(request.job, request.spec)
            created = self._coord.register(spec)
        except (JobConflict, JobLimit, ValueError) as err:
            await abort(context, status_of(err), str(err))
        self._metrics.active_jobs.set(self._coord.jobs)
        return pb.RegisterJobResponse(job=request.job, created=created,
                                      generation=self._coord.generation(request.job))

    async def UnregisterJob(
        self, request: pb.UnregisterJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnregisterJobResponse:
        try:
            self._coord.unregister(request.job)
        except KeyError:
            await abort(
                context, grpc.StatusCode.NOT_FOUND, f"job {request.job!r} is not registered"
            )
        self._metrics.forget_job(request.job)
        self._metrics.active_jobs.set(self._coord.jobs)
        return pb.UnregisterJobResponse(job=request.job)

    async def Solve(
        self, request: pb.SolveRequest, context: grpc.aio.ServicerContext
    ) -> pb.SolveResponse:
        try:
            plans = await self._coord.solve_now([report_from_proto(r) for r in request.reports])
        except (FieldError, StaleGeneration) as err:
            await abort(context, status_of(err), str(err))
        return pb.SolveResponse(plans=[plan_to_proto(request.reports[0].job, p) for p in plans])

    async def Stream(
        self, request_iterator: AsyncIterator[pb.Report], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Plan]:
        queue: asyncio.Queue[pb.Plan | _StreamEnd | _StreamAbort] = asyncio.Queue()
        binding: list[Binding] = []  # set by the first report; the queue is the stream's token
        reader = asyncio.get_running_loop().create_task(
            self._read(request_iterator, queue, binding))

        def reader_done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                err = task.exception()
                queue.put_nowait(_StreamAbort(grpc.StatusCode.INTERNAL,
                                              f"{type(err).__name__}: {err}"))

        reader.add_done_callback(reader_done)
        self._metrics.active_streams.inc()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _StreamEnd):
                    return
                if isinstance(item, _StreamAbort):
                    await abort(context, item.code, item.message)
                yield item
        finally:
            reader.cancel()
            if binding:
                self._coord.release(binding[0], queue)
            self._metrics.active_streams.dec()

    async def _read(
        self,
        request_iterator: AsyncIterator[pb.Report],
        queue: asyncio.Queue[pb.Plan | _StreamEnd | _StreamAbort],
        binding: list[Binding],
    ) -> None:
        """Feeds reports to the coordinator; plans go to ``queue`` as rounds finish. The first
        report binds the stream (``binding`` gets it; ``queue`` is the owner token)."""
        bound: tuple[str, int] | None = None
        outstanding = 0
        all_answered = asyncio.Event()
        all_answered.set()

        def deliver(plan: RankPlan) -> None:
            nonlocal outstanding
            queue.put_nowait(plan_to_proto(bound[0] if bound else "", plan))
            outstanding -= 1
            if outstanding == 0:
                all_answered.set()

        try:
            async for msg in request_iterator:
                report = report_from_proto(msg)
                if bound is None:
                    try:
                        binding.append(self._coord.bind(report, queue, report.generation))
                    except (FieldError, RankBound, StaleGeneration) as err:
                        queue.put_nowait(_StreamAbort(status_of(err),
                                                      f"first report of the stream: {err}"))
                        return
                    bound = (report.job, report.rank)
                elif (report.job, report.rank) != bound:
                    queue.put_nowait(invalid_plan(msg, (
                        f"job/rank ({report.job!r}, {report.rank}) differs from ({bound[0]!r}, "
                        f"{bound[1]}) this stream is bound to by its first report"
                    ), bound[0]))
                    continue
                outstanding += 1
                all_answered.clear()
                try:
                    self._coord.submit(report, deliver, binding[0])
                except StaleGeneration as err:
                    queue.put_nowait(_StreamAbort(status_of(err), str(err)))
                    return
                except FieldError as err:
                    outstanding -= 1
                    if outstanding == 0:
                        all_answered.set()
                    queue.put_nowait(invalid_plan(msg, str(err), bound[0]))
        except MalformedRequest as err:  # bytes that are no Report: nothing to answer on
            queue.put_nowait(_StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, str(err)))
            return
        await all_answered.wait()
        queue.put_nowait(_StreamEnd())
