"""Expert-parallel training of torchtitan MoE models with sample placement.

``parallelize(model, mesh)`` takes a torchtitan decoder (``torchtitan.models.common.decoder
.Decoder``: the qwen3 MoE and deepseek_v3 families, built from torchtitan's own model configs,
identical on every rank) and makes its MoE blocks expert-parallel over one mesh dimension: each
rank keeps experts [r * E / J, (r + 1) * E / J) of every MoE layer (torchtitan's own EP
sharding), everything else is replicated and data-parallel (``all_reduce_gradients`` or the
job's own data parallelism). Every MoE block's ``x = x + moe(ffn_norm(x))`` runs as:

- the block's own router (``moe.router`` with its load-balancing ``expert_bias_E``) routes the
  rank's tokens, and the counts torchtitan's bias update reads (``moe.tokens_per_expert_E``)
  grow as in ``MoE.forward``; the layer submits its route counts to the placement hook;
- dispatch sends each (token, slot) route's hidden state ``x`` to its expert's rank;
- the expert side runs ``ffn_norm``, torchtitan's ``GroupedExperts`` on the received routes
  sorted by local expert, the router weight, and once per token (its first slot) the residual
  ``x`` and the shared experts;
- the combine sends every route's output to the new rank of its sample (the plan).

A sample is one row of the rank's ``[B, L]`` token batch (torchtitan packs documents into
per-rank rows). Positions (when given) follow the samples; ``follow`` moves the labels (or any
per-sample tensor) to the rows of the output, so the model's own loss applies unchanged.

Round keys (step, micro-batch, layer) are threaded by the model: MoE layers are numbered in
order; each training forward is the next step, or, with ``attach(optimizer)``, the next
micro-batch of the optimizer's current step (gradient accumulation). torchtitan's activation
checkpointing (``FullAC``, ``SelectiveAC``: non-reentrant ``checkpoint_wrapper`` per block) and
``torch.utils.checkpoint`` need nothing: a block recomputed in the backward pass of the latest
forward applies the plan its forward applied (``netmoe.client.planning``), nothing is reported
again. An evaluation forward (``model.eval()`` or ``torch.inference_mode()``) keeps every sample
home, reports nothing and takes no round key.

Refused before anything is changed, with the setting named: a model without MoE blocks, experts
not divisible by the EP size, an MoE block already expert-parallel, document-masking attention
(flex / varlen: packed documents whose masks would have to be rebuilt), multi-token
prediction layers, context / tensor / pipeline parallelism.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from netmoe.client.dispatcher import CommStats, Dispatched, Layout, TokenDispatcher, move_samples
from netmoe.client.gradients import all_reduce_gradients
from netmoe.client.layer import ExpertParallel, PlacementHook
from netmoe.client.planning import in_backward
from netmoe.round import SamplePlan

_EXPERT_PARAMS = ("w1_EFD", "w2_EDF", "w3_EFD")


def _moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleDict):
        raise TypeError(f"model must be a torchtitan Decoder (with a 'layers' ModuleDict), got "
                        f"{type(model).__name__}")  # fmt: skip
    return [(name, block) for name, block in layers.items()
            if getattr(block, "moe_enabled", False)]  # fmt: skip


def _group_of(mesh: Any, mesh_dim: str | None) -> dist.ProcessGroup | None:
    """The process group of a DeviceMesh dimension (a 1-D mesh needs no name), a ProcessGroup
    as is, or None for the default group."""
    from torch.distributed.device_mesh import DeviceMesh

    if mesh is None or isinstance(mesh, dist.ProcessGroup):
        return mesh
    if isinstance(mesh, DeviceMesh):
        if mesh_dim is None and mesh.ndim != 1:
            raise ValueError(f"mesh has {mesh.ndim} dimensions {mesh.mesh_dim_names}: name the "
                             "expert-parallel one with mesh_dim")
        return mesh.get_group(mesh_dim) if mesh_dim is not None else mesh.get_group()
    raise TypeError(f"mesh must be a DeviceMesh, a ProcessGroup or None, got "
                    f"{type(mesh).__name__}")  # fmt: skip


def _check_parallelism(parallelism: Any) -> None:
    """Refuses the parallelisms whose samples are not whole rows of one rank."""
    if parallelism is None:
        return
    for name in ("context_parallel_degree", "tensor_parallel_degree",
                 "pipeline_parallel_degree"):  # fmt: skip
        value = getattr(parallelism, name, 1)
        if value != 1:
            raise ValueError(f"parallelism.{name}={value} is not supported with netmoe's "
                             "placement (a sample must be one rank's whole row); set it to 1")


def _check_model(model: nn.Module, blocks: list[tuple[str, nn.Module]], ep_size: int) -> int:
    """Validates the model for expert parallelism over ``ep_size`` devices; returns E."""
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.common.moe import MoE

    if not blocks:
        raise ValueError(f"{type(model).__name__} has no MoE layers (no block with moe_enabled)")
    if getattr(model, "mtp_layers", None):
        raise ValueError(f"{type(model).__name__} has {len(model.mtp_layers)} multi-token "
                         "prediction layers (num_mtp_layers): not supported, set it to 0")
    if getattr(model, "_netmoe", None) is not None:
        raise ValueError("model is already expert-parallel with netmoe")
    experts = None
    for name, block in blocks:
        moe = block.moe
        if not isinstance(moe, MoE):
            raise TypeError(f"layers.{name}.moe is a {type(moe).__name__}, not torchtitan's MoE")
        e = moe.routed_experts.inner_experts.num_experts
        if experts is not None and e != experts:
            raise ValueError(f"layers.{name} has {e} experts, earlier MoE layers {experts}: "
                             "every MoE layer must have the same number")
        experts = e
        if getattr(moe.routed_experts.token_dispatcher, "ep_mesh", None) is not None:
            raise ValueError(f"layers.{name} is already expert-parallel (torchtitan's token "
                             "dispatcher has an EP mesh): parallelize the unsharded model")
        inner = getattr(block.attention, "inner_attention", None)
        if inner is not None and not isinstance(inner, ScaledDotProductAttention):
            raise ValueError(
                f"layers.{name}.attention.inner_attention is {type(inner).__name__}: document "
                "masking of packed sequences (flex / varlen) is not supported; use "
                "ScaledDotProductAttention (causal attention per row)")
    assert experts is not None
    if experts % ep_size:
        raise ValueError(f"num_experts={experts} is not divisible by the expert-parallel size "
                         f"{ep_size}")  # fmt: skip
    return experts


@dataclass
class _Pass:
    """One forward pass: its dispatcher and what follows the samples.

    ids: [J * n] int64 global sample id (home row, rank-major) held at each row, all ranks;
    positions: [n, L] int64 positions of the rows this rank holds (None: 0..L-1 for every row).
    """

    step: int
    micro_batch: int
    dispatcher: TokenDispatcher
    placement: PlacementHook | None
    ids: np.ndarray
    positions: torch.Tensor | None
    plans: list[SamplePlan] = field(default_factory=list)
    topk: list[torch.Tensor] = field(default_factory=list)


class TorchtitanEP:
    """The expert-parallel side of a torchtitan model (see ``parallelize``).

    ep_device: this rank's device index in the expert-parallel group (an int); ep_size: the
    group's size.

    stats: the dispatcher's communication accounting over all forward passes (routes from split
    sizes); placement: the hook or None. After a forward: ``plans`` (applied plan per MoE layer),
    ``topk`` ([B * L, K] int64 expert ids per MoE layer in the rows held there), ``held_ids``.
    """

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None,
                 placement: PlacementHook | None, gpus_per_node: int | None) -> None:
        self.model = model
        self.group = group
        self.ep_device = dist.get_rank(group)
        self.ep_size = dist.get_world_size(group)
        self.gpus_per_node = gpus_per_node if gpus_per_node is not None else self.ep_size
        if self.gpus_per_node <= 0 or self.ep_size % self.gpus_per_node:
            raise ValueError(f"gpus_per_node={gpus_per_node} must divide the expert-parallel "
                             f"size {self.ep_size}")  # fmt: skip
        blocks = _moe_blocks(model)
        self.experts = _check_model(model, blocks, self.ep_size)
        self.placement = placement
        self.stats = CommStats()
        self.step = -1  # the last training forward's step
        self._next = (0, 0)  # (step, micro_batch) of the next training forward
        self._per_forward = True  # until an optimizer is attached
        self.blocks = [block for _, block in blocks]
        self.top_k = self.blocks[0].moe.router.top_k
        self._pass: _Pass | None = None
        self._last: _Pass | None = None
        per = self.experts // self.ep_size
        keep = slice(self.ep_device * per, (self.ep_device + 1) * per)
        for layer, block in enumerate(self.blocks):
            inner = block.moe.routed_experts.inner_experts
            for name in _EXPERT_PARAMS:
                full = getattr(inner, name)
                setattr(inner, name, nn.Parameter(full.detach()[keep].clone()))
            inner.num_experts = per
            block.forward = types.MethodType(_block_forward(self, layer), block)
        model.forward = types.MethodType(_decoder_forward(self), model)
        model._netmoe = self

    @property
    def plans(self) -> tuple[SamplePlan, ...]:
        return tuple(self._last.plans) if self._last is not None else ()

    @property
    def topk(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._last.topk) if self._last is not None else ()

    @property
    def held_ids(self) -> torch.Tensor:
        """[B] int64 global sample id (home row, rank-major) of each output row of this rank
        after the last forward."""
        if self._last is None:
            raise RuntimeError("no forward pass yet")
        n = self._last.dispatcher.layout.samples
        mine = self._last.ids[self.ep_device * n : (self.ep_device + 1) * n]
        return torch.from_numpy(mine.copy())

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's expert slices ([E / J, ...] each), whose gradients stay local."""
        return [getattr(b.moe.routed_experts.inner_experts, name)
                for b in self.blocks for name in _EXPERT_PARAMS]  # fmt: skip

    def dense_parameters(self) -> list[nn.Parameter]:
        """Replicated parameters (everything but the experts)."""
        local = {id(p) for p in self.expert_parameters()}
        return [p for p in self.model.parameters() if id(p) not in local]

    def all_reduce_gradients(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Sums the dense gradients over the EP group (one all_reduce); returns the global sums
        of ``values`` ([] float tensors) carried along."""
        return all_reduce_gradients(self.dense_parameters(), values, self.group)

    def follow(self, tensor: torch.Tensor) -> torch.Tensor:
        """Moves a per-sample tensor [B, ...] of this rank's input rows (labels, masks) to the
        rows of the last forward's output (one exchange; none if no sample moved)."""
        last = self._last
        if last is None:
            raise RuntimeError("follow needs a forward pass first")
        n = last.dispatcher.layout.samples
        if tensor.shape[0] != n:
            raise ValueError(f"tensor must have {n} rows (the forward's batch), got "
                             f"{tuple(tensor.shape)}")  # fmt: skip
        where = np.empty_like(last.ids)
        where[last.ids] = np.arange(last.ids.size)
        plan = SamplePlan(tuple((where // n).tolist()), self.ep_size)
        if not plan.moves:
            return tensor
        moved = move_samples(tensor, plan, self.ep_device, self.stats, self.group)
        arrived = {int(g): k for k, g in enumerate(plan.rows_held(self.ep_device))}
        order = [arrived[int(g)] for g in last.ids[self.ep_device * n : (self.ep_device + 1) * n]]
        return moved[torch.tensor(order, device=tensor.device)]

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Counts steps by ``optimizer``: every training forward between two of its steps is the
        next micro-batch of the step (gradient accumulation). Without an attached optimizer
        every training forward is a step of its own."""
        if self._per_forward is False:
            raise ValueError("an optimizer is attached already")
        self._per_forward = False
        optimizer.register_step_post_hook(self._stepped)

    def _stepped(self, *_: Any) -> None:
        self._next = (self._next[0] + 1, 0)

    # The forward pass (installed on the model and its MoE blocks by __init__).

    def _begin(self, tokens: torch.Tensor, positions: torch.Tensor | None,
               training: bool) -> _Pass:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, L], got {tuple(tokens.shape)}")
        b, s = tokens.shape
        if positions is not None and tuple(positions.shape) != (b, s):
            raise ValueError(f"positions must be [{b}, {s}] like tokens, got "
                             f"{tuple(positions.shape)}")  # fmt: skip
        layout = Layout(self.ep_device, self.ep_size, self.gpus_per_node, self.experts, b, s)
        step, micro_batch = self._next
        # An evaluation forward (model.eval(), or under torch.inference_mode) keeps every
        # sample home and takes no round key.
        placing = training and not torch.is_inference_mode_enabled()
        if placing:
            self._next = (step + 1, 0) if self._per_forward else (step, micro_batch + 1)
            self.step = step
            self.stats.step = step
        return _Pass(step, micro_batch, TokenDispatcher(layout, self.stats, self.group),
                     self.placement if placing else None,
                     np.arange(self.ep_size * b, dtype=np.int64), positions)  # fmt: skip

    def _moe(self, layer: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One MoE block's ``x + moe(ffn_norm(x))`` with placement; x: [B, L, D] float after
        attention. Returns [B, L, D] of the rows held after the combine.

        Outside any torch dispatch mode: selective activation checkpointing caches ops by
        their order in the forward, and a recompute's control plane (a replayed plan instead
        of the service's offer) runs other ops, so the layer is recomputed whole there."""
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            return self._moe_layer(layer, block, x)

    def _moe_layer(self, layer: int, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        recompute = in_backward()
        # A recompute (activation checkpointing) runs inside the backward of the latest forward
        # pass (gradient accumulation runs each micro-batch's backward after its forward).
        state = self._last if recompute else self._pass
        if state is None:
            raise RuntimeError("an MoE block ran outside the model's forward")
        if not recompute and len(state.plans) != layer:
            raise RuntimeError(f"MoE layer {layer} ran twice in one forward pass")
        b, s, d = x.shape
        moe = block.moe
        scores, ids, _ = moe.router(block.ffn_norm(x), moe.expert_bias_E)
        flat_ids = ids.reshape(b * s, -1)
        if moe.training:
            with torch.no_grad():
                moe.tokens_per_expert_E.add_(
                    torch.bincount(flat_ids.reshape(-1), minlength=self.experts).float())
        ep = ExpertParallel(state.dispatcher, state.placement)
        nxt = None
        if ep.placing and not recompute and layer + 1 < len(self.blocks):
            nb = self.blocks[layer + 1]
            with torch.no_grad():
                _, nxt, _ = nb.moe.router(nb.ffn_norm(x), nb.moe.expert_bias_E)
            nxt = nxt.reshape(b * s, -1)
        flat = x.reshape(b * s, d)
        ticket = ep.submit(state.step, layer, flat_ids, nxt, micro_batch=state.micro_batch)
        routes = ep.dispatch(layer, flat, flat_ids, scores.reshape(b * s, -1).to(x.dtype))
        out, plan = ep.combine(layer, self._expert_side(block, routes), routes, ticket)
        if recompute:
            # The forward's plan again (the placement hook replays it); its moves are recorded.
            return out.reshape(b, s, d)
        state.plans.append(plan)
        state.topk.append(flat_ids.detach())
        if plan.moves:
            state.ids = plan.follow(state.ids)
            if state.positions is not None:
                state.positions = ep.move(state.positions, plan)
        return out.reshape(b, s, d)

    def _expert_side(self, block: nn.Module, routes: Dispatched) -> torch.Tensor:
        """[R, D]: weight * experts(ffn_norm(x)) per received route, plus x and the shared
        experts of ffn_norm(x) on each token's first slot."""
        moe = block.moe
        z = block.ffn_norm(routes.x)
        local = routes.expert - self.ep_device * (self.experts // self.ep_size)
        order = torch.argsort(local, stable=True)
        counts = torch.bincount(local, minlength=self.experts // self.ep_size)
        y = moe.routed_experts.inner_experts(z[order], counts)
        y = torch.zeros_like(y).index_copy(0, order, y)
        # As torchtitan's combine: the score multiplies in float32.
        out = (y.float() * routes.weight[:, None].float()).to(y.dtype)
        out = out + routes.first[:, None] * routes.x
        if moe.shared_experts is not None:
            first = routes.first.nonzero().squeeze(1)
            out = out.index_add(0, first, moe.shared_experts(z[first]))
        return out


def _block_forward(ep: TorchtitanEP, layer: int) -> Any:
    def forward(block: nn.Module, x: torch.Tensor, attention_masks: Any,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + block.attention(block.attention_norm(x), attention_masks, positions)
        return ep._moe(layer, block, x)

    return forward


def _decoder_forward(ep: TorchtitanEP) -> Any:
    def forward(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                attention_masks: Any = None) -> torch.Tensor:
        """tokens: [B, L] int64 of this rank's rows; positions: [B, L] int64 or None. Returns
        the model's output for the rows held at the end (``ep.held_ids``; ``ep.follow``)."""
        if attention_masks is not None:
            raise ValueError("attention_masks given: document masking of packed sequences is "
                             "not supported with netmoe's placement (the masks would have to "
                             "follow the samples); pass none (causal attention per row)")
        state = ep._begin(tokens, positions, model.training)
        ep._pass = state
        try:
            h = model.tok_embeddings(tokens)
            for block in model.layers.values():
                h = block(h, None, state.positions)
            h = model.norm(h) if model.norm is not None else h
            out = h if model._skip_lm_head else model.lm_head(h)
        finally:
            ep._pass = None
        ep._last = state
        return out

    return forward


def parallelize(model: nn.Module, mesh: Any = None, *, mesh_dim: str | None = None,
                placement: PlacementHook | None = None, gpus_per_node: int | None = None,
                parallelism: Any = None) -> TorchtitanEP:
    """Makes a torchtitan MoE decoder expert-parallel with sample placement, in place.

    model: the full model, identical on every rank (same seed or checkpoint); its expert
        parameters are replaced by this rank's slices and its forward by the placement-aware
        one (same signature; output rows are the samples held at the end).
    mesh: a DeviceMesh (mesh_dim names the EP dimension unless it is 1-D), a ProcessGroup, or
        None for the default group. placement: ``netmoe.client.planning.Placement`` or None for
        home placement. gpus_per_node: ranks per node (default: all on one node).
    parallelism: torchtitan's ``ParallelismConfig`` of the job, checked for what is refused.
    Raises ValueError / TypeError naming the setting (see the module docstring); the model is
    unchanged then.
    """
    _check_parallelism(parallelism)
    return TorchtitanEP(model, _group_of(mesh, mesh_dim), placement, gpus_per_node)
