"""Expert placement advisor of the service: per-job windows of round counts, fits, confirmed maps.

Pure data plane, no gRPC. Every round the service solves feeds its counts to the job's window:
report (step, l) carries, per sample, the gather routes of layer l and the predicted scatter routes
of layer l+1, rows rank-major (the rows' home placement). The window keeps the latest steps,
bounded in steps and in bytes.

A fit needs `netmoe.solver.experts` rounds: [L, I, E] routes per layer, row i the same sample in
every layer, because layer l's experts serve the scatter of pair (l-1, l) and the gather of pair
(l, l+1). Samples move between layers, so rows are matched by the reports' sample ids, which must
follow the samples (the client's Placement reports them so): a step enters a fit once all its
layers are in with the same ids, each layer's real gather routes ordered by id. The predicted
scatters are only what the planner sees; the fit uses the routes that happened. Fitted and
replayed samples sit at home in id order, which changes no optimal route count.

Confirmed maps: from a step on, round (step', l) is solved with layer l's map for its gather and
layer l+1's for its scatter. Counts stay in the reports' expert ids, so the window stays valid
across confirmations. Confirmed copies (netmoe.solver.replicas) come with their maps: rounds
under them are solved with replica-aware costs.

Off the critical path: the coordinator tells the advisors about a solved round after its plans
went out (``ExpertAdvisors.solved``); window updates, the realised-saving metric and fits run in
order on one advisor thread, so a fit sees every round solved before it was asked for.
Thread safety: windows are written on the advisor thread while confirmations and the maps in
force are read on the event loop and in solver threads; one lock guards each advisor's state,
and fits work on a copy.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np

from netmoe.checks import positive_int
from netmoe.round import Key, RoundCounts, compact_counts
from netmoe.solver import Plan, Topology, solve
from netmoe.solver.balance import (
    check_budget,
    check_ratio,
    check_tables,
    fit_balanced,
    load_summary,
    owner_loads,
    ratio,
)
from netmoe.solver.experts import (
    UNITS,
    ExpertEvaluation,
    Recommendation,
    check_maps,
    evaluate_experts,
    fit_experts,
    recommend,
)
from netmoe.solver.replicas import (
    ReplicaEvaluation,
    ReplicaRecommendation,
    check_copies,
    evaluate_replicas,
    fit_replicas,
    recommend_replicas,
    route_table,
    served,
    solve_replicated,
)

from .errors import FieldError, NotEnoughData

if TYPE_CHECKING:
    from .jobs import JobSpec

log = logging.getLogger(__name__)
Holders = tuple[np.ndarray, np.ndarray | None]  # [E, J] bool of layer l and of l+1 (or None)
MAX_CONFIRMED = 8  # map versions remembered per job; older ones no round can need any more
T = TypeVar("T")


@dataclass(frozen=True)
class WindowLimits:
    """max_steps: steps each job's window keeps; max_bytes: bytes of counts it keeps."""

    max_steps: int = 32
    max_bytes: int = 32 << 20

    def __post_init__(self) -> None:
        positive_int("max_steps", self.max_steps)
        positive_int("max_bytes", self.max_bytes)


@dataclass(frozen=True)
class Realized:
    """One round solved under confirmed maps: inter-node routes of its plan (joint) and of the
    plan the registered expert map would have got (sample-only), gather + scatter."""

    joint_inter: int
    sample_only_inter: int
    # With copies in force: the inter-node routes the same maps would have got without them.
    without_copies_inter: int | None = None
    # Busiest device's routes over the mean in the round's gather layer, as planned.
    load_ratio: float | None = None


@dataclass(frozen=True)
class ExpertAdvice:
    """RecommendExperts' answer. fit_steps, held_out_steps: (first, last) window steps; the
    evaluation's rounds are held-out training steps. replicas, replica_evaluation: the copies'
    decision and held-out replay when copies were asked for."""

    recommendation: Recommendation
    evaluation: ExpertEvaluation
    fit_steps: tuple[int, int]
    held_out_steps: tuple[int, int]
    window_bytes: int
    replicas: ReplicaRecommendation | None = None
    replica_evaluation: ReplicaEvaluation | None = None
    # Held-out max/mean load (mean over pair layers, worst) with the copies and tables, and with
    # the fitted maps alone; set with the copies.
    load: tuple[float, float] | None = None
    joint_load: tuple[float, float] | None = None

    @property
    def predicted_copies_saving_per_step(self) -> float | None:
        """Inter-node routes per training step (forward pass) the copies save over joint
        placement alone on the held-out steps; None without copies."""
        ev = self.replica_evaluation
        if ev is None:
            return None
        return (ev.experts.joint.inter - ev.total.inter) / ev.experts.rounds

    @property
    def predicted_inter_saving_per_step(self) -> float:
        """Inter-node routes per training step (forward pass) joint saves over sample-only on
        the held-out steps."""
        return self.evaluation.inter_saving_per_step


class ExpertAdvisor:
    """One job: its window, its confirmed maps. topology: the registered one (its map is in
    force until a confirmation)."""

    def __init__(self, topology: Topology, limits: WindowLimits) -> None:
        self.topology = topology
        self.limits = limits
        self._lock = threading.Lock()
        # step -> (group, layer) -> (sample ids [I] uint64, gather [I, E] in a compact dtype)
        self._window: OrderedDict[int, dict[tuple[int, int], tuple[np.ndarray, np.ndarray]]] = (
            OrderedDict())
        self._bytes = 0
        self._layers = 0  # MoE layers seen (1 + highest layer, + 1 if it sent a scatter)
        self._last_step = -1  # highest step reported to the service (solved or not)
        # (first step, [L, E] maps, per-layer Topology, [L, E, J] holders or None, [L, E, J]
        # route tables or None) in step order
        self._confirmed: list[tuple[int, np.ndarray, tuple[Topology, ...],
                                    np.ndarray | None, np.ndarray | None]] = []

    # ------------------------------------------------------------------------------ the window

    @property
    def window_bytes(self) -> int:
        return self._bytes

    @property
    def window_steps(self) -> int:
        return len(self._window)

    def saw_step(self, step: int) -> None:
        """A report of `step` arrived (called before the round is solved)."""
        with self._lock:
            self._last_step = max(self._last_step, step)

    def observe(self, key: Key, ids: np.ndarray, gather: np.ndarray, has_next: bool,
                group: int = 0) -> None:
        """Adds round (step, layer) of expert-parallel group ``group``: ids [I] uint64 and gather
        routes [I, E] int64 (rows rank-major); has_next: the round had a scatter (a next MoE
        layer). Evicts the oldest steps beyond the limits; a step older than a full window's
        oldest is ignored."""
        step, layer = key
        g = compact_counts(gather)
        ids = np.asarray(ids, dtype=np.uint64)
        size = g.nbytes + ids.nbytes
        with self._lock:
            self._last_step = max(self._last_step, step)
            if size > self.limits.max_bytes:
                return
            if self._window and step < next(iter(self._window)) and (
                    len(self._window) >= self.limits.max_steps):
                return
            per_step = self._window.setdefault(step, {})
            old = per_step.get((group, layer))
            if old is not None:
                self._bytes -= old[0].nbytes + old[1].nbytes
            per_step[group, layer] = (ids, g)
            self._bytes += size
            self._layers = max(self._layers, layer + 1 + bool(has_next))
            if len(self._window) > 1 and step < next(reversed(self._window)):
                self._window = OrderedDict(sorted(self._window.items()))
            while len(self._window) > self.limits.max_steps or self._bytes > self.limits.max_bytes:
                _, dropped = self._window.popitem(last=False)
                self._bytes -= sum(a.nbytes + b.nbytes for a, b in dropped.values())

    @classmethod
    def _rounds(cls, per_step: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]], layers: int
                ) -> list[np.ndarray]:
        """The complete groups' rounds of one step: [L, I, E] int64 each (``_round``)."""
        groups = sorted({g for g, _ in per_step})
        rounds = [cls._round({layer: v for (h, layer), v in per_step.items() if h == g}, layers)
                  for g in groups]
        return [r for r in rounds if r is not None]

    @staticmethod
    def _round(per_layer: dict[int, tuple[np.ndarray, np.ndarray]], layers: int
               ) -> np.ndarray | None:
        """[L, I, E] int64 routes of one group's step, rows by sample id; None if a layer is
        missing or the layers' ids differ."""
        if sorted(per_layer) != list(range(layers)):
            return None
        first = np.sort(per_layer[0][0])
        out = []
        for layer in range(layers):
            ids, g = per_layer[layer]
            order = np.argsort(ids, kind="stable")
            if not np.array_equal(ids[order], first):
                return None
            out.append(g[order].astype(np.int64))
        return np.stack(out)

    # ---------------------------------------------------------------------------- confirmed maps

    def current_maps(self) -> np.ndarray:
        """[L, E] int64: the maps in force for the next step (L = layers seen, at least 2)."""
        with self._lock:
            return self._maps_at(self._last_step + 1, max(self._layers, 2))

    def _maps_at(self, step: int, layers: int) -> np.ndarray:
        for first, maps, *_ in reversed(self._confirmed):
            if first <= step:
                return maps
        return np.tile(self.topology.expert_device, (layers, 1))

    def topologies(self, key: Key) -> tuple[Topology, Topology | None]:
        """(gather topology, scatter topology or None for "the same") of round (step, layer)."""
        step, layer = key
        with self._lock:
            for first, _, topos, *_ in reversed(self._confirmed):
                if first <= step:
                    if layer >= len(topos):
                        break
                    return topos[layer], topos[layer + 1] if layer + 1 < len(topos) else None
        return self.topology, None

    def holders(self, key: Key) -> Holders | None:
        """Holders (owners and copies, [E, J] bool) of round (step, layer)'s gather layer and
        scatter layer (None for the last layer); None when no copies are in force."""
        step, layer = key
        with self._lock:
            for first, _, topos, held, _ in reversed(self._confirmed):
                if first <= step:
                    if held is None or layer >= len(topos):
                        return None
                    return held[layer], held[layer + 1] if layer + 1 < len(topos) else None
        return None

    def tables(self, key: Key) -> Holders | None:
        """Confirmed route tables ([E, J] int64) of round (step, layer)'s gather and scatter
        layer (None for the last layer); None when none were confirmed (the default rule)."""
        step, layer = key
        with self._lock:
            for first, _, topos, _, tables in reversed(self._confirmed):
                if first <= step:
                    if tables is None or layer >= len(topos):
                        return None
                    return tables[layer], tables[layer + 1] if layer + 1 < len(topos) else None
        return None

    def confirm(self, step: int, maps: object, copies: object | None = None,
                tables: object | None = None) -> None:
        """Puts maps ([L, E] device of each expert per layer) in force from step on, with copies
        ([L] (expert, device) lists, or None) on top, routed by tables ([L][J][E], or None: the
        default rule). Raises FieldError naming the field when step is not after every reported
        step, or maps have fewer layers than reported, or change a device's number of experts,
        or copies do not fit the maps, or tables name a device that does not hold the expert or
        break the rule (balance.check_tables)."""
        topo = self.topology
        with self._lock:
            if step <= self._last_step:
                raise FieldError(
                    "step", f"step={step} must come after step {self._last_step}, already "
                            f"reported (plans already sent are never re-solved)")
            arr = np.asarray(maps)
            layers = arr.shape[0] if arr.ndim == 2 else 0
            if layers < max(self._layers, 1):
                raise FieldError("maps", f"maps has {layers} layers of {topo.experts} experts, "
                                           f"the job reported {self._layers} layers")
            try:
                checked = check_maps("maps", arr, topo, layers)
            except ValueError as err:
                raise FieldError("maps", str(err)) from None
            want = np.bincount(topo.expert_device, minlength=topo.devices)
            for layer, m in enumerate(checked):
                have = np.bincount(m, minlength=topo.devices)
                if (have != want).any():
                    d = int(np.flatnonzero(have != want)[0])
                    raise FieldError(
                        "maps", f"maps[{layer}] puts {int(have[d])} experts on device {d}, the "
                                f"job's topology has {int(want[d])} there")
            held = None
            if copies is not None:
                try:
                    held = check_copies("copies", copies, topo, checked)
                except ValueError as err:
                    raise FieldError("copies", str(err)) from None
                held.setflags(write=False)
            routed = None
            if tables is not None:
                if held is None:
                    held = check_copies("copies", [()] * layers, topo, checked)
                    held.setflags(write=False)
                try:
                    routed = check_tables("route_tables", tables, topo, held)
                except ValueError as err:
                    raise FieldError("route_tables", str(err)) from None
                routed.setflags(write=False)
            checked.setflags(write=False)
            topos = tuple(topo.with_experts(m) for m in checked)
            self._confirmed = [c for c in self._confirmed if c[0] < step]
            self._confirmed.append((step, checked, topos, held, routed))
            # Rounds run forward, so only the latest versions can still be needed.
            del self._confirmed[:-MAX_CONFIRMED]

    def realized(self, spec: JobSpec, key: Key, counts: RoundCounts, plan: Plan
                 ) -> Realized | None:
        """For a round solved under confirmed maps: its inter-node routes and those of the plan
        the registered map would have got with the job's own objective and method. None when
        the registered map was in force."""
        gtopo, stopo = self.topologies(key)
        if gtopo is self.topology and stopo is None:
            return None
        base = solve(self.topology, counts.gather, counts.scatter, objective=spec.objective,
                     method=spec.method, time_limit=spec.deadline)
        held, tables = self.holders(key), self.tables(key)
        if held is None:
            load = np.bincount(gtopo.expert_device, weights=counts.gather.sum(axis=0),
                               minlength=gtopo.devices)
            return Realized(plan.after.inter, base.after.inter, load_ratio=ratio(load))
        table = route_table(gtopo, held[0], gtopo.expert_device) if tables is None else tables[0]
        load = served(gtopo, counts.gather, table, np.asarray(plan.dest)).sum(axis=0)
        bare = solve(gtopo, counts.gather, counts.scatter, scatter_topology=stopo,
                     objective=spec.objective, method=spec.method, time_limit=spec.deadline)
        return Realized(plan.after.inter, base.after.inter, bare.after.inter, ratio(load))

    def solve_with_copies(self, key: Key, gather: np.ndarray, scatter: np.ndarray | None,
                          home: np.ndarray) -> Plan | None:
        """Round (step, layer) solved with replica-aware costs when copies are in force for it,
        else None (the caller solves it as usual). gather, scatter: [I, E]; home: [I]."""
        held = self.holders(key)
        if held is None:
            return None
        gtopo, stopo = self.topologies(key)
        return solve_replicated(gtopo, gather, scatter, held, home=home, scatter_topology=stopo,
                                tables=self.tables(key))

    # -------------------------------------------------------------------------------- the fit

    def advise(
        self,
        *,
        horizon_steps: int,
        bytes_per_expert: int,
        held_out_steps: int = 0,
        unit: str = "seconds",
        starts: int = 4,
        seed: int = 0,
        replica_slots: int = 0,
        grad_bytes: int = 0,
        max_load_ratio: float | None = None,
        migration_budget: int | None = None,
    ) -> ExpertAdvice:
        """Fits maps on the window's earlier steps, replays the latest held_out_steps (0: half)
        and weighs the saving against the migration (netmoe.solver.experts.recommend). With
        replica_slots > 0, also chooses copies on the fit steps for the fitted maps and weighs
        them (netmoe.solver.replicas; grad_bytes: one expert's gradient, for their sync).
        With max_load_ratio or migration_budget, maps, copies and route tables are chosen for
        routes and load together (netmoe.solver.balance.fit_balanced, copies weighed on routes)
        and the copies' reason says what the bound cost in held-out routes and what routes-only
        copies would cost in load.
        Raises ValueError naming a bad argument, NotEnoughData when the window is too thin."""
        horizon_steps = positive_int("horizon_steps", horizon_steps)
        bytes_per_expert = positive_int("bytes_per_expert", bytes_per_expert)
        held_out_steps = positive_int("held_out_steps", held_out_steps, minimum=0)
        starts = positive_int("starts", starts, minimum=0)
        replica_slots = positive_int("replica_slots", replica_slots, minimum=0)
        grad_bytes = positive_int("grad_bytes_per_expert", grad_bytes, minimum=0)
        if max_load_ratio is not None:
            check_ratio("max_load_ratio", max_load_ratio)
        check_budget("migration_budget", migration_budget)
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        with self._lock:
            window = dict(self._window)  # arrays are never written after observe: no deep copy
            layers = self._layers
            current = self._maps_at(self._last_step + 1, max(layers, 2))
            size = self._bytes
        if layers < 2:
            raise NotEnoughData(f"the job reported {layers} MoE layer(s); expert placement "
                                f"needs rounds of at least 2 layers")
        # A step's rounds: one per expert-parallel group that reported all its layers.
        rounds = {step: self._rounds(window[step], layers) for step in sorted(window)}
        steps = [step for step, r in rounds.items() if r]
        if len(steps) < 2:
            raise NotEnoughData(
                f"the window holds {len(steps)} complete step(s) (all {layers} layers reported "
                f"with the same sample ids) of {len(window)}, need at least 2 (one to fit, one "
                f"held out)")
        held = held_out_steps or len(steps) // 2
        if held >= len(steps):
            raise ValueError(f"held_out_steps={held_out_steps} leaves nothing to fit: the window "
                             f"holds {len(steps)} complete steps")
        fit_steps, held_steps = steps[:-held], steps[-held:]
        fit_rounds = [r for s in fit_steps for r in rounds[s]]
        held_rounds = [r for s in held_steps for r in rounds[s]]
        balanced = max_load_ratio is not None or migration_budget is not None
        fit = fit_experts(self.topology, fit_rounds, current=current, starts=starts, seed=seed)
        replicas = replayed = load = joint_load = None
        if replica_slots or balanced:
            try:
                copies = fit_replicas(self.topology, fit_rounds, fit.array(),
                                      slots=replica_slots, grad_bytes=grad_bytes).copies
            except ValueError as err:
                raise ValueError(f"replica_slots={replica_slots}: {err}") from None
            replayed = evaluate_replicas(self.topology, held_rounds, fit.array(), copies,
                                         current=current)
            if balanced:
                routes_only = replayed
                bal = fit_balanced(self.topology, fit_rounds, slots=replica_slots,
                                   max_load_ratio=max_load_ratio, current=current,
                                   migration_budget=migration_budget, starts=starts, seed=seed)
                replayed = evaluate_replicas(self.topology, held_rounds, np.array(bal.maps),
                                             bal.copies, current=current, tables=bal.tables)
            evaluation = replayed.experts
            replicas = recommend_replicas(
                self.topology, replayed, bytes_per_expert=bytes_per_expert,
                grad_bytes=grad_bytes, horizon_steps=horizon_steps,
                unit=unit)  # type: ignore[arg-type]
            load = load_summary(replayed.loads)
            joint_load = load_summary(owner_loads(self.topology, held_rounds,
                                                  np.array(evaluation.maps)))
            if balanced:
                other = load_summary(routes_only.loads)
                replicas = dataclasses.replace(replicas, reason=(
                    f"{replicas.reason}; on the held-out steps the load bound costs "
                    f"{replayed.total.inter - routes_only.total.inter} inter-node routes against "
                    f"maps and copies for routes only ({replayed.total.inter} vs "
                    f"{routes_only.total.inter}), and routes only would leave the busiest device "
                    f"at {other[0]:.3f} x the mean load (worst layer {other[1]:.3f}) instead of "
                    f"{load[0]:.3f} ({load[1]:.3f})"))
        else:
            evaluation = evaluate_experts(self.topology, held_rounds, fit.array(),
                                          current=current)
        rec = recommend(self.topology, evaluation, bytes_per_expert=bytes_per_expert,
                        horizon_steps=horizon_steps, unit=unit)  # type: ignore[arg-type]
        return ExpertAdvice(rec, evaluation, (fit_steps[0], fit_steps[-1]),
                            (held_steps[0], held_steps[-1]), size, replicas, replayed, load,
                            joint_load)


class AdvisorObserver(Protocol):
    """Receives what the metrics endpoint exports; called from solver threads."""

    def window_changed(self, job: str, window_bytes: int, window_steps: int) -> None: ...

    def round_realized(self, job: str, realized: Realized) -> None: ...


class ExpertAdvisors:
    """The advisors of every registered job: the coordinator's ``RoundHooks``.

    A job registered with device_counts gets none: its counts are routes per device, which no
    expert map can be fitted on, and its rounds are solved on those counts as sent (the rank
    applied its expert map when it counted). Owns the advisor thread (see the module
    docstring); ``close`` stops it.
    """

    def __init__(
        self, limits: WindowLimits | None = None, observer: AdvisorObserver | None = None
    ) -> None:
        self.limits = limits or WindowLimits()
        self._observer = observer
        self._jobs: dict[str, ExpertAdvisor] = {}
        self._device_level: set[str] = set()  # jobs registered with device_counts
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netmoe-advisor")

    def added(self, spec: JobSpec) -> None:
        if spec.device_counts:
            self._device_level.add(spec.job)
            return
        self._jobs.setdefault(spec.job, ExpertAdvisor(spec.topology, self.limits))

    def removed(self, job: str) -> None:
        self._jobs.pop(job, None)
        self._device_level.discard(job)

    def get(self, job: str) -> ExpertAdvisor | None:
        """None for an unknown job and for a job registered with device_counts."""
        return self._jobs.get(job)

    def device_level(self, job: str) -> bool:
        """The job is registered with device_counts (so it has no advisor)."""
        return job in self._device_level

    def saw_step(self, job: str, step: int) -> None:
        adv = self._jobs.get(job)
        if adv is not None:
            adv.saw_step(step)

    def solve_with_copies(self, job: str, key: Key, gather: np.ndarray,
                          scatter: np.ndarray | None, home: np.ndarray) -> Plan | None:
        """ExpertAdvisor.solve_with_copies; None when the job has no advisor."""
        adv = self._jobs.get(job)
        return None if adv is None else adv.solve_with_copies(key, gather, scatter, home)

    def topologies(self, job: str, key: Key) -> tuple[Topology, Topology | None] | None:
        """None when the job has no advisor (the registered topology applies)."""
        adv = self._jobs.get(job)
        return None if adv is None else adv.topologies(key)

    def solved(self, spec: JobSpec, key: Key, counts: RoundCounts, plan: Plan, group: int
               ) -> None:
        """A group's round's plans went out: feed its counts (rows rank-major) to the job's
        window and its realised saving to the metrics, on the advisor thread."""
        adv = self._jobs.get(spec.job)
        if adv is not None:
            self._thread.submit(self._observe, adv, spec, key, counts, plan, group)

    def run(self, fn: Callable[[], T]) -> Future[T]:
        """Runs fn on the advisor thread, after every round handed over before it."""
        return self._thread.submit(fn)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _observe(self, adv: ExpertAdvisor, spec: JobSpec, key: Key, counts: RoundCounts,
                 plan: Plan, group: int) -> None:
        try:
            self._feed(adv, spec, key, counts, plan, group)
        except Exception:  # a metrics re-solve failing must not stop the windows of other rounds
            log.exception("expert advisor failed on job %r round %s", spec.job, key)

    def _feed(self, adv: ExpertAdvisor, spec: JobSpec, key: Key, counts: RoundCounts,
              plan: Plan, group: int) -> None:
        adv.observe(key, counts.sample_ids, counts.gather, counts.scatter is not None, group)
        if self._observer is None:
            return
        self._observer.window_changed(spec.job, adv.window_bytes, adv.window_steps)
        realized = adv.realized(spec, key, counts, plan)
        if realized is not None:
            self._observer.round_realized(spec.job, realized)
