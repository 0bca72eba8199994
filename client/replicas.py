"""Expert copies in a training job: create and drop them, route to them, keep them identical.

A copy is a full replica of one expert (parameters and optimizer state) on another rank, under the
expert's label (see netmoe.client.experts: labels are model slots, label a is owned by rank
a // (E / J)). With copies in force
  - the dispatcher sends each route to the copy on its sample's node when there is one, else to
    the owner (``TokenDispatcher.routes``, tables from ``route_tables``); the expert side computes
    every label it holds, so the combine returns the outputs from wherever they were computed;
  - after backward, ``sync_grads`` sums each replicated label's gradient over its holders only:
    one bucketed all-reduce per distinct holder set (all layers' labels held by exactly those
    ranks), in that set's own process group, so a rank moves bytes only for the labels it holds
    and owner and copies take the same optimizer step and stay bit-identical;
  - ``CopyGroups`` keeps those process groups: ``update`` (at adopt time) creates the holder sets
    new to a CopyTable and destroys those no longer needed, ``close`` destroys them all;
  - ``adopt_copies`` creates new copies from their owners (one all_to_all_single per layer) and
    drops old ones, optimizer state included.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from netmoe.client.experts import ExpertTable, expert_tensors
from netmoe.round import copy_route_table

Copies = tuple[tuple[tuple[int, int], ...], ...]  # [L] sorted (label, rank) copies


@dataclass(frozen=True)
class CopyTable:
    """copies[l]: sorted (label, rank) copies of layer l, never on the label's owner rank.
    ep_size: J devices of the expert-parallel group, gpus_per_node: G, experts: E labels per
    layer."""

    copies: Copies
    ep_size: int
    gpus_per_node: int
    experts: int

    def __post_init__(self) -> None:
        per = self.experts // self.ep_size
        for layer, pairs in enumerate(self.copies):
            if len(set(pairs)) != len(pairs):
                raise ValueError(f"copies[{layer}] lists a copy twice: {list(pairs)}")
            for label, rank in pairs:
                if not (0 <= label < self.experts and 0 <= rank < self.ep_size):
                    raise ValueError(f"copies[{layer}] has ({label}, {rank}): labels are "
                                     f"0..{self.experts - 1}, ranks 0..{self.ep_size - 1}")
                if label // per == rank:
                    raise ValueError(f"copies[{layer}] puts label {label} on its owner rank "
                                     f"{rank}")

    @classmethod
    def none(cls, layers: int, experts: int, ep_size: int, gpus_per_node: int) -> CopyTable:
        return cls(((),) * layers, ep_size, gpus_per_node, experts)

    @classmethod
    def from_original(cls, table: ExpertTable, copies: Sequence[Sequence[tuple[int, int]]],
                      gpus_per_node: int) -> CopyTable:
        """Copies named by original expert id (the service's) translated to labels."""
        if len(copies) != len(table.label):
            raise ValueError(f"copies must list {len(table.label)} layers, got {len(copies)}")
        return cls(tuple(tuple(sorted((table.label[layer][e], d) for e, d in pairs))
                         for layer, pairs in enumerate(copies)),
                   table.ep_size, gpus_per_node, len(table.label[0]))

    def holders(self, layer: int) -> np.ndarray:
        """[E, J] bool: owner and copies of each label."""
        per = self.experts // self.ep_size
        out = np.zeros((self.experts, self.ep_size), dtype=bool)
        out[np.arange(self.experts), np.arange(self.experts) // per] = True
        for label, rank in self.copies[layer]:
            out[label, rank] = True
        return out

    def holder_sets(self) -> dict[tuple[int, ...], tuple[tuple[int, int], ...]]:
        """The replicated labels of all layers grouped by their holders: sorted holder ranks ->
        sorted (layer, label) entries; keys in sorted order (the order every rank syncs them)."""
        sets: dict[tuple[int, ...], list[tuple[int, int]]] = defaultdict(list)
        for layer, pairs in enumerate(self.copies):
            held = self.holders(layer)
            for label in sorted({label for label, _ in pairs}):
                sets[tuple(np.flatnonzero(held[label]).tolist())].append((layer, label))
        return {ranks: tuple(sets[ranks]) for ranks in sorted(sets)}


def route_tables(copies: CopyTable) -> dict[int, torch.Tensor]:
    """For TokenDispatcher.routes: layer -> [E, J] int64 rank serving label a for a sample on
    rank d, for the layers that have copies. Pure numpy: no solver (OR-Tools) on the client."""
    owners = np.arange(copies.experts) // (copies.experts // copies.ep_size)
    return {layer: torch.as_tensor(copy_route_table(copies.holders(layer), owners,
                                                    copies.gpus_per_node))
            for layer, pairs in enumerate(copies.copies) if pairs}


def _group_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    return next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))


def adopt_copies(
    blocks: nn.ModuleList,
    optimizer: torch.optim.Optimizer | None,
    old: CopyTable,
    new: CopyTable,
    device: int,
    group: dist.ProcessGroup | None = None,
) -> int:
    """Creates the copies new has and old lacks, from their owners, and drops those old has and
    new lacks (collective: all ranks call it with the same tables). A created copy gets its
    owner's parameters and Adam state, in the owner's optimizer group settings; a dropped one
    leaves the model and the optimizer. blocks: block l has .moe.experts (ModuleDict by label).
    Returns the bytes this rank sent."""
    per = new.experts // new.ep_size
    sent_bytes = 0
    for layer, block in enumerate(blocks):
        experts = block.moe.experts
        before, after = set(old.copies[layer]), set(new.copies[layer])
        for label, where in sorted(before - after):
            if where == device:
                module = experts[str(label)]
                if optimizer is not None:
                    for p in module.parameters():
                        g = _group_of(optimizer, p)
                        g["params"] = [q for q in g["params"] if q is not p]
                        optimizer.state.pop(p, None)
                    optimizer.param_groups[:] = [g for g in optimizer.param_groups
                                                 if g["params"]]
                del experts[str(label)]
        created = sorted(after - before, key=lambda c: (c[0] // per, c[1], c[0]))
        if not created:
            continue
        template = experts[next(iter(experts.keys()))]
        size = sum(t.numel() for t in expert_tensors(template, optimizer))
        mine = sorted((c for c in created if c[0] // per == device), key=lambda c: (c[1], c[0]))
        send = torch.stack([
            torch.cat([t.reshape(-1).to(torch.float64)
                       for t in expert_tensors(experts[str(label)], optimizer)])
            for label, _ in mine
        ]) if mine else torch.zeros((0, size), dtype=torch.float64)
        send_splits = np.bincount([d for _, d in mine], minlength=new.ep_size).tolist()
        incoming = sorted((c for c in created if c[1] == device), key=lambda c: (c[0] // per, c[0]))
        recv_splits = np.bincount([a // per for a, _ in incoming], minlength=new.ep_size).tolist()
        recv = send.new_empty((len(incoming), size))
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
        sent_bytes += len(mine) * sum(t.numel() * t.element_size()
                                      for t in expert_tensors(template, optimizer))
        for row, (label, _) in enumerate(incoming):
            module = copy.deepcopy(template)
            for p in module.parameters():
                p.grad = None  # deepcopy carries the template's gradient along
            experts[str(label)] = module
            if optimizer is not None:
                settings = {k: v for k, v in _group_of(optimizer, next(template.parameters()))
                            .items() if k != "params"}
                optimizer.add_param_group({"params": list(module.parameters()), **settings})
            offset = 0
            for t in expert_tensors(module, optimizer):
                t.copy_(recv[row, offset:offset + t.numel()].view_as(t).to(t.dtype))
                offset += t.numel()
    return sent_bytes


class CopyGroups:
    """The process groups of sync_grads: one per distinct holder set of the CopyTable in force,
    cached by its tuple of global ranks (a plain cache, not a plan: it owns process groups).

    group: the ranks the tables' ranks are ranks of (a sub-world such as an EP group; None: the
    default group). timeout: of each created group's collectives (None: the backend's default).
    """

    def __init__(self, group: dist.ProcessGroup | None = None,
                 timeout: timedelta | None = None) -> None:
        self.group = group
        self.timeout = timeout
        # Global holder ranks -> their group (GroupMember.NON_GROUP_MEMBER on other ranks).
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        # This rank's buckets under `copies`: (holders' group, their (layer, label) entries).
        self.buckets: tuple[tuple[dist.ProcessGroup, tuple[tuple[int, int], ...]], ...] = ()

    @property
    def by_ranks(self) -> dict[tuple[int, ...], dist.ProcessGroup]:
        """The live groups by holder set (sorted tuples of global ranks), in sorted order."""
        return dict(sorted(self._groups.items()))

    def update(self, copies: CopyTable) -> None:
        """Makes the groups those of `copies`: creates the holder sets new to it and destroys
        those no longer needed. Collective over the default group (dist.new_group is): every
        rank of the job calls it, each with the table of its own `group`; every rank creates
        the union of all ranks' holder sets in one sorted order."""
        world_ranks = dist.get_process_group_ranks(self.group)  # group rank -> global rank
        if len(world_ranks) != copies.ep_size:
            raise ValueError(f"copies.ep_size={copies.ep_size} but the group has "
                             f"{len(world_ranks)} ranks")
        sets = {tuple(world_ranks[r] for r in ranks): entries
                for ranks, entries in copies.holder_sets().items()}
        everyone: list[list[tuple[int, ...]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, sorted(sets))
        needed = sorted({ranks for theirs in everyone for ranks in theirs or ()})
        for ranks in sorted(set(self._groups) - set(needed)):
            dist.destroy_process_group(self._groups.pop(ranks))
        for ranks in needed:
            if ranks not in self._groups:
                # No group_desc: torch < 2.4 (the package takes >= 2.1) does not know it.
                self._groups[ranks] = dist.new_group(list(ranks), timeout=self.timeout)
        me = dist.get_rank()
        self.buckets = tuple((self._groups[ranks], entries) for ranks, entries in sets.items()
                             if me in ranks)

    def close(self) -> None:
        """Destroys every group (local; idempotent)."""
        for ranks in sorted(self._groups):
            dist.destroy_process_group(self._groups.pop(ranks))
        self.buckets = ()

    def __enter__(self) -> CopyGroups:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def sync_grads(blocks: nn.ModuleList, groups: CopyGroups) -> None:
    """Sums each replicated label's parameter gradients over its holders, in place: one
    all-reduce per holder set this rank belongs to (groups.buckets, after groups.update), over
    that set's group; a rank holding none of the replicated labels makes no call. Collective
    among each set's holders.

    A bucket is 1-D, in the gradients' dtype and device: per (layer, label) entry its
    parameters' gradients flattened, then 1 if this holder has them all (else zeros and 0). That
    count keeps a label no route reached with grad None on every holder, as without copies.
    blocks: block l has .moe.experts (ModuleDict by label).
    """
    for group, entries in groups.buckets:
        modules = [blocks[layer].moe.experts[str(label)] for layer, label in entries]
        parts, count_at, size = [], [], 0
        for module in modules:
            params = list(module.parameters())
            have = all(p.grad is not None for p in params)
            parts.extend(p.grad.reshape(-1) if have else p.new_zeros(p.numel()) for p in params)
            parts.append(params[0].new_full((1,), float(have)))
            size += sum(p.numel() for p in params) + 1
            count_at.append(size - 1)
        bucket = torch.cat(parts)
        dist.all_reduce(bucket, group=group)
        counts = bucket[count_at].tolist()  # one device-to-host copy per bucket
        offset = 0
        for module, count in zip(modules, counts, strict=True):
            for p in module.parameters():
                if count:
                    value = bucket[offset:offset + p.numel()].view_as(p)
                    if p.grad is None:
                        p.grad = value.clone()
                    else:
                        p.grad.copy_(value)
                offset += p.numel()
            offset += 1
