"""Rounds: collect one report per rank of an expert-parallel group for a (job, step, layer),
solve once, answer every rank of the group. The groups of a job round independently: each has
its own deadline and fallback; together they get one job's share of the solver threads.

The round lifecycle, free of gRPC: open, add, expire, solve, finish. Which job a report belongs
to is ``jobs``', whether it fits is ``admission``'s, who solves is ``pool``'s. asyncio for
deadlines, numpy for the counts; all methods of ``Coordinator`` run on one event loop, only
``_run_solver`` runs in a pool thread.

Memory stays bounded: a round is dropped once answered, a job keeps at most ``max_pending`` open
rounds per group (the oldest is closed as incomplete to make room) and remembers the outcome of
its last ``finished_memory`` fallback rounds to answer late reports.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from netmoe.checks import positive_int, shown
from netmoe.round import INVALID, Key, RankPlan, RoundCounts, RoundKey, Traffic, home_placement
from netmoe.solver import Plan, Prices, Topology, solve, traffic

from .admission import (
    Report,
    assemble,
    check_coordinates,
    check_members,
    check_report,
    part_bytes,
)
from .errors import FieldError, OverLimit
from .jobs import Binding, Job, Jobs, JobSpec
from .pool import SolverThreads, picklable
from .solver_process import SolverGone

log = logging.getLogger(__name__)

SolveFn = Callable[..., Plan]  # the signature of netmoe.solver.solve
SOLVE_MARGIN = 0.2  # of the deadline, kept free of solving
MIN_BUDGET_S = 0.001
# Rounds whose solve may hold a thread longer than this share all solver threads but one, so
# short rounds (the plans a layer waits for) always find a thread free.
LONG_SOLVE_S = 0.25

# Round outcomes (metrics label values and Plan.reason of fallbacks); an invalid round's is the
# contract's INVALID.
SOLVED = "solved"
TIMEOUT = "timeout"
INCOMPLETE = "incomplete"
ERROR = "error"
UNREGISTERED = "unregistered"
SHUTDOWN = "shutdown"
OUTCOMES = (SOLVED, TIMEOUT, INCOMPLETE, INVALID, ERROR, UNREGISTERED, SHUTDOWN)


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


def solve_budget(spec: JobSpec, rnd: Round) -> float:
    """Seconds the solver may take: what is left of the round's deadline minus a margin (a fifth
    of the deadline: CP-SAT may overrun its limit a little, the plans must still be built and
    reach the ranks), so a time-limited solve returns its best (FEASIBLE) plan before the
    deadline instead of being overrun."""
    margin = SOLVE_MARGIN * spec.deadline
    left = rnd.opened + spec.deadline - time.monotonic()
    return max(left - margin, MIN_BUDGET_S)


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
class Round:
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



class Coordinator:
    """Jobs and their rounds. Create and use on the event loop that serves the reports.

    solve_fn: called in a pool thread as solve_fn(topology, gather, scatter, home=...,
    objective=..., method=..., time_limit=..., warm=...); tests inject slow solvers here. warm is
    the Plan.prices of the group's last solved round of the same layer (or None), which the
    solver may start from.
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
        self._process_rows = process_rows if picklable(solve_fn) else 0
        self._closed = False
        self._jobs = Jobs(max_jobs=max_jobs, max_world_size=max_world_size,
                          max_report_cells=max_report_cells)
        self._max_pending = positive_int("max_pending", max_pending)
        self._finished_memory = positive_int("finished_memory", finished_memory)
        self._max_job_bytes = positive_int("max_job_pending_bytes", max_job_pending_bytes)
        self._max_bytes = positive_int("max_pending_bytes", max_pending_bytes)
        self._pending_bytes = 0
        self._observer: RoundObserver = observer or NullObserver()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- jobs ------------------------------------------------------------------------------

    @property
    def registry(self) -> Jobs:
        """The registered jobs (limits, binding of streams to ranks)."""
        return self._jobs

    @property
    def jobs(self) -> int:
        return len(self._jobs)

    def pending_rounds(self, job: str) -> int:
        return len(self._jobs[job].open_rounds())

    def generation(self, job: str) -> int:
        """The registration number of a registered job (KeyError if unknown)."""
        return self._jobs[job].generation

    def spec(self, job: str) -> JobSpec:
        """Raises FieldError naming ``job`` unless it is registered."""
        return self._jobs.spec(job)

    def register(self, spec: JobSpec) -> bool:
        """Adds a job; False if it exists with the same spec. Raises JobConflict / JobLimit.
        Each new registration of a job id gets a new generation (``generation``)."""
        if self._jobs.register(spec) is None:
            return False
        if 0 < self._process_rows <= spec.samples:
            self._solvers.warm()
        self._hooks.added(spec)
        return True

    def unregister(self, job: str) -> None:
        """Forgets a job and all it remembers; its waiting ranks get fallbacks. Raises KeyError
        if unknown."""
        state = self._jobs[job]
        for rnd in [*state.open_rounds(), *state.unary]:
            self._finish(state, rnd, Outcome(UNREGISTERED, f"job {job!r} was unregistered"))
        self._jobs.remove(job)
        self._hooks.removed(job)

    def close(self) -> None:
        """Answers every waiting rank with a fallback and stops the solver threads; rounds
        reported from now on get the fallback "shutdown" at once."""
        self._closed = True
        for state in self._jobs.all():
            for rnd in state.open_rounds():
                self._finish(state, rnd, Outcome(SHUTDOWN, "the server is shutting down"))
        for task in self._tasks:
            task.cancel()
        self._solvers.shutdown()

    def bind(self, report: Report, owner: object, generation: int = 0) -> Binding:
        """Binds the report's (job, rank) to the stream ``owner`` until ``release``
        (``Jobs.bind``)."""
        return self._jobs.bind(report.job, report.rank, owner, generation)

    def release(self, binding: Binding, owner: object) -> None:
        self._jobs.release(binding, owner)

    # -- admission -------------------------------------------------------------------------

    def submit(self, report: Report, deliver: Deliver, binding: Binding | None = None) -> None:
        """Queues a report; ``deliver`` gets its plan once (possibly right away) when its round
        finishes. Raises FieldError if the report is rejected (then ``deliver`` is not called);
        a rejected report with valid coordinates ends its round as invalid for the other ranks.
        binding: the stream's, whose generation must still be registered (else StaleGeneration).
        """
        state = self._jobs.find_rank(report.job, report.rank)
        if binding is not None:
            state = self._jobs.bound_job(binding)
            state.check_generation(report.generation)
        check_coordinates(state.spec, report)
        g, _ = state.spec.groups.locate(report.rank)
        rnd = state.groups[g].pending.get(report.key)
        done = state.finished.get((g, report.key))
        try:
            members = check_members(state.spec, report)
        except FieldError as err:
            self._reject(state, g, report, rnd, done, err)
            raise
        self._check_order(state, report, members, rnd, binding is not None)
        try:
            part = check_report(state.spec, report, members=len(members))
        except FieldError as err:
            self._reject(state, g, report, rnd, done, err)
            raise
        if done is None:
            self._check_bytes(state, part_bytes(part))
        self._take_ranks(state, report, members, binding is not None)
        if done is not None:
            # Not "late": the round may have ended early because of another rank's report.
            deliver(members_plan(state.spec, report.key, done, members, part.sample_ids,
                                 f"its round had already ended before this report ({done.kind}: "
                                 f"{done.error})"))
            return
        self._add(state, rnd or self._open(state, g, report.key), members, part, deliver)

    def _reject(self, state: Job, g: int, report: Report, rnd: Round | None,
                done: Outcome | None, err: FieldError) -> None:
        """What a report carries does not fit: its round cannot complete without this rank, so
        it ends now for the others (unless it ended already)."""
        if done is None:
            self._finish(state, rnd or self._open(state, g, report.key),
                         Outcome(INVALID, f"rank {report.rank}: {err}"))

    @staticmethod
    def _check_order(state: Job, report: Report, members: tuple[int, ...], rnd: Round | None,
                     streamed: bool) -> None:
        """Raises FieldError unless every member's round comes after its last one and the
        round has no report of it yet; on a stream, a node report may carry only ranks without
        a stream of their own. Refused alone: a replayed report must not end the round the
        ranks' real reports belong to."""
        key, owner = report.key, state.bound.get(report.rank)
        for r in members:
            last = state.last.get(r)
            if last is not None and key <= last:
                raise FieldError(
                    "step",
                    f"(step, micro_batch, layer) {tuple(key)} of rank {r} does not come after "
                    f"{tuple(last)}, already reported (rounds must not go backwards, a round "
                    f"takes one report per rank)",
                )
            if rnd is not None and state.spec.groups.locate(r)[1] in rnd.parts:
                raise FieldError("step", f"rank {r} already reported (step, micro_batch, "
                                          f"layer) {tuple(key)}")
            if r != report.rank and streamed and state.bound.get(r, owner) is not owner:
                raise FieldError("ranks", f"rank {r} reports on a stream of its own; a node "
                                          f"report may carry only ranks without one")

    @staticmethod
    def _take_ranks(state: Job, report: Report, members: tuple[int, ...], streamed: bool
                    ) -> None:
        """The members' rounds move on to the report's; on a stream, the node's ranks belong
        to the reporting rank's stream from now on."""
        owner = state.bound.get(report.rank)
        for r in members:
            state.last[r] = report.key
            if streamed:
                state.bound[r] = owner

    async def solve_now(self, reports: Sequence[Report]) -> list[RankPlan]:
        """Solves one pre-gathered round of one or more whole groups: one report per rank of
        each, any order; each group is solved as its own round. Returns the plans in request
        order. Raises FieldError naming the field (``reports[k].field``) and value."""
        if not reports:
            raise FieldError("reports", "reports is empty, need one report per rank")
        head = reports[0]
        state = self._jobs.find(head.job)
        spec = state.spec
        state.check_generation(head.generation)
        if len(reports) > spec.world_size:
            raise FieldError("reports", f"reports has {len(reports)} reports, job {spec.job!r} "
                                        f"has world_size={spec.world_size} ranks")
        parts: dict[int, RoundCounts] = {}
        first: dict[int, int] = {}
        for k, rep in enumerate(reports):
            for name in ("job", "step", "micro_batch", "layer", "generation"):
                if getattr(rep, name) != getattr(head, name):
                    raise FieldError(
                        f"reports[{k}].{name}",
                        f"reports[{k}].{name}={getattr(rep, name)!r} differs from "
                        f"reports[0].{name}={getattr(head, name)!r}",
                    )
            try:
                self._jobs.find_rank(rep.job, rep.rank)
                check_coordinates(spec, rep)
            except FieldError as err:
                raise FieldError(f"reports[{k}].{err.field}", f"reports[{k}].{err}") from None
            if rep.ranks_error is not None:
                raise FieldError(f"reports[{k}].ranks", f"reports[{k}].{rep.ranks_error}")
            if rep.ranks:
                raise FieldError(f"reports[{k}].ranks", (
                    f"reports[{k}].ranks={shown(rep.ranks)}: Solve takes one report per rank "
                    f"(node reports go on streams)"))
            if rep.rank in first:
                raise FieldError(f"reports[{k}].rank", f"reports[{k}].rank={rep.rank} repeats "
                                 f"reports[{first[rep.rank]}].rank")
            first[rep.rank] = k
            parts[rep.rank] = check_report(spec, rep, f"reports[{k}].")
        self._check_bytes(state, sum(part_bytes(p) for p in parts.values()))
        groups = sorted({spec.groups.locate(r)[0] for r in parts})
        for g in groups:
            missing = [r for r in spec.groups.ranks[g] if r not in parts]
            if missing:
                of = f"group {g} of " if spec.groups.count > 1 else ""
                raise FieldError("reports", f"reports lacks ranks {shown(missing)} of {of}job "
                                            f"{spec.job!r}")
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

    @property
    def solving(self) -> int:
        """Solves running in solver threads now (after ``close``: the abandoned ones)."""
        return self._solvers.running

    @property
    def pending_bytes(self) -> int:
        """Bytes of the reports all open rounds hold."""
        return self._pending_bytes

    def _check_bytes(self, state: Job, size: int) -> None:
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

    # -- the round lifecycle ---------------------------------------------------------------

    def _open(self, state: Job, g: int, key: RoundKey, streamed: bool = True) -> Round:
        pending = state.groups[g].pending
        while streamed and len(pending) >= self._max_pending:
            oldest = next(iter(pending.values()))
            of = f"group {g} of " if state.spec.groups.count > 1 else ""
            self._finish(state, oldest, Outcome(
                INCOMPLETE, f"evicted: {of}job {state.spec.job!r} has max_pending="
                            f"{self._max_pending} open rounds"))
        rnd = Round(key, g, streamed)
        self._hooks.saw_step(state.spec.job, key[0])
        rnd.timer = asyncio.get_running_loop().call_later(
            state.spec.deadline, self._expire, state, rnd
        )
        if streamed:
            pending[key] = rnd
        else:
            state.unary.add(rnd)
        return rnd

    def _add(self, state: Job, rnd: Round, members: tuple[int, ...], part: RoundCounts,
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

    def _expire(self, state: Job, rnd: Round) -> None:
        if rnd.done:
            return
        if rnd.solving:
            before = self._home_traffic(state.spec, rnd.counts) if rnd.counts else None
            self._finish(state, rnd, Outcome(TIMEOUT, "solve overran the deadline", before))
        else:
            ranks = state.spec.groups.ranks[rnd.group]
            missing = [r for d, r in enumerate(ranks) if d not in rnd.parts]
            self._finish(state, rnd, Outcome(INCOMPLETE, f"no report from ranks "
                                                         f"{shown(missing)}"))

    async def _solve_round(self, state: Job, rnd: Round) -> None:
        spec = state.spec
        ranks = spec.groups.ranks[rnd.group]
        try:
            counts = rnd.counts = assemble([rnd.parts[d] for d in range(len(ranks))], ranks)
        except FieldError as err:
            self._finish(state, rnd, Outcome(INVALID, str(err)))
            return
        long = self._long_lane is not None and solve_budget(spec, rnd) > LONG_SOLVE_S
        prices = state.groups[rnd.group].prices
        warm = prices.get(rnd.key.layer)
        try:
            async with self._solver_turn(state), self._long_lane if long else nullcontext():
                plan = await asyncio.wrap_future(
                    self._solvers.submit(lambda: self._run_solver(spec, rnd, warm)))
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
            if plan.prices is not None:  # replica-aware plans carry none: keep the last ones
                prices[rnd.key.layer] = plan.prices
            outcome = Outcome(SOLVED, before=plan.before, plan=plan, counts=counts)
        if not rnd.done:
            self._finish(state, rnd, outcome)
        # The expert placement window files rounds by (step, layer): it takes one forward pass
        # per step (micro-batch 0), so a sample id names one sample across the layers.
        if (outcome.plan is not None and self._jobs.get(spec.job) is state
                and rnd.key.micro_batch == 0):
            self._hooks.solved(spec, rnd.key.layer_key, counts, outcome.plan, rnd.group)

    @asynccontextmanager
    async def _solver_turn(self, state: Job) -> AsyncIterator[None]:
        """Waits until the job runs fewer solves than its share of the threads, whatever its
        number of groups (``SolverThreads.share``), and holds one of them."""
        async with state.turn:
            await state.turn.wait_for(
                lambda: state.solving < self._solvers.share(len(self._jobs)))
            state.solving += 1
        try:
            yield
        finally:
            state.solving -= 1
            async with state.turn:
                state.turn.notify_all()

    def _run_solver(self, spec: JobSpec, rnd: Round, warm: Prices | None) -> Plan | None:
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
                      time_limit=solve_budget(spec, rnd), warm=warm, **extra)
        if 0 < self._process_rows <= len(home):
            # Compact counts (as assembled): the pipe carries about the report bytes.
            return self._solvers.in_process(self._solve_fn, topo, counts.gather, counts.scatter,
                                            **kwargs)
        return self._solve_fn(topo, counts.gather, counts.scatter, **kwargs)

    @staticmethod
    def _home_traffic(spec: JobSpec, counts: RoundCounts) -> Traffic:
        home = home_placement(spec.samples, spec.ep_size)
        return traffic(spec.counts_topology, home, counts.gather, counts.scatter)

    def _finish(self, state: Job, rnd: Round, outcome: Outcome) -> None:
        rnd.outcome = outcome
        if rnd.timer is not None:
            rnd.timer.cancel()
        state.unary.discard(rnd)
        if rnd.streamed:
            state.groups[rnd.group].pending.pop(rnd.key, None)
            if outcome.plan is None:
                state.finished[(rnd.group, rnd.key)] = outcome
                while len(state.finished) > self._finished_memory:
                    state.finished.popitem(last=False)
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

