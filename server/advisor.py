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
went out (``ExpertAdvisors.solved``); window updates and the realised-saving metric run in order
on one advisor thread. Fits run on a thread of their job's own, after the advisor thread got
past every round solved before the fit was asked for: one job's fit never delays another job's
fit or unregistration, and unregistration drops the job's queued fits and refuses the answer of
a running one. Every size a request names is checked against the job and the server's limits
(``WindowLimits``) on the event loop, before any work proportional to it.
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
    check_slots,
    evaluate_replicas,
    fit_replicas,
    recommend_replicas,
    route_table,
    served,
    solve_replicated,
)

from .errors import FieldError, NotEnoughData, OverLimit

if TYPE_CHECKING:
    from .jobs import JobSpec

log = logging.getLogger(__name__)
Holders = tuple[np.ndarray, np.ndarray | None]  # [E, J] bool of layer l and of l+1 (or None)
MAX_CONFIRMED = 8  # map versions remembered per job; older ones no round can need any more
MAX_BYTES = (1 << 63) - 1  # byte figures of an answer (migration, copies' memory) stay int64
T = TypeVar("T")


@dataclass(frozen=True)
class WindowLimits:
    """What one job may ask of its advisor. max_steps: steps each job's window keeps;
    max_bytes: bytes of counts it keeps; max_starts: random starts of one fit (its time and
    memory grow with them); max_confirmed_bytes: bytes of one confirmed version (maps [L, E]
    int64, holders [L, E, J] bool and route tables [L, E, J] int64), of which a job keeps
    MAX_CONFIRMED; max_expert_bytes: bytes_per_expert and grad_bytes_per_expert (their products
    with expert counts stay 64-bit); max_horizon_steps: horizon_steps."""

    max_steps: int = 32
    max_bytes: int = 32 << 20
    max_starts: int = 64
    max_confirmed_bytes: int = 64 << 20
    max_expert_bytes: int = 1 << 40
    max_horizon_steps: int = 1 << 30

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            positive_int(f.name, getattr(self, f.name))


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


@dataclass(frozen=True)
class AdviceArgs:
    """RecommendExperts' arguments (``ExpertAdvisor.advise``). Raises ValueError naming a field
    whose value is out of its type's range; the server's limits are ``ExpertAdvisor.check``'s."""

    horizon_steps: int
    bytes_per_expert: int
    held_out_steps: int = 0
    unit: str = "seconds"
    starts: int = 4
    seed: int = 0
    replica_slots: int = 0
    grad_bytes: int = 0
    max_load_ratio: float | None = None
    migration_budget: int | None = None

    def __post_init__(self) -> None:
        positive_int("horizon_steps", self.horizon_steps)
        positive_int("bytes_per_expert", self.bytes_per_expert)
        positive_int("held_out_steps", self.held_out_steps, minimum=0)
        positive_int("starts", self.starts, minimum=0)
        positive_int("replica_slots", self.replica_slots, minimum=0)
        positive_int("grad_bytes_per_expert", self.grad_bytes, minimum=0)
        if self.max_load_ratio is not None:
            check_ratio("max_load_ratio", self.max_load_ratio)
        check_budget("migration_budget", self.migration_budget)
        if self.unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}")


class ExpertAdvisor:
    """One job: its window, its confirmed maps. topology: the registered one (its map is in
    force until a confirmation); layers: the job's MoE layers (JobSpec.layers), the most a
    confirmation may name (None: no bound of the job's)."""

    def __init__(self, topology: Topology, limits: WindowLimits, layers: int | None = None
                 ) -> None:
        self.topology = topology
        self.limits = limits
        self.layers = layers
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

    def _current(self, layers: int) -> np.ndarray:
        """[layers, E] int64: the maps in force for the next step, one per layer of the window:
        a layer the confirmed maps do not name keeps the registered map (as ``topologies``
        solves it), so a window that grew or a confirmation of other layers never wedges a
        fit."""
        maps = self._maps_at(self._last_step + 1, layers)
        out = np.tile(self.topology.expert_device, (layers, 1))
        n = min(layers, maps.shape[0])
        out[:n] = maps[:n]
        return out

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

    def check_confirm(self, maps: int, copies: int, tables: int) -> None:
        """Sizes of a confirmation, before any work proportional to them: maps, copies, tables
        are the request's layer entries. Raises FieldError naming the field unless maps has the
        window's layer count (at most the job's layers before any report) and copies and tables
        have none or as many; OverLimit when the version would hold more than the server's
        max_confirmed_bytes."""
        topo, limit = self.topology, self.layers
        with self._lock:
            reported = self._layers
        if reported and maps != reported:
            raise FieldError("maps", f"maps has {maps} layers of {topo.experts} experts, the job "
                                     f"reported {reported} layers (its window's)")
        if maps < 1 or (limit is not None and maps > limit):
            raise FieldError("maps", f"maps has {maps} layers, the job's spec.layers allows "
                                     f"1 to {limit}")
        for name, n in (("copies", copies), ("route_tables", tables)):
            if n not in (0, maps):
                raise FieldError(name, f"{name} has {n} layers, need 0 or one per map layer "
                                       f"({maps})")
        cells = maps * topo.experts * topo.devices
        size = maps * topo.experts * 8 + (cells if copies or tables else 0) + 8 * cells * bool(
            tables)
        if size > self.limits.max_confirmed_bytes:
            raise OverLimit("maps", (
                f"{maps} layers of maps{', copies' if copies else ''}"
                f"{' and route tables' if tables else ''} for {topo.experts} experts on "
                f"{topo.devices} devices hold {size} bytes, over the server's "
                f"max_confirmed_bytes={self.limits.max_confirmed_bytes} per confirmed version"))

    def check_copy_count(self, maps: int, copies: int) -> None:
        """After ``check_confirm``, before the copies are read: FieldError unless the
        confirmation's copies in all fit its maps layers (per layer at most one copy of each
        expert on each device but its owner)."""
        topo = self.topology
        most = maps * topo.experts * (topo.devices - 1)
        if copies > most:
            raise FieldError("copies", f"copies lists {copies} copies, {maps} layers of "
                                       f"{topo.experts} experts on {topo.devices} devices hold "
                                       f"at most {most}")

    def confirm(self, step: int, maps: object, copies: object | None = None,
                tables: object | None = None) -> None:
        """Puts maps ([L, E] device of each expert per layer) in force from step on, with copies
        ([L] (expert, device) lists, or None) on top, routed by tables ([L][J][E], or None: the
        default rule). Raises FieldError naming the field when step is not after every reported
        step, or maps do not have the window's layer count, or change a device's number of experts,
        or copies do not fit the maps, or tables name a device that does not hold the expert or
        break the rule (balance.check_tables), and as ``check_confirm`` says."""
        topo = self.topology
        arr = np.asarray(maps)
        layers = arr.shape[0] if arr.ndim == 2 else 0
        self.check_confirm(layers, 0 if copies is None else len(copies),  # type: ignore[arg-type]
                           0 if tables is None else len(tables))  # type: ignore[arg-type]
        with self._lock:
            if step <= self._last_step:
                raise FieldError(
                    "step", f"step={step} must come after step {self._last_step}, already "
                            f"reported (plans already sent are never re-solved)")
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
        Raises ValueError naming a bad argument (``check``), NotEnoughData when the window is
        too thin."""
        return self.fit(self.check(AdviceArgs(
            horizon_steps, bytes_per_expert, held_out_steps, unit, starts, seed, replica_slots,
            grad_bytes, max_load_ratio, migration_budget)))

    def check(self, args: AdviceArgs) -> AdviceArgs:
        """args within the server's limits and the job's topology, checked before any work
        proportional to them (on the event loop, before the fit is queued). Raises ValueError
        naming the field, the value and the limit."""
        lim, topo = self.limits, self.topology
        for name, value, top in (
                ("starts", args.starts, lim.max_starts),
                ("horizon_steps", args.horizon_steps, lim.max_horizon_steps),
                ("held_out_steps", args.held_out_steps, lim.max_steps),
                ("bytes_per_expert", args.bytes_per_expert, lim.max_expert_bytes),
                ("grad_bytes_per_expert", args.grad_bytes, lim.max_expert_bytes)):
            if value > top:
                raise ValueError(f"{name}={value} is over the server's limit {top}")
        # Migration and copy bytes are bytes_per_expert times up to layers x experts: 64-bit.
        cells = topo.experts * (self.layers or 0)
        if args.bytes_per_expert * cells > MAX_BYTES:
            raise ValueError(f"bytes_per_expert={args.bytes_per_expert} times the job's "
                             f"layers x experts ({cells}) exceeds {MAX_BYTES} bytes")
        try:  # confirmed maps keep each device's expert count: the registered map decides
            check_slots(args.replica_slots, topo, topo.expert_device[None])
        except ValueError as err:
            raise ValueError(f"replica_slots={args.replica_slots}: {err}") from None
        return args

    def fit(self, args: AdviceArgs) -> ExpertAdvice:
        """``advise`` on arguments already ``check``-ed: the fit itself (seconds)."""
        horizon_steps, bytes_per_expert = args.horizon_steps, args.bytes_per_expert
        held_out_steps, unit, starts, seed = args.held_out_steps, args.unit, args.starts, args.seed
        replica_slots, grad_bytes = args.replica_slots, args.grad_bytes
        max_load_ratio, migration_budget = args.max_load_ratio, args.migration_budget
        with self._lock:
            window = dict(self._window)  # arrays are never written after observe: no deep copy
            layers = self._layers
            current = self._current(max(layers, 2))
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
            copies = fit_replicas(self.topology, fit_rounds, fit.array(), slots=replica_slots,
                                  grad_bytes=grad_bytes).copies
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
    applied its expert map when it counted). Owns the advisor thread, which feeds every job's
    window (see the module docstring), and one fit thread per job, so that one job's fit never
    delays another job's fit or unregistration; ``close`` stops them all.
    """

    def __init__(
        self, limits: WindowLimits | None = None, observer: AdvisorObserver | None = None
    ) -> None:
        self.limits = limits or WindowLimits()
        self._observer = observer
        self._jobs: dict[str, ExpertAdvisor] = {}
        self._device_level: set[str] = set()  # jobs registered with device_counts
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="netmoe-advisor")
        # Per job: its fits, one at a time in order (a thread starts at its first fit).
        self._fits: dict[str, ThreadPoolExecutor] = {}

    def added(self, spec: JobSpec) -> None:
        if spec.device_counts:
            self._device_level.add(spec.job)
            return
        if spec.job not in self._jobs:
            self._jobs[spec.job] = ExpertAdvisor(spec.topology, self.limits, spec.layers)
            self._fits[spec.job] = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=f"netmoe-fit-{spec.job[:32]}")

    def removed(self, job: str) -> None:
        """The job went: its queued fits are dropped (``fit``), a running one is left to end
        and its answer refused; its window goes with the last fit holding it."""
        self._jobs.pop(job, None)
        self._device_level.discard(job)
        fits = self._fits.pop(job, None)
        if fits is not None:  # queued fits still run, to fail at once (``fit``)
            fits.shutdown(wait=False)

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

    def fit(self, job: str, fn: Callable[[], T]) -> Future[T]:
        """Runs fn on job's own fit thread, after its earlier fits and after every round handed
        over before it reached the windows. Raises KeyError when job has no advisor; the future
        fails with KeyError when the job was unregistered before fn ran or while it ran (its
        answer is stale), and is cancelled when ``close`` came first."""
        fits = self._fits.get(job)
        if fits is None:
            raise KeyError(job)
        fed = self._thread.submit(lambda: None)

        def body() -> T:
            if self._fits.get(job) is not fits:
                raise KeyError(job)
            fed.result()
            out = fn()
            if self._fits.get(job) is not fits:
                raise KeyError(job)
            return out

        return fits.submit(body)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        for fits in self._fits.values():
            fits.shutdown(wait=False, cancel_futures=True)
        self._fits.clear()

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
