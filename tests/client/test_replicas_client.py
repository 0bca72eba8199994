"""Expert copies on real gloo groups (4 processes, 2 ranks per node; 8 with --runslow, whose
ranks 4..7 hold no replicated label as rank 1 already does in 4): created and dropped
with their Adam state, routes served by the copy on their sample's node, gradients summed among
each label's holders only (their own process groups; ranks holding no replicated label skip the
sync entirely); training equals a run without copies and copies stay bit-identical to their
owners."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from netmoe.app.reference.model import ModelConfig, MoEGPT
from netmoe.client.dispatcher import CommStats, Layout, TokenDispatcher
from netmoe.client.experts import ExpertTable
from netmoe.client.replicas import CopyGroups, CopyTable, adopt_copies, route_tables, sync_grads

from support import gloo_group, short_and_long, spawn_ranks, train_step

GPUS, SPD, STEPS, ADOPT_AT, CHANGE_AT = 2, 2, 6, 1, 4
# Two labels per rank: labels 0..3 live on node 0 (ranks 0, 1), 4..7 on node 1. Layer 0 first
# copies every node-0 label onto node 1 (ranks 2, 3), so no route from node 1 goes to node 0;
# later it keeps one copy, and layer 1 swaps its copy for another. Holder sets (owner + copies,
# all layers together): first {0, 2} (labels 0, 1 and layer 1's 5) and {1, 3}; later {0, 2} and
# {0, 3}, so {1, 3} goes, and rank 1 (and ranks 4..7 of 8) hold no replicated label at all.
FIRST = (((0, 2), (1, 2), (2, 3), (3, 3)), ((5, 0),), ())
LATER = (((0, 2),), ((6, 0),), ())
SETS = {"first": ((0, 2), (1, 3)), "later": ((0, 2), (0, 3))}
# A collective waiting for a rank that never comes (a sync not among holders only) fails.
TIMEOUT = timedelta(seconds=90)


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


def _holds_any(copies: CopyTable, rank: int) -> bool:
    return any(copies.holders(layer)[label, rank]
               for layer, pairs in enumerate(copies.copies) for label, _ in pairs)


def _worker(rank: int, port: int, world: int) -> None:
    with gloo_group(rank, world, port, TIMEOUT), CopyGroups(timeout=TIMEOUT) as groups:
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
                before = groups.by_ranks
                groups.update(new)
                _check_groups(groups, before, SETS["first" if step == ADOPT_AT else "later"],
                              rank)
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
            # A rank holding no replicated label skips the sync: a collective involving it
            # would wait for it (and time out).
            mine = groups if _holds_any(copies, rank) else None
            loss = train_step(model, opt, disp, tokens, world, copy_groups=mine)
            loss_p = train_step(plain, opt_p, plain_disp, tokens, world)
            assert abs(loss - loss_p) <= 1e-5 * abs(loss_p), (step, loss, loss_p)
            _check_copies_identical(model, opt, copies, world)
            sent = disp.stats.routes[(0, "dispatch")] - sent_before
            if ADOPT_AT <= step < CHANGE_AT and rank // GPUS == 1:
                assert sent[:GPUS].sum() == 0, sent  # every node-0 label has a copy here
            assert sent.sum() == SPD * cfg.seq_len * cfg.top_k
        assert (rank == 1 or rank >= 4) == (not _holds_any(copies, rank))


def _check_groups(groups: CopyGroups, before: dict, want: tuple, rank: int) -> None:
    """The groups are exactly the holder sets; one kept is the same group, one dropped is
    destroyed."""
    now = groups.by_ranks
    assert tuple(now) == want, (tuple(now), want)
    for ranks, pg in now.items():
        if rank in ranks:
            assert dist.get_process_group_ranks(pg) == list(ranks)
            assert pg is before.get(ranks, pg)  # kept, not created again
    for ranks in set(before) - set(now):
        if rank in ranks:
            with pytest.raises(KeyError):  # no longer registered: destroyed
                dist.get_process_group_ranks(before[ranks])


@short_and_long("world", 4, 8)
def test_copies_keep_training_identical_and_stay_bit_identical(world: int) -> None:
    spawn_ranks(_worker, world, world)


# Two expert-parallel groups of 4 (ranks 0..3 and 4..7, 2 per node, 8 labels), each with its own
# copies, in group ranks. Group 0: layer 0 copies labels 0 and 1 (owner 0) onto 2, layer 1 label
# 4 (owner 2) onto 0, layer 2 label 0 onto 2 and 3: holders {0, 2} and {0, 2, 3}. Group 1:
# layer 0 label 6 (owner 3) onto 0, layer 1 labels 2 and 3 (owner 1) onto 3: holders {0, 3} and
# {1, 3}, globally {4, 7} and {5, 7}. Global ranks 1 and 6 hold no replicated label.
EP_COPIES = ((((0, 2), (1, 2)), ((4, 0),), ((0, 2), (0, 3))),
             (((6, 0),), ((2, 3), (3, 3)), ()))
EP_SETS = ((0, 2), (0, 2, 3), (4, 7), (5, 7))
NO_GRAD = {(0, 0, 1)}  # (EP group, layer, label) no holder has a gradient for
COPY_GRAD_ONLY = {(0, 1, 4)}  # only the copy (not the owner) has one


def _sub_world_worker(rank: int, port: int) -> None:
    with gloo_group(rank, 8, port, TIMEOUT):
        ep_groups = [dist.new_group([0, 1, 2, 3]), dist.new_group([4, 5, 6, 7])]
        ep = rank // 4
        me, group = rank % 4, ep_groups[ep]
        cfg = ModelConfig(vocab=32, d_model=8, heads=2, layers=3, ffn=8, experts=8, top_k=2,
                          seq_len=4)
        model = MoEGPT(cfg, range(2 * me, 2 * me + 2), seed=3)
        none = CopyTable.none(cfg.layers, cfg.experts, 4, GPUS)
        copies = CopyTable(EP_COPIES[ep], 4, GPUS, cfg.experts)
        adopt_copies(model.blocks, None, none, copies, me, group=group)
        with CopyGroups(group, timeout=TIMEOUT) as groups:
            groups.update(copies)
            assert tuple(groups.by_ranks) == EP_SETS  # every rank has every set's group
            # Gradient 2^rank on every expert this rank holds (but the cases above), so a sum
            # names exactly the ranks it came from.
            for layer, block in enumerate(model.blocks):
                for key, module in block.moe.experts.items():
                    label = int(key)
                    owner = label // 2 == me
                    skip = (ep, layer, label) in NO_GRAD or (
                        (ep, layer, label) in COPY_GRAD_ONLY and owner)
                    for p in module.parameters():
                        p.grad = None if skip else torch.full_like(p, float(2 ** rank))
            if _holds_any(copies, me):
                sync_grads(model.blocks, groups)
            else:
                assert not groups.buckets
            for layer, block in enumerate(model.blocks):
                held = copies.holders(layer)
                replicated = {a for a, _ in copies.copies[layer]}
                for key, module in block.moe.experts.items():
                    label = int(key)
                    holders = np.flatnonzero(held[label]) + 4 * ep
                    if (ep, layer, label) in NO_GRAD:
                        want = None
                    elif (ep, layer, label) in COPY_GRAD_ONLY:
                        want = float(sum(2 ** int(r) for r in holders if r % 4 != label // 2))
                    elif label in replicated:
                        want = float(sum(2 ** int(r) for r in holders))
                    else:
                        want = float(2 ** rank)  # not replicated in this layer: untouched
                    for p in module.parameters():
                        if want is None:
                            assert p.grad is None, (rank, layer, label)
                        else:
                            assert torch.equal(p.grad, torch.full_like(p, want)), (
                                rank, layer, label, p.grad.flatten()[0].item(), want)
        assert not groups.by_ranks and not groups.buckets  # closed
        for pg in ep_groups:
            dist.destroy_process_group(pg)


def test_sync_grads_sums_among_holders_only_in_sub_worlds() -> None:
    """8 ranks in two EP groups: each label's gradients summed over exactly its holders (the
    groups are the distinct holder sets, global ranks), labels without gradients stay None,
    and the ranks that hold none never call sync_grads."""
    spawn_ranks(_sub_world_worker, 8)


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


_NO_SOLVER_RANK = """
import os, sys
import torch, torch.distributed as dist
import torch.nn.functional as F
from netmoe.client.dispatcher import Layout, TokenDispatcher
from netmoe.client.experts import ExpertTable
from netmoe.client.replicas import CopyGroups, CopyTable, adopt_copies, route_tables, sync_grads
from netmoe.app.reference.model import ModelConfig, MoEGPT
rank, world = {rank}, 2
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}")
dist.init_process_group("gloo", rank=rank, world_size=world)
with CopyGroups() as groups:
    cfg = ModelConfig(vocab=32, d_model=8, heads=2, layers=2, ffn=8, experts=4, top_k=2,
                      seq_len=4)
    layout = Layout(rank, world, 1, cfg.experts, 2, cfg.seq_len)
    model = MoEGPT(cfg, layout.local_experts, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    old = CopyTable.none(cfg.layers, cfg.experts, world, 1)
    copies = CopyTable.from_original(ExpertTable.identity(cfg.layers, cfg.experts, world),
                                     [[(0, 1), (1, 1)], []], 1)  # rank 0's experts on node 1
    adopt_copies(model.blocks, opt, old, copies, rank)
    groups.update(copies)
    disp = TokenDispatcher(layout)
    disp.route_tables = route_tables(copies)
    tokens = torch.randint(0, cfg.vocab, (2, cfg.seq_len + 1),
                           generator=torch.Generator().manual_seed(rank))
    result = model(tokens[:, :-1], disp)
    F.cross_entropy(result.logits, tokens[:, 1:].reshape(-1)).backward()
    sync_grads(model.blocks, groups)
    opt.step()
    sent = disp.stats.routes[(0, "dispatch")]
    print("ok", rank, sent.tolist())
dist.barrier()
dist.destroy_process_group()
"""


def test_a_training_step_with_copies_runs_without_or_tools() -> None:
    """The trainer image (netmoe[client]) has no OR-Tools: copies in force must not need it."""
    from concurrent.futures import ThreadPoolExecutor

    from netmoe.app.reference.launch import free_port

    from support import run_without

    port = free_port()
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda r: run_without(
            ("ortools", "netmoe.solver"), _NO_SOLVER_RANK.format(rank=r, port=port)), range(2)))
    for rank, out in enumerate(runs):
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.startswith(f"ok {rank}"), out.stdout
    # Layer 0: node 1's samples send rank 0's experts' routes to their copies on rank 1.
    assert runs[1].stdout.split(" ", 2)[2].startswith("[0,"), runs[1].stdout
