"""Turning per-rank plan replies into one plan every rank applies, or "no move".

A ``PlanSource`` answers a (step, layer) submission with a future of the rank's ``LocalPlan``.
``Placement`` waits for it with a timeout and then all-gathers the ranks' local plans (n + 1 ints
per rank): every rank learns the full device vector, which the combine needs to route other ranks'
tokens, and all ranks fall back together if any of them has no valid plan, so a single late reply
can never make ranks disagree about where samples go. Failures are logged and counted, never
raised into the training loop.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from netmoe.client.plan import LocalPlan, SamplePlan

log = logging.getLogger(__name__)


class NoPlan(Exception):
    """A plan source's answer "no plan for this round", with the reason (e.g. "timeout")."""


class PlanSource(Protocol):
    def submit(
        self,
        step: int,
        layer: int,
        sample_ids: np.ndarray,
        gather: np.ndarray,
        scatter: np.ndarray | None,
    ) -> Future[LocalPlan | None]:
        """Non-blocking. gather/scatter: [n, E] int counts; the future's None means "no plan"."""
        ...


class RandomPlans:
    """Seeded, balanced random placements: every sample moves somewhere arbitrary.

    A stress source for the dispatcher (any valid plan must leave the model's results unchanged);
    all ranks derive the same plan from (seed, step, layer) without talking to anybody.
    """

    def __init__(self, rank: int, world: int, samples: int, seed: int = 0) -> None:
        self.rank, self.world, self.samples, self.seed = rank, world, samples, seed
        # Global sample ids in row order, following the samples through a step's layers the way
        # ``Placement`` numbers them, so holds are ids like the service's.
        self._ids = np.arange(world * samples, dtype=np.int64)

    def submit(
        self,
        step: int,
        layer: int,
        sample_ids: np.ndarray,
        gather: np.ndarray,
        scatter: np.ndarray | None,
    ) -> Future[LocalPlan | None]:
        n, j = self.samples, self.world
        if layer == 0:
            self._ids = np.arange(n * j, dtype=np.int64)
        rng = np.random.default_rng([self.seed, step, layer])
        device = rng.permutation(np.arange(n * j) // n)
        plan = SamplePlan(tuple(device), j)
        holds = tuple(int(i) for i in self._ids[list(plan.holds(self.rank))])
        self._ids = self._ids[np.concatenate([plan.holds(r) for r in range(j)])]
        fut: Future[LocalPlan | None] = Future()
        fut.set_result(LocalPlan(self.rank, plan.dest(self.rank), holds))
        return fut


@dataclass
class PlacementStats:
    """Client-side accounting of one rank.

    submit_seconds: histograms + submission bookkeeping; wait_seconds: blocked before combines
    (reply wait + agreement all-gather, which also absorbs the ranks' compute skew);
    fallbacks: layers applied as "no move" because a plan was missing; reasons: why;
    solve_seconds: solver time per applied or received plan; moved: samples moved.
    """

    submit_seconds: float = 0.0
    wait_seconds: float = 0.0
    reply_seconds: float = 0.0  # the part of wait_seconds spent before the reply, not agreeing
    fallbacks: int = 0
    plans: int = 0
    moved: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    solve_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _Ticket:
    future: Future[LocalPlan | None]
    step: int
    layer: int


class Placement:
    """The model's placement hook: submit counts, then wait for the agreed plan."""

    def __init__(
        self,
        source: PlanSource,
        rank: int,
        world: int,
        samples: int,
        timeout: float,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        self.source, self.rank, self.world, self.samples = source, rank, world, samples
        self.timeout, self.group = timeout, group
        self.stats = PlacementStats()
        # Sample ids follow the samples through a step's layers (row ids at layer 0), so the
        # service can match a sample's routes across layers (its expert placement window).
        self._full = np.arange(world * samples, dtype=np.int64)

    def submit(
        self, step: int, layer: int, gather: torch.Tensor, scatter: torch.Tensor | None
    ) -> _Ticket:
        """gather, scatter: [n, E] int64 route counts of the local samples."""
        t0 = time.perf_counter()
        g = gather.detach().cpu().numpy()
        s = scatter.detach().cpu().numpy() if scatter is not None else None
        if layer == 0:
            self._full = np.arange(self.world * self.samples, dtype=np.int64)
        ids = self._full[self.rank * self.samples:(self.rank + 1) * self.samples]
        fut = self.source.submit(step, layer, ids, g, s)
        self.stats.submit_seconds += time.perf_counter() - t0
        return _Ticket(fut, step, layer)

    def _local(self, ticket: _Ticket) -> tuple[LocalPlan | None, str]:
        try:
            plan = ticket.future.result(timeout=self.timeout)
        except TimeoutError:
            return None, "timeout"
        except NoPlan as err:
            return None, f"server: {err}"
        except Exception as err:  # any transport or server failure means "no move", not a crash
            return None, f"error {type(err).__name__}"
        if plan is None:
            return None, "no plan"
        if len(plan.dest) != self.samples:
            return None, "wrong size"
        return plan, ""

    def wait(self, ticket: _Ticket) -> SamplePlan:
        """The plan all ranks apply at this layer's combine; "no move" if any rank lacks one."""
        t0 = time.perf_counter()
        local, reason = self._local(ticket)
        self.stats.reply_seconds += time.perf_counter() - t0
        n = self.samples
        mine = torch.full((n + 1,), -1, dtype=torch.int64)
        if local is not None:
            mine[0] = 1
            mine[1:] = torch.as_tensor(local.dest, dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine, group=self.group)
        table = torch.stack(gathered)
        plan = SamplePlan.no_move(self.world, n)
        if bool((table[:, 0] == 1).all()):
            try:
                plan = SamplePlan(tuple(table[:, 1:].reshape(-1).tolist()), self.world)
            except ValueError as err:
                reason = "inconsistent plan"
                log.warning("step %d layer %d: %s", ticket.step, ticket.layer, err)
            else:
                held = tuple(int(i) for i in self._full[list(plan.holds(self.rank))])
                if local is None or held != tuple(local.holds):
                    reason, plan = "inconsistent holds", SamplePlan.no_move(self.world, n)
        elif not reason:
            reason = "peer fallback"
        if reason:
            self.stats.fallbacks += 1
            self.stats.reasons[reason] += 1
            log.warning("step %d layer %d: no move (%s)", ticket.step, ticket.layer, reason)
        else:
            self.stats.plans += 1
            self.stats.moved += plan.moved
        if local is not None:
            self.stats.solve_seconds.append(local.solve_seconds)
        self._full = self._full[np.concatenate([plan.holds(r) for r in range(self.world)])]
        self.stats.wait_seconds += time.perf_counter() - t0
        return plan
