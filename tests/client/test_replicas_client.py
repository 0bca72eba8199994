"""Expert copies on real gloo groups (4 and 8 processes, 2 ranks per node): created and dropped
with their Adam state, routes served by the copy on their sample's node, gradients summed over
the copies; training equals a run without copies and copies stay bit-identical to their owners."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from netmoe.client.dispatcher import CommStats, Layout, TokenDispatcher
from netmoe.client.experts import ExpertTable
from netmoe.client.replicas import CopyTable, adopt_copies, route_tables
from netmoe.reference.model import ModelConfig, MoEGPT

from support import gloo_group, spawn_ranks, train_step

GPUS, SPD, STEPS, ADOPT_AT, CHANGE_AT = 2, 2, 6, 1, 4
# Two labels per rank: labels 0..3 live on node 0 (ranks 0, 1), 4..7 on node 1. Layer 0 first
# copies every node-0 label onto node 1 (ranks 2, 3), so no route from node 1 goes to node 0;
# later it keeps one copy, and layer 1 swaps its copy for another.
FIRST = (((0, 2), (1, 2), (2, 3), (3, 3)), ((5, 0),), ())
LATER = (((0, 2),), ((6, 1),), ())


def _check_copies_identical(model, opt, copies: CopyTable, world: int) -> None:
    """Every holder of a replicated label has the same parameters and Adam state, bit for bit."""
    mine = {}
    for layer, block in enumerate(model.blocks):
        for label in {a for a, _ in copies.copies[layer]}:
            if str(label) in block.moe.experts:
                module = block.moe.experts[str(label)]
                mine[(layer, label)] = [t.detach().clone() for p in module.parameters()
                                        for t in (p, opt.state[p]["exp_avg"],
                                                  opt.state[p]["exp_avg_sq"])]
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    for layer, pairs in enumerate(copies.copies):
        for label, where in pairs:
            owner = everyone[label // 2][(layer, label)]
            copy = everyone[where][(layer, label)]
            assert all(torch.equal(a, b) for a, b in zip(owner, copy, strict=True)), (layer, label)


def _worker(rank: int, port: int, world: int) -> None:
    with gloo_group(rank, world, port):
        cfg = ModelConfig(vocab=64, d_model=16, heads=2, layers=3, ffn=24, experts=2 * world,
                          top_k=2, seq_len=8)
        layout = Layout(rank, world, GPUS, cfg.experts, SPD, cfg.seq_len)
        plain_disp, disp = TokenDispatcher(layout), TokenDispatcher(layout, CommStats())
        plain = MoEGPT(cfg, layout.local_experts, seed=5)
        model = MoEGPT(cfg, layout.local_experts, seed=5)
        opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-2)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        table = ExpertTable.identity(cfg.layers, cfg.experts, world)
        copies = CopyTable.none(cfg.layers, cfg.experts, world, GPUS)
        for step in range(STEPS):
            if step in (ADOPT_AT, CHANGE_AT):
                new = CopyTable.from_original(table, FIRST if step == ADOPT_AT else LATER, GPUS)
                sent = adopt_copies(model.blocks, opt, copies, new, rank)
                created = set(new.copies[0] + new.copies[1]) - set(copies.copies[0]
                                                                   + copies.copies[1])
                assert (sent > 0) == any(a // 2 == rank for a, _ in created)
                copies = new
                disp.route_tables = route_tables(copies)
                _check_copies_identical(model, opt, copies, world)
                # The optimizer tracks exactly the model's parameters.
                tracked = {id(p) for g in opt.param_groups for p in g["params"]}
                assert tracked == {id(p) for p in model.parameters()}
                assert set(map(id, opt.state)) <= tracked
                held = {int(k) for k in model.blocks[0].moe.experts}
                want = set(layout.local_experts) | {a for a, r in copies.copies[0] if r == rank}
                assert held == want
            gen = torch.Generator().manual_seed(step)
            batch = torch.randint(0, cfg.vocab, (world * SPD, cfg.seq_len + 1), generator=gen)
            tokens = batch[rank * SPD:(rank + 1) * SPD]
            sent_before = disp.stats.routes.get((0, "dispatch"), np.zeros(world, np.int64))
            loss = train_step(model, opt, disp, tokens, world, copies=copies)
            loss_p = train_step(plain, opt_p, plain_disp, tokens, world)
            assert abs(loss - loss_p) <= 1e-5 * abs(loss_p), (step, loss, loss_p)
            _check_copies_identical(model, opt, copies, world)
            sent = disp.stats.routes[(0, "dispatch")] - sent_before
            if ADOPT_AT <= step < CHANGE_AT and rank // GPUS == 1:
                assert sent[:GPUS].sum() == 0, sent  # every node-0 label has a copy here
            assert sent.sum() == SPD * cfg.seq_len * cfg.top_k


@pytest.mark.parametrize("world", [4, 8])
def test_copies_keep_training_identical_and_stay_bit_identical(world: int) -> None:
    spawn_ranks(_worker, world, world)


def test_copy_table_names_bad_copies() -> None:
    with pytest.raises(ValueError, match=r"copies\[0\] puts label 1 on its owner rank 0"):
        CopyTable((((1, 0),),), 4, 2, 8)
    with pytest.raises(ValueError, match=r"copies\[0\] has \(9, 1\): labels are 0..7"):
        CopyTable((((9, 1),),), 4, 2, 8)
    with pytest.raises(ValueError, match="lists a copy twice"):
        CopyTable((((0, 2), (0, 2)),), 4, 2, 8)
    table = ExpertTable.identity(1, 8, 4).relabel([[1, 1, 0, 0, 2, 2, 3, 3]])
    # Original expert 0 now holds a label of rank 1.
    got = CopyTable.from_original(table, [[(0, 3)]], 2)
    assert got.copies == ((((table.label[0][0]), 3),),)
    tables = route_tables(got)
    label = table.label[0][0]
    assert tables[0][label].tolist() == [1, 1, 3, 3]  # node 1's samples use the copy on 3
