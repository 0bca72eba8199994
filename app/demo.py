"""``netmoe demo``: train an MoE on N x G emulated GPUs, without and with placement.

One driver for every model family: the reference MoE (default), a local Hugging Face checkpoint
(--hf-model) or a tiny torchtitan model (--torchtitan). It checks --server before anything else,
else starts an embedded placement service, prepares what the ranks read (the corpus; for the
reference model a pre-trained checkpoint, cached outside the repository and resumable, so
experts have specialised before the comparison), then trains the same steps with the same seed
with home placement and with plans from the service, and reports both (netmoe.app.demo_report).
Route counts come from the split sizes of the real All-to-All calls of every rank.

A family adds runs of its own: with --expert-placement the reference model trains a third time
(joint placement: the service fits expert maps after --adopt-after steps, the ranks move their
experts and go on with plans for the new maps; home, sample-only and joint are compared on the
steps after the move), with --replica-budget K a fourth (the expert copies the service
recommends too); torchtitan also trains on its own EP path (the "stock" run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netmoe.app.cli import non_negative, positive
from netmoe.app.demo_report import (
    check_planned,
    expert_report,
    max_rel_diff,
    placement_report,
    print_report,
    replica_report,
    routes_between,
)
from netmoe.app.progress import Progress
from netmoe.app.reference.results import RankResult
from netmoe.app.service import check_server, placement_service

Results = list[RankResult]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a small MoE on emulated GPUs with and without sample placement",
        description="Spawns nodes x gpus-per-node training processes (gloo on 127.0.0.1), trains "
        "the reference MoE with home placement and then with plans from the placement service, "
        "and compares inter-/intra-node routes, All-to-All time and losses.",
    )
    p.add_argument("--nodes", type=positive, default=2, help="emulated nodes")
    p.add_argument("--gpus-per-node", type=positive, default=4,
                   help="emulated GPUs (training processes) per node")
    p.add_argument("--steps", type=positive, default=12, help="compared training steps per run")
    p.add_argument(
        "--warmup-steps",
        type=non_negative,
        default=150,
        help="single-process pre-training steps of the cached checkpoint (0: none)",
    )
    p.add_argument("--samples-per-device", type=positive, default=4,
                   help="samples (sequences) each GPU holds per step")
    p.add_argument("--seq-len", type=positive, default=64, help="tokens per sample")
    p.add_argument("--layers", type=positive, default=4, help="MoE layers of the model")
    p.add_argument("--objective", choices=("volume", "bottleneck"), default="volume",
                   help="volume: fewest inter-node routes over the machine; bottleneck: the "
                   "busiest node's inter-node routes")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data and plans")
    p.add_argument("--server", default="", metavar="HOST:PORT",
                   help="use this placement service (default: start one inside the demo)")
    p.add_argument(
        "--record-trace",
        default="",
        metavar="PATH",
        help="save the home run's routing as a trace .npz for `netmoe evaluate`",
    )
    p.add_argument("--cache-dir", default="",
                   help="corpus and checkpoint cache (default: $NETMOE_CACHE, else "
                   "$XDG_CACHE_HOME/netmoe, else ~/.cache/netmoe)")
    p.add_argument(
        "--expert-placement",
        nargs="?",
        const="auto",
        choices=("auto", "force"),
        default=None,
        help="also train with joint placement: after --adopt-after steps the service fits expert "
        "maps and the ranks move their experts; auto: if the saving over --expert-horizon steps "
        "pays for the move, force: always. Compares home, sample-only and joint on the steps "
        "after adoption",
    )
    p.add_argument("--adopt-after", type=int, default=None,
                   help="steps before the experts move (default: half of --steps)")
    p.add_argument("--expert-horizon", type=positive, default=1000,
                   help="steps the saving must pay for the move within (auto)")
    p.add_argument("--hf-model", default="", metavar="DIR",
                   help="train this local Hugging Face MoE checkpoint instead (config + weights; "
                   "see docs/huggingface.md)")
    p.add_argument("--torchtitan", choices=("qwen3", "deepseek_v3"), default="",
                   help="train a tiny torchtitan model of this family instead (2 experts per "
                   "GPU), also on torchtitan's own EP path (see docs/torchtitan.md)")
    p.add_argument("--replica-budget", type=non_negative, default=None, metavar="K",
                   help="with --expert-placement: a fourth run that also creates up to K expert "
                   "copies per device and layer with the maps (as the service recommends; "
                   "force: always), compared on the same steps")
    p.add_argument("--max-load-ratio", type=float, default=0.0, metavar="R",
                   help="with --replica-budget: the service chooses maps, copies and route tables "
                   "with every layer's busiest device at most R x the mean load (R >= 1; "
                   "default 0: no bound) and the ranks route by the confirmed tables")
    p.add_argument("--micro-batches", type=positive, default=1, metavar="N",
                   help="forward passes per step (gradient accumulation); each has its own "
                   "placement rounds")
    p.add_argument("--recompute", action="store_true",
                   help="recompute every block in the backward pass (activation checkpointing); "
                   "the recompute applies the plan its forward applied")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: bf16 hidden states and All-to-All payloads (autocast), fp32 "
                   "parameters and router weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


@dataclass(frozen=True)
class ExtraRun:
    """A run a family adds after home and netmoe: its report name, its progress label and its
    config given the service address; ``planned`` runs must get plans (check_planned)."""

    name: str
    label: str
    config: Callable[[str], Any]
    planned: bool


@dataclass(frozen=True)
class Family:
    """What the driver needs of a model family: the rank module (``python -m MODULE``, see
    netmoe.app.reference.launch.run_ranks), the home run's config, the service job's name, a
    title line, the report's "config" given the home results, the runs it adds, what it adds
    to the report given every run's results by name, and the modules every rank imports (the
    fork server imports them once: run_ranks' preload)."""

    module: str
    cfg: Any
    job: str
    title: str
    describe: Callable[[Results], dict[str, Any]]
    extra: tuple[ExtraRun, ...] = ()
    extend: Callable[[dict[str, Any], dict[str, Results]], None] | None = None
    preload: tuple[str, ...] = ()


def run(args: argparse.Namespace) -> int:
    if args.server:
        check_server(args.server)  # before anything slow: a wrong address fails in seconds
    if args.torchtitan and args.hf_model:
        raise ValueError("give --torchtitan or --hf-model, not both")
    family = (_torchtitan(args) if args.torchtitan else _hf(args) if args.hf_model
              else _reference(args))  # fmt: skip
    runs: dict[str, Results] = {}
    planned = ["netmoe"]
    with placement_service(args.server) as (address, metrics_url):
        if metrics_url:
            print(f"netmoe demo: placement service on {address}, metrics on {metrics_url} until "
                  f"the demo ends", file=sys.stderr)
        runs["home"] = _train("home run", family,
                              dataclasses.replace(family.cfg, record_trace=args.record_trace))
        runs["netmoe"] = _train("netmoe run", family, dataclasses.replace(
            family.cfg, placement="service", server=address, job=family.job))  # fmt: skip
        for extra in family.extra:
            runs[extra.name] = _train(extra.label, family, extra.config(address))
            if extra.planned:
                planned.append(extra.name)
    report = placement_report(runs["home"], runs["netmoe"], family.describe(runs["home"]))
    if family.extend is not None:
        family.extend(report, runs)
    report["metrics_url"] = metrics_url
    if args.json:
        print(json.dumps(report))
    else:
        if family.title:
            print(family.title)
        print_report(report)
    return check_planned(address, [(name, runs[name]) for name in planned])


def _train(label: str, family: Family, cfg: Any) -> Results:
    """run_ranks(cfg) of the family's rank module with its progress on stderr."""
    from netmoe.app.reference.launch import run_ranks

    return run_ranks(cfg, progress=Progress(f"netmoe demo: {label}", cfg.steps).update,
                     module=family.module, preload=family.preload)


def _reference(args: argparse.Namespace) -> Family:
    """The reference MoE: pre-trained once (cached), then home, netmoe, and with
    --expert-placement the joint run, with --replica-budget the replicas run."""
    from netmoe.app.reference.data import load_corpus
    from netmoe.app.reference.pretrain import pretrain
    from netmoe.app.reference.train import TrainConfig

    cfg = TrainConfig(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, steps=args.steps,
        samples_per_device=args.samples_per_device, seq_len=args.seq_len, layers=args.layers,
        objective=args.objective, seed=args.seed, cache_dir=args.cache_dir,
        data_offset=args.warmup_steps, micro_batches=args.micro_batches,
        recompute=args.recompute, dtype=args.dtype,
    )  # fmt: skip
    adopt_at = args.steps // 2 if args.adopt_after is None else args.adopt_after
    if args.expert_placement and not 2 <= adopt_at < args.steps:
        raise ValueError(f"--adopt-after must leave at least 2 steps before the move (one to fit, "
                         f"one held out) and 1 after it, in [2, {args.steps - 1}] for --steps "
                         f"{args.steps}, got {adopt_at}")
    if args.replica_budget is not None and not args.expert_placement:
        raise ValueError("--replica-budget needs --expert-placement")
    if args.max_load_ratio and args.replica_budget is None:
        raise ValueError("--max-load-ratio needs --replica-budget")
    if args.max_load_ratio and not args.max_load_ratio >= 1:
        raise ValueError(f"--max-load-ratio must be >= 1 (busiest device / mean load), got "
                         f"{args.max_load_ratio}")
    if args.replica_budget is not None and args.replica_budget < 0:
        raise ValueError(f"--replica-budget must be >= 0 copies per device, got "
                         f"{args.replica_budget}")
    load_corpus(cfg.vocab, cfg.cache_dir or None)  # build once here, ranks read the cache
    if args.warmup_steps:
        cfg = dataclasses.replace(cfg, init_checkpoint=pretrain(cfg, args.warmup_steps))
    job = f"demo-{cfg.nodes}x{cfg.gpus_per_node}-s{cfg.seed}"
    moved = dict(placement="service", adopt_experts_at=adopt_at,
                 expert_placement=args.expert_placement or "auto",
                 expert_horizon=args.expert_horizon)
    extra = []
    if args.expert_placement:
        # A fresh job per run: its window and confirmed maps must start at step 0.
        extra.append(ExtraRun("joint", "joint run", lambda address: dataclasses.replace(
            cfg, server=address, job=f"{job}-joint-{os.getpid()}", **moved), planned=True))
    if args.replica_budget is not None:
        extra.append(ExtraRun("replicas", "replicas run", lambda address: dataclasses.replace(
            cfg, server=address, job=f"{job}-replicas-{os.getpid()}", **moved,
            replica_budget=args.replica_budget, max_load_ratio=args.max_load_ratio),
            planned=True))

    def extend(report: dict[str, Any], runs: dict[str, Results]) -> None:
        last = cfg.steps - 1
        if "joint" in runs:
            report["expert_placement"] = expert_report(runs["home"], runs["netmoe"],
                                                       runs["joint"], adopt_at, last)
        if "replicas" in runs:
            report["replicas"] = replica_report(runs["home"], runs["replicas"], adopt_at, last)

    return Family("netmoe.app.reference.train", cfg, job, "",
                  lambda home: dataclasses.asdict(cfg), tuple(extra), extend)


def _hf(args: argparse.Namespace) -> Family:
    """A local Hugging Face MoE checkpoint (netmoe.app.reference.hf_demo): home and netmoe."""
    from transformers import AutoConfig

    from netmoe.app.reference.hf_demo import RANK_IMPORTS, HFTrainConfig, experts_of, load_hf_corpus

    if args.expert_placement:
        raise ValueError("--expert-placement is not supported with --hf-model")
    cfg = HFTrainConfig(model_dir=args.hf_model, nodes=args.nodes,
                        gpus_per_node=args.gpus_per_node, steps=args.steps,
                        samples_per_device=args.samples_per_device, seq_len=args.seq_len,
                        objective=args.objective, seed=args.seed, cache_dir=args.cache_dir)
    mcfg = AutoConfig.from_pretrained(cfg.model_dir, local_files_only=True)
    experts = experts_of(mcfg)
    if experts % cfg.world:
        raise ValueError(f"{cfg.model_dir} has {experts} experts, not divisible by "
                         f"{cfg.nodes} x {cfg.gpus_per_node} = {cfg.world} ranks")
    # Built (and cached) once here; the ranks read the cache.
    load_hf_corpus(cfg.model_dir, mcfg.vocab_size, cfg.cache_dir or None)

    def describe(home: Results) -> dict[str, Any]:
        model = home[0].model  # a Hugging Face rank's, never None
        return {**dataclasses.asdict(cfg), "model_type": model.model_type,
                "layers": model.layers, "experts_per_device": experts // cfg.world,
                "top_k": model.top_k, "parameters_per_rank": [r.model.parameters for r in home]}

    return Family("netmoe.app.reference.hf_demo", cfg,
                  f"hf-demo-{cfg.nodes}x{cfg.gpus_per_node}-s{cfg.seed}-{os.getpid()}",
                  f"{mcfg.model_type} checkpoint {cfg.model_dir}", describe,
                  preload=RANK_IMPORTS)


def _torchtitan(args: argparse.Namespace) -> Family:
    """A tiny torchtitan model (netmoe.app.reference.torchtitan_demo): home, netmoe and
    torchtitan's own EP path (the "stock" run: its AllToAllTokenDispatcher, no plans)."""
    from netmoe.app.reference.data import load_corpus
    from netmoe.app.reference.torchtitan_demo import RANK_IMPORTS, VOCAB, TitanTrainConfig

    if args.expert_placement or args.replica_budget is not None:
        raise ValueError("--expert-placement and --replica-budget are not supported with "
                         "--torchtitan")
    if args.dtype != "fp32":
        raise ValueError(f"--dtype {args.dtype} is not supported with --torchtitan (its experts "
                         "compute in bfloat16 already; the hidden states stay fp32)")
    cfg = TitanTrainConfig(family=args.torchtitan, layers=args.layers, nodes=args.nodes,
                           gpus_per_node=args.gpus_per_node, steps=args.steps,
                           samples_per_device=args.samples_per_device, seq_len=args.seq_len,
                           objective=args.objective, seed=args.seed, cache_dir=args.cache_dir,
                           experts=2 * args.nodes * args.gpus_per_node,
                           micro_batches=args.micro_batches,
                           recompute="full" if args.recompute else "")  # fmt: skip
    load_corpus(VOCAB, cfg.cache_dir or None)  # built once here; the ranks read the cache

    def describe(home: Results) -> dict[str, Any]:
        return {**dataclasses.asdict(cfg), "model_type": cfg.family,
                "experts_per_device": cfg.experts // cfg.world, "top_k": cfg.top_k,
                "parameters_per_rank": [r.model.parameters for r in home]}

    def extend(report: dict[str, Any], runs: dict[str, Results]) -> None:
        # torchtitan's dispatcher keeps no byte counts: its routes and losses only.
        stock = runs["stock"]
        routes = routes_between(stock, 0, cfg.steps - 1)
        report["stock"] = {"loss": stock[0].loss, "inter_routes": routes["inter"],
                           "intra_routes": routes["intra"], "local_routes": routes["local"]}
        report["max_stock_loss_rel_diff"] = max_rel_diff(stock[0].loss, report["netmoe"]["loss"])

    stock = ExtraRun("stock", "torchtitan EP run",
                     lambda address: dataclasses.replace(cfg, stock=True), planned=False)
    return Family("netmoe.app.reference.torchtitan_demo", cfg,
                  f"torchtitan-demo-{cfg.family}-{cfg.nodes}x{cfg.gpus_per_node}-s{cfg.seed}-"
                  f"{os.getpid()}", f"torchtitan {cfg.family} (tiny: D={cfg.dim}, "
                  f"{cfg.experts} experts)", describe, (stock,), extend, RANK_IMPORTS)
