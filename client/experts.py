"""Adopting a new expert placement: move experts and their optimizer state, relabel the routers.

The model keeps the default layout in *labels*: rank r holds the experts labelled
r * (E/J) .. (r+1) * (E/J) - 1, and the dispatcher sends label a to rank a // (E/J). An
`ExpertTable` says which expert (by its original id, the id the placement service knows) each
label holds, per layer. Adopting maps (device of each original expert, E/J per device) gives every
expert a new label on its new device; then
  - each rank's expert modules are overwritten in place (parameters, Adam exp_avg / exp_avg_sq and
    step) from the rank that held the expert, in one all_to_all_single per layer;
  - the replicated router's rows (and their Adam state) are permuted locally on every rank, so
    router output label b is the same expert as before: top-k picks the same experts with the same
    weights and the model computes the same function (up to float summation order).
Parameter objects never change, so the optimizer keeps working on them. `OriginalIds` wraps a
placement hook so the service keeps seeing route counts by original expert id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from netmoe.client.dispatcher import Agreement


@dataclass(frozen=True)
class ExpertTable:
    """label[l][e]: label (model slot) of original expert e in layer l ([L][E]); ep_size: J, the
    expert-parallel group's devices.

    The device of expert e is label // experts_per_device.
    """

    label: tuple[tuple[int, ...], ...]
    ep_size: int

    @classmethod
    def identity(cls, layers: int, experts: int, ep_size: int) -> ExpertTable:
        return cls(tuple(tuple(range(experts)) for _ in range(layers)), ep_size)

    @property
    def experts_per_device(self) -> int:
        return len(self.label[0]) // self.ep_size

    def originals(self) -> np.ndarray:
        """[L, E] int64: original expert id held by each label (the inverse of ``label``)."""
        return np.argsort(np.array(self.label, dtype=np.int64), axis=1)

    def maps(self) -> np.ndarray:
        """[L, E] int64: device of each original expert."""
        return np.array(self.label, dtype=np.int64) // self.experts_per_device

    def relabel(self, maps: object) -> ExpertTable:
        """The table placing original expert e of layer l on device maps[l][e] ([L, E] ints,
        E/J per device). Experts that stay keep their label; arrivals take the freed ones."""
        arr = np.asarray(maps)
        old = np.array(self.label, dtype=np.int64)
        per = self.experts_per_device
        if arr.shape != old.shape or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"maps must be [{old.shape[0]}, {old.shape[1]}] integer devices, "
                             f"got shape {arr.shape} dtype {arr.dtype}")
        labels = []
        for layer, m in enumerate(arr):
            have = np.bincount(m, minlength=self.ep_size) if m.min() >= 0 else None
            if have is None or m.max() >= self.ep_size or (have != per).any():
                raise ValueError(f"maps[{layer}] must put {per} experts on each of the "
                                 f"{self.ep_size} devices, got {m.tolist()}")
            new = np.where(old[layer] // per == m, old[layer], -1)
            for d in range(self.ep_size):
                free = sorted(set(range(d * per, (d + 1) * per)) - set(new[m == d].tolist()))
                arriving = np.flatnonzero((m == d) & (new < 0))
                new[arriving] = free
            labels.append(tuple(int(x) for x in new))
        return ExpertTable(tuple(labels), self.ep_size)


def _adam_state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    """p's Adam state; a parameter never stepped (an expert no token reached yet) gets the zero
    state Adam itself would create at its first step, so every expert moves the same tensors."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise ValueError(f"optimizer must be Adam or AdamW to move its state, got "
                         f"{type(optimizer).__name__}")
    state = optimizer.state[p]
    if not state:
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if any(g.get("amsgrad") for g in optimizer.param_groups):
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def expert_tensors(expert: nn.Module, optimizer: torch.optim.Optimizer | None
                    ) -> list[torch.Tensor]:
    """The tensors that define one expert's training state, in a fixed order: parameters, then
    per parameter its Adam state (exp_avg, exp_avg_sq, [max_exp_avg_sq,] step)."""
    out = [p.data for p in expert.parameters()]
    if optimizer is not None:
        for p in expert.parameters():
            state = _adam_state(optimizer, p)
            out.extend(state[k] for k in sorted(state))
    return out


def state_bytes(expert: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of one expert's parameters plus optimizer state: what `adopt` moves per expert
    (the migration cost the placement service weighs)."""
    return sum(t.numel() * t.element_size() for t in expert_tensors(expert, optimizer))


def adopt(
    blocks: nn.ModuleList,
    optimizer: torch.optim.Optimizer | None,
    old: ExpertTable,
    new: ExpertTable,
    device: int,
    group: dist.ProcessGroup | None = None,
) -> int:
    """Moves experts from old to new labels on every rank (collective: all ranks call it).

    blocks: the model's blocks; block l has .moe.experts (ModuleDict keyed by str(label), this
    rank's labels) and .moe.router (Linear, weight [E, D], replicated). Returns the bytes this
    rank sent to other ranks.
    """
    per, ep_size = old.experts_per_device, old.ep_size
    sent_bytes = 0
    for layer, block in enumerate(blocks):
        moe = block.moe
        a = np.array(old.label[layer], dtype=np.int64)  # old label of original expert e
        b = np.array(new.label[layer], dtype=np.int64)
        slots = [moe.experts[str(label)] for label in range(device * per, (device + 1) * per)]
        tensors = [expert_tensors(e, optimizer) for e in slots]
        flat = [torch.cat([t.reshape(-1).to(torch.float64) for t in ts]) for ts in tensors]
        size = flat[0].numel()
        # Send: this rank's experts (by old label order) grouped by destination rank.
        mine = [int(e) for e in np.argsort(a) if a[e] // per == device]
        mine.sort(key=lambda e: (b[e] // per, a[e]))
        send = torch.stack([flat[a[e] % per] for e in mine])
        send_splits = np.bincount(b[mine] // per, minlength=ep_size).tolist()
        # Receive: experts whose new label is here, by source rank then source old label.
        incoming = sorted((int(e) for e in range(len(a)) if b[e] // per == device),
                          key=lambda e: (a[e] // per, a[e]))
        recv_splits = np.bincount(a[incoming] // per, minlength=ep_size).tolist()
        recv = send.new_empty((len(incoming), size))
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
        leaving = sum(1 for e in mine if b[e] // per != device)
        sent_bytes += leaving * sum(t.numel() * t.element_size() for t in tensors[0])
        for row, e in enumerate(incoming):
            offset = 0
            for t in tensors[b[e] % per]:
                t.copy_(recv[row, offset:offset + t.numel()].view_as(t).to(t.dtype))
                offset += t.numel()
        # Router rows follow their experts: new row b[e] is old row a[e]; same for Adam state.
        perm = torch.empty(len(a), dtype=torch.int64)
        perm[torch.as_tensor(b)] = torch.as_tensor(a)
        weight = moe.router.weight
        with torch.no_grad():
            weight.copy_(weight[perm])
            state = optimizer.state.get(weight, {}) if optimizer is not None else {}
            for value in state.values():
                if torch.is_tensor(value) and value.dim() and value.shape[0] == len(a):
                    value.copy_(value[perm])
    return sent_bytes


class OriginalIds:
    """A placement hook (see netmoe.client.layer.PlacementHook) that reports route counts by
    original expert id: the model counts by label, the service knows the original ids.

    A device_counts hook gets its counts unchanged: label a lives on device a // (E / J)
    whichever expert it holds, so routes per device need no translation.
    """

    def __init__(self, hook: object, table: ExpertTable) -> None:
        self.hook, self.table = hook, table
        self.device_counts = bool(getattr(hook, "device_counts", False))

    def _by_id(self, layer: int, counts: torch.Tensor) -> torch.Tensor:
        return counts[:, torch.as_tensor(self.table.label[layer])]

    def submit(self, step: int, layer: int, gather: torch.Tensor,
               scatter: torch.Tensor | None, micro_batch: int = 0) -> object:
        """gather, scatter: [n, E] int64 counts by label of layer l and l+1 ([n, J] by device
        for a device_counts hook, passed on as they are)."""
        if not self.device_counts:
            gather = self._by_id(layer, gather)
            scatter = None if scatter is None else self._by_id(layer + 1, scatter)
        return self.hook.submit(step, layer, gather, scatter,  # type: ignore[attr-defined]
                                micro_batch=micro_batch)

    def wait(self, ticket: object) -> Agreement:
        return self.hook.wait(ticket)  # type: ignore[attr-defined]
