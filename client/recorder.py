"""Records a training run's routing in the trace format ``netmoe evaluate`` reads.

Placement reorders samples between layers, so each rank records, per (step, layer), the original
id of every local sample with its tokens' top-k ids; ``save`` gathers everything on rank 0 and
writes tokens in one canonical order for all layers: by step, original sample row, position.
Sample ids in the file are step * I + original row. Each step is one round (one micro-batch of
n samples per rank): the file's round fields say the step, micro-batch 0 and the home rank
(original row // n) of every sample.

``HFRecorder`` (client/hf_recorder.py) records a Hugging Face transformers MoE model instead;
it needs torch only, transformers just for the model it is given.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from netmoe.client.hf_recorder import HFRecorder
from netmoe.round import SamplePlan

__all__ = ["HFRecorder", "TraceRecorder"]


class TraceRecorder:
    def __init__(self, layers: int, experts: int) -> None:
        self.layers, self.experts = layers, experts
        # (step, layer, original rows [n] int64, topk [n, S, K] int64)
        self._parts: list[tuple[int, int, np.ndarray, np.ndarray]] = []
        self._samples = 0
        self._per_rank = 0  # n: samples at home on each rank

    def record(
        self,
        step: int,
        global_samples: int,
        first_row: int,
        samples: int,
        seq_len: int,
        plans: Sequence[SamplePlan],
        topk: Sequence[torch.Tensor],
    ) -> None:
        """One step of one rank.

        global_samples: I; first_row: this rank's first home row (rank * n); plans: the plan
        applied at each layer; topk: [n * seq_len, K] int64 ids per layer, rows in the order the
        rank held them at that layer.
        """
        if len(topk) != self.layers or len(plans) != self.layers:
            raise ValueError(f"need {self.layers} layers of topk and plans, got {len(topk)}")
        self._samples, self._per_rank = global_samples, samples
        origin = np.arange(global_samples)  # original row of each current row
        for layer, ids in enumerate(topk):
            mine = origin[first_row : first_row + samples].copy()
            self._parts.append(
                (step, layer, mine, ids.detach().cpu().numpy().reshape(samples, seq_len, -1))
            )
            origin = plans[layer].follow(origin)

    def save(self, path: str, group_rank: int) -> None:
        """Collective: every rank calls it; rank 0 writes the .npz file."""
        from netmoe.trace import save_trace

        parts: list[list[tuple[int, int, np.ndarray, np.ndarray]]] | None = (
            [[] for _ in range(dist.get_world_size())] if group_rank == 0 else None
        )
        dist.gather_object(self._parts, parts, dst=0)
        if group_rank != 0 or parts is None:
            return
        flat = [p for rank_parts in parts for p in rank_parts]
        steps = sorted({p[0] for p in flat})
        seq_len, k = flat[0][3].shape[1:]
        big_i = self._samples
        topk = np.zeros((self.layers, len(steps), big_i, seq_len, k), dtype=np.int64)
        seen = np.zeros((self.layers, len(steps), big_i), dtype=np.int64)
        step_index = {s: i for i, s in enumerate(steps)}
        for step, layer, rows, ids in flat:
            topk[layer, step_index[step], rows] = ids
            seen[layer, step_index[step], rows] += 1
        if (seen != 1).any():
            raise RuntimeError("trace recorder: a sample was recorded twice or not at all")
        sample_ids = np.asarray(steps)[:, None] * big_i + np.arange(big_i)[None, :]
        sample_ids = np.repeat(sample_ids.reshape(-1), seq_len)
        step_ids = np.repeat(np.asarray(steps), big_i * seq_len)
        dp_ranks = np.tile(np.repeat(np.arange(big_i) // self._per_rank, seq_len), len(steps))
        save_trace(path, topk.reshape(self.layers, -1, k), sample_ids, self.experts,
                   rounds=(step_ids, np.zeros_like(step_ids), dp_ranks))
