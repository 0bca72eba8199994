"""Helpers shared by test files of several folders (importable: tests/ is on sys.path)."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

# The smallest reference-MoE training run worth checking (TrainConfig fields).
TINY_TRAIN = dict(steps=3, samples_per_device=2, seq_len=16, d_model=32, heads=2, layers=2,
                  ffn=32, vocab=512)  # fmt: skip


@contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """A default gloo process group on 127.0.0.1 for one spawned rank. On a clean exit every rank
    passes a barrier before the group is destroyed, so no rank tears its group down while a peer
    still talks to it; the group is destroyed on every exit."""
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    clean = False
    try:
        yield
        clean = True
    finally:
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def _entry(target: Callable[..., None], rank: int, port: int, errors: Any, args: tuple) -> None:
    try:
        target(rank, port, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise


def spawn_ranks(target: Callable[..., None], world: int, *args: object,
                timeout: float = 120.0) -> None:
    """Runs target(rank, port, *args) in `world` spawned processes (target and args picklable;
    target typically opens ``gloo_group(rank, world, port)``). Fails with the ranks' tracebacks,
    if a rank hangs past timeout (it is killed) or exits non-zero (an abort at exit included)."""
    import torch.multiprocessing as mp

    from netmoe.reference.launch import free_port

    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(target, r, port, errors, args))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    errors.close()
    errors.join_thread()
    assert not msgs, "\n".join(msgs)
    assert not alive, f"ranks {[procs.index(p) for p in alive]} hung"
    assert [p.exitcode for p in procs] == [0] * world, [p.exitcode for p in procs]
