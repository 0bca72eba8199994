"""One rank of a timed All-to-All probe:
``python -m netmoe.app.cluster.probe --workload W --out R``.

Runs inside the testbed (torch.distributed env://, gloo). The workload JSON holds named calls,
each a send matrix int64 [J, J] (bytes rank r sends to rank q) and a ``group``; calls of one
group form one sequence (for example the dispatch and combine All-to-Alls of one training step)
and groups are interleaved per iteration so drift in machine load hits them all alike.

Per call and iteration every rank records when it entered and left ``all_to_all_single``
(CLOCK_MONOTONIC, shared by every process of the machine); the first rank of each node also reads
its veth's tx/rx byte counters before and after the call, with barriers around, so the deltas
are that call's bytes on the link (plus a few barrier bytes). Rank 0 writes
``{"calls": [{"name", "group", "send", "starts": [ranks][iters], "ends": ...,
"tx": [nodes][iters], "rx": ...}], "world", "gpus_per_node"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def write_workload(path: Path, calls: Sequence[tuple[str, str, np.ndarray]],
                   gpus_per_node: int) -> None:
    """Write a workload: calls are (name, group, send int64 [J, J] bytes)."""
    if not calls:
        raise ValueError("calls must not be empty")
    world = calls[0][2].shape[0]
    for name, _, send in calls:
        if send.shape != (world, world) or (send < 0).any():
            raise ValueError(f"send of call {name!r} must be a non-negative [{world}, {world}] "
                             f"matrix, got shape {send.shape}")
    path.write_text(json.dumps({
        "gpus_per_node": gpus_per_node,
        "calls": [{"name": n, "group": g, "send": s.astype(np.int64).tolist()}
                  for n, g, s in calls],
    }))


def _counters(dev: str) -> tuple[int, int]:
    base = Path("/sys/class/net") / dev / "statistics"
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def run(workload: dict, iters: int, warmup: int) -> dict | None:
    """Execute the workload on this rank; returns the result on rank 0, else None."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        return _measure(workload, iters, warmup)
    finally:
        dist.destroy_process_group()


def _measure(workload: dict, iters: int, warmup: int) -> dict | None:
    import torch
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    g = int(workload["gpus_per_node"])
    calls = workload["calls"]
    if world % g or any(len(c["send"]) != world for c in calls):
        raise ValueError(f"workload is for {len(calls[0]['send'])} ranks, "
                         f"{g} per node; WORLD_SIZE is {world}")
    dev = os.environ.get("GLOO_SOCKET_IFNAME", "")
    reads = rank % g == 0 and bool(dev)
    prepared = []
    for c in calls:
        send = np.asarray(c["send"], dtype=np.int64)
        out_s, in_s = send[rank].tolist(), send[:, rank].tolist()
        prepared.append((torch.ones(sum(out_s), dtype=torch.uint8),
                         torch.empty(sum(in_s), dtype=torch.uint8), out_s, in_s))
    groups: dict[str, list[int]] = {}
    for k, c in enumerate(calls):
        groups.setdefault(c["group"], []).append(k)
    times = np.zeros((2, len(calls), iters))
    link = np.zeros((2, len(calls), iters), dtype=np.int64)  # tx, rx deltas on this node's veth
    for it in range(-warmup, iters):
        for members in groups.values():
            for k in members:
                src, dst, out_s, in_s = prepared[k]
                dist.barrier()
                before = _counters(dev) if reads else (0, 0)
                dist.barrier()
                t0 = time.monotonic()
                dist.all_to_all_single(dst, src, in_s, out_s)
                t1 = time.monotonic()
                dist.barrier()
                if it >= 0:
                    times[:, k, it] = (t0, t1)
                    if reads:
                        after = _counters(dev)
                        link[:, k, it] = (after[0] - before[0], after[1] - before[1])
    mine = torch.from_numpy(np.concatenate([times, link.astype(np.float64)]))
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    dist.barrier()  # no rank tears down the group while a peer still talks to it
    if rank != 0:
        return None
    every = torch.stack(gathered).numpy()  # [ranks, 4, calls, iters]
    heads = every[::g]  # first rank of each node read the counters
    return {"world": world, "gpus_per_node": g, "calls": [
        {**c, "starts": every[:, 0, k].tolist(), "ends": every[:, 1, k].tolist(),
         "tx": heads[:, 2, k].astype(np.int64).tolist(),
         "rx": heads[:, 3, k].astype(np.int64).tolist()}
        for k, c in enumerate(calls)]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netmoe.app.cluster.probe", description=__doc__)
    parser.add_argument("--workload", required=True, help="workload JSON (write_workload)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", required=True, help="result JSON, written by rank 0")
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        raise ValueError(f"need iters >= 1 and warmup >= 0, got {args.iters}, {args.warmup}")
    result = run(json.loads(Path(args.workload).read_text()), args.iters, args.warmup)
    if result is not None:
        tmp = Path(f"{args.out}.tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
