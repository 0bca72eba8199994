"""Route-count histograms: what the solver needs from each rank, built with torch ops."""

from __future__ import annotations

import torch
from torch import nn


def token_samples(samples: int, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[samples * seq_len] int64: local sample index of each token (tokens are sample-major)."""
    return torch.arange(samples, device=device).repeat_interleave(seq_len)


def route_counts(
    topk_ids: torch.Tensor, token_sample: torch.Tensor, samples: int, experts: int
) -> torch.Tensor:
    """Count matrix num[i, e]: (token, top-k slot) routes of local sample i to expert e.

    topk_ids: [T, K] int64 expert ids in [0, experts); token_sample: [T] int64 in [0, samples).
    Returns [samples, experts] int64 on topk_ids' device.
    """
    _check_routes(topk_ids, token_sample, experts)
    return _histogram(topk_ids, token_sample, samples, experts)


def device_route_counts(
    topk_ids: torch.Tensor, token_sample: torch.Tensor, samples: int, owner: torch.Tensor,
    devices: int,
) -> torch.Tensor:
    """Count matrix num[i, d]: routes of local sample i to the experts device d holds, i.e.
    ``route_counts`` summed over the experts of each device, without its [samples, E] matrix.

    topk_ids, token_sample: as for ``route_counts``; owner: [E] int64 device of each expert id,
    in [0, devices), on topk_ids' device. Returns [samples, devices] int64 on topk_ids' device.
    """
    if owner.dim() != 1:
        raise ValueError(f"owner must be [experts], got shape {tuple(owner.shape)}")
    if not bool(((owner >= 0) & (owner < devices)).all()):  # one device sync, not two
        raise ValueError(f"owner must lie in [0, {devices}), got [{int(owner.min())}, "
                         f"{int(owner.max())}]")
    _check_routes(topk_ids, token_sample, owner.numel())
    # index_select: a third of the time of owner[topk_ids] on CPU.
    dest = owner.index_select(0, topk_ids.reshape(-1)).view(topk_ids.shape)
    return _histogram(dest, token_sample, samples, devices)


def _check_routes(topk_ids: torch.Tensor, token_sample: torch.Tensor, experts: int) -> None:
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, K], got shape {tuple(topk_ids.shape)}")
    if token_sample.shape != topk_ids.shape[:1]:
        raise ValueError(
            f"token_sample must be [tokens]={topk_ids.shape[0]}, got {tuple(token_sample.shape)}"
        )
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= experts):
        raise ValueError(f"topk_ids must lie in [0, {experts}), got max {int(topk_ids.max())}")


def _histogram(column: torch.Tensor, token_sample: torch.Tensor, samples: int, columns: int
               ) -> torch.Tensor:
    """[samples, columns] int64: routes per (sample, column); column: [T, K] int64 in
    [0, columns), the column of each (token, slot)."""
    k = column.shape[1]
    flat = token_sample.repeat_interleave(k) * columns + column.reshape(-1)
    return torch.bincount(flat, minlength=samples * columns).reshape(samples, columns)


def router_topk(router: nn.Module, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: weights [T, K] float (softmax renormalized over the k) and ids [T, K] int64.

    x: [T, D] router input.
    """
    probs = torch.softmax(router(x), dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids
