"""Rounds: how training groups a trace's samples into All-to-Alls.

Training runs one dispatch and combine per micro-batch inside each expert-parallel (EP) group:
a round is the samples of one (step, micro-batch) on the G data-parallel ranks of one EP group,
m samples at home on each rank (m = the micro-batch size), so G x m samples. EP group g holds
data-parallel ranks g G .. g G + G - 1 (netmoe.groups.EPGroups.contiguous; rank d is device
d % G of its group).

Pure functions: sample ids in, rounds out; ValueError names the flag or field and its value.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from netmoe.groups import EPGroups


@dataclass(frozen=True)
class Round:
    """One All-to-All of one EP group. samples: sample ids (as sample_counts numbers them) in
    home order, device j of the group holding samples[j m : (j + 1) m]. batch: the place of its
    (step, micro-batch) in the run, which the EP groups' rounds of one micro-batch share; step
    and micro_batch come from the trace's round fields (None without them)."""

    batch: int
    ep_group: int
    samples: tuple[int, ...]
    step: int | None = None
    micro_batch: int | None = None


def plan_rounds(samples: int, groups: EPGroups, micro_batch_size: int | None,
                fields: np.ndarray | None = None) -> list[Round]:
    """The rounds of a trace of `samples` samples on the groups.world data-parallel devices,
    in EP groups of consecutive ranks (groups.ranks[g]).

    fields: [I, 3] int64 (step, micro-batch, data-parallel rank) of each sample (sample_rounds),
    or None: then round r holds the next devices x micro_batch_size samples, device d the d-th
    micro_batch_size of them (which must then be given; with fields it defaults to theirs).
    Rounds come sorted by (step, micro-batch, EP group)."""
    devices, ep_size, m = groups.world, groups.size, micro_batch_size
    if fields is None:
        if m is None:
            raise ValueError("the trace has no round fields: give --micro-batch-size")
        per_round = devices * m
        if samples % per_round:
            raise ValueError(f"--micro-batch-size {m} x {devices} devices = {per_round} samples "
                             f"per round does not divide the trace's {samples} samples")
        return [Round(r, g, tuple(range(r * per_round + g * ep_size * m,
                                                     r * per_round + (g + 1) * ep_size * m)))
                for r in range(samples // per_round) for g in range(groups.count)]
    at: dict[tuple[int, int, int], list[int]] = defaultdict(list)
    for i, (step, micro, rank) in enumerate(fields.tolist()):
        at[(step, micro, rank)].append(i)
    top = int(fields[:, 2].max())
    if top >= devices:
        raise ValueError(f"the trace's dp_ranks reach {top} ({top + 1} data-parallel ranks), "
                         f"but the cluster has {devices} devices (--nodes x --gpus-per-node)")
    sizes = {key: len(ids) for key, ids in at.items()}
    first = min(sizes)
    for key, size in sorted(sizes.items()):
        if size != sizes[first]:
            raise ValueError(
                f"the trace's round fields give step {key[0]} micro-batch {key[1]} DP rank "
                f"{key[2]} {size} samples, but step {first[0]} micro-batch {first[1]} DP rank "
                f"{first[2]} {sizes[first]}: a micro-batch has the same size on every rank")
    if m is not None and sizes[first] != m:
        raise ValueError(f"--micro-batch-size {m} disagrees with the trace's round fields: "
                         f"{sizes[first]} samples per (step, micro-batch, DP rank)")
    out = []
    for batch, (step, micro) in enumerate(sorted({key[:2] for key in at})):
        for g, ranks in enumerate(groups.ranks):
            missing = [d for d in ranks if (step, micro, d) not in at]
            if missing:
                raise ValueError(
                    f"step {step} micro-batch {micro} has no samples on DP ranks {missing} of "
                    f"EP group {g} (--ep-size {ep_size}, {devices} devices); the trace's "
                    f"dp_ranks run 0..{top}")
            ids = tuple(i for d in ranks for i in at[(step, micro, d)])
            out.append(Round(batch, g, ids, step, micro))
    return out


def split_rounds(rounds: list[Round]) -> tuple[list[Round], list[Round]]:
    """(fit, held out): the first half of the micro-batches (all EP groups of each) and the rest.
    ValueError when there are fewer than 2 micro-batches."""
    batches = 1 + max(r.batch for r in rounds)
    if batches < 2:
        raise ValueError(f"--expert-placement fit fits on the first half of the rounds and "
                         f"replays the rest, but the trace has {batches} round per EP group: "
                         f"lower --micro-batch-size")
    fit = batches // 2
    return [r for r in rounds if r.batch < fit], [r for r in rounds if r.batch >= fit]
