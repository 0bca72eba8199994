"""PlacementService: proto <-> domain translation, validation errors -> gRPC status codes.

The data plane lives in ``rounds.Coordinator``; this module only converts messages and decides
what an error does to an RPC (see the service comments in placement.proto).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import grpc.aio
import numpy as np

from netmoe.groups import EPGroups
from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.protos.convert import MAX_COUNT, counts_from_pb, plan_to_proto
from netmoe.round import RankPlan, compact_counts
from netmoe.solver import Topology

from .advisor import ExpertAdvisors
from .errors import (
    FieldError,
    JobConflict,
    JobLimit,
    NotOwner,
    RankBound,
    StaleGeneration,
    abort,
    status_of,
)
from .experts_service import ExpertPlacementRPCs
from .interceptors import MalformedRequest
from .metrics import Metrics
from .rounds import MAX_DEADLINE_S, MAX_LAYERS, Binding, Coordinator, JobSpec, Report
from .security import JobOwners

log = logging.getLogger(__name__)

MAX_ALPHA_S = 60.0
MAX_BYTES_PER_ROUTE = 1 << 32


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
    columns = t.nodes * t.gpus_per_node if msg.device_counts else t.experts
    routes = 2.0 * msg.world_size * msg.samples_per_device * columns * MAX_COUNT
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
    groups = ep_groups_from_proto(msg)
    topo = Topology(
        nodes=groups.nodes, gpus_per_node=groups.gpus, experts=t.experts,
        expert_device=np.asarray(t.expert_device, dtype=np.int64) if t.expert_device else None,
        alpha_intra=t.alpha_intra, alpha_inter=t.alpha_inter,
        bw_intra=t.bw_intra, bw_inter=t.bw_inter, bytes_per_route=t.bytes_per_route,
    )
    return JobSpec(
        job=job, topology=topo, world_size=msg.world_size,
        samples_per_device=msg.samples_per_device, objective=msg.objective or "volume",
        method=msg.method or "two_stage", deadline=msg.deadline_ms / 1000.0,
        layers=msg.layers or MAX_LAYERS, ep_groups=groups, device_counts=msg.device_counts,
    )


def ep_groups_from_proto(msg: pb.JobSpec) -> EPGroups:
    """The job's expert-parallel groups; ValueError naming spec.<field> and the value (for a
    layout: the group and the offending rank)."""
    t = msg.topology
    if msg.world_size != t.nodes * t.gpus_per_node:
        raise ValueError(f"spec.world_size={msg.world_size} must equal spec.topology.nodes x "
                         f"gpus_per_node = {t.nodes} x {t.gpus_per_node}")
    if not msg.groups:
        return EPGroups.contiguous(msg.world_size, t.gpus_per_node, msg.ep_size, "spec.")
    groups = EPGroups.explicit(msg.world_size, t.gpus_per_node,
                               [g.ranks for g in msg.groups], "spec.")
    if msg.ep_size and msg.ep_size != groups.size:
        raise ValueError(f"spec.ep_size={msg.ep_size} differs from the {groups.size} ranks of "
                         f"each of spec.groups")
    return groups


def report_from_proto(msg: pb.Report) -> Report:
    """The report with its counts decoded (``counts_from_pb``) and compacted. Counts that do
    not decode become ``Report.counts_error``: ``check_report`` raises it, so such a report is
    answered and ends its round like any other invalid content."""
    counts: dict[str, np.ndarray | None] = {"gather": None, "scatter": None}
    error = None
    for name in counts:
        if msg.HasField(name):
            try:
                counts[name] = compact_counts(counts_from_pb(getattr(msg, name), name))
            except ValueError as err:
                error = FieldError(name, str(err))
                break
    return Report(job=msg.job, step=msg.step, layer=msg.layer, rank=msg.rank,
                  sample_ids=np.fromiter(msg.sample_ids, dtype=np.uint64,
                                         count=len(msg.sample_ids)),
                  gather=counts["gather"], scatter=counts["scatter"], generation=msg.generation,
                  counts_error=error, ranks=tuple(msg.ranks), micro_batch=msg.micro_batch)


def invalid_plan(report: Report, error: str, job: str) -> pb.Plan:
    """The answer to a report that failed validation (job: the stream's, never the caller's)."""
    msg = plan_to_proto(job, RankPlan.rejected(report.step, report.layer, report.rank, error,
                                                  report.micro_batch))
    msg.ranks.extend(report.ranks)
    return msg


class _StreamEnd:
    """Queue sentinel: the client finished writing and every report was answered."""


class _StreamAbort:
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message


class _Outbox(asyncio.Queue):
    """A stream's outbound queue, bounded in bytes of plans not yet written. Past the bound it
    drops what it holds, refuses more plans and calls ``overflow`` with the reason."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.bytes = 0
        self.cut = False
        self.overflow: Callable[[str], None] = lambda reason: None

    def put_nowait(self, item: object) -> None:
        if isinstance(item, pb.Plan):
            if self.cut:
                return
            self.bytes += item.ByteSize()
            if self.bytes > self.limit:
                self.cut = True
                while not self.empty():
                    self.get_nowait()
                self.overflow(f"the client did not read its plans: more than "
                              f"stream_backlog_bytes={self.limit} bytes queued")
                return
        super().put_nowait(item)

    def sent(self, item: pb.Plan) -> None:
        self.bytes -= item.ByteSize()


@dataclass(frozen=True)
class StreamLimits:
    """backlog_bytes: plans queued for one stream (its client not reading) before it is cut;
    max_streams: open streams at once; idle_seconds: a stream sending nothing this long is
    closed."""

    backlog_bytes: int = 8 << 20
    max_streams: int = 4096
    idle_seconds: float = 600.0


class PlacementServicer(ExpertPlacementRPCs, placement_pb2_grpc.PlacementServiceServicer):
    def __init__(self, coordinator: Coordinator, advisors: ExpertAdvisors,
                 metrics: Metrics, limits: StreamLimits | None = None,
                 owners: JobOwners | None = None) -> None:
        self._coord = coordinator
        self._advisors = advisors
        self._owners = owners
        self._metrics = metrics
        self._limits = limits or StreamLimits()
        self._streams = 0
        self._cuts: set[asyncio.Task[None]] = set()

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
            if self._owners is not None:
                self._owners.check(request.job, context)
            created = self._coord.register(spec)
        except (JobConflict, JobLimit, NotOwner, ValueError) as err:
            await abort(context, status_of(err), str(err))
        if self._owners is not None:
            self._owners.take(request.job, context)
        self._metrics.active_jobs.set(self._coord.jobs)
        return pb.RegisterJobResponse(job=request.job, created=created,
                                      generation=self._coord.generation(request.job))

    async def UnregisterJob(
        self, request: pb.UnregisterJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnregisterJobResponse:
        await self._check_owner(request.job, context)
        try:
            self._coord.unregister(request.job)
        except KeyError:
            await abort(
                context, grpc.StatusCode.NOT_FOUND, f"job {request.job!r} is not registered"
            )
        if self._owners is not None:
            self._owners.forget(request.job)
        self._metrics.forget_job(request.job)
        # Rounds handed to the advisor thread before the job went may still export its window
        # series: forget them again once that thread got past them.
        await asyncio.wrap_future(self._advisors.run(lambda: self._metrics.forget_job(request.job)))
        self._metrics.active_jobs.set(self._coord.jobs)
        return pb.UnregisterJobResponse(job=request.job)

    async def Solve(
        self, request: pb.SolveRequest, context: grpc.aio.ServicerContext
    ) -> pb.SolveResponse:
        for job in sorted({r.job for r in request.reports}):
            await self._check_owner(job, context)
        try:
            plans = await self._coord.solve_now([report_from_proto(r) for r in request.reports])
        except (FieldError, StaleGeneration) as err:
            await abort(context, status_of(err), str(err))
        return pb.SolveResponse(plans=[plan_to_proto(request.reports[0].job, p) for p in plans])

    async def Stream(
        self, request_iterator: AsyncIterator[pb.Report], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Plan]:
        limits = self._limits
        if self._streams >= limits.max_streams:
            await abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the server already holds max_streams={limits.max_streams} open streams")
        queue = _Outbox(limits.backlog_bytes)
        binding: list[Binding] = []  # set by the first report; the queue is the stream's token
        reader = asyncio.get_running_loop().create_task(
            self._read(request_iterator, queue, binding, context))
        handler = asyncio.current_task()
        assert handler is not None
        # A client gone (or cut) while a plan is being written: end the handler quietly rather
        # than let the failed write log a traceback.
        context.add_done_callback(lambda _: handler.cancel())

        def overflow(reason: str) -> None:
            # The handler may sit in a write the client never takes: stop reading reports, free
            # the rank, and send the status (the client sees it after the plans in flight).
            who = f"of job {binding[0].job!r} rank {binding[0].rank}" if binding else "unbound"
            log.warning("stream %s disconnected: %s", who, reason)
            reader.cancel()
            if binding:
                self._coord.release(binding[0], queue)
            cut = asyncio.get_running_loop().create_task(self._cut(context, reason))
            self._cuts.add(cut)
            cut.add_done_callback(self._cuts.discard)

        queue.overflow = overflow

        def reader_done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                err = task.exception()
                queue.put_nowait(_StreamAbort(grpc.StatusCode.INTERNAL,
                                              f"{type(err).__name__}: {err}"))

        reader.add_done_callback(reader_done)
        self._streams += 1
        self._metrics.active_streams.inc()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _StreamEnd):
                    return
                if isinstance(item, _StreamAbort):
                    await abort(context, item.code, item.message)
                yield item
                queue.sent(item)
                if queue.cut:
                    return
        finally:
            self._streams -= 1
            reader.cancel()
            if binding:
                self._coord.release(binding[0], queue)
            self._metrics.active_streams.dec()

    @staticmethod
    async def _cut(context: grpc.aio.ServicerContext, reason: str) -> None:
        with contextlib.suppress(Exception):  # abort raises once the status is on its way
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)

    async def _read(
        self,
        request_iterator: AsyncIterator[pb.Report],
        queue: _Outbox,
        binding: list[Binding],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Feeds reports to the coordinator; plans go to ``queue`` as rounds finish. The first
        report binds the stream (``binding`` gets it; ``queue`` is the owner token) if the
        caller may act for its job (jobs bound to certificates)."""
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

        idle = self._limits.idle_seconds
        reports = aiter(request_iterator)
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(anext(reports), idle)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if outstanding:
                        continue
                    queue.put_nowait(_StreamAbort(grpc.StatusCode.DEADLINE_EXCEEDED, (
                        f"the stream sent no report for stream_idle_seconds={idle:g} s")))
                    return
                report = report_from_proto(msg)
                msg = None  # the counts live on in the report's compact arrays only
                if bound is None:
                    try:
                        if self._owners is not None:
                            self._owners.check(report.job, context)
                        binding.append(self._coord.bind(report, queue, report.generation))
                    except (FieldError, NotOwner, RankBound, StaleGeneration) as err:
                        queue.put_nowait(_StreamAbort(status_of(err),
                                                      f"first report of the stream: {err}"))
                        return
                    bound = (report.job, report.rank)
                elif (report.job, report.rank) != bound:
                    queue.put_nowait(invalid_plan(report, (
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
                    queue.put_nowait(invalid_plan(report, str(err), bound[0]))
        except MalformedRequest as err:  # bytes that are no Report: nothing to answer on
            queue.put_nowait(_StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, str(err)))
            return
        await all_answered.wait()
        queue.put_nowait(_StreamEnd())
