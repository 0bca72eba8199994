"""A small GPT-style model whose every FFN is a top-k MoE layer, experts spread over ranks.

Attention, norms, routers, embeddings and the head are replicated (data-parallel); expert e of
every layer lives only on rank e // (E / J). Each expert's initial weights depend only on
(seed, layer, e), so a checkpoint of all experts can be trained in one process and loaded by any
number of ranks.

An expert order places experts elsewhere without changing the function: with ``order[l]`` (a
permutation of range(E)), slot v of layer l holds original expert ``order[l][v]`` and router
row v is that expert's row, so slot v, and with it the original expert, lives on rank
v // (E / J). Routing ids are slots; the dispatcher and the placement service need no map.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from netmoe.client.dispatcher import Dispatched, TokenDispatcher
from netmoe.client.histogram import router_topk
from netmoe.client.layer import ExpertParallel, PlacementHook
from netmoe.round import SamplePlan


@dataclass(frozen=True)
class ModelConfig:
    """vocab: vocabulary size; experts: E per layer; top_k: routes per token."""

    vocab: int = 2048
    d_model: int = 64
    heads: int = 4
    layers: int = 4
    ffn: int = 128
    experts: int = 16
    top_k: int = 2
    seq_len: int = 64


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, S, D] float -> [n, S, D]."""
        n, s, d = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, s, d))


class Expert(nn.Module):
    def __init__(self, d: int, ffn: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, ffn)
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MoE(nn.Module):
    """Router and norm (replicated) plus this rank's experts, keyed by global expert id."""

    def __init__(self, cfg: ModelConfig, layer: int, local_experts: range, seed: int,
                 order: Sequence[int] | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.router = nn.Linear(cfg.d_model, cfg.experts, bias=False)
        if order is not None:
            with torch.no_grad():
                self.router.weight.copy_(self.router.weight[list(order)])
        experts = {}
        for e in local_experts:
            original = e if order is None else order[e]
            with torch.random.fork_rng():
                torch.manual_seed(seed * 1_000_003 + layer * 10_007 + original)
                experts[str(e)] = Expert(cfg.d_model, cfg.ffn)
        self.experts = nn.ModuleDict(experts)

    def expert_side(self, routes: Dispatched) -> torch.Tensor:
        """[R, D]: weight * expert(norm(x)) per route, plus x on each token's first slot."""
        experts = {int(key): expert for key, expert in self.experts.items()}
        return ExpertParallel.expert_outputs(routes, experts, self.norm)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, local_experts: range, seed: int,
                 order: Sequence[int] | None = None) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.heads)
        self.moe = MoE(cfg, layer, local_experts, seed, order)


@dataclass(frozen=True)
class ForwardResult:
    """logits: [n * S, vocab] of the samples this rank holds at the end, in holds order;
    plans: the plan applied at each layer's combine; topk: [n * S, K] int64 ids per layer."""

    logits: torch.Tensor
    plans: tuple[SamplePlan, ...]
    topk: tuple[torch.Tensor, ...]


def check_expert_order(order: Sequence[Sequence[int]], layers: int, experts: int) -> None:
    """Raises ValueError unless order is [layers] permutations of range(experts)."""
    if len(order) != layers or any(sorted(o) != list(range(experts)) for o in order):
        raise ValueError(f"expert_order must hold {layers} permutations of range({experts}), "
                         f"got {[list(o) for o in order]}")


def relabel_state(state: Mapping[str, torch.Tensor], order: Sequence[Sequence[int]],
                  ) -> dict[str, torch.Tensor]:
    """A state dict (experts keyed by original id, router rows in original order) rewritten for
    a model built with ``order``: slot v of layer l takes original expert order[l][v]."""
    out = {}
    slot_of = [{original: slot for slot, original in enumerate(perm)} for perm in order]
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) > 4 and parts[0] == "blocks" and parts[2:4] == ["moe", "experts"]:
            layer = int(parts[1])
            parts[4] = str(slot_of[layer][int(parts[4])])
        elif len(parts) == 5 and parts[0] == "blocks" and parts[2:] == ["moe", "router", "weight"]:
            value = value[list(order[int(parts[1])])]
        out[".".join(parts)] = value
    return out


class MoEGPT(nn.Module):
    def __init__(self, cfg: ModelConfig, local_experts: range, seed: int,
                 expert_order: Sequence[Sequence[int]] | None = None) -> None:
        """expert_order: [layers] permutations of range(E), see the module docstring."""
        super().__init__()
        if expert_order is not None:
            check_expert_order(expert_order, cfg.layers, cfg.experts)
        self.cfg = cfg
        torch.manual_seed(seed)
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, layer, local_experts, seed,
                  None if expert_order is None else expert_order[layer])
            for layer in range(cfg.layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Replicated parameters, whose gradients are all-reduced (everything but experts)."""
        return [p for name, p in self.named_parameters() if ".experts." not in name]

    def forward(
        self,
        tokens: torch.Tensor,
        dispatcher: TokenDispatcher,
        placement: PlacementHook | None = None,
        step: int = 0,
        micro_batch: int = 0,
        recompute: bool = False,
        dtype: torch.dtype | None = None,
    ) -> ForwardResult:
        """tokens: [n, S] int64 local samples. placement None means home placement (no plans).
        step, micro_batch: the round keys' (see ``netmoe.client.layer``). recompute: every
        block runs again in the backward pass (torch.utils.checkpoint, non-reentrant) instead
        of keeping its activations. dtype: of the hidden states between blocks (torch.bfloat16:
        mixed precision, run it under torch.autocast; router weights stay fp32); None keeps
        the parameters' dtype."""
        cfg = self.cfg
        n, s = tokens.shape
        if s != cfg.seq_len or n != dispatcher.layout.samples:
            raise ValueError(
                f"tokens must be [{dispatcher.layout.samples}, {cfg.seq_len}], got {(n, s)}"
            )
        ep = ExpertParallel(dispatcher, placement)
        h = self.tok(tokens) + self.pos(torch.arange(s, device=tokens.device))
        if dtype is not None:
            h = h.to(dtype)
        plans: list[SamplePlan] = []
        topks: list[torch.Tensor] = []
        for layer in range(cfg.layers):
            run = functools.partial(self._block, ep, layer, step, micro_batch, plans, topks)
            h = checkpoint(run, h, use_reentrant=False) if recompute else run(h)
        logits = self.head(self.ln_f(h)).reshape(n * s, cfg.vocab)
        return ForwardResult(logits, tuple(plans), tuple(topks))

    def _block(self, ep: ExpertParallel, layer: int, step: int, micro_batch: int,
               plans: list[SamplePlan], topks: list[torch.Tensor], h: torch.Tensor
               ) -> torch.Tensor:
        """Block ``layer``: h [n, S, D] -> [n, S, D] of the samples held after its combine (in
        h's dtype). Appends the plan and the top-k ids on its first run, not in a recompute."""
        cfg, block = self.cfg, self.blocks[layer]
        n, s, _ = h.shape
        h = h + block.attn(block.ln(h)).to(h.dtype)
        flat = h.reshape(n * s, cfg.d_model)
        weights, ids = router_topk(block.moe.router, block.moe.norm(flat), cfg.top_k)
        ticket = ep.submit(step, layer, ids, self._predict(layer, flat, ep.placement),
                           micro_batch=micro_batch)
        routes = ep.dispatch(layer, flat, ids, weights.float())
        out, plan = ep.combine(layer, block.moe.expert_side(routes), routes, ticket)
        if len(plans) == layer:
            plans.append(plan)
            topks.append(ids.detach())
        return out.reshape(n, s, cfg.d_model)

    @torch.no_grad()
    def _predict(self, layer: int, flat: torch.Tensor, placement: PlacementHook | None
                 ) -> torch.Tensor | None:
        """[T, K] ids layer + 1's router picks for layer ``layer``'s input: the next dispatch."""
        if placement is None or layer + 1 == self.cfg.layers:
            return None
        nxt = self.blocks[layer + 1].moe
        return router_topk(nxt.router, nxt.norm(flat), self.cfg.top_k)[1]
