"""Plan agreement: turning per-rank plan replies into one plan every rank applies, or "no move".

A ``PlanSource`` answers a round's submission (``RoundKey``: step, micro-batch, layer) with a
future of the rank's ``RankPlan``.
``Placement.wait`` waits for it with a timeout and returns an ``Offer`` (1 + 2n ints: valid flag,
the rank's dest vector, the held ids the service promised), which the dispatcher's combine
delivers to every rank in the control exchange it does anyway for split sizes; no collective of
its own.
From the same table every rank derives, with ``agree``, the full device vector (the combine needs
it to route other ranks' tokens) or "no move" for all if any rank has no valid plan, so a single
late reply can never make ranks disagree about where samples go. Failures are logged and counted,
never raised into the training loop; the log gets one line when rounds start falling back and
one when plans come back, not one per layer.

Recompute (activation checkpointing, reentrant or not): a layer that runs again inside a backward
pass submits its round key again. ``Placement`` answers it from the plan that round's forward
applied (a ``Replay``): no second report, no second wait, and the sample-id bookkeeping is left
as the forward left it. Outside a backward pass a rank's keys must increase strictly; a key that
does not, or a recompute of a round whose forward never ran, raises ValueError before anything is
sent.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from netmoe.client.node_reports import NodeReports, expand, pack, unpack
from netmoe.round import OPTIMAL, RankPlan, RoundCounts, RoundKey, SamplePlan

log = logging.getLogger(__name__)


class NoPlan(Exception):
    """A plan source's answer "no plan for this round", with the reason (e.g. "timeout")."""


class PlanSource(Protocol):
    """A source with a true ``device_counts`` attribute (a ``PlacementClient`` of a job
    registered with device_counts) takes [n, J] routes per device; others [n, E] per expert."""

    def submit(self, step: int, layer: int, counts: RoundCounts, micro_batch: int = 0
               ) -> Future[RankPlan | None]:
        """Non-blocking. counts: this rank's n samples; the future's None means "no plan"."""
        ...


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread: a forward that runs
    then is a recompute (torch.utils.checkpoint runs it there, reentrant or not)."""
    return torch._C._current_graph_task_id() != -1


class RandomPlans:
    """Seeded, balanced random placements: every sample moves somewhere arbitrary.

    A stress source for the dispatcher (any valid plan must leave the model's results unchanged);
    all ranks derive the same plan from (seed, step, micro_batch, layer) without talking to
    anybody.
    """

    def __init__(self, device: int, ep_size: int, samples: int, seed: int = 0) -> None:
        self.device, self.ep_size, self.samples, self.seed = device, ep_size, samples, seed
        # Global sample ids in row order, following the samples through a step's layers the way
        # ``Placement`` numbers them, so held ids are like the service's.
        self._ids = np.arange(ep_size * samples, dtype=np.int64)
        self._pass: tuple[int, int] | None = None

    def submit(self, step: int, layer: int, counts: RoundCounts, micro_batch: int = 0
               ) -> Future[RankPlan | None]:
        n, j = self.samples, self.ep_size
        if self._pass != (step, micro_batch):  # a new forward pass: ids are rows again
            self._pass = (step, micro_batch)
            self._ids = np.arange(n * j, dtype=np.int64)
        rng = np.random.default_rng([self.seed, step, micro_batch, layer])
        plan = SamplePlan(tuple(rng.permutation(np.arange(n * j) // n).tolist()), j)
        held = self._ids[plan.rows_held(self.device)]
        self._ids = plan.follow(self._ids)
        fut: Future[RankPlan | None] = Future()
        fut.set_result(RankPlan(step, layer, self.device, OPTIMAL,
                                np.asarray(plan.dest_of(self.device)), held.astype(np.uint64),
                                micro_batch=micro_batch))
        return fut


@dataclass
class PlacementStats:
    """Client-side accounting of one rank.

    submit_seconds: histograms + submission bookkeeping.
    reply_seconds: blocked on the plan source's reply (the service), before the combine.
    wait_seconds: what placement adds to the training step around the combines: reply_seconds
        plus building the offer and settling the agreed plan (checks, sample-id bookkeeping).
        Excludes the control exchange that carries the offers.
    exchange_seconds: wall time of the combines' control exchanges that carried the offers. The
        same exchange carries the split sizes and runs without placement too (CommStats
        .control_seconds of a home run), and it absorbs the ranks' compute skew, so it is not a
        cost of placement; reported so the two can be compared.
    fallbacks: layers applied as "no move" because a plan was missing; reasons: why;
    solve_seconds: solver time per applied or received plan; moved: samples moved.
    replays: layers a recompute ran again, answered with their forward's plan (not reported).
    """

    submit_seconds: float = 0.0
    wait_seconds: float = 0.0
    reply_seconds: float = 0.0
    exchange_seconds: float = 0.0
    fallbacks: int = 0
    plans: int = 0
    moved: int = 0
    replays: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    solve_seconds: list[float] = field(default_factory=list)


def agree(offers: np.ndarray, ids: np.ndarray, ep_size: int) -> tuple[SamplePlan | None, str]:
    """The plan every rank applies, from every rank's offer; (None, reason) means "no move".

    offers: [J, 1 + 2n] int64, row r = rank r's offer: [1 if it has a plan else 0, its n
    samples' new devices, the n sample ids it expects to hold after the move, in arrival order];
    ids: [I] int64 sample id of each row now (rank-major), the same on every rank. A pure
    function of inputs every rank shares, so every rank reaches the same verdict. ep_size: J,
    the expert-parallel group's devices.
    """
    offers = np.asarray(offers, dtype=np.int64)
    n = (offers.shape[1] - 1) // 2
    if offers.shape != (ep_size, 1 + 2 * n) or ids.shape != (ep_size * n,):
        raise ValueError(f"offers must be [{ep_size}, 1 + 2n] and ids [{ep_size} * n], got "
                         f"{offers.shape} and {ids.shape}")  # fmt: skip
    if (offers[:, 0] != 1).any():
        return None, "peer fallback"
    try:
        plan = SamplePlan(tuple(offers[:, 1 : 1 + n].reshape(-1).tolist()), ep_size)
    except ValueError:
        return None, "inconsistent plan"
    for r in range(ep_size):
        if not np.array_equal(ids[plan.rows_held(r)], offers[r, 1 + n :]):
            return None, "inconsistent held ids"
    return plan, ""


@dataclass(frozen=True)
class FixedPlan:
    """An ``Agreement`` on a plan every rank already knows (home placement, tests): the offer is
    its fingerprint, and settling checks that every rank offered the same one."""

    plan: SamplePlan

    def offer(self) -> torch.Tensor:
        return torch.tensor([self.plan.fingerprint()], dtype=torch.int64)

    def settle(self, offers: torch.Tensor, exchange_seconds: float) -> SamplePlan:
        if (offers[:, 0] != offers[0, 0]).any():
            raise RuntimeError(f"ranks apply different plans (fingerprints "
                               f"{offers[:, 0].tolist()})")
        return self.plan


@dataclass(frozen=True)
class Ticket:
    """A submitted round: the future of this rank's reply (None: its node's first rank gets
    the reply), and with node reports the gather under way (its work handle, its send buffer)."""

    future: Future[RankPlan | None] | None
    key: RoundKey
    gather: Any = None
    sent: torch.Tensor | None = None


@dataclass(frozen=True)
class Replay:
    """A recomputed round: the plan its forward applied, applied again (nothing is reported)."""

    key: RoundKey
    plan: SamplePlan


@dataclass(frozen=True)
class Offer:
    """A rank's reply for one layer, offered for agreement (an ``Agreement`` for the combine)."""

    placement: Placement
    ticket: Ticket
    reply: RankPlan | None
    reason: str

    def offer(self) -> torch.Tensor:
        """[1 + 2n] int64: see ``agree``; with node reports [1 + 2nG], the reply for the whole
        node (zeros but on its first rank, see ``netmoe.client.node_reports.expand``)."""
        n = self.placement.samples * self.placement.reporting
        mine = torch.zeros(1 + 2 * n, dtype=torch.int64)
        if self.reply is not None:
            mine[0] = 1
            mine[1 : 1 + n] = torch.as_tensor(self.reply.dest, dtype=torch.int64)
            mine[1 + n :] = torch.as_tensor(self.reply.held_ids.astype(np.int64))
        return mine

    def settle(self, offers: torch.Tensor, exchange_seconds: float) -> SamplePlan:
        return self.placement._settle(self, offers, exchange_seconds)


def timeout_for(deadline_ms: int) -> float:
    """Seconds a rank waits for a plan: the round's deadline (counted from its first report; the
    service answers by then, "no move" when late) plus half of it and 50 ms of transport slack.
    deadline_ms 0 (unknown) gives ValueError naming the missing argument."""
    if deadline_ms <= 0:
        raise ValueError("timeout must be given when the source has no spec.deadline_ms")
    return deadline_ms * 1.5e-3 + 0.05


class Placement:
    """The model's placement hook: submit counts, then wait for the reply and offer it to the
    combine, which settles the plan all ranks apply (see the module docstring).

    device, ep_size: the rank's device in its expert-parallel group and the group's size.
    timeout: seconds to wait for a plan; None: ``timeout_for`` the source's deadline (a
    ``PlacementClient``'s spec.deadline_ms; a node's other ranks, with no source, need one).
    node: with node reports (``netmoe.client.node_reports``), the rank's part in them; source is
    then the node's reporting client on its first rank and None on the others. ``close`` when
    done.
    device_counts: the layers count routes per device instead of per expert
    (``netmoe.client.layer``); None: the source's (False when it has none). A node's other ranks
    have no source: give it, the same as their first rank's client.
    """

    def __init__(self, source: PlanSource | None, device: int, ep_size: int, samples: int,
                 timeout: float | None = None, node: NodeReports | None = None,
                 device_counts: bool | None = None) -> None:
        if timeout is None:
            timeout = timeout_for(getattr(getattr(source, "spec", None), "deadline_ms", 0))
        if timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {timeout!r}")
        if node is not None and node.size == 1:
            node = None  # one rank of the group on the node: it reports alone
        if (source is None) != (node is not None and not node.first):
            raise ValueError("source must be given exactly on ranks that report (not on a "
                             "node's other ranks)")
        self.source, self.device, self.ep_size, self.samples = source, device, ep_size, samples
        self.timeout = timeout
        self.node = node
        # Ranks whose rows an offer carries (a node's, with node reports).
        self.reporting = 1 if node is None else node.size
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="netmoe-node-report")
                      if node is not None and node.first else None)
        self.device_counts = (bool(getattr(source, "device_counts", False))
                              if device_counts is None else device_counts)
        self.stats = PlacementStats()
        # Sample ids follow the samples through a forward pass's layers (row ids at its first
        # round), so the service can match a sample's routes across layers (its expert
        # placement window).
        self._full = np.arange(ep_size * samples, dtype=np.int64)
        self._last: RoundKey | None = None  # the latest round submitted (not a recompute)
        # The plan each round of the current step applied, for its recompute to apply again.
        self._applied: dict[RoundKey, SamplePlan] = {}
        # While rounds fall back: the first one's key and the reasons since (one log line each
        # way, not one per layer).
        self._falling: tuple[RoundKey, Counter[str]] | None = None

    def submit(
        self, step: int, layer: int, gather: torch.Tensor, scatter: torch.Tensor | None,
        micro_batch: int = 0,
    ) -> Ticket | Replay:
        """gather, scatter: [n, E] int64 route counts of the local samples ([n, J] routes per
        device when ``device_counts``). Inside a backward pass (a recompute) the answer is the
        round's forward plan, nothing is sent. Raises ValueError, with nothing sent and no state
        changed, for a key that does not come after the last one outside a backward pass, or a
        recompute of a round whose forward this rank never ran in the current step."""
        key = RoundKey(step, micro_batch, layer).check()
        if in_backward():
            plan = self._applied.get(key)
            if plan is None:
                ran = sorted(k for k in self._applied if k[:2] == key[:2])
                raise ValueError(
                    f"recompute of round (step, micro_batch, layer) {tuple(key)} on device "
                    f"{self.device}: its forward never ran in this step (layers that forward "
                    f"pass ran: {[k.layer for k in ran]})")
            return Replay(key, plan)
        if self._last is not None and key <= self._last:
            raise ValueError(
                f"round (step, micro_batch, layer) {tuple(key)} on device {self.device} does not "
                f"come after the last one {tuple(self._last)}: each forward pass of a step needs "
                f"its own micro_batch (a recompute runs inside the backward pass)")
        t0 = time.perf_counter()
        if self._last is None or self._last[:2] != key[:2]:  # a new forward pass
            self._full = np.arange(self.ep_size * self.samples, dtype=np.int64)
            if self._last is None or self._last.step != step:
                self._applied.clear()
        self._last = key
        ids = self._full[self.device * self.samples:(self.device + 1) * self.samples]
        if self.node is not None:
            ticket = self._submit_node(key, ids.astype(np.uint64), gather.detach(),
                                       None if scatter is None else scatter.detach())
            self.stats.submit_seconds += time.perf_counter() - t0
            return ticket
        counts = RoundCounts(
            ids.astype(np.uint64), gather.detach().cpu().numpy(),
            None if scatter is None else scatter.detach().cpu().numpy(),
        )
        assert self.source is not None
        fut = self.source.submit(step, layer, counts, micro_batch=micro_batch)
        self.stats.submit_seconds += time.perf_counter() - t0
        return Ticket(fut, key)

    def _submit_node(self, key: RoundKey, ids: np.ndarray, gather: torch.Tensor,
                     scatter: torch.Tensor | None) -> Ticket:
        """Starts the gather of this rank's counts on its node's first rank, which reports
        the node once the gather is in (on its own thread: submit never blocks)."""
        node = self.node
        assert node is not None
        sent = pack(ids, gather, scatter)
        if not node.first:
            work = dist.gather(sent, None, dst=node.members[0], group=node.group, async_op=True)
            return Ticket(None, key, work, sent)
        bufs = [torch.empty_like(sent) for _ in node.members]
        work = dist.gather(sent, bufs, dst=node.members[0], group=node.group, async_op=True)
        fut: Future[RankPlan | None] = Future()
        assert self._pool is not None
        self._pool.submit(self._report_node, work, bufs, key, gather.shape[1], fut)
        return Ticket(fut, key, work, sent)

    def _report_node(self, work: Any, bufs: list[torch.Tensor], key: RoundKey,
                     experts: int, fut: Future[RankPlan | None]) -> None:
        try:
            work.wait()
            assert self.source is not None
            reply = self.source.submit(key.step, key.layer, unpack(torch.cat(bufs), experts),
                                       micro_batch=key.micro_batch)
        except Exception as err:  # a failed gather or report means "no move", not a crash
            fut.set_exception(err)
            return

        def forward(done: Future[RankPlan | None]) -> None:
            err = done.exception()
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(done.result())

        reply.add_done_callback(forward)

    def close(self) -> None:
        """Stops the node-report thread (after the reports it has)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _reply(self, ticket: Ticket) -> tuple[RankPlan | None, str]:
        if ticket.gather is not None and ticket.future is None:
            ticket.gather.wait()  # a node's other rank: its counts are out, its first replies
            return None, ""
        try:
            assert ticket.future is not None
            plan = ticket.future.result(timeout=self.timeout)
        except TimeoutError:
            return None, "timeout"
        except NoPlan as err:
            return None, f"server: {err}"
        except ConnectionError as err:  # the group's service is down or there is none
            return None, f"no service: {err}"
        except Exception as err:  # any transport or server failure means "no move", not a crash
            return None, f"error {type(err).__name__}"
        if plan is None:
            return None, "no plan"
        rows = self.samples * self.reporting
        if len(plan.dest) != rows or len(plan.held_ids) != rows:
            return None, "wrong size"
        return plan, ""

    def wait(self, ticket: Ticket | Replay) -> Offer | FixedPlan:
        """Waits (up to the timeout) for this rank's reply; returns the offer the layer's combine
        settles into the plan all ranks apply ("no move" for all if any rank lacks one). A
        ``Replay`` does not wait: its combine applies the forward's plan again."""
        if isinstance(ticket, Replay):
            self.stats.replays += 1
            return FixedPlan(ticket.plan)
        t0 = time.perf_counter()
        reply, reason = self._reply(ticket)
        seconds = time.perf_counter() - t0
        self.stats.reply_seconds += seconds
        self.stats.wait_seconds += seconds
        return Offer(self, ticket, reply, reason)

    def _settle(self, pending: Offer, offers: torch.Tensor, exchange_seconds: float
                ) -> SamplePlan:
        """offers: [J, 1 + 2n] int64, every rank's offer (identical on every rank)."""
        t0 = time.perf_counter()
        self.stats.exchange_seconds += exchange_seconds
        ticket, reply = pending.ticket, pending.reply
        table = offers.numpy()
        if self.node is not None:
            table = expand(table, self.node, self.samples)
        agreed, reason = agree(table, self._full, self.ep_size)
        # The rank's own failure names the cause; "peer fallback" is for the ranks that had one.
        reason = pending.reason or reason
        plan = agreed if agreed is not None else SamplePlan.no_move(self.ep_size, self.samples)
        if agreed is None:
            self.stats.fallbacks += 1
            self.stats.reasons[reason] += 1
            if self._falling is None:
                log.warning("step %d micro-batch %d layer %d: no move (%s); later fallbacks are "
                            "counted in placement.stats until plans come back",
                            *ticket.key, reason)
                self._falling = (ticket.key, Counter())
            self._falling[1][reason] += 1
        else:
            self.stats.plans += 1
            self.stats.moved += plan.moved
            if self._falling is not None:
                since, reasons = self._falling
                log.warning("plans again from step %d micro-batch %d layer %d, after %d layers "
                            "without (since step %d micro-batch %d layer %d: %s)", *ticket.key,
                            sum(reasons.values()), *since, dict(reasons))
                self._falling = None
        if reply is not None:
            self.stats.solve_seconds.append(reply.solve_seconds)
        self._full = plan.follow(self._full)
        self._applied[ticket.key] = plan
        self.stats.wait_seconds += time.perf_counter() - t0
        return plan
