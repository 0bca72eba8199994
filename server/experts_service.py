"""RecommendExperts and ConfirmExperts: proto <-> advisor translation, errors -> status codes.

A mixin of PlacementServicer (which provides ``_coord`` and ``_metrics``). Fits take seconds, so
they run on one dedicated thread: the solver threads keep answering rounds meanwhile.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import grpc.aio
import numpy as np

from netmoe.protos import placement_pb2 as pb

from .advisor import ConfirmError, ExpertAdvice, ExpertAdvisor, NotEnoughData
from .metrics import Metrics
from .rounds import Coordinator

DEFAULT_STARTS = 4
_fits = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netmoe-expert-fit")


def _maps(rows: tuple[tuple[int, ...], ...] | np.ndarray) -> list[pb.ExpertMap]:
    return [pb.ExpertMap(device=[int(d) for d in row]) for row in rows]


def _copies(layers: tuple[tuple[tuple[int, int], ...], ...]) -> list[pb.LayerCopies]:
    return [pb.LayerCopies(copies=[pb.ExpertCopy(expert=e, device=d) for e, d in layer])
            for layer in layers]


def _replicas(advice: ExpertAdvice) -> pb.ReplicaAdvice | None:
    rec, ev = advice.replicas, advice.replica_evaluation
    if rec is None or ev is None:
        return None
    total = ev.total
    return pb.ReplicaAdvice(
        adopt=rec.adopt, reason=rec.reason, copies=_copies(rec.copies),
        replicated=pb.Routes(inter=total.inter, intra=total.intra, seconds=total.seconds),
        saving_per_step=rec.saving_per_step, sync_per_step=rec.sync_per_step,
        net_per_step=rec.net_per_step, migration_cost=rec.migration_cost,
        break_even_steps=rec.break_even_steps, memory_bytes=rec.memory_bytes,
        max_device_bytes=rec.max_device_bytes, cross_node_copies=rec.cross_node_copies,
    )


def advice_to_proto(job: str, advice: ExpertAdvice) -> pb.RecommendExpertsResponse:
    rec, ev = advice.recommendation, advice.evaluation

    def routes(kind: str) -> pb.Routes:
        r = getattr(ev, kind)
        return pb.Routes(inter=r.inter, intra=r.intra, seconds=r.seconds)

    return pb.RecommendExpertsResponse(
        job=job, adopt=rec.adopt, reason=rec.reason, maps=_maps(rec.maps),
        current=_maps(ev.current), moved_experts=rec.moved_experts, moved_inter=rec.moved_inter,
        migration_bytes=rec.migration_bytes, migration_seconds=rec.migration_seconds,
        unit=rec.unit, saving_per_step=rec.saving_per_step, migration_cost=rec.migration_cost,
        break_even_steps=rec.break_even_steps,
        home=routes("home"), sample_only=routes("sample_only"), joint=routes("joint"),
        fit_first_step=advice.fit_steps[0], fit_last_step=advice.fit_steps[1],
        held_out_first_step=advice.held_out_steps[0], held_out_last_step=advice.held_out_steps[1],
        window_bytes=advice.window_bytes, replicas=_replicas(advice),
    )


class ExpertPlacementRPCs:
    _coord: Coordinator
    _metrics: Metrics

    async def _advisor(self, job: str, context: grpc.aio.ServicerContext) -> ExpertAdvisor:
        adv = self._coord.experts.get(job)
        if adv is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {job!r} is not registered")
            raise AssertionError("context.abort returned")
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
            )

        try:
            advice = await asyncio.get_running_loop().run_in_executor(_fits, fit)
        except NotEnoughData as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        self._metrics.expert_predicted_saving.labels(request.job).set(
            advice.predicted_inter_saving_per_step)
        if advice.predicted_copies_saving_per_step is not None:
            self._metrics.replica_predicted_saving.labels(request.job).set(
                advice.predicted_copies_saving_per_step)
        return advice_to_proto(request.job, advice)

    async def ConfirmExperts(
        self, request: pb.ConfirmExpertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConfirmExpertsResponse:
        adv = await self._advisor(request.job, context)
        lengths = {len(m.device) for m in request.maps}
        if len(lengths) > 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"maps: layers list {sorted(lengths)} experts, need "
                                f"{adv.topology.experts} in every layer")
        maps = np.array([list(m.device) for m in request.maps], dtype=np.int64).reshape(
            len(request.maps), lengths.pop() if lengths else adv.topology.experts)
        copies = [[(c.expert, c.device) for c in layer.copies] for layer in request.copies]
        try:
            adv.confirm(request.step, maps, copies if request.copies else None)
        except ConfirmError as err:
            code = (grpc.StatusCode.FAILED_PRECONDITION if err.field == "step"
                    else grpc.StatusCode.INVALID_ARGUMENT)
            await context.abort(code, str(err))
        return pb.ConfirmExpertsResponse(job=request.job, step=request.step)
