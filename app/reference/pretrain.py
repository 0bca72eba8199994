"""The demo's pre-trained checkpoint: the reference model trained in one process (all experts)
before the compared runs, so experts have specialised; cached by shape, seed and step count, and
resumable: an interrupted pre-training goes on from its last saved state."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from netmoe.app.progress import Progress
from netmoe.app.reference.launch import run_ranks
from netmoe.app.reference.train import TrainConfig, resume_path
from netmoe.app.text import plural

# Steps between saved states: an interrupted pre-training loses at most this many.
CHECKPOINT_EVERY = 10


def pretrain(cfg: TrainConfig, steps: int, label: str = "netmoe demo") -> str:
    """Path of a checkpoint of cfg's model trained ``steps`` steps in one process on cfg's
    global batch; trained (and cached under cfg.cache_dir) when it is not there yet, from the
    state an interrupted pre-training saved when there is one. Progress goes to stderr."""
    from netmoe.app.reference.data import default_cache_dir

    key = (f"E{cfg.experts}-L{cfg.layers}-D{cfg.d_model}-F{cfg.ffn}-S{cfg.seq_len}"
           f"-I{cfg.global_samples}-V{cfg.vocab}-s{cfg.seed}-w{steps}")  # fmt: skip
    path = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / f"ckpt-{key}.pt"
    if path.exists():
        return str(path)
    # One intra-op thread: torch's OpenMP threads wait for each other at every operator, and on a
    # shared machine, where one of them is often descheduled, 2 threads made a pre-training step
    # 10 to 40 times slower than 1 (1 s vs 14 to 41 s on the 2-core development machine at load
    # 13, docs/demo.md).
    single = dataclasses.replace(
        cfg, nodes=1, gpus_per_node=1, experts_per_device=cfg.experts,
        samples_per_device=cfg.global_samples, steps=steps, placement="home", server="",
        record_trace="", init_checkpoint="", data_offset=0, threads=1, save_checkpoint=str(path),
        checkpoint_every=CHECKPOINT_EVERY, adopt_experts_at=0, replica_budget=0,
        max_load_ratio=0.0, copies=(), expert_order=(), ep_size=0,
    )  # fmt: skip
    again = "going on from its last saved state" if Path(resume_path(str(path))).exists() else (
        "once")
    print(f"{label}: pre-training a checkpoint ({plural(steps, 'step')}, {again}; saved every "
          f"{CHECKPOINT_EVERY} steps) -> {path}", file=sys.stderr)
    run_ranks(single, progress=Progress(f"{label}: pre-training", steps).update)
    return str(path)
