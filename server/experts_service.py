"""RecommendExperts and ConfirmExperts: proto <-> advisor translation, errors -> status codes.

A mixin of PlacementServicer (which provides ``_advisors`` and ``_metrics``). Fits take seconds:
they run on the advisors' own thread (after the window updates queued before them), so the
solver threads keep answering rounds meanwhile.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

from netmoe.protos import placement_pb2 as pb
from netmoe.protos.convert import (
    copies_from_proto,
    copies_to_proto,
    maps_from_proto,
    maps_to_proto,
    tables_from_proto,
    tables_to_proto,
)
from netmoe.solver.experts import Routes

from .advisor import ExpertAdvice, ExpertAdvisor, ExpertAdvisors
from .errors import FieldError, NotEnoughData, NotOwner, abort, status_of
from .metrics import Metrics
from .security import JobOwners

DEFAULT_STARTS = 4


def _routes(r: Routes) -> pb.Routes:
    return pb.Routes(inter=r.inter, intra=r.intra, seconds=r.seconds)


def _replicas(advice: ExpertAdvice) -> pb.ReplicaAdvice | None:
    rec, ev = advice.replicas, advice.replica_evaluation
    if rec is None or ev is None:
        return None
    total = ev.total
    return pb.ReplicaAdvice(
        adopt=rec.adopt, reason=rec.reason, copies=copies_to_proto(rec.copies),
        replicated=pb.Routes(inter=total.inter, intra=total.intra, seconds=total.seconds),
        saving_per_step=rec.saving_per_step, sync_per_step=rec.sync_per_step,
        net_per_step=rec.net_per_step, migration_cost=rec.migration_cost,
        break_even_steps=rec.break_even_steps, memory_bytes=rec.memory_bytes,
        max_device_bytes=rec.max_device_bytes, cross_node_copies=rec.cross_node_copies,
        route_tables=tables_to_proto(ev.tables),
        load=None if advice.load is None else pb.LoadRatio(mean=advice.load[0],
                                                           worst=advice.load[1]),
        joint_load=None if advice.joint_load is None else pb.LoadRatio(
            mean=advice.joint_load[0], worst=advice.joint_load[1]),
    )


def advice_to_proto(job: str, advice: ExpertAdvice) -> pb.RecommendExpertsResponse:
    rec, ev = advice.recommendation, advice.evaluation
    return pb.RecommendExpertsResponse(
        job=job, adopt=rec.adopt, reason=rec.reason, maps=maps_to_proto(rec.maps),
        current=maps_to_proto(ev.current), moved_experts=rec.moved_experts,
        moved_inter=rec.moved_inter, migration_bytes=rec.migration_bytes,
        migration_seconds=rec.migration_seconds, unit=rec.unit,
        saving_per_step=rec.saving_per_step, migration_cost=rec.migration_cost,
        break_even_steps=rec.break_even_steps,
        home=_routes(ev.home), sample_only=_routes(ev.sample_only), joint=_routes(ev.joint),
        fit_first_step=advice.fit_steps[0], fit_last_step=advice.fit_steps[1],
        held_out_first_step=advice.held_out_steps[0], held_out_last_step=advice.held_out_steps[1],
        window_bytes=advice.window_bytes, replicas=_replicas(advice),
    )


class ExpertPlacementRPCs:
    _advisors: ExpertAdvisors
    _metrics: Metrics
    _owners: JobOwners | None

    async def _check_owner(self, job: str, context: grpc.aio.ServicerContext) -> None:
        """PERMISSION_DENIED unless the caller may act for job (jobs bound to certificates)."""
        if self._owners is None:
            return
        try:
            self._owners.check(job, context)
        except NotOwner as err:
            await abort(context, status_of(err), str(err))

    async def _advisor(self, job: str, context: grpc.aio.ServicerContext) -> ExpertAdvisor:
        await self._check_owner(job, context)
        adv = self._advisors.get(job)
        if adv is None:
            if self._advisors.device_level(job):
                await abort(context, grpc.StatusCode.FAILED_PRECONDITION, (
                    f"job {job!r} reports device-level counts (spec.device_counts=true): the "
                    f"service keeps no expert window for it and places no experts; register "
                    f"with device_counts=false to use the advisor"))
            await abort(context, grpc.StatusCode.NOT_FOUND, f"job {job!r} is not registered")
        return adv

    async def RecommendExperts(
        self, request: pb.RecommendExpertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendExpertsResponse:
        adv = await self._advisor(request.job, context)

        def fit() -> ExpertAdvice:
            return adv.advise(
                horizon_steps=request.horizon_steps, bytes_per_expert=request.bytes_per_expert,
                held_out_steps=request.held_out_steps, unit=request.unit or "seconds",
                starts=request.starts or DEFAULT_STARTS, seed=request.seed,
                replica_slots=request.replica_slots, grad_bytes=request.grad_bytes_per_expert,
                max_load_ratio=request.max_load_ratio or None,
                migration_budget=(request.migration_budget
                                  if request.HasField("migration_budget") else None),
            )

        try:
            advice = await asyncio.wrap_future(self._advisors.run(fit))
        except (NotEnoughData, ValueError) as err:
            await abort(context, status_of(err), str(err))
        self._metrics.expert_predicted_saving.labels(request.job).set(
            advice.predicted_inter_saving_per_step)
        if advice.predicted_copies_saving_per_step is not None:
            self._metrics.replica_predicted_saving.labels(request.job).set(
                advice.predicted_copies_saving_per_step)
        if advice.load is not None:
            self._metrics.expert_predicted_load.labels(request.job).set(advice.load[0])
        return advice_to_proto(request.job, advice)

    async def ConfirmExperts(
        self, request: pb.ConfirmExpertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConfirmExpertsResponse:
        adv = await self._advisor(request.job, context)
        copies = copies_from_proto(request.copies) if request.copies else None
        try:
            maps = maps_from_proto(request.maps, adv.topology.experts)
            tables = (tables_from_proto(request.route_tables, adv.topology.devices,
                                        adv.topology.experts) if request.route_tables else None)
            adv.confirm(request.step, maps, copies, tables)
        except FieldError as err:
            # A step already reported is the job's state at fault, not the request's shape.
            code = (grpc.StatusCode.FAILED_PRECONDITION if err.field == "step"
                    else grpc.StatusCode.INVALID_ARGUMENT)
            await abort(context, code, str(err))
        except ValueError as err:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return pb.ConfirmExpertsResponse(job=request.job, step=request.step)
