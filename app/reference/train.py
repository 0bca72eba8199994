"""One training rank of the reference expert-parallel MoE.

``train(cfg)`` initialises torch.distributed from the environment (env://, gloo: RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT), trains cfg.steps steps and returns its RankResult.
``python -m netmoe.app.reference.train --config JSON --out FILE`` runs the same from any
launcher, for example inside a network namespace.

The loss is the global mean over all I * S tokens (each rank sums its tokens' losses and divides
by the global count) and replicated gradients are all-reduced with SUM, so neither depends on
which rank holds which sample: placement changes only float summation order.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from netmoe.app.reference.results import (
    ExpertAdvice,
    ExpertMoves,
    PlacementResult,
    RankResult,
    ReplicaAdvice,
)
from netmoe.groups import EPGroups

log = logging.getLogger(__name__)

PLACEMENTS = ("home", "service", "random")
# Environment variable naming a file where rank 0 keeps the count of finished steps (launchers
# show progress from it).
PROGRESS_FILE = "NETMOE_PROGRESS_FILE"
EXPERT_PLACEMENTS = ("auto", "force")
REPORT_BY = ("rank", "node")
DTYPES = ("fp32", "bf16")


def check_run(cfg: Any, positive: tuple[str, ...] = ()) -> None:
    """Raises ValueError naming the field and value unless a run config's common fields hold:
    nodes, gpus_per_node, samples_per_device, seq_len, threads and `positive` are positive
    integers; placement is known and has a server when it is "service"."""
    for name in ("nodes", "gpus_per_node", "samples_per_device", "seq_len", "threads",
                 *positive):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if cfg.placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {cfg.placement!r}")
    # A TrainConfig may name a sidecar per node instead (checked in its __post_init__).
    if cfg.placement == "service" and not cfg.server and not getattr(cfg, "sidecars", ()):
        raise ValueError("placement='service' needs server (host:port), got ''")


@dataclass(frozen=True)
class RunConfig:
    """The fields every model family's training run has (TrainConfig, and the Hugging Face and
    torchtitan ranks' configs extend it): nodes x gpus_per_node ranks, steps of
    samples_per_device samples of seq_len tokens per rank, AdamW's lr, the seed, the corpus
    batch of step 0 (data_offset), placement: "home" (no plans), "service" (gRPC placement
    service at ``server``, job ``job``, with objective, plan_timeout seconds a rank waits for a
    plan and deadline_ms for the solve) or "random" (seeded random plans, a dispatcher stress
    test); intra-op threads per rank, the corpus cache, the trace path of the run (none: "")."""

    nodes: int = 2
    gpus_per_node: int = 2
    steps: int = 10
    samples_per_device: int = 4
    seq_len: int = 64
    lr: float = 3e-3
    seed: int = 0
    data_offset: int = 0
    placement: str = "home"
    server: str = ""
    job: str = "netmoe-job"
    objective: str = "volume"
    plan_timeout: float = 5.0
    deadline_ms: int = 4000
    threads: int = 1
    cache_dir: str = ""
    record_trace: str = ""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def global_samples(self) -> int:
        return self.samples_per_device * self.world


@dataclass(frozen=True)
class TrainConfig(RunConfig):
    """A training run of the reference MoE (RunConfig's fields, then the model's and the
    reference run's own)."""

    gpus_per_node: int = 4
    d_model: int = 64
    heads: int = 4
    layers: int = 4
    ffn: int = 128
    experts_per_device: int = 2
    top_k: int = 2
    vocab: int = 2048
    init_checkpoint: str = ""
    save_checkpoint: str = ""
    # With save_checkpoint, on one rank: every K steps the rank saves its model, optimizer and
    # step to resume_path(save_checkpoint), and a run finding that file goes on from there (an
    # interrupted pre-training loses at most K steps); 0: only the final checkpoint.
    checkpoint_every: int = 0
    # [layers] permutations of range(experts): slot v of layer l holds original expert
    # expert_order[l][v] (see netmoe.app.reference.model); () keeps every expert in its home slot.
    expert_order: tuple[tuple[int, ...], ...] = ()
    # Expert placement (placement="service"): after the first adopt_experts_at steps (0: never),
    # rank 0 asks the service for expert maps (RecommendExperts, expert_held_out latest steps
    # held out, 0: half; saving over expert_horizon steps vs moving the experts) and all ranks
    # adopt them from the next step on if it recommends so ("auto") or anyway ("force", demos).
    adopt_experts_at: int = 0
    expert_placement: str = "auto"
    expert_horizon: int = 1000
    expert_held_out: int = 0
    # After the last step rank 0 unregisters the job from the service (False keeps the job, its
    # expert window and its metrics, for inspection).
    unregister: bool = True
    # With adopt_experts_at: expert copies per device and layer the service may add on top of
    # the maps (netmoe.solver.replicas), created with the maps when recommended. "force" creates
    # them anyway and has them chosen on routes alone (their gradient sync not weighed), since on
    # a tiny model the sync outweighs every route a copy saves.
    replica_budget: int = 0
    # With replica_budget: the load bound R (>= 1) under which the service chooses maps, copies
    # and route tables (netmoe.solver.balance); the ranks then route by the confirmed tables.
    # 0: none (routes only, the default rule's tables).
    max_load_ratio: float = 0.0
    # Expert copies in force from step 0 (netmoe bench cluster's replicas mode): [layers]
    # (expert, device) lists by the ids the service knows (slots when expert_order is set),
    # created from their owners before the first step and confirmed with the service from step 0.
    copies: tuple[tuple[tuple[int, int], ...], ...] = ()
    # placement="service" without server: node k's sidecar address ("" where it has none).
    # Each EP group's first rank publishes its node's sidecar in the job's torch.distributed
    # store and its group's ranks stream to that service only (netmoe.client.services).
    sidecars: tuple[str, ...] = ()
    # Ranks per expert-parallel group (0: all ranks one group). Groups are consecutive ranks
    # (netmoe.groups.EPGroups.contiguous); each holds every expert, trains on its own samples and
    # asks the service for its own plans; expert gradients are summed across the groups.
    ep_size: int = 0
    # With placement="service": "rank" (every rank streams its own reports) or "node" (the
    # ranks of a group on one node report through its first rank, netmoe.client.node_reports).
    report_by: str = "rank"
    # placement="service": register the job with device_counts, so ranks report [n, J] routes
    # per device instead of [n, E] per expert (no expert placement: that needs expert counts).
    device_counts: bool = False
    # Forward passes per step (gradient accumulation): micro-batch m of step t reads batch
    # data_offset + t * micro_batches + m; the loss is the mean over all of them.
    micro_batches: int = 1
    # Every block runs again in the backward pass (activation recompute, torch.utils.checkpoint).
    recompute: bool = False
    # "fp32", or "bf16": bf16 hidden states and All-to-Alls under torch.autocast, fp32 master
    # parameters and router weights (the usual mixed precision).
    dtype: str = "fp32"
    a2a_sync: bool = False  # barrier before each timed exchange (CommStats.sync)
    link_counters: bool = False  # first rank of a node reads GLOO_SOCKET_IFNAME's byte counters

    def __post_init__(self) -> None:
        object.__setattr__(self, "expert_order", tuple(tuple(o) for o in self.expert_order))
        object.__setattr__(self, "sidecars", tuple(self.sidecars))
        object.__setattr__(self, "copies", tuple(tuple((int(e), int(d)) for e, d in layer)
                                                 for layer in self.copies))
        if self.expert_order and (
            len(self.expert_order) != self.layers
            or any(sorted(o) != list(range(self.experts)) for o in self.expert_order)
        ):
            raise ValueError(f"expert_order must be {self.layers} permutations of "
                             f"range({self.experts}), got {self.expert_order!r}")
        check_run(self, ("d_model", "heads", "layers", "ffn", "experts_per_device", "top_k",
                         "vocab"))
        if self.sidecars:
            self._check_sidecars()
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        for name in ("adopt_experts_at", "expert_held_out", "replica_budget", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.checkpoint_every:
            # One rank holds every expert in the checkpoint; moved experts, copies and a trace
            # cannot be resumed from it.
            clash = {"save_checkpoint": (self.save_checkpoint, not self.save_checkpoint),
                     "world": (self.world, self.world != 1),
                     "adopt_experts_at": (self.adopt_experts_at, self.adopt_experts_at),
                     "copies": (self.copies, self.copies),
                     "record_trace": (self.record_trace, self.record_trace)}
            bad = [f"{name}={value!r}" for name, (value, wrong) in clash.items() if wrong]
            if bad:
                raise ValueError(f"checkpoint_every={self.checkpoint_every} needs save_checkpoint "
                                 f"and one rank (world 1) without adopt_experts_at, copies or "
                                 f"record_trace, got {', '.join(bad)}")
        if self.adopt_experts_at and self.placement != "service":
            raise ValueError(f"adopt_experts_at={self.adopt_experts_at} needs placement='service' "
                             f"(the service fits the expert maps), got {self.placement!r}")
        if self.max_load_ratio and (self.max_load_ratio < 1 or not self.replica_budget):
            raise ValueError(f"max_load_ratio={self.max_load_ratio} must be 0 or >= 1 and needs "
                             f"replica_budget, got replica_budget={self.replica_budget}")
        if self.replica_budget and not self.adopt_experts_at:
            raise ValueError(f"replica_budget={self.replica_budget} needs adopt_experts_at (copies "
                             f"come with the expert maps)")
        if self.device_counts and (self.adopt_experts_at or self.copies):
            raise ValueError(f"device_counts=True excludes adopt_experts_at and copies (expert "
                             f"placement needs expert counts), got adopt_experts_at="
                             f"{self.adopt_experts_at} and copies of {len(self.copies)} layers")
        if self.copies and (len(self.copies) != self.layers or self.adopt_experts_at):
            raise ValueError(f"copies must list {self.layers} layers and exclude adopt_experts_at "
                             f"(copies chosen later), got {len(self.copies)} layers and "
                             f"adopt_experts_at={self.adopt_experts_at}")
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or (
                self.micro_batches <= 0):
            raise ValueError(f"micro_batches must be a positive integer, got "
                             f"{self.micro_batches!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.report_by not in REPORT_BY:
            raise ValueError(f"report_by must be one of {REPORT_BY}, got {self.report_by!r}")
        if self.expert_placement not in EXPERT_PLACEMENTS:
            raise ValueError(f"expert_placement must be one of {EXPERT_PLACEMENTS}, got "
                             f"{self.expert_placement!r}")
        if isinstance(self.expert_horizon, bool) or not isinstance(self.expert_horizon, int) or (
                self.expert_horizon <= 0):
            raise ValueError(f"expert_horizon must be a positive integer, got "
                             f"{self.expert_horizon!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by heads={self.heads}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        if self.ep < self.world:
            one_group = {"adopt_experts_at": self.adopt_experts_at, "copies": self.copies,
                         "record_trace": self.record_trace, "link_counters": self.link_counters,
                         "expert_order": self.expert_order}
            used = [f"{k}={v!r}" for k, v in one_group.items() if v]
            if used:
                raise ValueError(f"ep_size={self.ep_size} (several expert-parallel groups) does "
                                 f"not support {', '.join(used)}")

    def _check_sidecars(self) -> None:
        from netmoe.client.services import check_address

        if self.server:
            raise ValueError(f"server={self.server!r} and sidecars={list(self.sidecars)!r} "
                             f"exclude each other (one service for the job, or one per EP group)")
        if len(self.sidecars) != self.nodes:
            raise ValueError(f"sidecars must name one address per node ({self.nodes}), got "
                             f"{len(self.sidecars)}: {list(self.sidecars)!r}")
        for k, address in enumerate(self.sidecars):
            if address:
                check_address(f"sidecars[{k}]", address)

    @property
    def groups(self) -> EPGroups:
        """The expert-parallel groups (ValueError naming ep_size when they do not fit)."""
        return EPGroups.contiguous(self.world, self.gpus_per_node, self.ep_size)

    @property
    def ep(self) -> int:
        """Ranks per expert-parallel group."""
        return self.groups.size

    @property
    def experts(self) -> int:
        return self.experts_per_device * self.ep

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**raw)


def route_totals(routes: dict[tuple[int, str], np.ndarray], rank: int, g: int, layers: int):
    """Per layer [inter, intra, local] routes this rank sent, dispatch + combine."""
    out = np.zeros((layers, 3), dtype=np.int64)
    for (layer, _phase), sent in routes.items():
        peers = np.arange(sent.size)
        inter = peers // g != rank // g
        local = peers == rank
        out[layer] += [sent[inter].sum(), sent[~inter & ~local].sum(), sent[local].sum()]
    return out


@dataclass
class _Run:
    """One rank's training state (built by ``_setup``)."""

    cfg: TrainConfig
    rank: int
    model: Any
    opt: Any
    dense: list[Any]
    comm: Any
    dispatcher: Any
    corpus: Any
    placement: Any = None
    client: Any = None
    recorder: Any = None
    meter: _LinkMeter | None = None
    copy_groups: Any = None  # CopyGroups once expert copies are in force
    # The rank's device in its expert-parallel group, the group's process group (None: the
    # world) and the group of the ranks holding the same experts in the other groups (None: one
    # group), over which expert gradients are summed.
    device: int = 0
    ep_group: Any = None
    expert_dp: Any = None


def train(cfg: TrainConfig) -> RankResult:
    """Trains cfg.steps steps on this rank; returns losses, route counts and timings."""
    import torch.distributed as dist

    rank = join_ranks(cfg.world, cfg.threads)
    run: _Run | None = None
    clean = False
    try:
        run = _setup(cfg, rank)
        out = _train_steps(run)
        dist.barrier()  # every rank's last round is in before the job is unregistered
        clean = True
        return out
    finally:
        if run is not None and run.placement is not None:
            run.placement.close()
        if run is not None and run.client is not None:
            run.client.close(unregister=clean and _unregisters(cfg, rank) and cfg.unregister)
        if clean:
            dist.barrier()  # no rank tears down the group while a peer still talks to it
        if run is not None and run.copy_groups is not None:
            run.copy_groups.close()
        dist.destroy_process_group()


def _setup(cfg: TrainConfig, rank: int) -> _Run:
    import torch
    import torch.distributed as dist

    from netmoe.app.reference.data import load_corpus
    from netmoe.app.reference.model import ModelConfig, MoEGPT
    from netmoe.client.dispatcher import CommStats, Layout, TokenDispatcher
    from netmoe.client.planning import Placement, RandomPlans
    from netmoe.client.recorder import TraceRecorder

    groups = cfg.groups
    ep_size = groups.size
    g, device = groups.locate(rank)
    ep_group = expert_dp = None
    if groups.count > 1:
        # Every rank creates every group, in one order (new_group is collective).
        ep_groups = [dist.new_group(list(ranks)) for ranks in groups.ranks]
        peers = [dist.new_group([ranks[d] for ranks in groups.ranks]) for d in range(ep_size)]
        ep_group, expert_dp = ep_groups[g], peers[device]
    layout = Layout(device, ep_size, groups.gpus, cfg.experts, cfg.samples_per_device,
                    cfg.seq_len)  # fmt: skip
    mcfg = ModelConfig(cfg.vocab, cfg.d_model, cfg.heads, cfg.layers, cfg.ffn, cfg.experts,
                       cfg.top_k, cfg.seq_len)  # fmt: skip
    model = MoEGPT(mcfg, layout.local_experts, cfg.seed, cfg.expert_order or None)
    if cfg.init_checkpoint:
        _load_checkpoint(model, cfg.init_checkpoint, cfg.expert_order)
    comm = CommStats(sync=cfg.a2a_sync)
    run = _Run(
        cfg, rank, model, torch.optim.AdamW(model.parameters(), lr=cfg.lr),
        model.dense_parameters(), comm, TokenDispatcher(layout, comm, ep_group),
        load_corpus(cfg.vocab, cfg.cache_dir or None),
        meter=_LinkMeter(rank % cfg.gpus_per_node == 0) if cfg.link_counters else None,
        recorder=TraceRecorder(cfg.layers, cfg.experts) if cfg.record_trace else None,
        device=device, ep_group=ep_group, expert_dp=expert_dp,
    )
    if cfg.placement == "random":
        source = RandomPlans(device, ep_size, cfg.samples_per_device, cfg.seed + g)
        run.placement = Placement(source, device, ep_size, cfg.samples_per_device,
                                  cfg.plan_timeout)
    elif cfg.placement == "service":
        from netmoe.client.node_reports import node_reports
        from netmoe.client.placement_client import PlacementClient, job_spec
        from netmoe.client.services import group_source

        spec = job_spec(cfg.nodes, cfg.gpus_per_node, cfg.experts, cfg.samples_per_device,
                        hidden_size=cfg.d_model, dtype_bytes=2 if cfg.dtype == "bf16" else 4,
                        objective=cfg.objective,
                        deadline_ms=cfg.deadline_ms, layers=cfg.layers, ep_size=cfg.ep_size,
                        device_counts=cfg.device_counts)
        node = node_reports(groups, rank) if cfg.report_by == "node" else None
        ranks = node.members if node is not None else ()
        if node is None or node.first:  # a node's other ranks: its first rank reports for them
            run.client = (group_source(_group_service(cfg, rank), cfg.job, rank, spec, ranks=ranks)
                          if cfg.sidecars else
                          PlacementClient(cfg.server, cfg.job, rank, spec, ranks=ranks))
        run.placement = Placement(run.client, device, ep_size, cfg.samples_per_device,
                                  cfg.plan_timeout, node, cfg.device_counts)
    return run


def _group_service(cfg: TrainConfig, rank: int) -> Any:
    """The service of this rank's EP group (``netmoe.client.services.Found``), through the job's
    store: the group's first rank publishes its node's sidecar, the others wait for it (up to the
    process group's 120 s, like any rendezvous)."""
    import torch.distributed as dist

    from netmoe.client.services import discover, publish

    # The store the default process group rendezvoused through (torch has no public getter).
    store = dist.distributed_c10d._get_default_store()
    g, device = cfg.groups.locate(rank)
    if device == 0:
        return publish(store, cfg.job, g, cfg.sidecars[rank // cfg.gpus_per_node] or None)
    return discover(store, cfg.job, g, timeout=120.0)


def _unregisters(cfg: TrainConfig, rank: int) -> bool:
    """This rank forgets the job on its service after the last step: rank 0 with one service;
    with sidecars, each group's first rank whose sidecar no lower group's first rank uses."""
    if not cfg.sidecars:
        return rank == 0
    gpn = cfg.gpus_per_node
    leaders = [cfg.sidecars[ranks[0] // gpn] for ranks in cfg.groups.ranks]
    g, device = cfg.groups.locate(rank)
    return device == 0 and bool(leaders[g]) and leaders.index(leaders[g]) == g


def _train_steps(run: _Run) -> RankResult:
    import torch.distributed as dist

    from netmoe.app.reference.model import relabel_state
    from netmoe.client.experts import ExpertTable, OriginalIds

    cfg, rank = run.cfg, run.rank
    losses, step_seconds, allreduce_seconds = [], [], 0.0
    # Expert ids the service and traces know: the model's labels until experts move.
    table = ExpertTable.identity(cfg.layers, cfg.experts, cfg.ep)
    hook: Any = run.placement
    moves: ExpertMoves | None = None
    copies = None  # CopyTable once expert copies are in force
    sync_seconds = 0.0
    step_routes, routes_so_far = [], np.zeros((cfg.layers, 3), dtype=np.int64)
    done = progress_writer()
    if cfg.copies:
        copies, moves = _adopt_copies(run, table, _confirm_copies(cfg, run.client, rank))
    first = _resume(run) if cfg.checkpoint_every else 0
    done(first)
    dist.barrier()  # with copies: rank 0 confirmed them before any rank reports step 0
    for step in range(first, cfg.steps):
        if cfg.adopt_experts_at and step == cfg.adopt_experts_at:
            table, moves = _adopt_experts(cfg, run.model, run.opt, run.client, table, rank, step)
            hook = OriginalIds(run.placement, table)
            copies, moves = _adopt_copies(run, table, moves)
        t_step = time.perf_counter()
        loss, seconds, synced = _step(run, step, hook, table, copies)
        losses.append(loss)
        allreduce_seconds += seconds
        sync_seconds += synced
        step_seconds.append(time.perf_counter() - t_step)
        totals = route_totals(run.comm.routes, run.device, run.dispatcher.layout.gpus_per_node,
                               cfg.layers)
        step_routes.append((totals - routes_so_far).tolist())
        routes_so_far = totals
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _save_checkpoint({"model": run.model.state_dict(), "opt": run.opt.state_dict(),
                              "step": step + 1, "config": _resume_key(cfg)},
                             resume_path(cfg.save_checkpoint))
        done(step + 1)
    if run.recorder is not None:
        run.recorder.save(cfg.record_trace, group_rank=rank)
    # Keyed by original expert id, so runs with and without moved experts compare; copies are
    # their owners' business.
    state = relabel_state(_owned(run.model.state_dict(), run.dispatcher.layout.local_experts),
                          table.label)
    if cfg.save_checkpoint:
        _save_checkpoint(state, cfg.save_checkpoint)
        Path(resume_path(cfg.save_checkpoint)).unlink(missing_ok=True)
    return RankResult(
        rank=rank, loss=losses, step_seconds=step_seconds, a2a_seconds=run.comm.a2a_seconds,
        control_seconds=run.comm.control_seconds, allreduce_seconds=allreduce_seconds,
        routes=routes_so_far.tolist(), step_routes=step_routes,
        bytes_per_route={phase: run.comm.bytes_per_route(phase)
                         for phase in ("dispatch", "combine")},
        placement=(placement_result(run.placement, run.client) if run.placement is not None
                   else None),
        first_step=first, copy_sync_seconds=sync_seconds, expert_moves=moves,
        param_checksum=_checksum(state), a2a_calls=[list(c) for c in run.comm.calls],
        link_counters=run.meter.readings if run.meter is not None else [],
    )  # fmt: skip


def _step(run: _Run, step: int, hook: Any, table: Any, copies: Any
          ) -> tuple[float, float, float]:
    """One training step; returns (global mean loss, seconds in the gradient all-reduce,
    seconds summing the gradients of expert copies)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from netmoe.client.dispatcher import move_samples

    cfg, rank = run.cfg, run.rank
    n, s, big_i = cfg.samples_per_device, cfg.seq_len, cfg.global_samples
    micro = cfg.micro_batches
    run.comm.step = step
    if run.meter is not None:
        run.meter.mark()
    run.opt.zero_grad(set_to_none=False)
    bf16 = cfg.dtype == "bf16"
    losses = []
    for m in range(micro):
        batch = run.corpus.batch(cfg.data_offset + step * micro + m, big_i, s, cfg.seed)
        local = torch.from_numpy(batch[rank * n : (rank + 1) * n])
        with torch.autocast(local.device.type, dtype=torch.bfloat16, enabled=bf16):
            result = run.model(local[:, :-1], run.dispatcher, hook, step, micro_batch=m,
                               recompute=cfg.recompute, dtype=torch.bfloat16 if bf16 else None)
        labels = local[:, 1:]
        for plan in result.plans:
            labels = move_samples(labels, plan, run.device, run.comm, run.ep_group)
        loss = F.cross_entropy(result.logits.float(), labels.reshape(-1), reduction="sum")
        loss = loss / (big_i * s * micro)
        loss.backward()
        losses.append(loss.detach())
        if m == 0 and run.recorder is not None:
            originals = torch.as_tensor(table.originals())
            topk = tuple(originals[layer][ids] for layer, ids in enumerate(result.topk))
            run.recorder.record(step, big_i, rank * n, n, s, result.plans, topk)
    if run.meter is not None:
        run.meter.mark()
    t0 = time.perf_counter()
    flat = torch.cat([p.grad.reshape(-1) for p in run.dense] + [sum(losses).reshape(1)])
    dist.all_reduce(flat)
    seconds = time.perf_counter() - t0
    if run.meter is not None:
        run.meter.mark()
    offset = 0
    for p in run.dense:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    if run.expert_dp is not None:
        t0 = time.perf_counter()
        experts = [p.grad for name, p in run.model.named_parameters() if ".experts." in name]
        bucket = torch.cat([grad.reshape(-1) for grad in experts])
        dist.all_reduce(bucket, group=run.expert_dp)
        offset = 0
        for grad in experts:
            grad.copy_(bucket[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        seconds += time.perf_counter() - t0
    synced = 0.0
    if copies is not None:
        from netmoe.client.replicas import sync_grads

        t0 = time.perf_counter()
        sync_grads(run.model.blocks, run.copy_groups)
        synced = time.perf_counter() - t0
    run.opt.step()
    return float(flat[-1]), seconds, synced


def _adopt_experts(cfg: TrainConfig, model: Any, opt: Any, client: Any, table: Any, rank: int,
                   step: int) -> tuple[Any, ExpertMoves]:
    """Before `step` (collective): rank 0 asks the service for expert maps and, when adopting,
    confirms them from `step` on, before any rank can report that step (the others wait for the
    broadcast); then every rank moves its experts and Adam state (netmoe.client.experts.adopt).
    Returns the ExpertTable in force and what happened (the same on every rank but sent_bytes
    and adopt_seconds). A failed call means "keep the experts", never a crash."""
    import torch.distributed as dist

    from netmoe.client.experts import adopt, state_bytes

    box: list[Any] = [None]  # the other ranks receive rank 0's ExpertMoves
    if rank == 0:
        expert = next(iter(model.blocks[0].moe.experts.values()))
        grad_bytes = sum(p.numel() * p.element_size() for p in expert.parameters())
        box[0] = _ask_experts(cfg, client, state_bytes(expert, opt), step, grad_bytes)
    dist.broadcast_object_list(box, src=0)
    moves: ExpertMoves = box[0]
    if not moves.adopted:
        return table, moves
    new = table.relabel(np.array(moves.advice.maps, dtype=np.int64))
    t0 = time.perf_counter()
    sent = adopt(model.blocks, opt, table, new, rank)
    return new, dataclasses.replace(moves, sent_bytes=sent,
                                    adopt_seconds=time.perf_counter() - t0)


def _owned(state: dict[str, Any], local: range) -> dict[str, Any]:
    """state without the entries of expert copies (labels this rank does not own)."""
    def copy_key(key: str) -> bool:
        parts = key.split(".")
        return len(parts) > 4 and parts[2:4] == ["moe", "experts"] and int(parts[4]) not in local

    return {k: v for k, v in state.items() if not copy_key(k)}


def _adopt_copies(run: _Run, table: Any, moves: ExpertMoves) -> tuple[Any, ExpertMoves]:
    """After the maps (collective): creates the copies rank 0 confirmed (moves.copies, by
    original id), the process groups among their holders (run.copy_groups) and routes to them.
    Returns the CopyTable in force (or None) and moves with this rank's creation bytes and
    seconds."""
    import torch

    from netmoe.client.replicas import CopyGroups, CopyTable, adopt_copies, route_tables

    if not moves.copies_adopted:
        return None, moves
    cfg = run.cfg
    copies = CopyTable.from_original(table, [[tuple(c) for c in layer] for layer in moves.copies],
                                     cfg.gpus_per_node)
    none = CopyTable.none(cfg.layers, cfg.experts, cfg.ep, cfg.gpus_per_node)
    t0 = time.perf_counter()
    sent = adopt_copies(run.model.blocks, run.opt, none, copies, run.device)
    run.copy_groups = CopyGroups()
    run.copy_groups.update(copies)
    moves = dataclasses.replace(moves, copy_sent_bytes=sent,
                                copy_seconds=time.perf_counter() - t0)
    run.dispatcher.route_tables = route_tables(copies)
    if moves.route_tables:
        # The confirmed tables, by original expert id ([L][J][E]), as [label, rank] per layer.
        originals = table.originals()
        run.dispatcher.route_tables = {
            layer: torch.as_tensor(np.array(t, dtype=np.int64).T[originals[layer]])
            for layer, t in enumerate(moves.route_tables)}
    return copies, moves


def _confirm_copies(cfg: TrainConfig, client: Any, rank: int) -> ExpertMoves:
    """cfg.copies in force from step 0: rank 0 confirms them with the registered maps (rounds
    are then solved replica-aware); returns what _adopt_copies takes. A failed call leaves
    the service unaware of the copies (plans ignore them, results do not change)."""
    import grpc

    moves = ExpertMoves(copies=[[list(c) for c in layer] for layer in cfg.copies],
                        copies_adopted=True)
    if rank == 0 and client is not None:
        per = cfg.experts_per_device
        maps = [[e // per for e in range(cfg.experts)]] * cfg.layers
        try:
            client.confirm_experts(0, maps, copies=cfg.copies)
            moves = dataclasses.replace(moves, copies_confirmed=True)
        except grpc.RpcError as err:
            moves = dataclasses.replace(
                moves, error=f"ConfirmExperts: {err.code().name}: {err.details()}")
            log.warning("copies: %s; plans ignore them", moves.error)
    return moves


def _ask_experts(cfg: TrainConfig, client: Any, bytes_per_expert: int, step: int,
                 grad_bytes: int = 0) -> ExpertMoves:
    """Rank 0's RecommendExperts (and ConfirmExperts from `step` when adopting)."""
    import grpc

    force = cfg.expert_placement == "force"
    moves = ExpertMoves(step=step, bytes_per_expert=bytes_per_expert,
                        grad_bytes_weighed=0 if force else grad_bytes)
    try:
        rec = client.recommend_experts(cfg.expert_horizon, bytes_per_expert, cfg.expert_held_out,
                                       replica_slots=cfg.replica_budget,
                                       grad_bytes_per_expert=moves.grad_bytes_weighed,
                                       max_load_ratio=cfg.max_load_ratio)
    except grpc.RpcError as err:
        moves = dataclasses.replace(
            moves, error=f"RecommendExperts: {err.code().name}: {err.details()}")
        log.warning("step %d: %s; experts stay", step, moves.error)
        return moves
    maps = [list(m.device) for m in rec.maps]
    moves = dataclasses.replace(moves, advice=ExpertAdvice(
        recommended=rec.adopt, reason=rec.reason, maps=maps, unit=rec.unit,
        saving_per_step=rec.saving_per_step, migration_cost=rec.migration_cost,
        break_even_steps=rec.break_even_steps if math.isfinite(rec.break_even_steps) else None,
        moved_experts=rec.moved_experts, moved_inter=rec.moved_inter,
        migration_bytes=rec.migration_bytes,
        held_out={kind: {"inter": r.inter, "intra": r.intra}
                  for kind, r in (("home", rec.home), ("sample_only", rec.sample_only),
                                  ("joint", rec.joint))},
        fit_steps=[rec.fit_first_step, rec.fit_last_step],
        held_out_steps=[rec.held_out_first_step, rec.held_out_last_step],
    ))
    copies = None
    if rec.HasField("replicas"):
        r = rec.replicas
        proposed = [[[c.expert, c.device] for c in layer.copies] for layer in r.copies]
        moves = dataclasses.replace(moves, copies=proposed, replicas=ReplicaAdvice(
            recommended=r.adopt, reason=r.reason, saving_per_step=r.saving_per_step,
            sync_per_step=r.sync_per_step, memory_bytes=r.memory_bytes,
            held_out_inter=r.replicated.inter, cross_node_copies=r.cross_node_copies))
        if (r.adopt or force) and any(proposed):
            copies = proposed
        if cfg.max_load_ratio:
            moves = dataclasses.replace(
                moves, route_tables=[np.array(t.device).reshape(-1, len(maps[0])).tolist()
                                     for t in r.route_tables],
                load={"predicted": [r.load.mean, r.load.worst],
                      "joint": [r.joint_load.mean, r.joint_load.worst]})
    if not (rec.adopt or force):
        return moves
    try:
        client.confirm_experts(step, maps, copies=copies,
                               route_tables=moves.route_tables if copies else None)
    except grpc.RpcError as err:
        moves = dataclasses.replace(
            moves, error=f"ConfirmExperts: {err.code().name}: {err.details()}")
        log.warning("step %d: %s; experts stay", step, moves.error)
        return moves
    return dataclasses.replace(moves, adopted=True, copies_adopted=copies is not None)


class _LinkMeter:
    """Byte counters of this node's inter-node interface (GLOO_SOCKET_IFNAME), read by the
    first rank of each node between barriers, so a delta covers one phase of every rank.
    readings: [tx_bytes, rx_bytes] per mark (head ranks only)."""

    def __init__(self, head: bool) -> None:
        dev = os.environ.get("GLOO_SOCKET_IFNAME", "")
        if not dev:
            raise ValueError("link_counters needs GLOO_SOCKET_IFNAME (the node's interface)")
        self.base = Path("/sys/class/net") / dev / "statistics"
        self.head = head
        self.readings: list[list[int]] = []

    def mark(self) -> None:
        import torch.distributed as dist

        dist.barrier()
        if self.head:
            self.readings.append([int((self.base / f"{d}_bytes").read_text())
                                  for d in ("tx", "rx")])


def _checksum(state: dict[str, Any]) -> dict[str, list[float]]:
    """Per-parameter [sum, sum of squares]: lets launchers compare parameters across runs."""
    return {
        name: [float(p.detach().double().sum()), float(p.detach().double().pow(2).sum())]
        for name, p in state.items()
    }


def join_ranks(world: int, threads: int) -> int:
    """This training rank's rank, joined to the gloo group from the environment (env://: RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT); ValueError when WORLD_SIZE is not the config's
    ``world`` (nodes x gpus_per_node). Torch runs ``threads`` intra-op threads."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if size != world:
        raise ValueError(f"WORLD_SIZE={size} but nodes x gpus_per_node = {world}")
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=size,
                            timeout=timedelta(seconds=120))  # fmt: skip
    return rank


def placement_result(placement: Any, client: Any) -> PlacementResult:
    """The results of a rank that trained with a placement hook (its PlacementStats: plan wait,
    submit, reply and exchange seconds, fallbacks and their reasons, plans, moved samples,
    solve seconds) and its client's rejection ("" without a client or none)."""
    st = placement.stats
    return PlacementResult(
        plan_wait_seconds=st.wait_seconds, submit_seconds=st.submit_seconds,
        reply_seconds=st.reply_seconds, exchange_seconds=st.exchange_seconds,
        fallbacks=st.fallbacks, fallback_reasons=dict(st.reasons), plans=st.plans,
        moved=st.moved, solve_seconds=st.solve_seconds,
        rejected=client.rejected if client is not None else "",
    )  # fmt: skip


def progress_writer() -> Callable[[int], None]:
    """A function a training rank calls with the steps it has finished: it keeps them in
    $PROGRESS_FILE for its launcher (netmoe.app.reference.launch.run_ranks shows them and fails a
    run whose ranks stop making progress); it does nothing when the variable is not set."""
    path = os.environ.get(PROGRESS_FILE, "")

    def done(steps: int) -> None:
        if path:
            write_atomic(path, str(steps))

    return done


def write_atomic(path: str, text: str) -> None:
    """Writes text to path so that a reader never sees a partial file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(text)
    os.replace(tmp, path)


def _save_checkpoint(state: dict[str, Any], path: str) -> None:
    """Saves this rank's state dict; experts are keyed by global id, so shards can be merged."""
    import torch

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def resume_path(checkpoint: str) -> str:
    """Where a run saving ``checkpoint`` keeps its state every checkpoint_every steps."""
    return f"{checkpoint}.resume"


def _resume_key(cfg: TrainConfig) -> dict[str, Any]:
    """The fields a resumed run must share with the run that saved the state (all but the
    step count and where files and threads go)."""
    skip = {"steps", "threads", "cache_dir", "checkpoint_every"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def _resume(run: _Run) -> int:
    """Loads model and optimizer from resume_path(save_checkpoint) when it exists; returns the
    step to go on from (0 without a saved state). ValueError naming the file when it was saved
    by a run of another configuration."""
    import torch

    path = resume_path(run.cfg.save_checkpoint)
    if not Path(path).exists():
        return 0
    saved = torch.load(path, map_location="cpu", weights_only=True)
    key = _resume_key(run.cfg)
    differ = sorted(k for k in key if saved["config"].get(k) != key[k])
    if differ:
        raise ValueError(f"{path} was saved by a run with other {', '.join(differ)}; delete it "
                         f"to start over")
    run.model.load_state_dict(saved["model"])
    run.opt.load_state_dict(saved["opt"])
    log.info("resuming from step %d (%s)", saved["step"], path)
    return min(int(saved["step"]), run.cfg.steps)


def _load_checkpoint(model: Any, path: str, expert_order: tuple[tuple[int, ...], ...] = ()
                     ) -> None:
    """Loads the entries this rank owns from a checkpoint holding every expert (keyed by
    original id; relabeled to slots when the model was built with an expert order)."""
    import torch

    from netmoe.app.reference.model import relabel_state

    state = torch.load(path, map_location="cpu", weights_only=True)
    if expert_order:
        state = relabel_state(state, expert_order)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"checkpoint {path} lacks {missing[:3]} (model shape differs?)")
    model.load_state_dict({k: state[k] for k in own})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netmoe.app.reference.train")
    parser.add_argument("--config", required=True, help="TrainConfig as JSON text or @file")
    parser.add_argument("--out", required=True, help="where to write the result JSON")
    args = parser.parse_args(argv)
    text = Path(args.config[1:]).read_text() if args.config.startswith("@") else args.config
    cfg = TrainConfig.from_dict(json.loads(text))
    write_atomic(args.out, train(cfg).to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
