"""Rounds: collect one report per rank of an expert-parallel group for a (job, step, layer),
solve once, answer every rank of the group. The groups of a job round independently: each has
its own deadline, fallback and solver turn.

The data plane of the service, free of gRPC: asyncio for deadlines, numpy for the counts and a
thread pool for the solver so the event loop keeps serving while a round is solved. All methods of
``Coordinator`` run on one event loop; only ``_run_solver`` runs in a pool thread.

Memory stays bounded: a round is dropped once answered, a job keeps at most ``max_pending`` open
rounds (the oldest is closed as incomplete to make room) and remembers the outcome of its last
``finished_memory`` fallback rounds to answer late reports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pickle
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import numpy as np

from netmoe.checks import positive_int
from netmoe.groups import EPGroups
from netmoe.round import Key, RankPlan, RoundCounts, RoundKey, Traffic, home_placement
from netmoe.solver import METHODS, OBJECTIVES, Plan, Topology, solve, traffic

from .errors import FieldError, JobConflict, JobLimit, OverLimit, RankBound, StaleGeneration
from .solver_process import SolverGone, SolverProcess

log = logging.getLogger(__name__)

SolveFn = Callable[..., Plan]  # the signature of netmoe.solver.solve
MAX_DEADLINE_S = 60.0
MAX_JOB_ID = 128
MAX_LAYERS = 1024
SOLVE_MARGIN = 0.2  # of the deadline, kept free of solving
MIN_BUDGET_S = 0.001
# Rounds whose solve may hold a thread longer than this share all solver threads but one, so
# short rounds (the plans a layer waits for) always find a thread free.
LONG_SOLVE_S = 0.25
MAX_STEP = (1 << 63) - 1  # steps index int64 arrays downstream (expert windows)

# Round outcomes (metrics label values and Plan.reason of fallbacks).
SOLVED = "solved"
TIMEOUT = "timeout"
INCOMPLETE = "incomplete"
INVALID = "invalid"
ERROR = "error"
UNREGISTERED = "unregistered"
SHUTDOWN = "shutdown"
OUTCOMES = (SOLVED, TIMEOUT, INCOMPLETE, INVALID, ERROR, UNREGISTERED, SHUTDOWN)


@dataclass(frozen=True)
class JobSpec:
    """A registered job: topology, balance and how to solve its rounds.

    topology: one expert-parallel group's (its nodes x ranks per node, expert map in the
    group's devices); every group solves its rounds on it. ep_groups: the job's groups (None:
    one group of world_size = topology.devices ranks). Every rank reports samples_per_device
    samples. deadline: seconds from a round's first report until its ranks get the home
    placement. layers: MoE layers of the model; reports name layers in [0, layers).
    device_counts: reports carry [n, J] routes per device instead of [n, E] routes per expert
    (``counts_topology``); the expert placement advisor does not serve such a job.
    """

    job: str
    topology: Topology
    world_size: int
    samples_per_device: int
    objective: str = "volume"
    method: str = "two_stage"
    deadline: float = 0.05
    layers: int = MAX_LAYERS
    ep_groups: EPGroups | None = None
    device_counts: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.job, str) or not self.job or len(self.job) > MAX_JOB_ID:
            raise ValueError(f"job must be a non-empty id of at most {MAX_JOB_ID} characters, "
                             f"got {self.job!r}")
        if not self.job.isprintable():
            raise ValueError(f"job must be printable, got {self.job!r}")
        positive_int("world_size", self.world_size)
        positive_int("samples_per_device", self.samples_per_device)
        t = self.topology
        if self.ep_groups is None:
            if self.world_size != t.devices:
                raise ValueError(
                    f"world_size={self.world_size} must equal nodes x gpus_per_node = "
                    f"{t.nodes} x {t.gpus_per_node} = {t.devices}"
                )
            object.__setattr__(self, "ep_groups",
                               EPGroups.contiguous(self.world_size, t.gpus_per_node))
        groups = self.groups
        if groups.world != self.world_size:
            raise ValueError(f"ep_groups cover {groups.world} ranks, world_size is "
                             f"{self.world_size}")
        if (groups.nodes, groups.gpus) != (t.nodes, t.gpus_per_node):
            raise ValueError(f"a group spans {groups.nodes} nodes x {groups.gpus} ranks, the "
                             f"topology {t.nodes} x {t.gpus_per_node}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 1 <= positive_int("layers", self.layers) <= MAX_LAYERS:
            raise ValueError(f"layers must be in [1, {MAX_LAYERS}], got {self.layers!r}")
        if not 0 < self.deadline <= MAX_DEADLINE_S:
            raise ValueError(
                f"deadline must be in (0, {MAX_DEADLINE_S:g}] seconds, got {self.deadline!r}"
            )
        if not isinstance(self.device_counts, bool):
            raise ValueError(f"device_counts must be a bool, got {self.device_counts!r}")

    @property
    def groups(self) -> EPGroups:
        assert self.ep_groups is not None  # set by __post_init__
        return self.ep_groups

    @property
    def ep_size(self) -> int:
        """J, the ranks of one group."""
        return self.topology.devices

    @property
    def samples(self) -> int:
        """I, the samples of one round (of one group)."""
        return self.ep_size * self.samples_per_device

    @cached_property
    def counts_topology(self) -> Topology:
        """The topology whose experts the reports' count columns are: the registered one, or
        for device_counts one pseudo-expert per device (``Topology.per_device``)."""
        return self.topology.per_device() if self.device_counts else self.topology


@dataclass(frozen=True, eq=False)
class Report:
    """One rank's report (or a node report of several ranks) as received, its shapes not yet
    checked against the job (``check_report`` does).

    ranks: a node report's ranks, rank first (``check_members`` checks them); () for rank alone.
    sample_ids: [n] uint64 global ids in local order (n per member in turn). gather, scatter:
    [rows, cols] routes of each local sample to each expert (to each device for device_counts
    jobs) in the smallest unsigned dtype holding them, shaped as sent (None: absent; scatter is
    absent when there is no next layer). generation: the job registration the sender knows (0:
    whichever is current). counts_error: why the counts on the wire did not decode (raised by
    check_report). micro_batch: the round's (see ``netmoe.round.RoundKey``).
    """

    job: str
    step: int
    layer: int
    rank: int
    sample_ids: np.ndarray
    gather: np.ndarray | None
    scatter: np.ndarray | None
    generation: int = 0
    counts_error: FieldError | None = None
    ranks: tuple[int, ...] = ()
    micro_batch: int = 0

    @property
    def key(self) -> RoundKey:
        return RoundKey(self.step, self.micro_batch, self.layer)

    @property
    def members(self) -> tuple[int, ...]:
        """The ranks whose samples the report carries, in row order."""
        return self.ranks or (self.rank,)


@dataclass(frozen=True, eq=False)
class Outcome:
    """How a round ended. plan and counts (all ranks' rows, rank-major) are set when solved."""

    kind: str
    error: str = ""
    before: Traffic | None = None
    plan: Plan | None = None
    counts: RoundCounts | None = None


class RoundObserver(Protocol):
    """Receives what the metrics endpoint exports; called on the event loop."""

    def round_finished(
        self, job: str, outcome: str, before: Traffic | None, after: Traffic | None
    ) -> None: ...

    def solve_finished(self, seconds: float) -> None: ...


class NullObserver:
    def round_finished(
        self, job: str, outcome: str, before: Traffic | None, after: Traffic | None
    ) -> None:
        pass

    def solve_finished(self, seconds: float) -> None:
        pass


class RoundHooks(Protocol):
    """What the coordinator asks of the expert placement side (``netmoe.server.advisor``).

    All are called on the event loop and must return at once: ``solved`` is called after the
    round's plans went out and does its work (windows, metrics) elsewhere.
    """

    def added(self, spec: JobSpec) -> None: ...

    def removed(self, job: str) -> None: ...

    def saw_step(self, job: str, step: int) -> None:
        """A report of ``step`` arrived (before its round is solved)."""

    def topologies(self, job: str, key: Key) -> tuple[Topology, Topology | None] | None:
        """(gather topology, scatter topology or None for the same) in force for the round;
        None for the registered topology."""

    def solve_with_copies(self, job: str, key: Key, gather: np.ndarray,
                          scatter: np.ndarray | None, home: np.ndarray) -> Plan | None:
        """The round's plan when confirmed expert copies are in force (replica-aware costs);
        None to solve as usual. Runs in a solver thread."""

    def solved(self, spec: JobSpec, key: Key, counts: RoundCounts, plan: Plan, group: int
               ) -> None:
        """Group ``group``'s round ``key`` was solved (counts: its rows, rank-major)."""


class NoHooks:
    def added(self, spec: JobSpec) -> None:
        pass

    def removed(self, job: str) -> None:
        pass

    def saw_step(self, job: str, step: int) -> None:
        pass

    def topologies(self, job: str, key: Key) -> tuple[Topology, Topology | None] | None:
        return None

    def solve_with_copies(self, job: str, key: Key, gather: np.ndarray,
                          scatter: np.ndarray | None, home: np.ndarray) -> Plan | None:
        return None

    def solved(self, spec: JobSpec, key: Key, counts: RoundCounts, plan: Plan, group: int
               ) -> None:
        pass


class SolverThreads:
    """Daemon threads running solves. Shut down, queued solves are cancelled and a running one is
    abandoned: the process exits without waiting for it (a CP-SAT run may take the deadline).

    Each thread may hand its solves to its own SolverProcess (``in_process``); shutdown kills
    those, so an abandoned solve there stops at once.
    """

    def __init__(self, threads: int) -> None:
        self._queue: queue.SimpleQueue[tuple[Future, Callable[[], object]] | None] = (
            queue.SimpleQueue())
        self._procs = [SolverProcess() for _ in range(threads)]
        self._threads = [threading.Thread(target=self._work, args=(proc,),
                                          name=f"netmoe-solver-{k}", daemon=True)
                         for k, proc in enumerate(self._procs)]
        self._lock = threading.Lock()
        self._local = threading.local()
        self.running = 0  # solves under way
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[[], object]) -> Future:
        fut: Future = Future()
        self._queue.put((fut, fn))
        return fut

    def warm(self) -> None:
        """Starts every thread's process (a job whose rounds go there registered)."""
        for proc in self._procs:
            proc.start()

    def in_process(self, fn: Callable[..., Plan], *args: object, **kwargs: object) -> Plan:
        """fn(*args, **kwargs) in the calling solver thread's process."""
        return self._local.proc.call(fn, *args, **kwargs)

    def shutdown(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        for proc in self._procs:
            proc.kill()

    def _work(self, proc: SolverProcess) -> None:
        self._local.proc = proc
        while (item := self._queue.get()) is not None:
            fut, fn = item
            if not fut.set_running_or_notify_cancel():
                continue
            with self._lock:
                self.running += 1
            try:
                fut.set_result(fn())
            except BaseException as err:
                fut.set_exception(err)
            finally:
                with self._lock:
                    self.running -= 1


def _picklable(fn: Callable[..., object]) -> bool:
    try:
        pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def check_members(spec: JobSpec, report: Report) -> tuple[int, ...]:
    """A node report's ranks (``Report.members``), or FieldError naming ``ranks`` unless they
    are ``rank`` first, then the other ranks of its group on its node, each once."""
    if not report.ranks:
        return (report.rank,)
    ranks, gpn = report.ranks, spec.groups.gpus_per_node
    if ranks[0] != report.rank:
        raise FieldError("ranks", f"ranks starts with {ranks[0]}, need the reporting rank "
                                  f"{report.rank} first")
    g, _ = spec.groups.locate(report.rank)
    node = report.rank // gpn
    want = [r for r in spec.groups.ranks[g] if r // gpn == node]
    if sorted(ranks) != want:
        extra = sorted(set(ranks) - set(want)) or sorted(r for r in set(ranks)
                                                         if ranks.count(r) > 1)
        missing = sorted(set(want) - set(ranks))
        raise FieldError("ranks", (
            f"ranks {list(ranks)[:16]} must be the {len(want)} ranks of group {g} on node "
            f"{node}, {want[:16]}" + (f"; not those: {extra[:8]}" if extra else "")
            + (f"; missing {missing[:8]}" if missing else "")))
    return tuple(ranks)


def check_report(spec: JobSpec, report: Report, prefix: str = "", members: int = 1
                 ) -> RoundCounts:
    """The report's ids and counts ([n, E] each, as received; [n, J] for device_counts), or
    FieldError unless they fit the job: n = members x samples_per_device unique ids, counts that
    decoded, shaped [n, E] ([n, J])."""
    n, e = spec.samples_per_device * members, spec.counts_topology.experts
    ids = report.sample_ids
    if len(ids) != n:
        need = (f"samples_per_device={n}" if members == 1 else
                f"samples_per_device x ranks = {spec.samples_per_device} x {members} = {n}")
        raise FieldError(f"{prefix}sample_ids",
                         f"{prefix}sample_ids has {len(ids)} ids, job {spec.job!r} needs {need}")
    seen = ids.tolist()
    # A set of n Python ints is ~30x cheaper than np.unique at the few ids a rank holds.
    if len(set(seen)) != n:
        dup = next(i for k, i in enumerate(seen) if i in seen[:k])
        raise FieldError(f"{prefix}sample_ids",
                         f"{prefix}sample_ids repeats id {dup} (rank {report.rank})")
    if report.counts_error is not None:
        err = report.counts_error
        raise FieldError(f"{prefix}{err.field}", f"{prefix}{err}")
    rows = "samples_per_device" if members == 1 else "samples_per_device x ranks"
    columns = "devices" if spec.device_counts else "experts"
    need = f"[{rows}, {columns}] = [{n}, {e}] for job {spec.job!r}"
    if spec.device_counts:
        need += " (device_counts)"
    if report.gather is None:
        raise FieldError(f"{prefix}gather", f"{prefix}gather is missing, need {need}")
    for name, counts in (("gather", report.gather), ("scatter", report.scatter)):
        if counts is not None and counts.shape != (n, e):
            absent = " (or absent: no next layer)" if name == "scatter" else ""
            raise FieldError(f"{prefix}{name}", f"{prefix}{name}.shape is {list(counts.shape)}, "
                                                f"need {need}{absent}")
    return RoundCounts(ids, report.gather, report.scatter)


def assemble(parts: Sequence[RoundCounts], ranks: Sequence[int]) -> RoundCounts:
    """The round's rows from every rank's checked counts (in device order), rank-major, in
    the parts' compact dtypes.

    ranks: the global rank of each part, for the errors. Raises FieldError for ids repeated
    across ranks or ranks disagreeing on whether scatter is sent.
    """
    ids = np.concatenate([p.sample_ids for p in parts])
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1][0]
        named = [r for r, p in zip(ranks, parts, strict=True) if dup in p.sample_ids]
        raise FieldError("sample_ids", f"sample_ids: id {int(dup)} is reported by ranks {named}")
    with_scatter = [r for r, p in zip(ranks, parts, strict=True) if p.scatter is not None]
    if with_scatter and len(with_scatter) != len(parts):
        without = [r for r, p in zip(ranks, parts, strict=True) if p.scatter is None]
        raise FieldError(
            "scatter", f"scatter: ranks {with_scatter} sent one but ranks {without} did not"
        )
    scatters = None if parts[0].scatter is None else [p.scatter for p in parts]
    # The rows stay compact (the parts' widest dtype): the solver widens what it needs in its
    # own thread, not on the event loop that assembles (an int64 copy of a group's rows took
    # 2 ms of it at I = 512, E = 256).
    return RoundCounts(
        ids, np.concatenate([p.gather for p in parts]),
        None if scatters is None else np.concatenate(scatters),
    )


def solve_budget(spec: JobSpec, rnd: _Round) -> float:
    """Seconds the solver may take: what is left of the round's deadline minus a margin (a fifth
    of the deadline: CP-SAT may overrun its limit a little, the plans must still be built and
    reach the ranks), so a time-limited solve returns its best (FEASIBLE) plan before the
    deadline instead of being overrun."""
    margin = SOLVE_MARGIN * spec.deadline
    left = rnd.opened + spec.deadline - time.monotonic()
    return max(left - margin, MIN_BUDGET_S)


def part_bytes(part: RoundCounts) -> int:
    """Bytes a pending report holds."""
    scatter = 0 if part.scatter is None else part.scatter.nbytes
    return part.sample_ids.nbytes + part.gather.nbytes + scatter


def members_plan(spec: JobSpec, key: RoundKey, outcome: Outcome, members: tuple[int, ...],
                 ids: np.ndarray, error: str = "") -> RankPlan:
    """The answer to a report of ``members`` (one rank, or a node report: rank first): each
    member's ``rank_plan`` (ids [n per member]), joined in member order for a node report."""
    if len(members) == 1:
        return rank_plan(spec, key, outcome, members[0], ids, error)
    n = spec.samples_per_device
    parts = [rank_plan(spec, key, outcome, r, ids[k * n:(k + 1) * n], error)
             for k, r in enumerate(members)]
    head = parts[0]
    return dataclasses.replace(
        head, dest=np.concatenate([p.dest for p in parts]),
        held_ids=np.concatenate([p.held_ids for p in parts]), ranks=members)


def rank_plan(spec: JobSpec, key: RoundKey, outcome: Outcome, rank: int, ids: np.ndarray,
              error: str = "") -> RankPlan:
    """Rank ``rank``'s part of its group's round outcome (ids [n]: its report's sample ids);
    fallbacks keep every sample at home. dest and held rows are the group's devices and rows."""
    plan, counts = outcome.plan, outcome.counts
    step, micro_batch, layer = key
    _, d = spec.groups.locate(rank)
    if plan is None or counts is None:
        return RankPlan.stay(step, layer, rank, ids, outcome.kind, error or outcome.error,
                             outcome.before, d, micro_batch)
    n = spec.samples_per_device
    return RankPlan(
        step, layer, rank, plan.status, np.asarray(plan.dest[d * n:(d + 1) * n]),
        counts.sample_ids[plan.rows_held[d]], error=error, solve_seconds=plan.solve_seconds,
        moved=plan.moved, before=plan.before, after=plan.after, micro_batch=micro_batch,
    )


Deliver = Callable[[RankPlan], None]


@dataclass(eq=False)
class _Round:
    """One group's round. parts: device in the group -> its rank's counts. streamed: reports
    arrive one by one on streams (False: one unary Solve request)."""

    key: RoundKey
    group: int = 0
    streamed: bool = True
    timer: asyncio.TimerHandle | None = None
    parts: dict[int, RoundCounts] = field(default_factory=dict)
    # (ranks of a report, its ids, where its answer goes)
    waiters: list[tuple[tuple[int, ...], np.ndarray, Deliver]] = field(default_factory=list)
    counts: RoundCounts | None = None
    outcome: Outcome | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    solving: bool = False
    opened: float = field(default_factory=time.monotonic)  # the deadline counts from here

    @property
    def done(self) -> bool:
        return self.outcome is not None


@dataclass(frozen=True)
class Binding:
    """A stream's (job, rank) in one registration (generation) of the job id."""

    job: str
    rank: int
    generation: int


@dataclass(eq=False)
class _Group:
    """One expert-parallel group's open rounds, remembered outcomes and solver turn."""

    pending: dict[RoundKey, _Round] = field(default_factory=dict)
    finished: OrderedDict[RoundKey, Outcome] = field(default_factory=OrderedDict)
    # One solve of the group at a time: its slow rounds never hold more than one solver thread.
    solver_turn: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False)
class _Job:
    """bound: rank -> the owner (an opaque stream token) of the one stream reporting for it.
    groups: one _Group per expert-parallel group of the spec."""

    spec: JobSpec
    generation: int
    groups: list[_Group] = field(default_factory=list)
    last: dict[int, RoundKey] = field(default_factory=dict)
    bound: dict[int, object] = field(default_factory=dict)
    unary: set[_Round] = field(default_factory=set)  # rounds of Solve calls in flight
    pending_bytes: int = 0  # of the reports its open rounds hold

    def __post_init__(self) -> None:
        self.groups = [_Group() for _ in range(self.spec.groups.count)]

    def open_rounds(self) -> list[_Round]:
        return [rnd for g in self.groups for rnd in g.pending.values()]


class Coordinator:
    """Jobs and their rounds. Create and use on the event loop that serves the reports.

    solve_fn: called in a pool thread as solve_fn(topology, gather, scatter, home=...,
    objective=..., method=..., time_limit=...); tests inject slow solvers here.
    hooks: the expert placement side (maps in force per round, what to do after a solve).
    """

    def __init__(
        self,
        *,
        solve_fn: SolveFn = solve,
        solver_threads: int = 4,
        process_rows: int = 2048,
        max_jobs: int = 64,
        max_pending: int = 16,
        finished_memory: int = 256,
        max_world_size: int = 1024,
        max_report_cells: int = 1 << 20,
        max_job_pending_bytes: int = 256 << 20,
        max_pending_bytes: int = 1 << 30,
        observer: RoundObserver | None = None,
        hooks: RoundHooks | None = None,
    ) -> None:
        self._solve_fn = solve_fn
        self._hooks: RoundHooks = hooks if hooks is not None else NoHooks()
        self._solvers = SolverThreads(positive_int("solver_threads", solver_threads))
        self._long_lane = asyncio.Semaphore(solver_threads - 1) if solver_threads > 1 else None
        process_rows = positive_int("process_rows", process_rows, minimum=0)
        # Injected solvers (tests' closures) cannot be sent to a process: they run in the thread.
        self._process_rows = process_rows if _picklable(solve_fn) else 0
        self._closed = False
        self._max_jobs = positive_int("max_jobs", max_jobs)
        self._max_pending = positive_int("max_pending", max_pending)
        self._finished_memory = positive_int("finished_memory", finished_memory)
        self._max_world_size = positive_int("max_world_size", max_world_size)
        self._max_report_cells = positive_int("max_report_cells", max_report_cells)
        self._max_job_bytes = positive_int("max_job_pending_bytes", max_job_pending_bytes)
        self._max_bytes = positive_int("max_pending_bytes", max_pending_bytes)
        self._pending_bytes = 0
        self._observer: RoundObserver = observer or NullObserver()
        self._jobs: dict[str, _Job] = {}
        self._generation = 0  # of the last registration; unique over the server's life
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def jobs(self) -> int:
        return len(self._jobs)

    def pending_rounds(self, job: str) -> int:
        return len(self._jobs[job].open_rounds())

    def generation(self, job: str) -> int:
        """The registration number of a registered job (KeyError if unknown)."""
        return self._jobs[job].generation

    def register(self, spec: JobSpec) -> bool:
        """Adds a job; False if it exists with the same spec. Raises JobConflict / JobLimit.
        Each new registration of a job id gets a new generation (``generation``)."""
        t = spec.topology
        self.check_limits(spec.job, world_size=spec.world_size, devices=t.devices,
                          samples_per_device=spec.samples_per_device, experts=t.experts)
        old = self._jobs.get(spec.job)
        if old is not None:
            if old.spec != spec:
                raise JobConflict(f"job {spec.job!r} is already registered with another spec")
            return False
        if len(self._jobs) >= self._max_jobs:
            raise JobLimit(f"job {spec.job!r}: the server already holds max_jobs={self._max_jobs}")
        self._generation += 1
        self._jobs[spec.job] = _Job(spec, self._generation)
        if 0 < self._process_rows <= spec.samples:
            self._solvers.warm()
        self._hooks.added(spec)
        return True

    def check_limits(
        self, job: str, *, world_size: int, devices: int, samples_per_device: int, experts: int
    ) -> None:
        """Raises JobLimit naming the value and the limit. Cheap on raw numbers, so it runs
        before a spec is built (a Topology allocates arrays of devices and experts)."""
        for name, value in (("world_size", world_size), ("nodes x gpus_per_node", devices)):
            if value > self._max_world_size:
                raise JobLimit(f"job {job!r}: {name}={value} exceeds the server's "
                               f"max_world_size={self._max_world_size}")
        cells = max(samples_per_device, 1) * experts
        if cells > self._max_report_cells:
            raise JobLimit(
                f"job {job!r}: samples_per_device x experts = {samples_per_device} x {experts} = "
                f"{cells} per report exceeds the server's max_report_cells="
                f"{self._max_report_cells}"
            )

    def unregister(self, job: str) -> None:
        """Forgets a job; its waiting ranks get fallbacks. Raises KeyError if unknown."""
        state = self._jobs[job]
        for rnd in [*state.open_rounds(), *state.unary]:
            self._finish(state, rnd, Outcome(UNREGISTERED, f"job {job!r} was unregistered"))
        del self._jobs[job]
        self._hooks.removed(job)

    def close(self) -> None:
        """Answers every waiting rank with a fallback and stops the solver threads; rounds
        reported from now on get the fallback "shutdown" at once."""
        self._closed = True
        for state in self._jobs.values():
            for rnd in state.open_rounds():
                self._finish(state, rnd, Outcome(SHUTDOWN, "the server is shutting down"))
        for task in self._tasks:
            task.cancel()
        self._solvers.shutdown()

    def spec(self, job: str) -> JobSpec:
        state = self._jobs.get(job)
        if state is None:
            raise FieldError("job", f"job {job!r} is not registered")
        return state.spec

    def check_binding(self, report: Report) -> JobSpec:
        """Raises FieldError unless the report names a known job and a rank of it."""
        spec = self.spec(report.job)
        if not 0 <= report.rank < spec.world_size:
            raise FieldError(
                "rank",
                f"rank {report.rank} is outside [0, {spec.world_size}) for job {spec.job!r}",
            )
        return spec

    @staticmethod
    def check_coordinates(spec: JobSpec, report: Report) -> None:
        """Raises FieldError unless layer and step are in range; checked before any round is
        opened, so out-of-range coordinates touch no round."""
        if not 0 <= report.layer < spec.layers:
            raise FieldError(
                "layer", f"layer {report.layer} is outside [0, {spec.layers}) for job "
                         f"{spec.job!r} (spec.layers)")
        if not 0 <= report.step <= MAX_STEP:
            raise FieldError("step", f"step {report.step} exceeds {MAX_STEP}")

    def bind(self, report: Report, owner: object, generation: int = 0) -> Binding:
        """Binds (report.job, report.rank) to the stream ``owner`` until ``release``.

        generation: the registration the stream's client knows (0: the current one). Raises
        FieldError (unknown job, rank out of range), StaleGeneration (the job id was registered
        anew since) or RankBound (another open stream holds the rank).
        """
        spec = self.check_binding(report)
        state = self._jobs[report.job]
        self._check_generation(state, generation)
        holder = state.bound.get(report.rank)
        if holder is not None and holder is not owner:
            raise RankBound(f"rank {report.rank} of job {spec.job!r} is already bound to another "
                            f"open stream (one stream per rank; close it first)")
        state.bound[report.rank] = owner
        return Binding(spec.job, report.rank, state.generation)

    def release(self, binding: Binding, owner: object) -> None:
        """Frees the ranks of a closed stream (its own and those its node reports carried). The
        ranks' next streams start afresh: their steps may restart (a worker resumed from a
        checkpoint), rounds still refuse a second report."""
        state = self._jobs.get(binding.job)
        if state is None or state.generation != binding.generation:
            return
        for rank in [r for r, o in state.bound.items() if o is owner]:
            del state.bound[rank]
            state.last.pop(rank, None)

    @staticmethod
    def _check_generation(state: _Job, generation: int) -> None:
        if generation and generation != state.generation:
            raise StaleGeneration(
                f"generation {generation} of job {state.spec.job!r} was unregistered; the job "
                f"id is now generation {state.generation} (register again)")

    def submit(self, report: Report, deliver: Deliver, binding: Binding | None = None) -> None:
        """Queues a report; ``deliver`` gets its plan once (possibly right away) when its round
        finishes. Raises FieldError if the report is rejected (then ``deliver`` is not called);
        a rejected report with valid coordinates ends its round as invalid for the other ranks.
        binding: the stream's, whose generation must still be registered (else StaleGeneration).
        """
        spec = self.check_binding(report)
        state = self._jobs[report.job]
        if binding is not None:
            if state.generation != binding.generation:
                raise StaleGeneration(
                    f"generation {binding.generation} of job {spec.job!r} was unregistered; "
                    f"the job id is now generation {state.generation}")
            self._check_generation(state, report.generation)
        self.check_coordinates(spec, report)
        key, rank = report.key, report.rank
        g, _ = spec.groups.locate(rank)
        group = state.groups[g]
        rnd = group.pending.get(key)
        done = group.finished.get(key)
        try:
            members = check_members(spec, report)
        except FieldError as err:
            if done is None:
                self._finish(state, rnd or self._open(state, g, key),
                             Outcome(INVALID, f"rank {rank}: {err}"))
            raise
        owner = state.bound.get(rank)
        for r in members:
            last = state.last.get(r)
            if last is not None and key <= last:
                raise FieldError(
                    "step",
                    f"(step, micro_batch, layer) {tuple(key)} of rank {r} does not come after "
                    f"{tuple(last)}, already reported (rounds must not go backwards, a round "
                    f"takes one report per rank)",
                )
            if rnd is not None and spec.groups.locate(r)[1] in rnd.parts:
                raise FieldError("step", f"rank {r} already reported (step, micro_batch, layer) "
                                         f"{tuple(key)}")
            if r != rank and binding is not None and state.bound.get(r, owner) is not owner:
                raise FieldError("ranks", f"rank {r} reports on a stream of its own; a node "
                                          f"report may carry only ranks without one")
        try:
            part = check_report(spec, report, members=len(members))
        except FieldError as err:
            if done is None:
                self._finish(state, rnd or self._open(state, g, key),
                             Outcome(INVALID, f"rank {rank}: {err}"))
            raise
        if done is None:
            self._check_bytes(state, part_bytes(part))
        for r in members:
            state.last[r] = key
            if binding is not None:
                state.bound[r] = owner  # the node's ranks belong to this stream now
        if done is not None:
            # Not "late": the round may have ended early because of another rank's report.
            deliver(members_plan(spec, key, done, members, part.sample_ids,
                                 f"its round had already ended before this report ({done.kind}: "
                                 f"{done.error})"))
            return
        if rnd is None:
            rnd = self._open(state, g, key)
        self._add(state, rnd, members, part, deliver)

    async def solve_now(self, reports: Sequence[Report]) -> list[RankPlan]:
        """Solves one pre-gathered round of one or more whole groups: one report per rank of
        each, any order; each group is solved as its own round. Returns the plans in request
        order. Raises FieldError naming the field (``reports[k].field``) and value."""
        if not reports:
            raise FieldError("reports", "reports is empty, need one report per rank")
        head = reports[0]
        spec = self.spec(head.job)
        self._check_generation(self._jobs[head.job], head.generation)
        parts: dict[int, RoundCounts] = {}
        for k, rep in enumerate(reports):
            for name in ("job", "step", "micro_batch", "layer", "generation"):
                if getattr(rep, name) != getattr(head, name):
                    raise FieldError(
                        f"reports[{k}].{name}",
                        f"reports[{k}].{name}={getattr(rep, name)!r} differs from "
                        f"reports[0].{name}={getattr(head, name)!r}",
                    )
            if not 0 <= rep.rank < spec.world_size:
                raise FieldError(f"reports[{k}].rank", f"reports[{k}].rank={rep.rank} is outside "
                                 f"[0, {spec.world_size}) for job {spec.job!r}")
            try:
                self.check_coordinates(spec, rep)
            except FieldError as err:
                raise FieldError(f"reports[{k}].{err.field}", f"reports[{k}].{err}") from None
            if rep.ranks:
                raise FieldError(f"reports[{k}].ranks", f"reports[{k}].ranks={list(rep.ranks)}: "
                                 f"Solve takes one report per rank (node reports go on streams)")
            if rep.rank in parts:
                first = next(i for i, r in enumerate(reports) if r.rank == rep.rank)
                raise FieldError(f"reports[{k}].rank", f"reports[{k}].rank={rep.rank} repeats "
                                 f"reports[{first}].rank")
            parts[rep.rank] = check_report(spec, rep, f"reports[{k}].")
        self._check_bytes(self._jobs[head.job], sum(part_bytes(p) for p in parts.values()))
        groups = sorted({spec.groups.locate(r)[0] for r in parts})
        for g in groups:
            missing = [r for r in spec.groups.ranks[g] if r not in parts]
            if missing:
                of = f"group {g} of " if spec.groups.count > 1 else ""
                raise FieldError("reports", f"reports lacks ranks {missing} of {of}job "
                                            f"{spec.job!r}")
        state = self._jobs[head.job]
        plans: dict[int, RankPlan] = {}

        def deliver(plan: RankPlan) -> None:
            plans[plan.rank] = plan

        rounds = [self._open(state, g, head.key, streamed=False) for g in groups]
        for rnd in rounds:
            for rank in spec.groups.ranks[rnd.group]:
                self._add(state, rnd, (rank,), parts[rank], deliver)
        for rnd in rounds:
            await rnd.finished.wait()
            assert rnd.outcome is not None
            if rnd.outcome.kind == INVALID:
                raise FieldError("reports", rnd.outcome.error)
        return [plans[rep.rank] for rep in reports]

    def _open(self, state: _Job, g: int, key: RoundKey, streamed: bool = True) -> _Round:
        pending = state.groups[g].pending
        while streamed and len(pending) >= self._max_pending:
            oldest = next(iter(pending.values()))
            of = f"group {g} of " if state.spec.groups.count > 1 else ""
            self._finish(state, oldest, Outcome(
                INCOMPLETE, f"evicted: {of}job {state.spec.job!r} has max_pending="
                            f"{self._max_pending} open rounds"))
        rnd = _Round(key, g, streamed)
        self._hooks.saw_step(state.spec.job, key[0])
        rnd.timer = asyncio.get_running_loop().call_later(
            state.spec.deadline, self._expire, state, rnd
        )
        if streamed:
            pending[key] = rnd
        else:
            state.unary.add(rnd)
        return rnd

    @property
    def solving(self) -> int:
        """Solves running in solver threads now (after ``close``: the abandoned ones)."""
        return self._solvers.running

    @property
    def pending_bytes(self) -> int:
        """Bytes of the reports all open rounds hold."""
        return self._pending_bytes

    def _check_bytes(self, state: _Job, size: int) -> None:
        """Raises OverLimit naming the limit a report of ``size`` bytes would exceed."""
        job = state.spec.job
        if state.pending_bytes + size > self._max_job_bytes:
            raise OverLimit("max_job_pending_bytes", (
                f"job {job!r} holds {state.pending_bytes} bytes of pending reports; {size} more "
                f"exceed max_job_pending_bytes={self._max_job_bytes}"))
        if self._pending_bytes + size > self._max_bytes:
            raise OverLimit("max_pending_bytes", (
                f"the server holds {self._pending_bytes} bytes of pending reports; {size} more "
                f"(job {job!r}) exceed max_pending_bytes={self._max_bytes}"))

    def _add(self, state: _Job, rnd: _Round, members: tuple[int, ...], part: RoundCounts,
             deliver: Deliver) -> None:
        """A report's checked counts (rows of ``members`` in turn) join the round; the last
        rank's start the solve."""
        size = part_bytes(part)
        state.pending_bytes += size
        self._pending_bytes += size
        n = state.spec.samples_per_device
        for k, r in enumerate(members):
            rows = slice(k * n, (k + 1) * n)
            rnd.parts[state.spec.groups.locate(r)[1]] = RoundCounts(
                part.sample_ids[rows], part.gather[rows],
                None if part.scatter is None else part.scatter[rows])
        rnd.waiters.append((members, part.sample_ids, deliver))
        if self._closed:
            self._finish(state, rnd, Outcome(SHUTDOWN, "the server is shutting down"))
        elif len(rnd.parts) == state.spec.ep_size:
            rnd.solving = True
            task = asyncio.get_running_loop().create_task(self._solve_round(state, rnd))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _expire(self, state: _Job, rnd: _Round) -> None:
        if rnd.done:
            return
        if rnd.solving:
            before = self._home_traffic(state.spec, rnd.counts) if rnd.counts else None
            self._finish(state, rnd, Outcome(TIMEOUT, "solve overran the deadline", before))
        else:
            ranks = state.spec.groups.ranks[rnd.group]
            missing = [r for d, r in enumerate(ranks) if d not in rnd.parts]
            shown = missing[:8] + (["..."] if len(missing) > 8 else [])
            self._finish(state, rnd, Outcome(INCOMPLETE, f"no report from ranks {shown}"))

    async def _solve_round(self, state: _Job, rnd: _Round) -> None:
        spec = state.spec
        ranks = spec.groups.ranks[rnd.group]
        try:
            counts = rnd.counts = assemble([rnd.parts[d] for d in range(len(ranks))], ranks)
        except FieldError as err:
            self._finish(state, rnd, Outcome(INVALID, str(err)))
            return
        long = self._long_lane is not None and solve_budget(spec, rnd) > LONG_SOLVE_S
        turn = state.groups[rnd.group].solver_turn
        try:
            async with turn, self._long_lane if long else nullcontext():
                plan = await asyncio.wrap_future(
                    self._solvers.submit(lambda: self._run_solver(spec, rnd)))
        except asyncio.CancelledError:
            if self._closed:  # close() cancelled the queued solve and answered the round
                return
            raise
        except SolverGone as err:
            if self._closed:  # close() killed the process; the round got "shutdown"
                return
            log.error("job %r round %s: %s", spec.job, rnd.key, err)
            outcome = Outcome(ERROR, str(err))
        except ValueError as err:
            outcome = Outcome(INVALID, f"solver rejected the round: {err}")
        except Exception as err:  # a solver bug must not leave ranks waiting for the deadline
            log.exception("solver failed on job %r round %s", spec.job, rnd.key)
            outcome = Outcome(ERROR, f"solver failed: {type(err).__name__}: {err}")
        else:
            if plan is None:  # the round expired before a solver thread picked it up
                return
            self._observer.solve_finished(plan.solve_seconds)
            outcome = Outcome(SOLVED, before=plan.before, plan=plan, counts=counts)
        if not rnd.done:
            self._finish(state, rnd, outcome)
        # The expert placement window files rounds by (step, layer): it takes one forward pass
        # per step (micro-batch 0), so a sample id names one sample across the layers.
        if (outcome.plan is not None and self._jobs.get(spec.job) is state
                and rnd.key.micro_batch == 0):
            self._hooks.solved(spec, rnd.key.layer_key, counts, outcome.plan, rnd.group)

    def _run_solver(self, spec: JobSpec, rnd: _Round) -> Plan | None:
        if rnd.done or rnd.counts is None:
            return None
        counts = rnd.counts
        topo, scatter_topo = (self._hooks.topologies(spec.job, rnd.key.layer_key)
                              or (spec.counts_topology, None))
        extra = {} if scatter_topo is None else {"scatter_topology": scatter_topo}
        home = home_placement(spec.samples, spec.ep_size)
        # Confirmed copies change every route's cost: such rounds take the replica-aware solver.
        plan = self._hooks.solve_with_copies(spec.job, rnd.key.layer_key, counts.gather,
                                             counts.scatter, home)
        if plan is not None:
            return plan
        kwargs = dict(home=home, objective=spec.objective, method=spec.method,
                      time_limit=solve_budget(spec, rnd), **extra)
        if 0 < self._process_rows <= len(home):
            # Compact counts (as assembled): the pipe carries about the report bytes.
            return self._solvers.in_process(self._solve_fn, topo, counts.gather, counts.scatter,
                                            **kwargs)
        return self._solve_fn(topo, counts.gather, counts.scatter, **kwargs)

    @staticmethod
    def _home_traffic(spec: JobSpec, counts: RoundCounts) -> Traffic:
        home = home_placement(spec.samples, spec.ep_size)
        return traffic(spec.counts_topology, home, counts.gather, counts.scatter)

    def _finish(self, state: _Job, rnd: _Round, outcome: Outcome) -> None:
        rnd.outcome = outcome
        if rnd.timer is not None:
            rnd.timer.cancel()
        state.unary.discard(rnd)
        if rnd.streamed:
            group = state.groups[rnd.group]
            group.pending.pop(rnd.key, None)
            if outcome.plan is None:
                group.finished[rnd.key] = outcome
                while len(group.finished) > self._finished_memory:
                    group.finished.popitem(last=False)
        after = outcome.plan.after if outcome.plan is not None else outcome.before
        if self._jobs.get(state.spec.job) is state:  # a gone job's series stay removed
            self._observer.round_finished(state.spec.job, outcome.kind, outcome.before, after)
        for members, ids, deliver in rnd.waiters:
            deliver(members_plan(state.spec, rnd.key, outcome, members, ids))
        rnd.waiters.clear()
        size = sum(part_bytes(p) for p in rnd.parts.values())
        state.pending_bytes -= size
        self._pending_bytes -= size
        rnd.parts.clear()
        rnd.finished.set()
