"""Adopting an expert placement on real gloo groups (4 processes; 8 with --runslow, the same
path on more ranks): experts and their Adam state move, routers are relabelled, and training
goes on exactly as without the move."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from netmoe.app.reference.model import ModelConfig, MoEGPT
from netmoe.client.dispatcher import Layout, TokenDispatcher
from netmoe.client.experts import ExpertTable, OriginalIds, adopt
from netmoe.client.planning import FixedPlan
from netmoe.round import SamplePlan
from netmoe.solver import Topology
from netmoe.solver.cost import device_counts

from support import gloo_group, short_and_long, spawn_ranks, train_step

SPD, STEPS, ADOPT_AT = 2, 5, 2


class Recorder:
    """Placement hook that keeps every rank's samples home and records the reported counts
    (routes per device when device_counts)."""

    def __init__(self, ep_size: int, device_counts: bool = False) -> None:
        self.ep_size, self.seen, self.device_counts = ep_size, [], device_counts

    def submit(self, step, layer, gather, scatter, micro_batch=0):
        self.seen.append((gather.clone(), None if scatter is None else scatter.clone()))

    def wait(self, ticket) -> FixedPlan:
        return FixedPlan(SamplePlan.no_move(self.ep_size, SPD))


def _adam(opt: torch.optim.Optimizer, expert: torch.nn.Module) -> list[torch.Tensor]:
    """fc1.weight, its exp_avg, exp_avg_sq and step (zeros if never stepped)."""
    w = expert.fc1.weight
    st = opt.state.get(w) or {"exp_avg": torch.zeros_like(w), "exp_avg_sq": torch.zeros_like(w),
                              "step": torch.zeros(())}
    return [w.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone(),
            st["step"].clone()]


def _worker(rank: int, port: int, world: int) -> None:
    with gloo_group(rank, world, port):
        cfg = ModelConfig(vocab=64, d_model=16, heads=2, layers=3, ffn=24, experts=2 * world,
                          top_k=2, seq_len=8)
        layout = Layout(rank, world, 2, cfg.experts, SPD, cfg.seq_len)
        disp = TokenDispatcher(layout)
        moved = MoEGPT(cfg, layout.local_experts, seed=3)
        still = MoEGPT(cfg, layout.local_experts, seed=3)
        opt_m = torch.optim.AdamW(moved.parameters(), lr=1e-2)
        opt_s = torch.optim.AdamW(still.parameters(), lr=1e-2)
        old = ExpertTable.identity(cfg.layers, cfg.experts, world)
        rng = np.random.default_rng(11)  # the same maps on every rank
        maps = np.stack([rng.permutation(np.arange(cfg.experts) // 2) for _ in range(cfg.layers)])
        new = old.relabel(maps)
        assert new.maps().tolist() == maps.tolist()
        table = old
        for step in range(STEPS):
            gen = torch.Generator().manual_seed(step)
            batch = torch.randint(0, cfg.vocab, (world * SPD, cfg.seq_len + 1), generator=gen)
            tokens = batch[rank * SPD:(rank + 1) * SPD]
            if step == ADOPT_AT:
                sent = adopt(moved.blocks, opt_m, old, new, rank)
                table = new
                leaving = sum(1 for layer in range(cfg.layers) for e in range(cfg.experts)
                              if old.label[layer][e] // 2 == rank and maps[layer][e] != rank)
                assert (sent > 0) == (leaving > 0), (sent, leaving)
                # The same function: counts by original id equal those of the unmoved model.
                rec_m, rec_s = Recorder(world), Recorder(world)
                rec_d = Recorder(world, device_counts=True)
                with torch.no_grad():
                    out_m = moved(tokens[:, :-1], disp, OriginalIds(rec_m, table)).logits
                    out_s = still(tokens[:, :-1], disp, rec_s).logits
                    moved(tokens[:, :-1], disp, OriginalIds(rec_d, table))
                torch.testing.assert_close(out_m, out_s, rtol=1e-5, atol=1e-6)
                for (gm, sm), (gs, ss) in zip(rec_m.seen, rec_s.seen, strict=True):
                    assert torch.equal(gm, gs)
                    assert (sm is None and ss is None) or torch.equal(sm, ss)
                # Routes per device: the counts by original id summed under the new maps.
                topos = [Topology(world // 2, 2, cfg.experts, m) for m in maps]
                for layer, ((gd, sd), (gs, ss)) in enumerate(zip(rec_d.seen, rec_s.seen,
                                                                 strict=True)):
                    assert gd.tolist() == device_counts(topos[layer], gs.numpy()).tolist()
                    assert (sd is None and ss is None) or (
                        sd.tolist() == device_counts(topos[layer + 1], ss.numpy()).tolist())
                # Expert e now sits on rank maps[l][e] under its new label, Adam state included.
                for layer in range(cfg.layers):
                    theirs = [None] * world
                    dist.all_gather_object(theirs, {
                        int(label): _adam(opt_s, ex) for label, ex in
                        still.blocks[layer].moe.experts.items()})
                    merged = {e: v for part in theirs for e, v in part.items()}
                    for e in range(cfg.experts):
                        if maps[layer][e] == rank:
                            here = moved.blocks[layer].moe.experts[str(new.label[layer][e])]
                            for got, want in zip(_adam(opt_m, here), merged[e], strict=True):
                                torch.testing.assert_close(got, want, rtol=0, atol=0)
            loss_m = train_step(moved, opt_m, disp, tokens, world)
            loss_s = train_step(still, opt_s, disp, tokens, world)
            assert abs(loss_m - loss_s) <= 1e-5 * abs(loss_s), (step, loss_m, loss_s)
        # After training on, every expert's parameters match the unmoved run's (by original id);
        # Adam divides by sqrt(exp_avg_sq), which magnifies summation-order noise of tiny grads.
        for layer in range(cfg.layers):
            mine_m = {e: moved.blocks[layer].moe.experts[str(new.label[layer][e])]
                      for e in range(cfg.experts) if maps[layer][e] == rank}
            got = [None] * world
            dist.all_gather_object(got, {e: m.fc2.weight.detach().clone()
                                         for e, m in mine_m.items()})
            merged = {e: w for part in got for e, w in part.items()}
            for label, expert in still.blocks[layer].moe.experts.items():
                torch.testing.assert_close(merged[int(label)], expert.fc2.weight.detach(),
                                           rtol=1e-3, atol=1e-4)


@short_and_long("world", 4, 8)
def test_adopting_expert_maps_keeps_training_identical(world: int) -> None:
    spawn_ranks(_worker, world, world)


def test_relabel_keeps_staying_experts_and_names_bad_maps() -> None:
    old = ExpertTable.identity(1, 8, 4)
    new = old.relabel([[1, 0, 1, 0, 2, 2, 3, 3]])
    assert new.maps().tolist() == [[1, 0, 1, 0, 2, 2, 3, 3]]
    assert new.label[0][4:] == (4, 5, 6, 7)  # stayed: same labels
    with pytest.raises(ValueError, match=r"maps\[0\] must put 2 experts on each of the 4"):
        old.relabel([[0, 0, 0, 1, 2, 2, 3, 3]])
    with pytest.raises(ValueError, match=r"maps must be \[1, 8\] integer devices"):
        old.relabel([[0.5] * 8])
