"""Conversions between the round contract (``netmoe.round``) and its wire form (``netmoe.v1``).

Both directions live here, used by the service's servicer and by the client, so the two sides
cannot drift apart. Counts travel as raw little-endian bytes with a dtype and a shape
(``Counts``): one array write on the sender, one copy-free view on the receiver. Their shape is
checked against the job by the service (``netmoe.server.admission.check_report``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from netmoe.checks import shown
from netmoe.groups import EPGroups
from netmoe.round import (
    BW_INTER,
    BW_INTRA,
    FALLBACK,
    FEASIBLE,
    INVALID,
    OPTIMAL,
    STATUSES,
    RankPlan,
    RoundCounts,
    Traffic,
    compact_counts,
)

from . import placement_pb2 as pb

if TYPE_CHECKING:
    from netmoe.server.admission import Report
    from netmoe.server.jobs import JobSpec

_TO_WIRE = {
    OPTIMAL: pb.PLAN_STATUS_OPTIMAL,
    FEASIBLE: pb.PLAN_STATUS_FEASIBLE,
    FALLBACK: pb.PLAN_STATUS_FALLBACK,
    INVALID: pb.PLAN_STATUS_INVALID,
}
_FROM_WIRE = {v: k for k, v in _TO_WIRE.items()}
assert set(_TO_WIRE) == set(STATUSES)


# Wire dtypes of Counts, narrowest first.
_COUNTS_DTYPES = {
    pb.COUNTS_DTYPE_UINT8: np.dtype("<u1"),
    pb.COUNTS_DTYPE_UINT16: np.dtype("<u2"),
    pb.COUNTS_DTYPE_UINT32: np.dtype("<u4"),
}
# (largest count, wire code, dtype), narrowest first: looked up per report, so precomputed.
_NARROWEST = [(int(np.iinfo(d).max), c, d) for c, d in _COUNTS_DTYPES.items()]
MAX_COUNT = _NARROWEST[-1][0]  # of the widest wire dtype


def counts_to_pb(counts: object, field: str = "counts") -> pb.Counts:
    """counts [n, E] (or [n, J]) non-negative ints (any integer dtype, at most 2^32 - 1) ->
    Counts: the row-major little-endian bytes of the narrowest unsigned dtype holding the largest
    count.

    Raises ValueError naming ``field`` for another rank, a non-integer dtype or counts out of
    range.
    """
    arr = np.asarray(counts)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise ValueError(f"{field} must be a [samples, experts] integer array, got shape "
                         f"{list(arr.shape)} of {arr.dtype}")
    top = int(arr.max()) if arr.size else 0
    low = int(arr.min()) if arr.size and arr.dtype.kind == "i" else 0
    if low < 0 or top > MAX_COUNT:
        raise ValueError(f"{field} must lie in [0, {MAX_COUNT}], got [{low}, {top}]")
    _, code, dtype = next(n for n in _NARROWEST if top <= n[0])
    return pb.Counts(data=arr.astype(dtype, copy=False).tobytes(), dtype=code, shape=arr.shape)


def counts_from_pb(msg: pb.Counts, field: str) -> np.ndarray:
    """A read-only [shape[0], shape[1]] view of msg.data in its wire dtype (uint8, 16 or 32):
    no copy, no object per count.

    Raises ValueError naming ``field`` and the value unless the dtype is known, the shape has
    two dimensions and data holds exactly shape[0] x shape[1] counts; all checked on the
    message's numbers before any array exists.
    """
    dtype = _COUNTS_DTYPES.get(msg.dtype)
    if dtype is None:
        known = ", ".join(pb.CountsDtype.Name(c) for c in _COUNTS_DTYPES)
        name = (pb.CountsDtype.Name(msg.dtype) if msg.dtype in pb.CountsDtype.values()
                else "not a CountsDtype")
        raise ValueError(f"{field}.dtype={msg.dtype} ({name}), need one of {known}")
    if len(msg.shape) != 2:
        raise ValueError(f"{field}.shape {shown(msg.shape, 4)} has {len(msg.shape)} "
                         f"dimensions, need 2 ([samples, experts])")
    rows, cols = msg.shape
    data = msg.data  # one copy out of the message; the view below keeps it alive
    need = rows * cols * dtype.itemsize  # Python ints: no overflow, whatever the shape
    if len(data) != need:
        raise ValueError(f"{field}.data has {len(data)} bytes, shape [{rows}, {cols}] x "
                         f"{dtype.name} needs {need}")
    return np.frombuffer(data, dtype=dtype).reshape(rows, cols)


def report_to_proto(job: str, step: int, layer: int, rank: int, counts: RoundCounts,
                    ranks: Sequence[int] = (), micro_batch: int = 0) -> pb.Report:
    """One rank's report, or a node report of ``ranks`` (rank first; rows n per rank in turn);
    counts.gather / scatter [rows, E] (or [rows, J] for device_counts jobs) non-negative ints
    (``counts_to_pb``: ValueError naming the field otherwise)."""
    return pb.Report(
        job=job, step=step, layer=layer, rank=rank, ranks=list(ranks), micro_batch=micro_batch,
        sample_ids=np.asarray(counts.sample_ids, dtype=np.uint64).tolist(),
        gather=counts_to_pb(counts.gather, "gather"),
        scatter=None if counts.scatter is None else counts_to_pb(counts.scatter, "scatter"),
    )


def traffic_to_proto(t: Traffic) -> pb.Routes:
    return pb.Routes(inter=t.inter, intra=t.intra, local=t.local, seconds=t.seconds)


def traffic_from_proto(msg: pb.Routes) -> Traffic:
    """Routes on the wire carry no per-channel times: t_intra and t_inter come back as 0."""
    return Traffic(msg.inter, msg.intra, msg.local, 0.0, 0.0, msg.seconds)


def plan_to_proto(job: str, plan: RankPlan) -> pb.Plan:
    msg = pb.Plan(
        job=job, step=plan.step, layer=plan.layer, rank=plan.rank,
        dest=plan.dest.tolist(), held_ids=plan.held_ids.tolist(), status=_TO_WIRE[plan.status],
        reason=plan.reason, error=plan.error, solve_seconds=plan.solve_seconds, moved=plan.moved,
        ranks=plan.ranks, micro_batch=plan.micro_batch,
    )
    if plan.before is not None:
        msg.before.CopyFrom(traffic_to_proto(plan.before))
    if plan.after is not None:
        msg.after.CopyFrom(traffic_to_proto(plan.after))
    return msg


def plan_from_proto(msg: pb.Plan) -> RankPlan:
    """Raises ValueError for a status the contract does not define (UNSPECIFIED)."""
    status = _FROM_WIRE.get(msg.status)
    if status is None:
        raise ValueError(f"plan.status={msg.status} is not a known PlanStatus")
    return RankPlan(
        step=msg.step, layer=msg.layer, rank=msg.rank, status=status,
        dest=np.fromiter(msg.dest, dtype=np.int64, count=len(msg.dest)),
        held_ids=np.fromiter(msg.held_ids, dtype=np.uint64, count=len(msg.held_ids)),
        reason=msg.reason, error=msg.error, solve_seconds=msg.solve_seconds, moved=msg.moved,
        before=traffic_from_proto(msg.before) if msg.HasField("before") else None,
        after=traffic_from_proto(msg.after) if msg.HasField("after") else None,
        ranks=tuple(msg.ranks), micro_batch=msg.micro_batch,
    )


def maps_to_proto(maps: object) -> list[pb.ExpertMap]:
    """[L][E] device of each expert per layer -> one ExpertMap per layer (rows as given: the
    service names a layer of the wrong length)."""
    return [pb.ExpertMap(device=[int(d) for d in row]) for row in maps]  # type: ignore[attr-defined]


def maps_from_proto(maps: list[pb.ExpertMap], experts: int) -> np.ndarray:
    """[L, E] int64. Raises ValueError naming the layers whose length is not ``experts``."""
    bad = [layer for layer, m in enumerate(maps) if len(m.device) != experts]
    if bad:
        lengths = sorted({len(maps[layer].device) for layer in bad})
        raise ValueError(f"maps: layers {bad[:8]} list {lengths} experts, need {experts} in "
                         f"every layer")
    return np.array([list(m.device) for m in maps], dtype=np.int64).reshape(len(maps), experts)


def copies_to_proto(layers: object) -> list[pb.LayerCopies]:
    """[L] lists of (expert, device) copies -> one LayerCopies per layer."""
    return [pb.LayerCopies(copies=[pb.ExpertCopy(expert=int(e), device=int(d)) for e, d in layer])
            for layer in layers]  # type: ignore[attr-defined]


def copies_from_proto(layers: list[pb.LayerCopies]) -> list[list[tuple[int, int]]]:
    """One LayerCopies per layer -> [L] lists of (expert, device) copies."""
    return [[(c.expert, c.device) for c in layer.copies] for layer in layers]


def tables_to_proto(tables: object) -> list[pb.RouteTable]:
    """[L][J][E] route tables -> one RouteTable per layer (device[d * E + e])."""
    return [pb.RouteTable(device=[int(h) for row in layer for h in row])  # type: ignore[attr-defined]
            for layer in tables]  # type: ignore[attr-defined]


def tables_from_proto(tables: list[pb.RouteTable], devices: int,
                      experts: int) -> np.ndarray:
    """[L, J, E] int64. Raises ValueError naming the layers whose length is not J x E."""
    bad = [layer for layer, t in enumerate(tables) if len(t.device) != devices * experts]
    if bad:
        lengths = sorted({len(tables[layer].device) for layer in bad})
        raise ValueError(f"route_tables: layers {bad[:8]} list {lengths} entries, need devices x "
                         f"experts = {devices * experts} in every layer")
    return np.array([list(t.device) for t in tables], dtype=np.int64).reshape(
        len(tables), devices, experts)


# --- expert advice: RecommendExperts' answer (netmoe.server.advisor -> netmoe.v1) -----------
# Typed Any: the contract imports only the core, never the server or the solver whose
# dataclasses (ExpertAdvice, Routes) these read.

def _routes_to_proto(r: Any) -> pb.Routes:
    """netmoe.solver.experts.Routes of held-out rounds -> Routes (``local`` is unset)."""
    return pb.Routes(inter=r.inter, intra=r.intra, seconds=r.seconds)


def _replicas_to_proto(advice: Any) -> pb.ReplicaAdvice | None:
    """The copies' part of the answer; None when no copies were asked for."""
    rec, ev = advice.replicas, advice.replica_evaluation
    if rec is None or ev is None:
        return None
    return pb.ReplicaAdvice(
        adopt=rec.adopt, reason=rec.reason, copies=copies_to_proto(rec.copies),
        replicated=_routes_to_proto(ev.total),
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


def advice_to_proto(job: str, advice: Any) -> pb.RecommendExpertsResponse:
    """The advisor's answer (netmoe.server.advisor.ExpertAdvice) to RecommendExperts for job."""
    rec, ev = advice.recommendation, advice.evaluation
    return pb.RecommendExpertsResponse(
        job=job, adopt=rec.adopt, reason=rec.reason, maps=maps_to_proto(rec.maps),
        current=maps_to_proto(ev.current), moved_experts=rec.moved_experts,
        moved_inter=rec.moved_inter, migration_bytes=rec.migration_bytes,
        migration_seconds=rec.migration_seconds, unit=rec.unit,
        saving_per_step=rec.saving_per_step, migration_cost=rec.migration_cost,
        break_even_steps=rec.break_even_steps,
        home=_routes_to_proto(ev.home), sample_only=_routes_to_proto(ev.sample_only),
        joint=_routes_to_proto(ev.joint),
        fit_first_step=advice.fit_steps[0], fit_last_step=advice.fit_steps[1],
        held_out_first_step=advice.held_out_steps[0], held_out_last_step=advice.held_out_steps[1],
        window_bytes=advice.window_bytes, replicas=_replicas_to_proto(advice),
    )


def job_spec(
    nodes: int,
    gpus_per_node: int,
    experts: int,
    samples_per_device: int,
    *,
    hidden_size: int,
    dtype_bytes: int = 2,
    bw_intra: float = BW_INTRA,
    bw_inter: float = BW_INTER,
    alpha_intra: float = 0.0,
    alpha_inter: float = 0.0,
    objective: str = "volume",
    method: str = "two_stage",
    deadline_ms: int = 50,
    layers: int = 0,
    ep_size: int = 0,
    groups: Sequence[Sequence[int]] = (),
    device_counts: bool = False,
) -> pb.JobSpec:
    """A job's spec from plain numbers.

    hidden_size x dtype_bytes is what one (token, top-k slot) route carries (bf16: 2 bytes).
    Bandwidths in bytes/s per channel, alphas in seconds per All-to-All; the defaults are the
    paper's cluster (400 GB/s NVLink, 100 GB/s InfiniBand, latency ignored). Only their ratio
    matters to the "volume" objective's choice; they scale the modelled times the service
    reports. deadline_ms: per-round deadline counted from the round's first report. layers:
    the model's MoE layers (reports name layers below it; 0: the service's limit). ep_size:
    ranks per expert-parallel group (0: all ranks one group), groups of consecutive ranks unless
    ``groups`` lists each group's global ranks (``netmoe.groups``); experts are spread over one
    group's devices.
    device_counts: reports carry [n, J] routes per device instead of [n, E] per expert
    (JobSpec.device_counts: E/J times fewer counts; no expert placement advisor).
    """
    return pb.JobSpec(
        topology=pb.Topology(
            nodes=nodes, gpus_per_node=gpus_per_node, experts=experts,
            alpha_intra=alpha_intra, alpha_inter=alpha_inter,
            bw_intra=bw_intra, bw_inter=bw_inter, bytes_per_route=hidden_size * dtype_bytes,
        ),
        world_size=nodes * gpus_per_node,
        samples_per_device=samples_per_device,
        objective=objective,
        method=method,
        deadline_ms=deadline_ms,
        layers=layers,
        ep_size=ep_size,
        groups=[pb.RankGroup(ranks=list(g)) for g in groups],
        device_counts=device_counts,
    )


# The service's side: spec and reports from the wire, answers to refused reports. The domain
# types are the server's, imported in the functions: the client imports this module without
# the server's dependencies (OR-Tools).

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
    from netmoe.server.jobs import MAX_LAYERS, JobSpec, check_deadline, check_layers
    from netmoe.solver import Topology

    if not msg.HasField("topology"):
        raise ValueError("spec.topology is missing")
    check_deadline("spec.deadline_ms", msg.deadline_ms / 1000, f"{msg.deadline_ms} ms")
    layers = check_layers("spec.layers", msg.layers or MAX_LAYERS)  # 0: the service's limit
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
        layers=layers, ep_groups=groups, device_counts=msg.device_counts,
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


def report_from_proto(msg: pb.Report, max_ranks: int) -> Report:
    """The report with its counts decoded (``counts_from_pb``) and compacted. Counts that do
    not decode become ``Report.counts_error``: ``check_report`` raises it, so such a report is
    answered and ends its round like any other invalid content. max_ranks: the most ranks a
    node report can carry (the server's max_world_size); a longer list is not converted but
    becomes ``Report.ranks_error``."""
    from netmoe.server.admission import Report
    from netmoe.server.errors import FieldError

    counts: dict[str, np.ndarray | None] = {"gather": None, "scatter": None}
    error = None
    for name in counts:
        if msg.HasField(name):
            try:
                counts[name] = compact_counts(counts_from_pb(getattr(msg, name), name))
            except ValueError as err:
                error = FieldError(name, str(err))
                break
    ranks_error = None
    if len(msg.ranks) > max_ranks:
        ranks_error = FieldError("ranks", f"ranks lists {len(msg.ranks)} values, more than "
                                          f"max_world_size={max_ranks} ranks of any job")
    return Report(job=msg.job, step=msg.step, layer=msg.layer, rank=msg.rank,
                  sample_ids=np.fromiter(msg.sample_ids, dtype=np.uint64,
                                         count=len(msg.sample_ids)),
                  gather=counts["gather"], scatter=counts["scatter"], generation=msg.generation,
                  counts_error=error, ranks=() if ranks_error else tuple(msg.ranks),
                  micro_batch=msg.micro_batch, ranks_error=ranks_error)


def invalid_plan(report: Report, error: str, job: str, max_ranks: int) -> pb.Plan:
    """The answer to a report that failed validation (job: the stream's, never the caller's).
    It names the report's ranks only when they are no more than ``max_ranks`` (a node's): an
    answer never echoes an unbounded request field."""
    msg = plan_to_proto(job, RankPlan.rejected(report.step, report.layer, report.rank, error,
                                                  report.micro_batch))
    if len(report.ranks) <= max_ranks:
        msg.ranks.extend(report.ranks)
    return msg
