"""All-to-All token dispatcher that applies sample placement in the combine exchange.

Dispatch sends every (token, top-k slot) route to its expert's device. The expert side computes
``weight * expert(x) + [slot == 0] * x``, so the residual is added exactly once per token, and the
combine sends each route's output straight to the *new* device of the token's sample. The whole
hidden state arrives there; no extra exchange is needed to move samples.

Every exchange is ``torch.distributed.all_to_all_single``; the float ones go through an autograd
function whose backward is the mirrored exchange (split sizes swapped), so gradients follow the
same routes back. Route counts per peer are recorded from the real split sizes.

Each exchange is preceded by one small control exchange of ints. In the combine it carries, from
every rank to every rank, both the rank's part of the placement agreement (see ``Agreement``) and
its per-sample route counts, from which every rank derives the agreed plan and all split sizes
locally: one small collective per combine, not one to agree plus one for split sizes.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from netmoe.round import SamplePlan


@dataclass
class CommStats:
    """Communication accounting of one rank.

    a2a_seconds: wall time inside all_to_all_single (forward and backward, all exchanges).
    routes: (layer, phase) -> [J] int64 routes this rank sent to each device, phase "dispatch"
        or "combine", accumulated over steps.
    calls: one record per tagged exchange, in call order (the same order on every rank):
        (step, layer, phase, start, end, bytes sent to each rank [J]); start/end are
        time.monotonic() seconds, which all processes of one machine share, so the wall time of
        a call across ranks is max(end) - min(start). phase: "dispatch", "combine", "move", or
        one of them + "_bwd" for the mirrored exchange of the backward pass.
    step: the training step that ``calls`` records are filed under (set by the training loop).
    sync: barrier before every tagged exchange, so its wall time across ranks measures the
        exchange and not the ranks' compute skew (costs one barrier per exchange).
    control_seconds: wall time of the small control exchanges (dispatch split sizes; combine
        agreement + split sizes), forward only; it absorbs the ranks' compute skew, as it is
        where a rank first waits for the others in each phase.
    control_calls: (layer, phase) -> number of control exchanges issued, summed over steps.
    sent_bytes: phase -> bytes this rank sent in the tagged exchanges of that phase (payload,
        router weights and metadata; self-sends included, like ``routes``), summed over steps.
    """

    a2a_seconds: float = 0.0
    routes: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    calls: list[tuple[int, int, str, float, float, list[int]]] = field(default_factory=list)
    step: int = 0
    sync: bool = False
    control_seconds: float = 0.0
    control_calls: Counter[tuple[int, str]] = field(default_factory=Counter)
    sent_bytes: Counter[str] = field(default_factory=Counter)

    def bytes_per_route(self, phase: str = "dispatch") -> float:
        """Bytes sent per route in ``phase`` ("dispatch" or "combine"): D x h's itemsize for the
        hidden state, plus the route's metadata (and its router weight in the dispatch)."""
        routes = sum(int(v.sum()) for (_, ph), v in self.routes.items() if ph == phase)
        return self.sent_bytes[phase] / routes if routes else 0.0

    def add_routes(self, layer: int, phase: str, sent: torch.Tensor) -> None:
        counts = sent.detach().cpu().numpy().astype(np.int64)
        key = (layer, phase)
        if key in self.routes:
            self.routes[key] = self.routes[key] + counts
        else:
            self.routes[key] = counts


def exchange(
    x: torch.Tensor,
    recv_splits: list[int],
    send_splits: list[int],
    stats: CommStats | None = None,
    group: dist.ProcessGroup | None = None,
    tag: tuple[int, str] | None = None,
) -> torch.Tensor:
    """One all_to_all_single, no autograd: x [sum(send_splits), ...] -> [sum(recv_splits), ...].

    tag: (layer, phase) under which ``stats.calls`` records the call (untagged: not recorded).
    """
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    x = x.contiguous()
    if stats is not None and tag is not None and stats.sync:
        dist.barrier(group=group)
    t0 = time.monotonic()
    dist.all_to_all_single(out, x, recv_splits, send_splits, group=group)
    t1 = time.monotonic()
    if stats is not None:
        stats.a2a_seconds += t1 - t0
        if tag is not None:
            row = x[0].numel() * x.element_size() if x.shape[0] else 0
            sent = [n * row for n in send_splits]
            stats.calls.append((stats.step, tag[0], tag[1], t0, t1, sent))
            stats.sent_bytes[tag[1]] += sum(sent)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, recv_splits, send_splits, stats, group, tag):  # type: ignore[override]
        ctx.splits = (recv_splits, send_splits)
        ctx.stats, ctx.group = stats, group
        ctx.tag = None if tag is None else (tag[0], f"{tag[1]}_bwd")
        return exchange(x, recv_splits, send_splits, stats, group, tag)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        recv_splits, send_splits = ctx.splits
        grad_x = exchange(grad, send_splits, recv_splits, ctx.stats, ctx.group, ctx.tag)
        return grad_x, None, None, None, None, None


def all_to_all(
    x: torch.Tensor,
    recv_splits: list[int],
    send_splits: list[int],
    stats: CommStats | None = None,
    group: dist.ProcessGroup | None = None,
    tag: tuple[int, str] | None = None,
) -> torch.Tensor:
    """Autograd-aware all_to_all_single; backward sends gradients back along the same routes.

    tag: (layer, phase) to record the call under in stats.calls; backward records phase_bwd."""
    return _AllToAll.apply(x, recv_splits, send_splits, stats, group, tag)


class Agreement(Protocol):
    """A plan the ranks settle inside the combine's control exchange instead of beforehand.

    ``offer`` is this rank's part ([m] int64, the same m on every rank); the combine delivers
    every rank's offer to every rank and ``settle`` turns the [J, m] table into the plan. settle
    must be a function of the table and of state every rank shares, so that all ranks apply the
    same plan; exchange_seconds is the control exchange's wall time, for accounting.
    """

    def offer(self) -> torch.Tensor: ...

    def settle(self, offers: torch.Tensor, exchange_seconds: float) -> SamplePlan: ...


@dataclass(frozen=True)
class Layout:
    """Where things live: this process's device in its expert-parallel group, the group's
    ep_size J devices, G per node, E experts per layer.

    Expert e lives on device e // (E / J); each device holds ``samples`` sequences of ``seq_len``
    tokens, tokens sample-major (token t belongs to local sample t // seq_len).
    """

    device: int
    ep_size: int
    gpus_per_node: int
    experts: int
    samples: int
    seq_len: int

    def __post_init__(self) -> None:
        for name in ("ep_size", "gpus_per_node", "experts", "samples", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= self.device < self.ep_size:
            raise ValueError(f"device must lie in [0, {self.ep_size}), got {self.device}")
        if self.ep_size % self.gpus_per_node:
            raise ValueError(
                f"ep_size={self.ep_size} is not a multiple of gpus_per_node={self.gpus_per_node}"
            )
        if self.experts % self.ep_size:
            raise ValueError(f"experts={self.experts} is not divisible by ep_size={self.ep_size}")

    @property
    def tokens(self) -> int:
        return self.samples * self.seq_len

    @property
    def experts_per_device(self) -> int:
        return self.experts // self.ep_size

    @property
    def local_experts(self) -> range:
        """Global ids of the experts on this device."""
        e = self.experts_per_device
        return range(self.device * e, (self.device + 1) * e)


@dataclass(frozen=True)
class Dispatched:
    """Routes received by an expert rank, grouped by source rank then source order.

    x: [R, D] float, the source token's hidden state (differentiable);
    weight: [R] float router weight of the route (differentiable);
    first: [R] bool, route is its token's top-1 slot (carries the residual);
    expert: [R] int64 global expert id; src_rank, src_token: [R] int64 origin of the route;
    top_k: K, routes per token; sample_routes: [n, J] int64 routes the *sender* sent from each
    of its local samples to each rank (what the combine's control exchange shares).
    """

    x: torch.Tensor
    weight: torch.Tensor
    first: torch.Tensor
    expert: torch.Tensor
    src_rank: torch.Tensor
    src_token: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    top_k: int
    sample_routes: torch.Tensor


class TokenDispatcher:
    """Dispatch and combine for one rank; stateless between calls except for ``stats``.

    routes: layer -> [E, J] int64 route table, the rank serving label a for a sample on rank d
    (expert copies, see netmoe.client.replicas); layers without one send label a to its owner
    a // (E / J). Set it on every rank alike.
    """

    def __init__(
        self, layout: Layout, stats: CommStats | None = None, group: dist.ProcessGroup | None = None
    ) -> None:
        self.layout = layout
        self.stats = stats if stats is not None else CommStats()
        self.group = group
        # layer -> [E, J] int64: the rank that serves expert a for a sample on rank d, when
        # expert copies are in force (netmoe.client.replicas.route_tables); else e // (E / J).
        self.route_tables: dict[int, torch.Tensor] = {}

    def _control(self, layer: int, phase: str, rows: torch.Tensor) -> tuple[torch.Tensor, float]:
        """One small control exchange: rows [J, m] int64, row j goes to rank j; returns the
        [J, m] rows received (row j from rank j) and the exchange's wall time."""
        ones = [1] * self.layout.ep_size
        t0 = time.perf_counter()
        recv = exchange(rows, ones, ones, None, self.group)
        seconds = time.perf_counter() - t0
        self.stats.control_seconds += seconds
        self.stats.control_calls[(layer, phase)] += 1
        return recv, seconds

    def dispatch(
        self, layer: int, h: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor
    ) -> Dispatched:
        """Send routes to expert ranks.

        h: [T, D] float hidden states of local tokens; topk_ids: [T, K] int64; weights: [T, K].
        """
        lay = self.layout
        if h.dim() != 2 or h.shape[0] != lay.tokens:
            raise ValueError(f"h must be [tokens={lay.tokens}, D], got {tuple(h.shape)}")
        if topk_ids.shape != weights.shape or topk_ids.shape[:1] != h.shape[:1]:
            raise ValueError(
                f"topk_ids {tuple(topk_ids.shape)} and weights {tuple(weights.shape)} must both "
                f"be [tokens={lay.tokens}, K]"
            )
        k = topk_ids.shape[1]
        expert = topk_ids.reshape(-1)
        token = torch.arange(lay.tokens, device=h.device).repeat_interleave(k)
        slot = torch.arange(k, device=h.device).repeat(lay.tokens)
        table = self.route_tables.get(layer)
        dest = expert // lay.experts_per_device if table is None else table[expert, lay.device]
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=lay.ep_size)
        sample_routes = torch.bincount(
            token // lay.seq_len * lay.ep_size + dest, minlength=lay.samples * lay.ep_size
        ).view(lay.samples, lay.ep_size)
        self.stats.add_routes(layer, "dispatch", send_counts)
        recv, _ = self._control(layer, "dispatch", send_counts.view(-1, 1))
        recv_splits, send_splits = recv.view(-1).tolist(), send_counts.tolist()
        meta = torch.stack([expert[order], token[order], slot[order]], dim=1)
        tag = (layer, "dispatch")
        meta = exchange(meta, recv_splits, send_splits, self.stats, self.group, tag)
        # h and the router weights travel apart, each in its own dtype: a bf16 payload stays
        # bf16 (D x 2 bytes per route) and fp32 weights keep their precision (4 bytes more).
        x = all_to_all(h[token[order]], recv_splits, send_splits, self.stats, self.group, tag)
        weight = all_to_all(weights.reshape(-1)[order], recv_splits, send_splits, self.stats,
                            self.group, tag)
        src_rank = torch.repeat_interleave(
            torch.arange(lay.ep_size, device=h.device),
            torch.tensor(recv_splits, device=h.device),
        )
        return Dispatched(
            x=x,
            weight=weight,
            first=meta[:, 2] == 0,
            expert=meta[:, 0],
            src_rank=src_rank,
            src_token=meta[:, 1],
            send_splits=send_splits,
            recv_splits=recv_splits,
            top_k=k,
            sample_routes=sample_routes,
        )

    def combine(
        self, layer: int, out: torch.Tensor, routes: Dispatched, agreement: Agreement
    ) -> tuple[torch.Tensor, SamplePlan]:
        """Send each route's output to the new device of its sample and sum per token.

        out: [R, D] float, the expert side's result per received route (weighted expert output,
        plus the residual on first-slot routes). agreement: the plan to apply, settled in this
        combine's control exchange (``netmoe.client.planning``: a ``FixedPlan`` or a service
        ``Offer``). Returns ([T, D] hidden state of the samples this rank holds under the
        applied plan, in ``plan.rows_held(layout.device)`` order, tokens sample-major; the
        applied plan).
        Raises RuntimeError if a token does not receive exactly K routes with one residual.
        """
        if out.shape[0] != routes.x.shape[0]:
            raise ValueError(f"out must have {routes.x.shape[0]} rows, got {out.shape[0]}")
        plan, counts = self._agree(layer, routes, agreement)
        recv_splits, dest, dest_token = self._targets(layer, routes, plan, counts)
        order = torch.argsort(dest, stable=True)
        send_splits = torch.bincount(dest, minlength=self.layout.ep_size).tolist()
        meta = torch.stack([dest_token[order], routes.first[order].long()], dim=1)
        tag = (layer, "combine")
        meta = exchange(meta, recv_splits, send_splits, self.stats, self.group, tag)
        payload = all_to_all(out[order], recv_splits, send_splits, self.stats, self.group, tag)
        self._check_tokens(layer, meta, routes.top_k)
        result = out.new_zeros((self.layout.tokens, out.shape[1]))
        return result.index_add(0, meta[:, 0], payload), plan

    def _agree(self, layer: int, routes: Dispatched, agreement: Agreement
               ) -> tuple[SamplePlan, torch.Tensor]:
        """The combine's one control exchange: every rank's offer and per-sample route counts.
        Returns the settled plan and counts [I, J] int64: routes of row i that rank r holds."""
        lay = self.layout
        # On the routes' device: NCCL exchanges device tensors only; the table is small.
        dev = routes.sample_routes.device
        offer = agreement.offer().to(device=dev, dtype=torch.int64).reshape(-1)
        m = offer.numel()
        mine = torch.cat([offer, routes.sample_routes.reshape(-1)])
        table, seconds = self._control(layer, "combine", mine.expand(lay.ep_size, -1).contiguous())
        table = table.cpu()
        try:
            plan = agreement.settle(table[:, :m], seconds)
        except RuntimeError as err:
            raise RuntimeError(f"combine at layer {layer}: {err}") from None
        if plan.devices != lay.ep_size or plan.samples_per_device != lay.samples:
            raise ValueError(
                f"plan is for {plan.devices} devices x {plan.samples_per_device} samples, "
                f"layout has {lay.ep_size} x {lay.samples}"
            )
        return plan, table[:, m:].reshape(lay.ep_size * lay.samples, lay.ep_size)

    def _targets(self, layer: int, routes: Dispatched, plan: SamplePlan, counts: torch.Tensor
                 ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Split sizes from the shared counts, and for every received route its destination
        rank and token index there: (recv_splits [J], dest [R] int64, dest_token [R] int64)."""
        lay = self.layout
        new_device = torch.as_tensor(plan.dest)
        recv_splits = counts[new_device == lay.device].sum(dim=0).tolist()
        expect_send = torch.bincount(new_device, weights=counts[:, lay.device].double(),
                                     minlength=lay.ep_size).long()  # fmt: skip
        device = new_device.to(routes.x.device)
        position = torch.as_tensor(plan.position(), device=routes.x.device)
        row = routes.src_rank * lay.samples + routes.src_token // lay.seq_len
        dest = device[row]
        send_counts = torch.bincount(dest, minlength=lay.ep_size)
        if not torch.equal(send_counts.cpu(), expect_send):
            raise RuntimeError(
                f"combine at layer {layer}: routes held {send_counts.tolist()} disagree with the "
                f"senders' counts {expect_send.tolist()}"
            )
        self.stats.add_routes(layer, "combine", send_counts)
        return recv_splits, dest, position[row] * lay.seq_len + routes.src_token % lay.seq_len

    def _check_tokens(self, layer: int, meta: torch.Tensor, top_k: int) -> None:
        """meta: [R', 2] (token, first slot) of the received routes: K each, one residual."""
        tokens = self.layout.tokens
        per_token = torch.bincount(meta[:, 0], minlength=tokens)
        residuals = torch.bincount(meta[:, 0], weights=meta[:, 1].double(), minlength=tokens)
        if per_token.numel() != tokens or (per_token != top_k).any() or (residuals != 1).any():
            raise RuntimeError(
                f"combine at layer {layer}: every token must receive K={top_k} routes "
                f"and exactly one residual; got routes per token in "
                f"[{int(per_token.min())}, {int(per_token.max())}], residuals in "
                f"[{float(residuals.min())}, {float(residuals.max())}]"
            )


def move_samples(
    tensor: torch.Tensor,
    plan: SamplePlan,
    device: int,
    stats: CommStats | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Move per-sample side tensors (labels, masks, positions) with their samples.

    tensor: [n, ...] any dtype, row i = local sample i. Returns [n, ...] in plan.rows_held(device)
    order; device: this process's device in its expert-parallel group. Differentiable for float
    tensors. Split sizes follow from the plan, no count exchange.
    """
    n = plan.samples_per_device
    if tensor.shape[0] != n:
        raise ValueError(f"tensor must have {n} rows (samples per device), got {tensor.shape[0]}")
    if not plan.moves:
        return tensor
    dest = torch.as_tensor(plan.dest_of(device))
    order = torch.argsort(dest, stable=True).to(tensor.device)
    send = torch.bincount(dest, minlength=plan.devices).tolist()
    src = plan.rows_held(device) // n
    recv = np.bincount(src, minlength=plan.devices).tolist()
    tag = (-1, "move")  # side tensors belong to no layer
    if tensor.is_floating_point():
        return all_to_all(tensor[order], recv, send, stats, group, tag)
    return exchange(tensor[order], recv, send, stats, group, tag)
