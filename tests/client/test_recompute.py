"""Activation recompute and micro-batches with sample placement (gloo ranks, real service).

A custom top-2 MoE (embedding, MoE layers of 8 linear experts, head), trained a few AdamW steps
with gradient accumulation, is run twice per case on the same ranks: home placement (no hook)
and with placement (the embedded service, or the dispatcher's random plans). Every loss and every
gradient must equal home's within 1e-5 relative: a recompute that applied another plan than its
forward, or micro-batches whose rounds collided, would give other samples' activations.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from netmoe.client.dispatcher import Layout, TokenDispatcher
from netmoe.client.layer import ExpertParallel, SampleTensors
from netmoe.client.placement_client import PlacementClient, job_spec
from netmoe.client.planning import Placement, RandomPlans
from netmoe.round import SamplePlan
from netmoe.server.app import ServerHandle, start
from netmoe.server.config import ServerConfig

from support import gloo_group, spawn_ranks

N, S, D, E, K, VOCAB, LAYERS, STEPS = 2, 8, 16, 8, 2, 64, 3, 2
RTOL = 1e-5


@dataclass(frozen=True)
class Case:
    """recompute: "none", "block" (every MoE block checkpointed) or "alternate" (every other);
    micro: micro-batches per step; source: "service" or "random" (RandomPlans); evaluate: after
    each optimizer step, evaluation forwards (ep.evaluation() and torch.inference_mode()) with
    the step's own keys, whose losses are compared too."""

    recompute: str
    reentrant: bool
    micro: int
    source: str = "service"
    evaluate: bool = False

    def checkpointed(self, layer: int) -> bool:
        return self.recompute == "block" or (self.recompute == "alternate" and layer % 2 == 0)

    @property
    def name(self) -> str:
        kind = "reentrant" if self.reentrant else "non-reentrant"
        return f"{self.recompute}-{kind}-mb{self.micro}-{self.source}"


class ToyMoE(nn.Module):
    """Embedding, LAYERS MoE blocks (router + this rank's experts), head. Replicated parts and
    experts start equal on every rank for one seed; a rank keeps its own experts only."""

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.routers = nn.ModuleList(nn.Linear(D, E) for _ in range(LAYERS))
        experts = [[nn.Linear(D, D) for _ in range(E)] for _ in range(LAYERS)]
        self.experts = nn.ModuleList(
            nn.ModuleDict({str(e): layer[e] for e in layout.local_experts}) for layer in experts)
        self.head = nn.Linear(D, VOCAB)

    def dense(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("experts.")]

    def block(self, ep: ExpertParallel, step: int, micro: int, layer: int, plans: list,
              side: SampleTensors | None, h: torch.Tensor) -> torch.Tensor:
        """One MoE layer: h [T, D] float32 -> [T, D] of the samples held after its combine."""
        weights, ids = torch.softmax(self.routers[layer](h), -1).topk(K)
        nxt = None
        if layer + 1 < LAYERS:
            with torch.no_grad():
                nxt = self.routers[layer + 1](h).topk(K).indices
        ticket = ep.submit(step, layer, ids, nxt, micro_batch=micro)
        routes = ep.dispatch(layer, h, ids, weights / weights.sum(-1, keepdim=True))
        experts = {int(e): m for e, m in self.experts[layer].items()}
        h, plans[layer] = ep.combine(layer, ep.expert_outputs(routes, experts), routes, ticket,
                                     side)
        return h

    def loss(self, ep: ExpertParallel, case: Case, step: int, micro: int,
             tokens: torch.Tensor, forget: int = -1) -> tuple[torch.Tensor, list[SamplePlan]]:
        """tokens [N, S + 1] int64 -> this rank's sum of token losses, the plans applied.
        forget: a layer whose combine is not given the side tensors (a model's bug)."""
        h = self.embed(tokens[:, :-1]).reshape(N * S, D)
        side = ep.samples(labels=tokens[:, 1:])
        plans: list = [None] * LAYERS
        for layer in range(LAYERS):
            fn = functools.partial(self.block, ep, step, micro, layer, plans,
                                   None if layer == forget else side)
            h = (checkpoint(fn, h, use_reentrant=case.reentrant) if case.checkpointed(layer)
                 else fn(h))
        return F.cross_entropy(self.head(h), side["labels"].reshape(-1), reduction="sum"), plans


def _tokens(rank: int, step: int, micro: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    return torch.randint(0, VOCAB, (N, S + 1), generator=gen)


def _train(model: ToyMoE, ep: ExpertParallel, case: Case, world: int
           ) -> tuple[list[float], list[torch.Tensor], int]:
    """STEPS AdamW steps of case.micro micro-batches. Returns the global loss of each step, the
    rank's gradients of each step (flattened; dense ones summed over ranks) and samples moved."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads, moved = [], [], 0
    tokens_total = world * N * S * case.micro
    for step in range(STEPS):
        opt.zero_grad()
        total = torch.zeros(())
        for micro in range(case.micro):
            loss, plans = model.loss(ep, case, step, micro, _tokens(ep.layout.device, step, micro))
            (loss / tokens_total).backward()
            total += loss.detach()
            moved += sum(p.moved for p in plans)
        for p in model.dense():
            dist.all_reduce(p.grad)
        dist.all_reduce(total)
        losses.append(float(total) / tokens_total)
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
        opt.step()
        if case.evaluate:  # mid-training, placement off: same keys, no rounds, no error
            plain = Case("none", False, 1)
            with ep.evaluation(), torch.no_grad():
                losses.append(_global(model.loss(ep, plain, step, 0, _tokens(99, step, 0))[0]))
            with torch.inference_mode():
                losses.append(_global(model.loss(ep, plain, step, 0, _tokens(98, step, 0))[0]))
    return losses, grads, moved


def _global(loss: torch.Tensor) -> float:
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total)


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = float((got - want).abs().max())
    assert err <= RTOL * float(want.abs().max()), f"{what}: max |diff| {err:.3g}"


def _worker(rank: int, port: int, world: int, gpus: int, address: str, cases: list[Case]
            ) -> None:
    with gloo_group(rank, world, port):
        layout = Layout(rank, world, gpus, E, N, S)
        for k, case in enumerate(cases):
            home_ep = ExpertParallel(TokenDispatcher(layout))
            want, want_grads, _ = _train(ToyMoE(layout), home_ep, case, world)
            client = None
            if case.source == "service":
                spec = job_spec(world // gpus, gpus, E, N, hidden_size=D, dtype_bytes=4,
                                deadline_ms=5000)
                client = PlacementClient(address, f"recompute-{world}-{k}", rank, spec)
                source: object = client
            else:
                source = RandomPlans(rank, world, N, seed=k)
            placement = Placement(source, rank, world, N, timeout=10.0)  # type: ignore[arg-type]
            ep = ExpertParallel(TokenDispatcher(layout), placement)
            got, got_grads, moved = _train(ToyMoE(layout), ep, case, world)
            for step, (g, w) in enumerate(zip(got, want, strict=True)):
                assert abs(g - w) <= RTOL * abs(w), f"{case.name} step {step}: {g} vs {w}"
            for step, (g, w) in enumerate(zip(got_grads, want_grads, strict=True)):
                _close(g, w, f"{case.name} step {step} gradients")
            st = placement.stats
            rounds = STEPS * case.micro * LAYERS
            recomputed = sum(case.checkpointed(layer) for layer in range(LAYERS))
            assert (st.plans, st.fallbacks) == (rounds, 0), (case.name, st.plans, st.reasons)
            assert st.replays == STEPS * case.micro * recomputed, (case.name, st.replays)
            seen = torch.tensor([moved])
            dist.all_reduce(seen)
            assert int(seen) > 0, f"{case.name}: no plan moved a sample, the case shows nothing"
            dist.barrier()
            if client is not None:
                client.close(unregister=rank == 0)
        # A model that forgets its side tensors at layer 1's combine gets an error before the
        # loss, not another loss (random plans move samples at every layer).
        ep = ExpertParallel(TokenDispatcher(layout), Placement(RandomPlans(rank, world, N), rank,
                                                               world, N, timeout=10.0))
        with pytest.raises(RuntimeError, match=r"side tensor 'labels' followed the moves of "
                                               r"layers \[0, 2\], but layers \[0, 1, 2\] of "):
            ToyMoE(layout).loss(ep, Case("block", False, 1), 0, 0, _tokens(rank, 0, 0), forget=1)


@pytest.fixture(scope="module")
def service() -> Iterator[ServerHandle]:
    handle = start(ServerConfig(port=0, drain_seconds=0.0, metrics_port=None, grace_seconds=1.0))
    yield handle
    handle.stop()


FAST = [
    Case("block", reentrant=False, micro=2, evaluate=True),
    Case("alternate", reentrant=True, micro=1),
    Case("none", reentrant=False, micro=4),
    Case("block", reentrant=True, micro=2, source="random"),
]
ALL = [Case(r, reentrant, micro, source) for r in ("none", "block", "alternate")
       for reentrant in ((False,) if r == "none" else (False, True)) for micro in (1, 2, 4)
       for source in ("service", "random")]


def test_recompute_and_micro_batches_equal_home_on_2x2(service: ServerHandle) -> None:
    spawn_ranks(_worker, 4, 4, 2, service.address, FAST, timeout=600)


@pytest.mark.slow
def test_recompute_and_micro_batches_equal_home_on_2x4(service: ServerHandle) -> None:
    spawn_ranks(_worker, 8, 8, 4, service.address, FAST, timeout=1800)


@pytest.mark.slow
def test_every_recompute_and_micro_batch_combination_equals_home(service: ServerHandle) -> None:
    spawn_ranks(_worker, 4, 4, 2, service.address, ALL, timeout=1800)


def test_side_tensors_of_another_leading_size_are_refused() -> None:
    ep = ExpertParallel(TokenDispatcher(Layout(0, 1, 1, E, N, S)))
    with pytest.raises(ValueError, match=r"mask must be \[samples=2, \.\.\.\] \(one row per local "
                                         r"sample\), got \(3, 8\)"):
        ep.samples(labels=torch.zeros(N, S), mask=torch.zeros(3, S))


def test_placement_refuses_keys_out_of_order_and_recompute_of_rounds_never_run() -> None:
    """Bad round keys raise before anything is sent, and leave the placement's state as it was."""
    sent: list[tuple[int, int, int]] = []

    class Recording(RandomPlans):
        def submit(self, step, layer, counts, micro_batch=0):  # type: ignore[no-untyped-def]
            sent.append((step, micro_batch, layer))
            return super().submit(step, layer, counts, micro_batch)

    placement = Placement(Recording(0, 1, 2), 0, 1, 2, timeout=1.0)
    counts = torch.ones(2, 4, dtype=torch.int64)
    placement.submit(3, 0, counts, counts, micro_batch=1)
    full = placement._full.copy()
    for step, micro, layer, need in ((3, 1, 0, "(3, 1, 0) on device 0 does not come after "
                                                "the last one (3, 1, 0)"),
                                     (3, 0, 5, "(3, 0, 5) on device 0 does not come after"),
                                     (2, 4, 0, "(2, 4, 0) on device 0 does not come after")):
        with pytest.raises(ValueError, match=need.replace("(", r"\(").replace(")", r"\)")):
            placement.submit(step, layer, counts, counts, micro_batch=micro)
    with pytest.raises(ValueError, match="micro_batch must be a non-negative integer, got -1"):
        placement.submit(4, 0, counts, counts, micro_batch=-1)
    # A recompute (a submit inside a backward pass) of a round whose forward never ran.
    errors: list[str] = []

    def recompute(grad: torch.Tensor) -> None:
        try:
            placement.submit(3, 1, counts, counts, micro_batch=1)
        except ValueError as err:
            errors.append(str(err))

    x = torch.ones(1, requires_grad=True)
    y = x * 2
    y.register_hook(recompute)
    y.sum().backward()
    assert errors and "recompute of round (step, micro_batch, layer) (3, 1, 1) on device 0: its " \
                      "forward never ran" in errors[0], errors
    assert sent == [(3, 1, 0)]
    assert np.array_equal(placement._full, full) and placement._last == (3, 1, 0)
