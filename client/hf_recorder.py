"""Records the routing of a Hugging Face transformers MoE model in netmoe's trace format.

Forward hooks on every router module (``mlp.gate`` / ``mlp.router`` of the decoder layers)
keep the indices the router itself returns: in transformers 5 each router returns
``(logits, scores, indices)`` with ``indices`` [B * S, K], rows batch-major (the MoE block
flattens [B, S, H] with view(-1, H)). Dense layers have no router and are skipped (DeepSeek-V3
``first_k_dense_replace``, Qwen ``mlp_only_layers`` / ``decoder_sparse_step``); padding tokens
(attention mask 0) are dropped. Each sequence of a batch is one sample.

In a data-parallel training job, give each rank's recorder its ``dp_rank``: every capture is
then one micro-batch of the current step (``advance_step`` starts the next), the trace carries
each sample's step, micro-batch and home rank (the round fields ``netmoe evaluate`` solves
rounds by), and ``save`` gathers the ranks' routing into one file on rank 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from netmoe.trace import Trace, merge_traces, write


@dataclass(frozen=True)
class Family:
    """Where a family's routers live: ``layers.N.mlp.<attr>`` of class ``router``."""

    attr: str
    router: str


FAMILIES: dict[str, Family] = {
    "mixtral": Family("gate", "MixtralTopKRouter"),
    "qwen2_moe": Family("gate", "Qwen2MoeTopKRouter"),
    "qwen3_moe": Family("gate", "Qwen3MoeTopKRouter"),
    "olmoe": Family("gate", "OlmoeTopKRouter"),
    "deepseek_v3": Family("gate", "DeepseekV3TopkRouter"),
    "gpt_oss": Family("router", "GptOssTopKRouter"),
}


def family_of(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a supported MoE family; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def find_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer index, router module) of every MoE layer, in layer order."""
    fam = family_of(getattr(model.config, "model_type", type(model).__name__))
    pattern = re.compile(rf"(?:^|\.)layers\.(\d+)\.mlp\.{fam.attr}$")
    found = []
    for name, module in model.named_modules():
        m = pattern.search(name)
        if m and type(module).__name__ == fam.router:
            found.append((int(m.group(1)), module))
    if not found:
        raise ValueError(f"{type(model).__name__} has no {fam.router} at layers.N.mlp."
                         f"{fam.attr}: not a {model.config.model_type} model as transformers "
                         f"5 defines it")
    return sorted(found, key=lambda item: item[0])


class HFRecorder:
    """Routing of a transformers MoE model, sample by sample.

    Either ``record(input_ids, attention_mask)`` (runs the forward itself, without gradients)
    or ``with recorder.capture(attention_mask): model(...)`` around a forward of your own (a
    router running again inside the block, e.g. a checkpointed recompute, is not recorded
    twice). ``trace()`` / ``save(path)`` give everything recorded so far. dp_rank: this
    process's data-parallel rank in a training job (see the module doc), None when recording
    outside one (the trace then has no round fields).
    """

    def __init__(self, model: torch.nn.Module, dp_rank: int | None = None) -> None:
        if dp_rank is not None and (isinstance(dp_rank, bool) or not isinstance(dp_rank, int)
                                    or dp_rank < 0):
            raise ValueError(f"dp_rank must be a non-negative integer or None, got {dp_rank!r}")
        self.model = model
        self.dp_rank = dp_rank
        self.step, self._micro_batch = 0, 0
        routers = find_routers(model)
        self.layer_ids = [layer for layer, _ in routers]
        self._routers = [module for _, module in routers]
        self.num_experts = int(self._routers[0].num_experts)
        self._ids: list[list[np.ndarray]] = [[] for _ in routers]  # per layer: [n, K] blocks
        self._sample_ids: list[np.ndarray] = []
        self._rounds: list[np.ndarray] = []  # per capture: [n, 2] (step, micro-batch) per token
        self._samples = 0

    def advance_step(self, step: int | None = None) -> None:
        """Ends the current training step: the next capture is micro-batch 0 of `step` (default:
        the current step + 1)."""
        if step is not None and (isinstance(step, bool) or not isinstance(step, int)
                                 or step < 0):
            raise ValueError(f"step must be a non-negative integer, got {step!r}")
        self.step = self.step + 1 if step is None else step
        self._micro_batch = 0

    @contextmanager
    def capture(self, attention_mask: torch.Tensor) -> Iterator[None]:
        """One forward of a [B, S] batch inside the block. attention_mask [B, S]: 1 for a
        token, 0 for padding (torch.ones(B, S) for a batch without padding)."""
        calls: list[torch.Tensor | None] = [None] * len(self._routers)

        def hook(index: int):
            def keep(_module, _inputs, output) -> None:
                if calls[index] is None:
                    calls[index] = output[2].detach()
            return keep

        handles = [r.register_forward_hook(hook(i)) for i, r in enumerate(self._routers)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        if any(c is None for c in calls):
            missing = [self.layer_ids[i] for i, c in enumerate(calls) if c is None]
            raise RuntimeError(f"routers of layers {missing} did not run inside capture()")
        self._add(calls, attention_mask)

    def _add(self, calls: list[torch.Tensor], attention_mask: torch.Tensor) -> None:
        rows = calls[0].shape[0]
        mask = attention_mask.detach().cpu().numpy()
        if mask.ndim != 2 or mask.size != rows:
            raise ValueError(f"attention_mask must be [B, S] with B * S = {rows} tokens the "
                             f"routers saw, got shape {tuple(mask.shape)}")
        batch, seq = mask.shape
        keep = mask.reshape(-1) != 0
        sample = np.repeat(np.arange(self._samples, self._samples + batch), seq)
        self._samples += batch
        self._sample_ids.append(sample[keep])
        self._rounds.append(np.tile([self.step, self._micro_batch], (int(keep.sum()), 1)))
        self._micro_batch += 1
        for layer, ids in enumerate(calls):
            self._ids[layer].append(ids.cpu().numpy().astype(np.int64)[keep])

    @torch.no_grad()
    def record(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Runs the model on input_ids [B, S] int64 (attention_mask [B, S]) and records it."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        device = next(self.model.parameters()).device
        with self.capture(attention_mask):
            self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       use_cache=False)

    def trace(self) -> Trace:
        """topk_ids [L, T, K] int64 of the MoE layers, sample_ids [T], layer_ids [L] and, with
        a dp_rank, the round fields [T] each."""
        if not self._sample_ids:
            raise ValueError("nothing recorded yet")
        topk = np.stack([np.concatenate(blocks) for blocks in self._ids])
        sample_ids = np.concatenate(self._sample_ids)
        rounds: tuple[np.ndarray | None, ...] = (None, None, None)
        if self.dp_rank is not None:
            both = np.concatenate(self._rounds).astype(np.int64)
            rounds = (both[:, 0], both[:, 1], np.full(len(sample_ids), self.dp_rank))
        return Trace(topk, sample_ids, self.num_experts, tuple(self.layer_ids),
                     self.model.config.model_type, *rounds)

    def save(self, path: str) -> None:
        """Writes the trace to path. With a dp_rank inside an initialised torch.distributed job
        this is a collective: every rank calls it, rank 0 writes all ranks' samples."""
        import torch.distributed as dist

        if self.dp_rank is None or not dist.is_initialized():
            write(path, self.trace())
            return
        parts: list[Trace] | None = [None] * dist.get_world_size() \
            if dist.get_rank() == 0 else None  # type: ignore[list-item]
        dist.gather_object(self.trace(), parts, dst=0)
        if parts is not None:
            write(path, merge_traces(parts))
