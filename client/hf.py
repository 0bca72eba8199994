"""Expert-parallel training of Hugging Face MoE causal LMs with sample placement.

``parallelize(model)`` takes a transformers 5 Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE causal LM
(every rank builds or loads the same full model) and returns an ``ExpertParallelLM``: each rank
keeps only its experts (slices of the fused 3-D expert parameters), everything else is
replicated and data-parallel (``all_reduce_gradients``). Every MoE decoder layer runs netmoe's
dispatcher instead of the layer's ``residual + mlp(post_attention_layernorm(h))`` step:

- the model's own router (``mlp.gate``) routes the rank's tokens (its top-k, normalisation);
- dispatch sends each (token, slot) route to its expert's rank;
- the expert side runs the model's own experts module on its local slice and adds the residual
  (and Qwen2-MoE's gated shared expert, which is replicated) once per token, on the token's
  first slot;
- the combine sends every route's output to the new device of its sample (the plan), so samples
  move without an exchange of their own; sample ids, labels, attention masks and position ids
  follow with one small ``move_samples`` per moving layer, and the causal mask and rotary
  embeddings are rebuilt for the samples a rank then holds.

The loss is the model's: causal LM cross entropy normalised by the global count of labelled
tokens, plus ``router_aux_loss_coef`` times the load-balancing loss over all tokens of all ranks
(when ``config.output_router_logits``). Each rank's loss is its share, so the sum over ranks is
the unsharded model's loss and summed gradients are its gradients: which rank holds which sample
changes only float summation order.

Expert maps: ``expert_map[e]`` is the rank of expert e (E / J experts per rank). The dispatcher
places slot v on rank v // (E / J), so experts are numbered into slots sorted by rank; routing,
route counts and the placement service all see slots, the model's router and experts keep their
own ids. Device-agnostic: tensors stay on the model's device and the collectives are
all_to_all_single and all_reduce.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from netmoe.client.dispatcher import CommStats, Dispatched, Layout, TokenDispatcher, move_samples
from netmoe.client.gradients import all_reduce_gradients
from netmoe.client.layer import ExpertParallel
from netmoe.client.planning import Placement
from netmoe.round import SamplePlan

SUPPORTED = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
IGNORE_INDEX = -100  # transformers' label value for "no loss here"


@dataclass(frozen=True)
class StepOutput:
    """One forward pass of one rank.

    loss: [] float, this rank's share of the global loss (None without labels); the sum over
        ranks is the unsharded model's loss. aux_loss: [] float, this rank's share of the
        load-balancing loss (None unless the model outputs router logits).
    logits: [n, S, V] float of the samples this rank holds at the end, rows in ``held_ids`` order.
    held_ids: [n] int64 sample id (its home row, rank-major) of each held sample.
    labels: [n, S] int64 shifted labels of the held samples (None without labels).
    plans: the plan applied at each MoE layer's combine; topk: [n * S, K] int64 slot ids per MoE
        layer, rows in the order the rank held them at that layer.
    """

    loss: torch.Tensor | None
    aux_loss: torch.Tensor | None
    logits: torch.Tensor
    held_ids: torch.Tensor
    labels: torch.Tensor | None
    plans: tuple[SamplePlan, ...]
    topk: tuple[torch.Tensor, ...]


def _is_moe(layer: nn.Module) -> bool:
    return hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts")


def expert_slots(expert_map: Sequence[int], ep_size: int) -> list[int]:
    """Slot of each expert: experts sorted by rank (stable), [E] ints; see the module docstring.

    Raises ValueError naming the value unless every entry is a device in [0, ep_size) and every
    device holds E / ep_size experts."""
    experts = len(expert_map)
    if experts % ep_size:
        raise ValueError(f"expert_map has {experts} experts, not divisible by ep_size={ep_size}")
    bad = [(e, d) for e, d in enumerate(expert_map) if not 0 <= int(d) < ep_size]
    if bad:
        e, d = bad[0]
        raise ValueError(f"expert_map[{e}]={d} names a missing device: devices are "
                         f"0..{ep_size - 1}")
    per = [sum(1 for d in expert_map if int(d) == r) for r in range(ep_size)]
    if any(c != experts // ep_size for c in per):
        raise ValueError(f"expert_map must give each device {experts // ep_size} experts, got "
                         f"{per} per device")  # fmt: skip
    order = sorted(range(experts), key=lambda e: int(expert_map[e]))
    slots = [0] * experts
    for slot, e in enumerate(order):
        slots[e] = slot
    return slots


class ExpertParallelLM(nn.Module):
    """A transformers MoE causal LM sharded over the ranks of ``group``; see ``parallelize``.

    ep_device: this rank's device index in ``group`` (an int; ``device`` is left to mean a
    torch.device, as on every module); ep_size: the group's size."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None,
                 expert_map: Sequence[int] | None, placement: Placement | None,
                 gpus_per_node: int | None) -> None:
        super().__init__()
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise ValueError(f"model type {cfg.model_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED)}")  # fmt: skip
        if getattr(cfg, "router_jitter_noise", 0.0):
            raise ValueError(f"router_jitter_noise={cfg.router_jitter_noise} is not supported "
                             "(it rescales hidden states at random before routing); set it to 0")
        self.model = model
        self.group = group
        self.ep_device = dist.get_rank(group)
        self.ep_size = dist.get_world_size(group)
        self.gpus_per_node = gpus_per_node if gpus_per_node is not None else self.ep_size
        self.moe_layers = [i for i, layer in enumerate(self._layers()) if _is_moe(layer)]
        if not self.moe_layers:
            raise ValueError(f"{cfg.model_type} model has no MoE layers")
        first = self._layers()[self.moe_layers[0]].mlp
        self.experts = first.gate.num_experts
        self.top_k = first.gate.top_k
        if self.experts % self.ep_size:
            raise ValueError(f"experts={self.experts} is not divisible by the expert-parallel "
                             f"size ep_size={self.ep_size}")  # fmt: skip
        if expert_map is None:
            expert_map = [e * self.ep_size // self.experts for e in range(self.experts)]
        if len(expert_map) != self.experts:
            raise ValueError(f"expert_map must list {self.experts} ranks (one per expert), got "
                             f"{len(expert_map)}")  # fmt: skip
        slots = expert_slots(expert_map, self.ep_size)
        per = self.experts // self.ep_size
        # Original expert ids on this rank, in slot order.
        self.local_experts = sorted(range(self.experts), key=lambda e: slots[e])[
            self.ep_device * per : (self.ep_device + 1) * per]  # fmt: skip
        device = next(model.parameters()).device
        self.register_buffer("slot_of", torch.tensor(slots, device=device), persistent=False)
        self.placement = placement
        self.stats = CommStats()
        keep = torch.tensor(self.local_experts, device=device)
        for i in self.moe_layers:
            experts = self._layers()[i].mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                full = getattr(experts, name)
                setattr(experts, name, nn.Parameter(full.detach()[keep].clone()))
            experts.num_experts = per

    def _layers(self) -> Sequence[nn.Module]:
        return self.model.model.layers[: self.model.config.num_hidden_layers]

    def expert_parameters(self) -> list[nn.Parameter]:
        """This rank's expert slices ([E / J, ...] each), whose gradients stay local."""
        return [p for i in self.moe_layers for p in self._layers()[i].mlp.experts.parameters()]

    def dense_parameters(self) -> list[nn.Parameter]:
        """Replicated parameters (everything but the experts), gradients all-reduced."""
        local = {id(p) for p in self.expert_parameters()}
        return [p for p in self.model.parameters() if id(p) not in local]

    def all_reduce_gradients(self, *values: torch.Tensor) -> list[torch.Tensor]:
        """Sums the dense gradients over the ranks (one all_reduce) and returns the global sums
        of ``values`` ([] float tensors, e.g. each rank's loss share) carried along with them."""
        return all_reduce_gradients(self.dense_parameters(), values, self.group)

    def _context(self, h: torch.Tensor, mask: torch.Tensor | None,
                 positions: torch.Tensor) -> tuple[dict[str, Any], tuple[torch.Tensor, ...]]:
        """Causal masks by attention type and rotary embeddings, as the model's forward builds
        them, for the samples held now. h: [n, S, D]; mask: [n, S] or None; positions: [1 or n,
        S] int64."""
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        base = self.model.model
        cfg = base.config
        kw = dict(config=cfg, inputs_embeds=h, attention_mask=mask, cache=None,
                  position_ids=positions)  # fmt: skip
        if cfg.model_type == "qwen2_moe":
            masks = {"full_attention": create_causal_mask(**kw),
                     "sliding_attention": create_sliding_window_causal_mask(**kw)}
        elif cfg.model_type == "olmoe" or getattr(cfg, "sliding_window", None) is None:
            masks = {"": create_causal_mask(**kw)}
        else:
            masks = {"": create_sliding_window_causal_mask(**kw)}
        return masks, base.rotary_emb(h, position_ids=positions)

    def _mask_for(self, masks: dict[str, Any], layer: int) -> Any:
        if "" in masks:
            return masks[""]
        return masks[self.model.config.layer_types[layer]]

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        step: int = 0,
        micro_batch: int = 0,
    ) -> StepOutput:
        """input_ids, attention_mask, position_ids, labels: [n, S] int64 of this rank's samples
        (labels unshifted, ``IGNORE_INDEX`` for none, as transformers takes them); every rank
        passes the same n and S. step, micro_batch: the training step and the forward pass
        within it (gradient accumulation) the placement service files plans under (see
        ``netmoe.client.layer``); under ``torch.inference_mode()`` placement is off."""
        n, s = input_ids.shape
        for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids),
                        ("labels", labels)):  # fmt: skip
            if t is not None and tuple(t.shape) != (n, s):
                raise ValueError(f"{name} must be [{n}, {s}] like input_ids, got "
                                 f"{tuple(t.shape)}")  # fmt: skip
        layout = Layout(self.ep_device, self.ep_size, self.gpus_per_node, self.experts, n, s)
        # One per forward pass, shared by its MoE layers (its token index is built once).
        ep = ExpertParallel(TokenDispatcher(layout, self.stats, self.group), self.placement)
        base = self.model.model
        h = base.embed_tokens(input_ids)
        side, default_positions = self._side(n, s, input_ids.device, attention_mask,
                                             position_ids, labels)  # fmt: skip
        context = self._context(h, attention_mask, default_positions
                                if position_ids is None else position_ids)  # fmt: skip
        h, plans, topks, router = self._layers_forward(h, side, default_positions, context, ep,
                                                       step, micro_batch)  # fmt: skip
        logits = self.model.lm_head(base.norm(h))
        loss, aux = self._loss(logits, side, router)
        return StepOutput(loss, aux, logits, side["held_ids"][:, 0], side.get("labels"),
                          tuple(plans), tuple(topks))  # fmt: skip

    def _side(self, n: int, s: int, dev: torch.device, attention_mask: torch.Tensor | None,
              position_ids: torch.Tensor | None, labels: torch.Tensor | None
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The per-sample side tensors, [n, *] int64 each (so one exchange moves them all):
        "held_ids" [n, 1] (the samples' global ids), "labels" [n, S] shifted left by one
        (``IGNORE_INDEX`` last), "mask" and "positions" when given; and the default positions
        [1, S] int64."""
        held = torch.arange(self.ep_device * n, (self.ep_device + 1) * n, device=dev)
        side = {"held_ids": held[:, None]}
        if labels is not None:
            pad = labels.new_full((n, 1), IGNORE_INDEX)
            side["labels"] = torch.cat([labels[:, 1:], pad], dim=1)
        if attention_mask is not None:
            side["mask"] = attention_mask.long()
        if position_ids is not None:
            side["positions"] = position_ids.long()
        return side, torch.arange(s, device=dev)[None]

    def _layers_forward(self, h: torch.Tensor, side: dict[str, torch.Tensor],
                        default_positions: torch.Tensor,
                        context: tuple[dict[str, Any], tuple[torch.Tensor, ...]],
                        ep: ExpertParallel, step: int, micro_batch: int
                        ) -> tuple[torch.Tensor, list[SamplePlan], list[torch.Tensor], list[Any]]:
        """The decoder layers on h [n, S, D] (embedded input_ids) with the attention context
        (masks, rotary) of ``_context``; side tensors and context follow the samples whenever a
        combine moves them. Returns h [n, S, D] of the
        samples held after the last layer, the applied plans and [n * S, K] top-k slot ids per
        MoE layer, and the router logits [n * S, E] with the mask of the tokens they held."""
        n, s, _ = h.shape
        masks, rotary = context
        layers = self._layers()
        plans, topks, router = [], [], []
        for i, layer in enumerate(layers):
            positions = side.get("positions", default_positions)
            mask = side.get("mask")
            a, _ = layer.self_attn(hidden_states=layer.input_layernorm(h),
                                   position_embeddings=rotary,
                                   attention_mask=self._mask_for(masks, i),
                                   position_ids=positions)  # fmt: skip
            h = h + a
            if not _is_moe(layer):
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                continue
            flat = h.reshape(n * s, -1)
            logits, weights, ids = layer.mlp.gate(layer.post_attention_layernorm(flat))
            router.append((logits, mask))
            slots = self.slot_of[ids]
            nxt = next((layers[j] for j in self.moe_layers if j > i), None)
            out, plan = self._moe_layer(ep, self.moe_layers.index(i), layer, nxt, flat, slots,
                                        weights, step, micro_batch)  # fmt: skip
            h = out.reshape(n, s, -1)
            plans.append(plan)
            topks.append(slots.detach())
            if plan.moves:
                side.update(self._move(side, plan))
                masks, rotary = self._context(h, side.get("mask"),
                                              side.get("positions", default_positions))
        return h, plans, topks, router

    def _loss(self, logits: torch.Tensor, side: dict[str, torch.Tensor], router: list[Any]
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(this rank's share of the global mean loss, or None without labels; its share of the
        load-balancing loss, or None when the model has it off). logits: [n, S, V]."""
        cfg = self.model.config
        n, s, _ = logits.shape
        count = torch.zeros((), device=logits.device)
        if "labels" in side:
            count = (side["labels"] != IGNORE_INDEX).sum().to(logits.dtype)
        aux = None
        if cfg.output_router_logits:
            aux, count = self._balance_loss(router, count)
        elif "labels" in side:
            count = count.clone()
            dist.all_reduce(count, group=self.group)
        if "labels" not in side:
            return None, aux
        ce = F.cross_entropy(logits.float().reshape(n * s, -1), side["labels"].reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
        loss = ce / count
        if aux is not None:
            loss = loss + cfg.router_aux_loss_coef * aux
        return loss, aux

    def _balance_loss(self, router: list[tuple[torch.Tensor, torch.Tensor | None]],
                      count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of the model's load-balancing loss over all ranks' tokens, and the
        global labelled-token count (all-reduced with the routing counts in one call).

        The loss is E * sum_e f_e * P_e with f the top-k share and P the mean router
        probability of expert e over every layer's tokens (padding masked out): linear in the
        probability sums, so each rank's share uses its own sums with the global f."""
        e, k = self.experts, self.top_k
        dev = router[0][0].device
        chosen = torch.zeros(e, dtype=torch.float32, device=dev)
        prob_sum = torch.zeros(e, dtype=torch.float32, device=dev)
        rows = torch.zeros((), dtype=torch.float32, device=dev)
        for logits, mask in router:
            probs = torch.softmax(logits, dim=-1)
            _, picked = torch.topk(probs, k, dim=-1)
            # Router ids are the model's own expert ids, as the unsharded model counts them.
            weight = (torch.ones(logits.shape[0], device=dev) if mask is None
                      else mask.reshape(-1).to(device=dev, dtype=torch.float32))  # fmt: skip
            chosen = chosen.scatter_add(0, picked.reshape(-1), weight.repeat_interleave(k))
            prob_sum = prob_sum + (probs.float() * weight[:, None]).sum(dim=0)
            rows = rows + weight.sum()
        totals = torch.cat([chosen, rows[None], count.float()[None]]).detach()
        dist.all_reduce(totals, group=self.group)
        share = e * torch.sum(totals[:e] / totals[e] * prob_sum / totals[e])
        return share, totals[e + 1].to(count.dtype)

    def _expert_side(self, layer: nn.Module, routes: Dispatched) -> torch.Tensor:
        """[R, D]: weight * expert(norm(x)) per route, plus x (and Qwen2-MoE's gated shared
        expert of norm(x)) on each token's first slot."""
        mlp = layer.mlp
        z = layer.post_attention_layernorm(routes.x)
        local = routes.expert - self.ep_device * (self.experts // self.ep_size)
        out = mlp.experts(z, local[:, None], routes.weight[:, None].to(z.dtype))
        out = out + routes.first[:, None] * routes.x
        if hasattr(mlp, "shared_expert"):
            first = routes.first.nonzero().squeeze(1)
            zf = z[first]
            shared = torch.sigmoid(mlp.shared_expert_gate(zf)) * mlp.shared_expert(zf)
            out = out.index_add(0, first, shared)
        return out

    # The two functions below are the only calls into the dispatcher and the placement hook.

    def _moe_layer(self, ep: ExpertParallel, index: int, layer: nn.Module,
                   nxt: nn.Module | None, flat: torch.Tensor, slots: torch.Tensor,
                   weights: torch.Tensor, step: int, micro_batch: int
                   ) -> tuple[torch.Tensor, SamplePlan]:
        """One MoE layer: count/submit, dispatch, expert side, wait, combine.

        flat: [n * S, D] hidden state after attention (the residual); slots, weights: [n * S, K]
        the router's choice in slot ids and its weights. Returns ([n * S, D] next hidden state
        of the samples held after the combine, the applied plan)."""
        nxt_slots = None
        if ep.placing and nxt is not None:
            with torch.no_grad():
                _, _, ids = nxt.mlp.gate(nxt.post_attention_layernorm(flat))
            nxt_slots = self.slot_of[ids]
        ticket = ep.submit(step, index, slots, nxt_slots, micro_batch=micro_batch)
        routes = ep.dispatch(index, flat, slots, weights.to(flat.dtype))
        return ep.combine(index, self._expert_side(layer, routes), routes, ticket)

    def _move(self, side: dict[str, torch.Tensor], plan: SamplePlan) -> dict[str, torch.Tensor]:
        """Side tensors [n, *] int64 moved with their samples (one exchange for all)."""
        widths = [t.shape[1] for t in side.values()]
        moved = move_samples(torch.cat(list(side.values()), dim=1), plan, self.ep_device,
                             self.stats, self.group)  # fmt: skip
        return dict(zip(side, moved.split(widths, dim=1), strict=True))


def parallelize(model: nn.Module, group: dist.ProcessGroup | None = None,
                expert_map: Sequence[int] | None = None, placement: Placement | None = None,
                gpus_per_node: int | None = None) -> ExpertParallelLM:
    """Makes a transformers MoE causal LM expert-parallel over ``group`` (default: the world).

    model: the full model, identical on every rank (same seed or checkpoint); its expert
        parameters are replaced in place by this rank's slices. expert_map: [E] rank of each
        expert (default contiguous: expert e on rank e // (E / J)). placement: the placement
        hook (``netmoe.client.planning.Placement``) or None for home placement.
    gpus_per_node: G, ranks per node (default: all ranks on one node).
    Raises ValueError for an unsupported model type (listing the supported ones), experts not
    divisible by the group's size, or a map naming a missing device.
    """
    return ExpertParallelLM(model, group, expert_map, placement, gpus_per_node)
