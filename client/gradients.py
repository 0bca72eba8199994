"""Data-parallel gradient sums for the replicated (non-expert) parameters of an EP model."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn


def all_reduce_gradients(dense: Sequence[nn.Parameter], values: Sequence[torch.Tensor],
                         group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """Sums the gradients of ``dense`` over the ranks of ``group`` in one all_reduce (a missing
    gradient counts as zeros) and returns the global sums of ``values`` ([] float tensors, e.g.
    each rank's loss share) carried along with them."""
    for p in dense:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    extra = [v.detach().reshape(1).to(dense[0].grad.dtype) for v in values]
    flat = torch.cat([p.grad.reshape(-1) for p in dense] + extra)
    dist.all_reduce(flat, group=group)
    offset = 0
    for p in dense:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return list(flat[offset:].unbind())
