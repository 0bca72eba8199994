"""Rounds: collect one report per rank for a (job, step, layer), solve once, answer every rank.

The data plane of the service, free of gRPC: asyncio for deadlines, numpy for the counts and a
thread pool for the solver so the event loop keeps serving while a round is solved. All methods of
``Coordinator`` run on one event loop; only ``_run_solver`` runs in a pool thread.

Memory stays bounded: a round is dropped once answered, a job keeps at most ``max_pending`` open
rounds (the oldest is closed as incomplete to make room) and remembers the outcome of its last
``finished_memory`` fallback rounds to answer late reports.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from netmoe.solver import METHODS, OBJECTIVES, Plan, Topology, Traffic, solve, traffic
from netmoe.solver.topology import positive_int

from .advisor import ExpertAdvisors

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (step, layer)
SolveFn = Callable[..., Plan]  # the signature of netmoe.solver.solve
MAX_DEADLINE_S = 60.0
MAX_JOB_ID = 128

# Round outcomes (metrics label values and Plan.reason of fallbacks).
SOLVED = "solved"
TIMEOUT = "timeout"
INCOMPLETE = "incomplete"
INVALID = "invalid"
ERROR = "error"
UNREGISTERED = "unregistered"
SHUTDOWN = "shutdown"
OUTCOMES = (SOLVED, TIMEOUT, INCOMPLETE, INVALID, ERROR, UNREGISTERED, SHUTDOWN)


class ReportError(ValueError):
    """A report (or unary request) that fails validation; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class JobConflict(Exception):
    """A job id is already registered with a different spec."""


class JobLimit(Exception):
    """Registering one more job would exceed the server's cap."""


@dataclass(frozen=True)
class JobSpec:
    """A registered job: topology, balance and how to solve its rounds.

    world_size must equal topology.devices; every rank reports samples_per_device samples.
    deadline: seconds from a round's first report until its ranks get the home placement.
    """

    job: str
    topology: Topology
    world_size: int
    samples_per_device: int
    objective: str = "volume"
    method: str = "two_stage"
    deadline: float = 0.05

    def __post_init__(self) -> None:
        if not isinstance(self.job, str) or not self.job or len(self.job) > MAX_JOB_ID:
            raise ValueError(f"job must be a non-empty id of at most {MAX_JOB_ID} characters, "
                             f"got {self.job!r}")
        if not self.job.isprintable():
            raise ValueError(f"job must be printable, got {self.job!r}")
        positive_int("world_size", self.world_size)
        positive_int("samples_per_device", self.samples_per_device)
        if self.world_size != self.topology.devices:
            raise ValueError(
                f"world_size={self.world_size} must equal nodes x gpus_per_node = "
                f"{self.topology.nodes} x {self.topology.gpus_per_node} = {self.topology.devices}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not 0 < self.deadline <= MAX_DEADLINE_S:
            raise ValueError(
                f"deadline must be in (0, {MAX_DEADLINE_S:g}] seconds, got {self.deadline!r}"
            )

    @property
    def samples(self) -> int:
        """I, the samples of one round."""
        return self.world_size * self.samples_per_device


@dataclass(frozen=True, eq=False)
class Report:
    """One rank's counts for one round, as received (shapes are checked by ``check_report``).

    sample_ids: [n] uint64 global ids in local order. gather, scatter: [n * E] int64 row-major
    routes of each local sample to each expert; scatter is empty when there is no next layer.
    """

    job: str
    step: int
    layer: int
    rank: int
    sample_ids: np.ndarray
    gather: np.ndarray
    scatter: np.ndarray

    @property
    def key(self) -> Key:
        return (self.step, self.layer)


@dataclass(frozen=True, eq=False)
class RankPlan:
    """What one rank does in one round.

    status: "optimal" | "feasible" (solved), "fallback" (home placement, see reason) or
    "invalid" (this report was rejected, see error; device and holds are empty).
    device: [n] int64 destination of each local sample. holds: [samples_per_device] uint64 ids
    held afterwards in delivery order (source rank, then source local order).
    before / after: whole-job routes at home and with this plan, None when unknown.
    """

    job: str
    step: int
    layer: int
    rank: int
    status: str
    reason: str
    error: str
    device: np.ndarray
    holds: np.ndarray
    before: Traffic | None
    after: Traffic | None
    solve_seconds: float
    moved: int


@dataclass(frozen=True, eq=False)
class Outcome:
    """How a round ended. plan and ids ([I] uint64, rank-major) are set only when solved."""

    @classmethod
    def solved(cls, plan: Plan, ids: np.ndarray) -> Outcome:
        return cls(SOLVED, before=plan.before, plan=plan, ids=ids, moved=plan.moved)


    kind: str
    error: str = ""
    before: Traffic | None = None
    plan: Plan | None = None
    ids: np.ndarray | None = None
    moved: int = 0  # Plan.moved, computed once per round rather than once per rank


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


def check_report(spec: JobSpec, report: Report, prefix: str = "") -> None:
    """Raises ReportError unless the report's ids and counts fit the job."""
    n, e = spec.samples_per_device, spec.topology.experts
    ids = report.sample_ids
    if len(ids) != n:
        raise ReportError(
            f"{prefix}sample_ids",
            f"{prefix}sample_ids has {len(ids)} ids, job {spec.job!r} needs samples_per_device={n}",
        )
    seen = ids.tolist()
    # A set of n Python ints is ~30x cheaper than np.unique at the few ids a rank holds.
    if len(set(seen)) != n:
        dup = next(i for k, i in enumerate(seen) if i in seen[:k])
        raise ReportError(f"{prefix}sample_ids",
                          f"{prefix}sample_ids repeats id {dup} (rank {report.rank})")
    if len(report.gather) != n * e:
        raise ReportError(
            f"{prefix}gather",
            f"{prefix}gather has {len(report.gather)} counts, need samples_per_device x experts "
            f"= {n} x {e} = {n * e}",
        )
    if len(report.scatter) not in (0, n * e):
        raise ReportError(
            f"{prefix}scatter",
            f"{prefix}scatter has {len(report.scatter)} counts, need 0 (no next layer) or "
            f"samples_per_device x experts = {n} x {e} = {n * e}",
        )


def assemble(
    spec: JobSpec, reports: Sequence[Report]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Stacks checked reports of ranks 0..J-1 (in rank order) into solver rows, rank-major.

    Returns ids [I] uint64, gather [I, E] int64 and scatter [I, E] int64 or None. Raises
    ReportError for ids repeated across ranks or ranks disagreeing on whether scatter is sent.
    """
    e = spec.topology.experts
    ids = np.concatenate([r.sample_ids for r in reports])
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1][0]
        ranks = sorted({r.rank for r in reports if dup in r.sample_ids})
        raise ReportError("sample_ids", f"sample_ids: id {int(dup)} is reported by ranks {ranks}")
    gather = np.concatenate([r.gather for r in reports]).reshape(-1, e)
    with_scatter = [r.rank for r in reports if len(r.scatter)]
    if not with_scatter:
        return ids, gather, None
    if len(with_scatter) != len(reports):
        without = [r.rank for r in reports if not len(r.scatter)]
        raise ReportError(
            "scatter", f"scatter: ranks {with_scatter} sent one but ranks {without} did not"
        )
    return ids, gather, np.concatenate([r.scatter for r in reports]).reshape(-1, e)


def rank_plan(spec: JobSpec, outcome: Outcome, report: Report, error: str = "") -> RankPlan:
    """This rank's part of a round's outcome; fallbacks keep every sample at home."""
    r, n = report.rank, spec.samples_per_device
    plan = outcome.plan
    if plan is not None and outcome.ids is not None:
        rows = np.fromiter(plan.holds[r], dtype=np.int64, count=n)
        return RankPlan(
            job=report.job, step=report.step, layer=report.layer, rank=r,
            status=plan.status, reason="", error=error,
            device=np.asarray(plan.device[r * n:(r + 1) * n], dtype=np.int64),
            holds=outcome.ids[rows], before=plan.before, after=plan.after,
            solve_seconds=plan.solve_seconds, moved=outcome.moved,
        )
    return RankPlan(
        job=report.job, step=report.step, layer=report.layer, rank=r,
        status="fallback", reason=outcome.kind, error=error or outcome.error,
        device=np.full(n, r, dtype=np.int64), holds=report.sample_ids,
        before=outcome.before, after=outcome.before, solve_seconds=0.0, moved=0,
    )


Deliver = Callable[[RankPlan], None]


@dataclass(eq=False)
class _Round:
    key: Key
    timer: asyncio.TimerHandle | None = None
    reports: dict[int, Report] = field(default_factory=dict)
    waiters: list[tuple[Report, Deliver]] = field(default_factory=list)
    mats: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None
    solving: bool = False
    done: bool = False


@dataclass(eq=False)
class _Job:
    spec: JobSpec
    pending: dict[Key, _Round] = field(default_factory=dict)
    finished: OrderedDict[Key, Outcome] = field(default_factory=OrderedDict)
    last: dict[int, Key] = field(default_factory=dict)


class Coordinator:
    """Jobs and their rounds. Create and use on the event loop that serves the reports.

    solve_fn: called in a pool thread as solve_fn(topology, gather, scatter, home=...,
    objective=..., method=..., time_limit=...); tests inject slow solvers here.
    """

    def __init__(
        self,
        *,
        solve_fn: SolveFn = solve,
        solver_threads: int = 1,
        max_jobs: int = 64,
        max_pending: int = 16,
        finished_memory: int = 256,
        max_world_size: int = 1024,
        max_report_cells: int = 1 << 20,
        observer: RoundObserver | None = None,
        experts: ExpertAdvisors | None = None,
    ) -> None:
        self._solve_fn = solve_fn
        # Expert placement advisors: windows of round counts, expert maps in force per step.
        self.experts = experts if experts is not None else ExpertAdvisors()
        self._executor = ThreadPoolExecutor(
            max_workers=positive_int("solver_threads", solver_threads),
            thread_name_prefix="netmoe-solver",
        )
        self._max_jobs = positive_int("max_jobs", max_jobs)
        self._max_pending = positive_int("max_pending", max_pending)
        self._finished_memory = positive_int("finished_memory", finished_memory)
        self._max_world_size = positive_int("max_world_size", max_world_size)
        self._max_report_cells = positive_int("max_report_cells", max_report_cells)
        self._observer: RoundObserver = observer or NullObserver()
        self._jobs: dict[str, _Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def jobs(self) -> int:
        return len(self._jobs)

    def pending_rounds(self, job: str) -> int:
        return len(self._jobs[job].pending)

    def register(self, spec: JobSpec) -> bool:
        """Adds a job; False if it exists with the same spec. Raises JobConflict / JobLimit."""
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
        self._jobs[spec.job] = _Job(spec)
        self.experts.add(spec.job, spec.topology)
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
        for rnd in list(state.pending.values()):
            self._finish(state, rnd, Outcome(UNREGISTERED, f"job {job!r} was unregistered"))
        del self._jobs[job]
        self.experts.remove(job)

    def close(self) -> None:
        """Answers every waiting rank with a fallback and stops the solver threads."""
        for state in self._jobs.values():
            for rnd in list(state.pending.values()):
                self._finish(state, rnd, Outcome(SHUTDOWN, "the server is shutting down"))
        for task in self._tasks:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def spec(self, job: str) -> JobSpec:
        state = self._jobs.get(job)
        if state is None:
            raise ReportError("job", f"job {job!r} is not registered")
        return state.spec

    def check_binding(self, report: Report) -> JobSpec:
        """Raises ReportError unless the report names a known job and a rank of it."""
        spec = self.spec(report.job)
        if not 0 <= report.rank < spec.world_size:
            raise ReportError(
                "rank",
                f"rank {report.rank} is outside [0, {spec.world_size}) for job {spec.job!r}",
            )
        return spec

    def submit(self, report: Report, deliver: Deliver) -> None:
        """Queues a report; ``deliver`` gets its plan once (possibly right away) when its round
        finishes. Raises ReportError if the report is rejected (then ``deliver`` is not called);
        a rejected report with valid coordinates ends its round as invalid for the other ranks.
        """
        spec = self.check_binding(report)
        state = self._jobs[report.job]
        key, rank = report.key, report.rank
        last = state.last.get(rank)
        if last is not None and key <= last:
            raise ReportError(
                "step",
                f"step/layer {key} of rank {rank} does not come after {last}, already reported "
                f"(steps must not go backwards, a round takes one report per rank)",
            )
        rnd = state.pending.get(key)
        done = state.finished.get(key)
        try:
            check_report(spec, report)
        except ReportError as err:
            if done is None:
                self._finish(state, rnd or self._open(state, key),
                             Outcome(INVALID, f"rank {rank}: {err}"))
            raise
        if done is not None:
            state.last[rank] = key
            deliver(rank_plan(spec, done, report, f"report came after its round had finished "
                                                  f"({done.kind}: {done.error})"))
            return
        if rnd is None:
            rnd = self._open(state, key)
        state.last[rank] = key
        rnd.reports[rank] = report
        rnd.waiters.append((report, deliver))
        if len(rnd.reports) == spec.world_size:
            rnd.solving = True
            task = asyncio.get_running_loop().create_task(self._solve_round(state, rnd))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def solve_now(self, reports: Sequence[Report]) -> list[RankPlan]:
        """Solves one pre-gathered round: one report per rank, any order. Returns the plans in
        request order. Raises ReportError naming the field (``reports[k].field``) and value."""
        if not reports:
            raise ReportError("reports", "reports is empty, need one report per rank")
        head = reports[0]
        spec = self.spec(head.job)
        seen: dict[int, int] = {}
        for k, rep in enumerate(reports):
            for name in ("job", "step", "layer"):
                if getattr(rep, name) != getattr(head, name):
                    raise ReportError(
                        f"reports[{k}].{name}",
                        f"reports[{k}].{name}={getattr(rep, name)!r} differs from "
                        f"reports[0].{name}={getattr(head, name)!r}",
                    )
            if not 0 <= rep.rank < spec.world_size:
                raise ReportError(f"reports[{k}].rank", f"reports[{k}].rank={rep.rank} is outside "
                                  f"[0, {spec.world_size}) for job {spec.job!r}")
            if rep.rank in seen:
                raise ReportError(f"reports[{k}].rank", f"reports[{k}].rank={rep.rank} repeats "
                                  f"reports[{seen[rep.rank]}].rank")
            seen[rep.rank] = k
            check_report(spec, rep, f"reports[{k}].")
        if len(seen) != spec.world_size:
            missing = sorted(set(range(spec.world_size)) - set(seen))
            raise ReportError("reports", f"reports lacks ranks {missing} of job {spec.job!r}")
        ordered = sorted(reports, key=lambda r: r.rank)
        try:
            mats = assemble(spec, ordered)
        except ReportError:
            self._observer.round_finished(spec.job, INVALID, None, None)
            raise
        self.experts.saw_step(spec.job, head.step)
        fut = asyncio.get_running_loop().run_in_executor(
            self._executor, self._run_solver, spec, mats, None, head.key
        )
        try:
            plan = await asyncio.wait_for(asyncio.shield(fut), spec.deadline)
        except TimeoutError:
            fut.add_done_callback(self._observe_late_solve)
            outcome = Outcome(TIMEOUT, "solve overran the deadline", self._home_traffic(spec, mats))
        except ValueError as err:
            self._observer.round_finished(spec.job, INVALID, None, None)
            raise ReportError("reports", f"solver rejected the round: {err}") from err
        else:
            assert plan is not None  # only rounds of the streaming path can be skipped
            self._observer.solve_finished(plan.solve_seconds)
            outcome = Outcome.solved(plan, mats[0])
        self._report_outcome(spec, outcome)
        return [rank_plan(spec, outcome, rep) for rep in reports]

    def _open(self, state: _Job, key: Key) -> _Round:
        while len(state.pending) >= self._max_pending:
            oldest = next(iter(state.pending.values()))
            self._finish(state, oldest, Outcome(
                INCOMPLETE, f"evicted: job {state.spec.job!r} has max_pending={self._max_pending} "
                            f"open rounds"))
        rnd = _Round(key)
        self.experts.saw_step(state.spec.job, key[0])
        rnd.timer = asyncio.get_running_loop().call_later(
            state.spec.deadline, self._expire, state, rnd
        )
        state.pending[key] = rnd
        return rnd

    def _expire(self, state: _Job, rnd: _Round) -> None:
        if rnd.done:
            return
        if rnd.solving:
            before = self._home_traffic(state.spec, rnd.mats) if rnd.mats else None
            self._finish(state, rnd, Outcome(TIMEOUT, "solve overran the deadline", before))
        else:
            missing = sorted(set(range(state.spec.world_size)) - set(rnd.reports))
            shown = missing[:8] + (["..."] if len(missing) > 8 else [])
            self._finish(state, rnd, Outcome(INCOMPLETE, f"no report from ranks {shown}"))

    async def _solve_round(self, state: _Job, rnd: _Round) -> None:
        spec = state.spec
        try:
            rnd.mats = assemble(spec, [rnd.reports[r] for r in range(spec.world_size)])
        except ReportError as err:
            self._finish(state, rnd, Outcome(INVALID, str(err)))
            return
        loop = asyncio.get_running_loop()
        try:
            plan = await loop.run_in_executor(self._executor, self._run_solver, spec, rnd.mats, rnd,
                                              rnd.key)
        except ValueError as err:
            outcome = Outcome(INVALID, f"solver rejected the round: {err}")
        except Exception as err:  # a solver bug must not leave ranks waiting for the deadline
            log.exception("solver failed on job %r round %s", spec.job, rnd.key)
            outcome = Outcome(ERROR, f"solver failed: {type(err).__name__}: {err}")
        else:
            if plan is None:  # the round expired before a solver thread picked it up
                return
            self._observer.solve_finished(plan.solve_seconds)
            outcome = Outcome.solved(plan, rnd.mats[0])
        if not rnd.done:
            self._finish(state, rnd, outcome)

    def _run_solver(
        self, spec: JobSpec, mats: tuple[np.ndarray, np.ndarray, np.ndarray | None],
        rnd: _Round | None,
        key: Key,
    ) -> Plan | None:
        if rnd is not None and rnd.done:
            return None
        _, gather, scatter = mats
        home = np.repeat(np.arange(spec.world_size, dtype=np.int64), spec.samples_per_device)
        topo, scatter_topo = self.experts.topologies(spec.job, key) or (spec.topology, None)
        extra = {} if scatter_topo is None else {"scatter_topology": scatter_topo}
        # Confirmed copies change every route's cost: such rounds take the replica-aware solver.
        plan = self.experts.solve_with_copies(spec.job, key, gather, scatter, home)
        if plan is None:
            plan = self._solve_fn(
                topo, gather, scatter, home=home, objective=spec.objective,
                method=spec.method, time_limit=spec.deadline, **extra,
            )
        self.experts.observe(spec.job, key, mats[0], gather, scatter, plan.after)
        return plan

    def _observe_late_solve(self, fut: asyncio.Future[Plan | None]) -> None:
        if not fut.cancelled() and fut.exception() is None and fut.result() is not None:
            self._observer.solve_finished(fut.result().solve_seconds)

    @staticmethod
    def _home_traffic(
        spec: JobSpec, mats: tuple[np.ndarray, np.ndarray, np.ndarray | None]
    ) -> Traffic:
        home = np.repeat(np.arange(spec.world_size, dtype=np.int64), spec.samples_per_device)
        return traffic(spec.topology, home, mats[1], mats[2])

    def _report_outcome(self, spec: JobSpec, outcome: Outcome) -> None:
        after = outcome.plan.after if outcome.plan is not None else outcome.before
        self._observer.round_finished(spec.job, outcome.kind, outcome.before, after)

    def _finish(self, state: _Job, rnd: _Round, outcome: Outcome) -> None:
        rnd.done = True
        if rnd.timer is not None:
            rnd.timer.cancel()
        state.pending.pop(rnd.key, None)
        if outcome.plan is None:
            state.finished[rnd.key] = outcome
            while len(state.finished) > self._finished_memory:
                state.finished.popitem(last=False)
        self._report_outcome(state.spec, outcome)
        for report, deliver in rnd.waiters:
            deliver(rank_plan(state.spec, outcome, report))
        rnd.waiters.clear()
        rnd.reports.clear()
