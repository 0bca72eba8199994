"""PlacementService: the RPCs, and what a validation error does to each (gRPC status codes).

The data plane lives in ``rounds.Coordinator``, the wire conversion in ``netmoe.protos.convert``;
this module only calls them and decides what an error does to an RPC (see the service comments
in placement.proto).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import grpc.aio

from netmoe.protos import placement_pb2 as pb
from netmoe.protos import placement_pb2_grpc
from netmoe.protos.convert import invalid_plan, plan_to_proto, report_from_proto, spec_from_proto
from netmoe.round import RankPlan

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
from .jobs import Binding
from .metrics import Metrics
from .rounds import Coordinator
from .security import JobOwners

log = logging.getLogger(__name__)


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
            size = item.ByteSize()
            self.bytes += size
            if self.bytes > self.limit:
                self.cut = True
                while not self.empty():
                    self.get_nowait()
                # One plan past the bound alone is the server's answer, not a slow reader.
                self.overflow(
                    f"a plan of {size} bytes exceeds stream_backlog_bytes={self.limit}"
                    if size == self.bytes else
                    f"the client did not read its plans: more than "
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
            self._coord.registry.check_limits(
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
        max_world = self._coord.registry.max_world_size
        if len(request.reports) > max_world:  # before any work per report
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, (
                f"reports has {len(request.reports)} reports, more than max_world_size="
                f"{max_world} ranks of any job"))
        for job in sorted({r.job for r in request.reports}):
            await self._check_owner(job, context)
        try:
            plans = await self._coord.solve_now(
                [report_from_proto(r, max_world) for r in request.reports])
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
        max_ranks = self._coord.registry.max_world_size
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
                report = report_from_proto(msg, max_ranks)
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
                    ), bound[0], max_ranks))
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
                    queue.put_nowait(invalid_plan(report, str(err), bound[0], max_ranks))
        except MalformedRequest as err:  # bytes that are no Report: nothing to answer on
            queue.put_nowait(_StreamAbort(grpc.StatusCode.INVALID_ARGUMENT, str(err)))
            return
        await all_answered.wait()
        queue.put_nowait(_StreamEnd())
