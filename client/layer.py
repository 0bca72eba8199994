"""The per-layer calls of an expert-parallel MoE forward pass with sample placement.

A training job that brings its own model uses netmoe through ``ExpertParallel``. Per MoE layer
``l`` of a forward pass, on every rank of the expert-parallel group:

    ticket = ep.submit(step, l, topk_ids, next_topk_ids, micro_batch=m)  # never blocks
    routes = ep.dispatch(l, h, topk_ids, weights)         # tokens to their experts' ranks
    out = ep.expert_outputs(routes, experts)              # weight * expert(x) + residual once
    h, plan = ep.combine(l, out, routes, ticket, side)    # waits for the plan; outputs go to
                                                          # each sample's new rank, and so do
                                                          # the side tensors
    loss = loss_fn(h, side["labels"])

``side = ep.samples(labels=labels, mask=...)``, made once per forward pass, holds its per-sample
side tensors ([n, ...] each): every combine it is given moves them with their samples, and
reading one raises RuntimeError, naming the layers, when a layer of the pass moved samples
without it, so a combine that forgot it gives an error before the loss, not another loss.
``ep.move(tensor, plan)`` moves one tensor by hand (no such check).

``next_topk_ids`` is layer l+1's router applied to layer l's input (its prediction of the next
dispatch), None at the last MoE layer. Without a placement hook every sample stays home and
``submit`` does nothing; with one, a missing or late plan means "no move" on every rank: results
never change, only where samples sit. docs/training-loop.md has a complete example.

Round keys, as a framework threads them: ``step`` is the optimizer step, ``micro_batch`` the
forward pass within it (gradient accumulation or pipeline micro-batches, 0, 1, ...; 0 when a step
has one), ``l`` the MoE layer's index in the model; (step, micro_batch, l) must increase from one
``submit`` of a rank to the next. Activation recompute needs nothing: a layer that runs again
inside the backward pass (``torch.utils.checkpoint``, reentrant or not) submits the same key and
gets the plan its forward applied, with no report and no wait. Evaluation (a forward without
backward, mid-training): run it under ``torch.inference_mode()`` or ``with ep.evaluation():``;
placement is off there (home placement, nothing reported), so the training rounds and their keys
are untouched. A plain ``torch.no_grad()`` forward counts as a training forward (the reentrant
checkpoint runs its first forward so) and needs keys of its own.

What ``submit`` counts follows the hook: [n, E] routes per expert id, or, for a hook whose
``device_counts`` is true (a job registered with device_counts), [n, J] routes per device: the
rank owning each id (id a lives on rank a // (E / J); moved experts keep this, since
netmoe.client.experts relabels them), counted straight from the ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Protocol

import torch

from netmoe.client.dispatcher import Agreement, Dispatched, Layout, TokenDispatcher, move_samples
from netmoe.client.histogram import device_route_counts, route_counts, token_samples
from netmoe.client.planning import FixedPlan, in_backward
from netmoe.round import SamplePlan


class PlacementHook(Protocol):
    """What the layers ask of the placement side (``netmoe.client.planning.Placement``).

    A hook may have a ``device_counts`` attribute: when true, ``submit`` gets routes per device
    instead of per expert (see the module docstring); a hook without one gets [n, E].
    """

    def submit(
        self, step: int, layer: int, gather: torch.Tensor, scatter: torch.Tensor | None,
        micro_batch: int = 0,
    ) -> object:
        """gather, scatter: [n, E] int64 route counts of the local samples ([n, J] for a
        device_counts hook); returns a ticket. Called again with the same key inside the
        backward pass for a recompute (see the module docstring)."""
        ...

    def wait(self, ticket: object) -> Agreement:
        """This layer's plan, as an offer the combine settles into the plan all ranks apply."""
        ...


class ExpertParallel:
    """One rank's MoE layers: counts, plan requests, dispatch and combine (see module docstring).

    dispatcher: the rank's TokenDispatcher (its Layout says J, E, n samples of S tokens);
    placement: None for home placement.
    """

    def __init__(self, dispatcher: TokenDispatcher, placement: PlacementHook | None = None
                 ) -> None:
        self.dispatcher = dispatcher
        self.placement = placement
        lay = dispatcher.layout
        self._home = FixedPlan(SamplePlan.no_move(lay.ep_size, lay.samples))
        self._device_counts = bool(getattr(placement, "device_counts", False))
        self._evaluating = False
        # The forward pass (step, micro_batch) of the latest submit, and for the passes of the
        # current step the layers whose combine moved samples (what side tensors must follow).
        self._pass = (0, 0)
        self._moved: dict[tuple[int, int], list[int]] = {}
        # On the ids' device: ([T] local sample of each token, [E] device of each expert id).
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def layout(self) -> Layout:
        return self.dispatcher.layout

    def _counts(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """[n, E] int64 routes per expert id, or [n, J] per device for a device_counts hook."""
        lay = self.layout
        if self._index is None or self._index[0].device != topk_ids.device:
            self._index = (token_samples(lay.samples, lay.seq_len, topk_ids.device),
                           torch.arange(lay.experts, device=topk_ids.device)
                           // lay.experts_per_device)
        token_sample, owner = self._index
        if self._device_counts:
            return device_route_counts(topk_ids, token_sample, lay.samples, owner, lay.ep_size)
        return route_counts(topk_ids, token_sample, lay.samples, lay.experts)

    @contextmanager
    def evaluation(self) -> Iterator[None]:
        """Forward passes inside run with placement off: home placement, nothing reported,
        training rounds untouched (``torch.inference_mode()`` does the same by itself)."""
        before, self._evaluating = self._evaluating, True
        try:
            yield
        finally:
            self._evaluating = before

    @property
    def placing(self) -> bool:
        """Whether a forward pass now asks for plans (a hook, and not evaluating)."""
        return (self.placement is not None and not self._evaluating
                and not torch.is_inference_mode_enabled())

    def submit(self, step: int, layer: int, topk_ids: torch.Tensor,
               next_topk_ids: torch.Tensor | None = None, micro_batch: int = 0
               ) -> object | None:
        """Asks for round (step, micro_batch, layer)'s plan (see the module docstring for the
        keys). topk_ids: [T, K] int64 expert ids of this layer's routes; next_topk_ids: [T, K']
        int64 predicted ids of layer + 1, or None. T = n * S. None: home placement."""
        if not self.placing:
            return None
        assert self.placement is not None
        nxt = None if next_topk_ids is None else self._counts(next_topk_ids)
        ticket = self.placement.submit(step, layer, self._counts(topk_ids), nxt,
                                       micro_batch=micro_batch)
        if not in_backward():
            if step != self._pass[0]:
                self._moved.clear()
            self._pass = (step, micro_batch)
        return ticket

    def dispatch(self, layer: int, h: torch.Tensor, topk_ids: torch.Tensor,
                 weights: torch.Tensor) -> Dispatched:
        """h: [T, D] float local tokens (sample-major); topk_ids, weights: [T, K]."""
        return self.dispatcher.dispatch(layer, h, topk_ids, weights)

    @staticmethod
    def expert_outputs(routes: Dispatched,
                       experts: Mapping[int, Callable[[torch.Tensor], torch.Tensor]],
                       norm: Callable[[torch.Tensor], torch.Tensor] | None = None
                       ) -> torch.Tensor:
        """[R, D] in x's dtype: weight * expert(norm(x)) per received route, plus x on each
        token's first slot (the residual, once per token). experts: global expert id -> this
        rank's module. The product takes the weight's precision (fp32 router weights on bf16
        states) and is rounded to x's dtype once, so the combine sends x's dtype."""
        z = routes.x if norm is None else norm(routes.x)
        y = routes.x.new_zeros(routes.x.shape)
        for e, expert in experts.items():
            idx = (routes.expert == e).nonzero().squeeze(1)
            if idx.numel():
                y = y.index_copy(0, idx, expert(z[idx]))
        weighted = (routes.weight.unsqueeze(1) * y).to(routes.x.dtype)
        return weighted + routes.first.unsqueeze(1) * routes.x

    def samples(self, **tensors: torch.Tensor) -> SampleTensors:
        """The per-sample side tensors of one forward pass (labels, masks, positions), each
        [n, ...] with row i = local sample i; ValueError naming a tensor of another leading
        size. Give the result to every ``combine`` of the pass (see the module docstring)."""
        return SampleTensors(self, tensors)

    def combine(self, layer: int, out: torch.Tensor, routes: Dispatched, ticket: object | None,
                side: SampleTensors | None = None) -> tuple[torch.Tensor, SamplePlan]:
        """Waits for the plan of ``ticket`` (up to the placement's timeout) and sends each route's
        output to its sample's new rank (ticket None, as ``submit`` returns when not placing:
        home placement). side: the pass's side tensors, moved with their samples (not again in
        a recompute). Returns ([T, D] tokens of the samples held now, in
        ``plan.rows_held(rank)`` order; the plan every rank applied)."""
        agreement = (self._home if self.placement is None or ticket is None
                     else self.placement.wait(ticket))
        h, plan = self.dispatcher.combine(layer, out, routes, agreement)
        if plan.moves and ticket is not None and not in_backward():
            self._moved.setdefault(self._pass, []).append(layer)
            if side is not None:
                side._follow(self._pass, layer, plan)
        return h, plan

    def close(self, unregister: bool = False) -> None:
        """Ends placement: the hook's node-report thread and its stream to the service.
        unregister: also forget the job on the service (one rank, after every rank's last
        step)."""
        if self.placement is None:
            return
        close = getattr(self.placement, "close", None)
        if close is not None:
            close()
        source = getattr(self.placement, "source", None)
        if source is not None and hasattr(source, "close"):
            source.close(unregister=unregister)

    def move(self, tensor: torch.Tensor, plan: SamplePlan) -> torch.Tensor:
        """Moves a per-sample side tensor [n, ...] (labels, masks, positions) with its samples."""
        return move_samples(tensor, plan, self.layout.device, self.dispatcher.stats,
                            self.dispatcher.group)


class SampleTensors(Mapping[str, torch.Tensor]):
    """Per-sample side tensors of one forward pass, moved with their samples by the combines they
    are given (``ExpertParallel.samples``). Reading one checks that it followed every plan of its
    pass that moved samples: RuntimeError naming the layers otherwise."""

    def __init__(self, ep: ExpertParallel, tensors: Mapping[str, torch.Tensor]) -> None:
        n = ep.layout.samples
        for name, t in tensors.items():
            if t.dim() == 0 or t.shape[0] != n:
                raise ValueError(f"{name} must be [samples={n}, ...] (one row per local sample), "
                                 f"got {tuple(t.shape)}")
        self._ep = ep
        self._checked = ep.placing  # without placement (evaluation, home) nothing moves
        self._tensors = dict(tensors)
        self._pass: tuple[int, int] | None = None  # set by the first combine it follows
        self._followed: list[int] = []

    def _follow(self, pass_: tuple[int, int], layer: int, plan: SamplePlan) -> None:
        if self._pass is None:
            self._pass = pass_
        self._tensors = {name: self._ep.move(t, plan) for name, t in self._tensors.items()}
        self._followed.append(layer)

    def __getitem__(self, name: str) -> torch.Tensor:
        moved = self._ep._moved.get(self._pass or self._ep._pass, []) if self._checked else []
        if moved != self._followed:
            raise RuntimeError(
                f"side tensor {name!r} followed the moves of layers {self._followed}, but layers "
                f"{moved} of its forward pass moved samples: give it to every combine "
                f"(ep.combine(..., side)) so it stays with its samples")
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)
