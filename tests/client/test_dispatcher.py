"""Token dispatcher on real gloo process groups (4 processes, 2 nodes x 2 devices).

Every rank checks its combine output and its gradients against a closed form computed from all
ranks' inputs, which every rank can regenerate from the seeds. With ``Placement`` offers, the
combine settles the plan in its one control exchange: the test counts every collective issued.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import pytest
import torch
import torch.distributed as dist

from netmoe.client.dispatcher import CommStats, Layout, TokenDispatcher, move_samples
from netmoe.client.histogram import route_counts, token_samples
from netmoe.client.layer import ExpertParallel
from netmoe.client.planning import FixedPlan, Placement, RandomPlans
from netmoe.round import RankPlan, SamplePlan

from support import gloo_group, spawn_ranks

WORLD, GPUS, EXPERTS, SAMPLES, SEQ, D, K = 4, 2, 8, 3, 5, 6, 2


def _inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    t = SAMPLES * SEQ
    h = torch.randn(t, D, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:K] for _ in range(t)])
    w = torch.rand(t, K, generator=gen, dtype=torch.float64)
    return h, ids, w


def _expected(rows: list[int]) -> torch.Tensor:
    """Hidden state of the given global rows: h + sum_k w_k * (e_k + 1) * h."""
    out = []
    for row in rows:
        h, ids, w = _inputs(row // SAMPLES)
        sl = slice((row % SAMPLES) * SEQ, (row % SAMPLES + 1) * SEQ)
        scale = 1 + (w[sl] * (ids[sl] + 1)).sum(dim=1, keepdim=True)
        out.append(h[sl] * scale)
    return torch.cat(out)


def _worker(rank: int, port: int) -> None:
    with gloo_group(rank, WORLD, port):
        layout = Layout(rank, WORLD, GPUS, EXPERTS, SAMPLES, SEQ)
        disp = TokenDispatcher(layout)
        rng = np.random.default_rng(7)
        plans = [
            SamplePlan.no_move(WORLD, SAMPLES),
            SamplePlan(tuple(rng.permutation(np.arange(WORLD * SAMPLES) // SAMPLES)), WORLD),
        ]
        for plan in plans:
            h, ids, w = _inputs(rank)
            h.requires_grad_(True)
            w.requires_grad_(True)
            routes = disp.dispatch(0, h, ids, w)
            # "Expert" e multiplies by e + 1; residual on each token's first slot.
            y = routes.x * (routes.expert + 1).unsqueeze(1).double()
            out = routes.weight.unsqueeze(1) * y + routes.first.unsqueeze(1) * routes.x
            got, applied = disp.combine(0, out, routes, FixedPlan(plan))
            assert applied is plan
            holds = plan.rows_held(rank).tolist()
            torch.testing.assert_close(got, _expected(holds))
            # Backward: loss = sum(got * g) with g = global row id + 1 per token.
            g = torch.tensor(holds, dtype=torch.float64).repeat_interleave(SEQ).unsqueeze(1) + 1
            (got * g).sum().backward()
            my_g = torch.arange(rank * SAMPLES, (rank + 1) * SAMPLES, dtype=torch.float64)
            my_g = (my_g + 1).repeat_interleave(SEQ).unsqueeze(1)
            scale = 1 + (w.detach() * (ids + 1)).sum(dim=1, keepdim=True)
            torch.testing.assert_close(h.grad, my_g * scale.expand(-1, D))
            want_w = (my_g * h.detach()).sum(dim=1, keepdim=True) * (ids + 1)
            torch.testing.assert_close(w.grad, want_w.double())
            labels = torch.arange(rank * SAMPLES, (rank + 1) * SAMPLES).unsqueeze(1).repeat(1, 2)
            moved = move_samples(labels, plan, rank)
            assert moved[:, 0].tolist() == holds, (moved, holds)
        # A corrupted plan view must be caught on every rank, not silently mix tokens.
        h, ids, w = _inputs(rank)
        routes = disp.dispatch(1, h, ids, w)
        bad = plans[1] if rank == 0 else plans[0]
        try:
            disp.combine(1, routes.x, routes, FixedPlan(bad))
        except RuntimeError as err:
            assert "ranks apply different plans" in str(err)
        else:
            raise AssertionError(f"rank {rank}: inconsistent plans were not detected")


COLLECTIVES = ("all_to_all_single", "all_gather", "all_gather_object", "all_reduce", "barrier",
               "broadcast", "gather", "scatter", "reduce_scatter", "send", "recv")


def _count_collectives() -> Counter[str]:
    """Counts every torch.distributed collective this process issues from now on (each call
    still runs for real)."""
    calls: Counter[str] = Counter()

    def counted(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            calls[name] += 1
            return fn(*args, **kwargs)

        return call

    for name in COLLECTIVES:
        setattr(dist, name, counted(name, getattr(dist, name)))
    return calls


class _Late:
    """A plan source whose replies never arrive: Placement must time out into "no move"."""

    def submit(self, *args: object, **kwargs: object) -> Future[RankPlan | None]:
        return Future()


def _agreement_worker(rank: int, port: int) -> None:
    with gloo_group(rank, WORLD, port):
        comm = CommStats()
        disp = TokenDispatcher(Layout(rank, WORLD, GPUS, EXPERTS, SAMPLES, SEQ), comm)
        calls = _count_collectives()
        for step, late_rank in enumerate((None, 2)):
            source = _Late() if rank == late_rank else RandomPlans(rank, WORLD, SAMPLES, seed=5)
            placement = Placement(source, rank, WORLD, SAMPLES, timeout=0.3)
            h, ids, w = _inputs(rank)
            gather = route_counts(ids, token_samples(SAMPLES, SEQ), SAMPLES, EXPERTS)
            calls.clear()
            ticket = placement.submit(step, 0, gather, None)
            routes = disp.dispatch(0, h, ids, w)
            out = routes.weight.unsqueeze(1) * routes.x * (routes.expert + 1).unsqueeze(1)
            got, plan = disp.combine(0, out + routes.first.unsqueeze(1) * routes.x, routes,
                                     placement.wait(ticket))  # fmt: skip
            # Dispatch: split sizes, metadata, hidden states, router weights; combine: ONE control
            # exchange (agreement and split sizes together), metadata, payload. Placement issues
            # none of its own.
            assert sum(calls.values()) == 7, calls
            assert comm.control_calls[(0, "combine")] == step + 1, comm.control_calls
            torch.testing.assert_close(got, _expected(plan.rows_held(rank).tolist()))
            seen: list[object] = [None] * WORLD
            dist.all_gather_object(seen, plan.fingerprint())
            assert len(set(seen)) == 1, seen  # every rank applied the same plan
            st = placement.stats
            if late_rank is None:
                assert plan.moves and st.plans == 1 and st.fallbacks == 0
            else:  # one rank without a plan: every rank falls back, none raises
                assert not plan.moves and st.plans == 0 and st.fallbacks == 1
                reason = "timeout" if rank == late_rank else "peer fallback"
                assert st.reasons == Counter({reason: 1}), st.reasons
            assert 0 <= st.reply_seconds <= st.wait_seconds


def test_dispatch_combine_values_gradients_and_move_samples() -> None:
    spawn_ranks(_worker, WORLD)


def test_combine_settles_the_plan_in_its_one_control_exchange_and_falls_back_together() -> None:
    spawn_ranks(_agreement_worker, WORLD)


def test_layout_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="experts=6 is not divisible by ep_size=4"):
        Layout(0, 4, 2, 6, 1, 1)
    with pytest.raises(ValueError, match=r"device must lie in \[0, 4\), got 4"):
        Layout(4, 4, 2, 8, 1, 1)


def _mixed_precision_worker(rank: int, port: int) -> None:
    with gloo_group(rank, 2, port):
        layout = Layout(rank, 2, 2, EXPERTS, SAMPLES, SEQ)
        disp = TokenDispatcher(layout)
        h64, ids, w64 = _inputs(rank)
        h = h64.to(torch.bfloat16).requires_grad_(True)
        w = w64.float().requires_grad_(True)  # fp32 router weights on bf16 hidden states
        routes = disp.dispatch(0, h, ids, w)
        assert (routes.x.dtype, routes.weight.dtype) == (torch.bfloat16, torch.float32)
        # The weights' exact fp32 values arrive (not rounded to bf16 on the way).
        sent = sorted(w.detach().reshape(-1).tolist())
        seen: list[object] = [None, None]
        dist.all_gather_object(seen, (sent, routes.weight.detach().tolist()))
        assert sorted(seen[0][0] + seen[1][0]) == sorted(seen[0][1] + seen[1][1])
        out = ExpertParallel.expert_outputs(routes, {e: (lambda x, e=e: x * (e + 1))
                                                     for e in layout.local_experts})
        assert out.dtype == torch.bfloat16
        got, _ = disp.combine(0, out, routes, FixedPlan(SamplePlan.no_move(2, SAMPLES)))
        assert got.dtype == torch.bfloat16
        scale = 1 + (w64 * (ids + 1)).sum(dim=1, keepdim=True)
        torch.testing.assert_close(got.double(), h64 * scale, rtol=2e-2, atol=2e-2)
        got.float().sum().backward()
        assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
        # Bytes per route: D x 2 for the state, plus int64 metadata (expert, token, slot) and
        # the fp32 weight in the dispatch; D x 2 plus (token, first slot) in the combine.
        st = disp.stats
        assert st.bytes_per_route("dispatch") == D * 2 + 3 * 8 + 4, st.sent_bytes
        assert st.bytes_per_route("combine") == D * 2 + 2 * 8, st.sent_bytes


def test_bf16_states_keep_their_dtype_on_the_wire_and_fp32_weights_their_precision() -> None:
    spawn_ranks(_mixed_precision_worker, 2)


# Expert copies in force: expert 0 (home device 0) is also served by device 2 for node 1's
# samples, expert 6 (home 3) by device 1 for node 0's, and hot expert 2 (home 1) splits: device 0
# serves its own samples' routes to it. table[e, d]: the device serving expert e for device d.
HOME = (torch.arange(EXPERTS) // (EXPERTS // WORLD)).view(-1, 1)
TABLE = HOME.repeat(1, WORLD)
TABLE[0, 2:] = 2
TABLE[6, :2] = 1
TABLE[2, 0] = 0


def _table_worker(rank: int, port: int) -> None:
    with gloo_group(rank, WORLD, port):
        layout = Layout(rank, WORLD, GPUS, EXPERTS, SAMPLES, SEQ)
        disp = TokenDispatcher(layout)
        disp.route_tables = {0: TABLE}
        h, ids, w = _inputs(rank)
        routes = disp.dispatch(0, h, ids, w)
        want = torch.bincount(TABLE[ids.reshape(-1), rank], minlength=WORLD)
        assert torch.equal(torch.as_tensor(disp.stats.routes[(0, "dispatch")]), want)
        # Every route arrives at the device its sender's table column names.
        assert torch.equal(TABLE[routes.expert, routes.src_rank],
                           torch.full_like(routes.expert, rank))
        # Any holder computes the same expert: the result is the no-copy closed form.
        out = ExpertParallel.expert_outputs(routes, {e: (lambda x, e=e: x * (e + 1))
                                                     for e in range(EXPERTS)})
        got, _ = disp.combine(0, out, routes, FixedPlan(SamplePlan.no_move(WORLD, SAMPLES)))
        torch.testing.assert_close(got, _expected(list(range(rank * SAMPLES,
                                                             (rank + 1) * SAMPLES))))


def test_dispatch_sends_each_route_to_the_holder_its_route_table_names() -> None:
    # The table moves routes off their home device, so a dispatcher ignoring it fails here.
    assert (TABLE != HOME).any()
    spawn_ranks(_table_worker, WORLD)
