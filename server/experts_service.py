"""RecommendExperts and ConfirmExperts: proto <-> advisor translation, errors -> status codes.

A mixin of PlacementServicer (which provides ``_advisors`` and ``_metrics``). Fits take seconds:
they run on their job's own fit thread (after the window updates queued before them), so the
solver threads keep answering rounds and other jobs' fits go on meanwhile. Every size a request
names is checked on the event loop before any work proportional to it.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

from netmoe.protos import placement_pb2 as pb
from netmoe.protos.convert import (
    advice_to_proto,
    copies_from_proto,
    maps_from_proto,
    tables_from_proto,
)

from .advisor import AdviceArgs, ExpertAdvice, ExpertAdvisor, ExpertAdvisors
from .errors import FieldError, NotEnoughData, NotOwner, abort, status_of
from .metrics import Metrics
from .security import JobOwners

DEFAULT_STARTS = 4


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
        try:
            args = adv.check(AdviceArgs(
                horizon_steps=request.horizon_steps, bytes_per_expert=request.bytes_per_expert,
                held_out_steps=request.held_out_steps, unit=request.unit or "seconds",
                starts=request.starts or DEFAULT_STARTS, seed=request.seed,
                replica_slots=request.replica_slots, grad_bytes=request.grad_bytes_per_expert,
                max_load_ratio=request.max_load_ratio or None,
                migration_budget=(request.migration_budget
                                  if request.HasField("migration_budget") else None),
            ))
            advice: ExpertAdvice = await asyncio.wrap_future(
                self._advisors.fit(request.job, lambda: adv.fit(args)))
            if self._advisors.get(request.job) is not adv:  # gone since the fit ended
                raise KeyError(request.job)
        except KeyError:
            await abort(context, grpc.StatusCode.NOT_FOUND,
                        f"job {request.job!r} was unregistered before its fit answered")
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
        try:
            adv.check_confirm(len(request.maps), len(request.copies), len(request.route_tables))
            adv.check_copy_count(len(request.maps),
                                 sum(len(layer.copies) for layer in request.copies))
            copies = copies_from_proto(request.copies) if request.copies else None
            maps = maps_from_proto(request.maps, adv.topology.experts)
            tables = (tables_from_proto(request.route_tables, adv.topology.devices,
                                        adv.topology.experts) if request.route_tables else None)
            adv.confirm(request.step, maps, copies, tables)
        except FieldError as err:
            # A step already reported is the job's state at fault, not the request's shape.
            code = (grpc.StatusCode.FAILED_PRECONDITION if err.field == "step"
                    else status_of(err))
            await abort(context, code, str(err))
        except ValueError as err:
            await abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return pb.ConfirmExpertsResponse(job=request.job, step=request.step)
