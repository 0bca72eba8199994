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
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids must be [tokens, K], got shape {tuple(topk_ids.shape)}")
    if token_sample.shape != topk_ids.shape[:1]:
        raise ValueError(
            f"token_sample must be [tokens]={topk_ids.shape[0]}, got {tuple(token_sample.shape)}"
        )
    if topk_ids.numel() and (int(topk_ids.min()) < 0 or int(topk_ids.max()) >= experts):
        raise ValueError(f"topk_ids must lie in [0, {experts}), got max {int(topk_ids.max())}")
    k = topk_ids.shape[1]
    flat = token_sample.repeat_interleave(k) * experts + topk_ids.reshape(-1)
    return torch.bincount(flat, minlength=samples * experts).reshape(samples, experts)


def router_topk(router: nn.Module, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing: weights [T, K] float (softmax renormalized over the k) and ids [T, K] int64.

    x: [T, D] router input.
    """
    probs = torch.softmax(router(x), dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids
