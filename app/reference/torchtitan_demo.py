"""``netmoe demo --torchtitan qwen3|deepseek_v3``: a tiny torchtitan MoE model trained
expert-parallel on N x G emulated GPUs three ways: home placement (netmoe's dispatcher, no
plans), with plans from the placement service, and torchtitan's own EP path (its
``AllToAllTokenDispatcher`` over an ``ep`` device mesh, the "stock" run).

The ranks run ``train(cfg)`` (``python -m netmoe.app.reference.torchtitan_demo --config JSON
--out FILE``, started by ``netmoe.app.reference.launch.run_ranks``; the driver is
netmoe.app.demo) on the demo corpus. ``tiny_model`` builds the models from torchtitan's own
config builders (the qwen3 MoE and deepseek_v3 layer factories) at tiny sizes, with causal SDPA
attention (torchtitan's language-model default, flex attention with document masks, is refused
by the adapter; see docs/torchtitan.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from dataclasses import dataclass
from typing import Any

import numpy as np

from netmoe.app.reference.results import ModelInfo, RankResult
from netmoe.app.reference.train import (
    RunConfig,
    check_run,
    join_ranks,
    placement_result,
    progress_writer,
    write_atomic,
)

FAMILIES = ("qwen3", "deepseek_v3")
# bfloat16: torchtitan 0.3's GroupedExperts as it is (its grouped matmuls cast to bfloat16
# whatever the parameters' dtype); float32: the same grouped matmuls in float32, for
# comparisons that bfloat16 rounding would blur.
EXPERT_DTYPES = ("bfloat16", "float32")
VOCAB = 2048  # the demo corpus' ids
# Every rank imports these (about 5 s of CPU after torch): the fork server imports them once.
RANK_IMPORTS = ("torchtitan.models.common.moe",)


@dataclass(frozen=True)
class TitanConfig:
    """A tiny torchtitan model of ``family``: D = dim, E experts, top-k, MoE layers (deepseek_v3
    adds one dense layer first, as its configs do, and one shared expert); expert_dtype: see
    EXPERT_DTYPES."""

    family: str = "qwen3"
    dim: int = 32
    layers: int = 2
    experts: int = 8
    top_k: int = 2
    vocab: int = VOCAB
    max_seq_len: int = 256
    expert_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"expert_dtype must be one of {', '.join(EXPERT_DTYPES)}, got "
                             f"{self.expert_dtype!r}")  # fmt: skip
        for name in ("dim", "layers", "experts", "top_k", "vocab", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % 8:
            raise ValueError(f"dim must be a multiple of 8 (CPU grouped_mm), got {self.dim}")


def model_config(cfg: TitanConfig) -> Any:
    """The torchtitan model config of cfg, from torchtitan's own layer builders."""
    from torchtitan.models.common import CosSinRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    d, hidden = cfg.dim, cfg.dim // 2
    if cfg.family == "qwen3":
        from torchtitan.models.qwen3 import Qwen3Model, _qwen3_norm
        from torchtitan.models.qwen3 import _build_qwen3_moe_layers as build_layers

        head = d // 4
        layers = build_layers(n_layers=cfg.layers, dim=d, n_heads=4, n_kv_heads=2, head_dim=head,
                              moe_hidden_dim=hidden, num_experts=cfg.experts, top_k=cfg.top_k,
                              attn_backend="flex", moe_comm_backend="standard",
                              rope=CosSinRoPE.Config(dim=head, max_seq_len=cfg.max_seq_len,
                                                     theta=1e6))  # fmt: skip
        config = Qwen3Model.Config(
            vocab_size=cfg.vocab, dim=d, norm=_qwen3_norm(d),
            tok_embeddings=Embedding.Config(num_embeddings=cfg.vocab, embedding_dim=d),
            lm_head=Linear.Config(in_features=d, out_features=cfg.vocab), layers=layers)
    else:
        from torchtitan.models.common import ComplexRoPE
        from torchtitan.models.deepseek_v3 import DeepSeekV3Model
        from torchtitan.models.deepseek_v3 import _build_dsv3_layers as build_layers

        rope_dim = 8
        layers = build_layers(n_layers=cfg.layers + 1, n_dense_layers=1, dim=d, n_heads=4,
                              q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
                              qk_rope_head_dim=rope_dim, v_head_dim=8, mscale=0.7,
                              dense_hidden_dim=2 * d, moe_hidden_dim=hidden,
                              num_experts=cfg.experts, num_shared_experts=1,
                              router_top_k=cfg.top_k, router_score_func="softmax",
                              attn_backend="flex", moe_comm_backend="standard",
                              non_blocking_capacity_factor=None,
                              rope=ComplexRoPE.Config(dim=rope_dim, max_seq_len=cfg.max_seq_len,
                                                      theta=10000.0))  # fmt: skip
        config = DeepSeekV3Model.Config(
            vocab_size=cfg.vocab, dim=d, norm=RMSNorm.Config(normalized_shape=d),
            tok_embeddings=Embedding.Config(num_embeddings=cfg.vocab, embedding_dim=d),
            lm_head=Linear.Config(in_features=d, out_features=cfg.vocab), layers=layers)
    for layer in config.layers:
        # Causal attention per row: the adapter refuses document masks (see the docstring).
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    return config


def tiny_model(cfg: TitanConfig, seed: int = 0) -> Any:
    """The model of cfg, initialised by torchtitan's own init_states under ``seed`` (float32)."""
    import torch

    model = model_config(cfg).build()
    torch.manual_seed(seed)
    model.init_states()
    if cfg.expert_dtype == "float32":
        for block in model.layers.values():
            if getattr(block, "moe_enabled", False):
                inner = block.moe.routed_experts.inner_experts
                inner.forward = types.MethodType(_float32_experts, inner)
    return model


def _float32_experts(self: Any, x_RD: Any, num_tokens_per_expert_E: Any) -> Any:
    """GroupedExperts.forward without its bfloat16 casts: x_RD [R, D] float32 rows sorted by
    local expert, num_tokens_per_expert_E [e] rows per expert -> [R, D]."""
    import torch
    import torch.nn.functional as F

    offs = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
    h = F.silu(torch._grouped_mm(x_RD, self.w1_EFD.transpose(-2, -1), offs=offs))
    h = h * torch._grouped_mm(x_RD, self.w3_EFD.transpose(-2, -1), offs=offs)
    return torch._grouped_mm(h, self.w2_EDF.transpose(-2, -1), offs=offs)


def stock_parallelize(model: Any, group_ranks: list[int] | None = None) -> Any:
    """torchtitan's own EP path on model, in place: each rank keeps its contiguous slice of
    every MoE layer's experts (as torchtitan's Shard(0) EP sharding) and the layers' stock
    ``AllToAllTokenDispatcher`` is wired to a 1-D "ep" CPU device mesh over the world.
    Returns the expert parameters (their gradients stay local; the rest are replicated)."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torchtitan.distributed.utils import set_spmd_backend

    # The default "spmd_types" backend needs torchtitan's trainer-built SPMD mesh.
    set_spmd_backend("partial_dtensor")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    experts = []
    for block in model.layers.values():
        if not getattr(block, "moe_enabled", False):
            continue
        inner = block.moe.routed_experts.inner_experts
        per = inner.num_experts // world
        for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
            local = nn.Parameter(getattr(inner, name).detach()[rank * per:(rank + 1) * per]
                                 .clone())  # fmt: skip
            setattr(inner, name, local)
            experts.append(local)
        inner.num_experts = per
        block.moe.routed_experts.token_dispatcher.wire_meshes(ep_mesh=mesh)
    return experts


def load_balancing(model: Any, optimizer: Any) -> None:
    """Registers torchtitan's own auxiliary-loss-free bias update (its optimizer pre-hook,
    ``register_moe_load_balancing_hook``) with token counts summed over the world."""
    from torchtitan.components.optimizer import register_moe_load_balancing_hook

    register_moe_load_balancing_hook(optimizer, [model], _WorldDims())


class _WorldDims:
    """The two things torchtitan's bias update asks of its ParallelDims: the mesh the token
    counts are summed over (all ranks: the "loss" mesh) and whether EP shares it with TP."""

    ep_enabled = True
    tp = 1

    def get_optional_mesh(self, name: str) -> Any:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        if name != "loss":
            return None
        if not hasattr(self, "_mesh"):
            self._mesh = init_device_mesh("cpu", (dist.get_world_size(),),
                                          mesh_dim_names=("loss",))
        return self._mesh


@dataclass(frozen=True)
class TitanTrainConfig(RunConfig):
    """A training run of a tiny torchtitan model: RunConfig's fields, the model's
    (``TitanConfig`` fields); stock: torchtitan's own EP path instead of netmoe's (home
    placement only); micro_batches: forward passes per step (micro-batch m of step t reads
    batch t x micro_batches + m); recompute: torchtitan's activation checkpointing, "full" or
    "selective" per block ("" none)."""

    family: str = "qwen3"
    dim: int = 32
    layers: int = 2
    experts: int = 8
    top_k: int = 2
    expert_dtype: str = "bfloat16"
    steps: int = 4
    samples_per_device: int = 2
    seq_len: int = 16
    stock: bool = False
    job: str = "netmoe-torchtitan"
    micro_batches: int = 1
    recompute: str = ""

    def __post_init__(self) -> None:
        check_run(self, ("steps", "micro_batches"))
        if self.recompute not in ("", "full", "selective"):
            raise ValueError(f"recompute must be '', 'full' or 'selective' (torchtitan's FullAC / "
                             f"SelectiveAC), got {self.recompute!r}")
        if self.stock and self.placement != "home":
            raise ValueError(f"stock (torchtitan's own EP path) has no placement, got "
                             f"placement={self.placement!r}")
        model = self.model  # TitanConfig checks the model's fields
        if model.experts % self.world:
            raise ValueError(f"experts={model.experts} is not divisible by nodes x "
                             f"gpus_per_node = {self.world} ranks")  # fmt: skip

    @property
    def model(self) -> TitanConfig:
        return TitanConfig(self.family, self.dim, self.layers, self.experts, self.top_k,
                           max_seq_len=max(256, self.seq_len),
                           expert_dtype=self.expert_dtype)  # fmt: skip

class SplitSpy:
    """Counts the routes of torchtitan's stock dispatchers from the split sizes they compute:
    ``routes`` (layer, phase) -> [J] int64 sent to each rank, summed over forwards (the format
    of CommStats.routes). Dispatch sends ``input_splits``, the combine returns
    ``output_splits``."""

    def __init__(self, model: Any) -> None:
        self.routes: dict[tuple[int, str], np.ndarray] = {}
        blocks = [b for b in model.layers.values() if getattr(b, "moe_enabled", False)]
        for layer, block in enumerate(blocks):
            disp = block.moe.routed_experts.token_dispatcher
            disp.dispatch = self._spy(layer, disp.dispatch)

    def _spy(self, layer: int, dispatch: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            out = dispatch(*args, **kwargs)
            meta = out[2]
            for phase, splits in (("dispatch", meta.input_splits),
                                  ("combine", meta.output_splits)):  # fmt: skip
                sent = np.asarray(splits, dtype=np.int64)
                key = (layer, phase)
                self.routes[key] = self.routes.get(key, 0) + sent
            return out

        return counted


def train(cfg: TitanTrainConfig) -> RankResult:
    """Trains cfg.steps AdamW steps on this rank (env:// gloo); returns the losses, the routes
    per step from the split sizes (local, intra-node, inter-node), timings."""
    import torch
    import torch.distributed as dist
    from torchtitan.components.loss import cross_entropy_loss

    from netmoe.app.reference.data import load_corpus
    from netmoe.app.reference.train import route_totals
    from netmoe.client.gradients import all_reduce_gradients
    from netmoe.client.planning import Placement, RandomPlans
    from netmoe.client.recorder import TraceRecorder
    from netmoe.client.torchtitan import parallelize

    rank = join_ranks(cfg.world, cfg.threads)
    client = None
    clean = False
    try:
        corpus = load_corpus(VOCAB, cfg.cache_dir or None)
        model = tiny_model(cfg.model, cfg.seed)
        n, s = cfg.samples_per_device, cfg.seq_len
        placement, ep, spy = None, None, None
        if cfg.placement == "random":
            placement = Placement(RandomPlans(rank, cfg.world, n, cfg.seed), rank, cfg.world, n,
                                  cfg.plan_timeout)  # fmt: skip
        elif cfg.placement == "service":
            from netmoe.client.placement_client import PlacementClient, job_spec

            spec = job_spec(cfg.nodes, cfg.gpus_per_node, cfg.experts, n, hidden_size=cfg.dim,
                            dtype_bytes=4, objective=cfg.objective, deadline_ms=cfg.deadline_ms)
            client = PlacementClient(cfg.server, cfg.job, rank, spec)
            placement = Placement(client, rank, cfg.world, n, cfg.plan_timeout)
        if cfg.stock:
            spy = SplitSpy(model)
            experts = {id(p) for p in stock_parallelize(model)}
            dense = [p for p in model.parameters() if id(p) not in experts]
        else:
            ep = parallelize(model, placement=placement, gpus_per_node=cfg.gpus_per_node)
            dense = ep.dense_parameters()
        if cfg.recompute:
            from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

            policy = FullAC if cfg.recompute == "full" else SelectiveAC
            policy(policy.Config()).apply(model)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
        if ep is not None:
            ep.attach(opt)
        load_balancing(model, opt)
        layers = cfg.layers
        recorder = (TraceRecorder(layers, cfg.experts) if cfg.record_trace and ep is not None
                    else None)  # fmt: skip
        losses, step_seconds, step_routes = [], [], []
        so_far = np.zeros((layers, 3), dtype=np.int64)
        micro = cfg.micro_batches
        done = progress_writer()
        dist.barrier()
        for step in range(cfg.steps):
            t_step = time.perf_counter()
            opt.zero_grad(set_to_none=False)
            parts = []
            for m in range(micro):
                batch = corpus.batch(cfg.data_offset + step * micro + m, cfg.global_samples, s,
                                     cfg.seed)  # fmt: skip
                rows = torch.from_numpy(batch[rank * n : (rank + 1) * n])
                tokens, labels = rows[:, :-1], rows[:, 1:]
                pred = model(tokens)
                if ep is not None:
                    labels = ep.follow(labels)
                # torchtitan's loss: summed cross entropy over the global token count.
                loss = cross_entropy_loss(pred, labels) / (cfg.global_samples * s * micro)
                loss.backward()
                parts.append(loss.detach())
                if m == 0 and recorder is not None and ep is not None:
                    recorder.record(step, cfg.global_samples, rank * n, n, s, ep.plans,
                                    ep.topk)  # fmt: skip
            (total,) = all_reduce_gradients(dense, [sum(parts)], None)
            opt.step()
            losses.append(float(total))
            step_seconds.append(time.perf_counter() - t_step)
            if ep is not None:
                totals = route_totals(ep.stats.routes, rank, cfg.gpus_per_node, layers)
            else:
                assert spy is not None
                totals = route_totals(spy.routes, rank, cfg.gpus_per_node, layers)
            step_routes.append((totals - so_far).tolist())
            so_far = totals
            done(step + 1)
        if recorder is not None:
            recorder.save(cfg.record_trace, group_rank=rank)
        result = RankResult(
            rank=rank, loss=losses, step_seconds=step_seconds,
            a2a_seconds=ep.stats.a2a_seconds if ep is not None else 0.0,
            control_seconds=ep.stats.control_seconds if ep is not None else 0.0,
            allreduce_seconds=0.0, routes=so_far.tolist(), step_routes=step_routes,
            bytes_per_route=None if ep is None else {phase: ep.stats.bytes_per_route(phase)
                                                     for phase in ("dispatch", "combine")},
            placement=placement_result(placement, client) if placement is not None else None,
            model=ModelInfo(parameters=sum(p.numel() for p in model.parameters()),
                            layers=layers, experts=cfg.experts, top_k=cfg.top_k,
                            model_type=cfg.family),
            stock=cfg.stock,
        )  # fmt: skip
        dist.barrier()
        clean = True
        return result
    finally:
        if client is not None:
            client.close(unregister=clean and rank == 0)
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netmoe.app.reference.torchtitan_demo")
    parser.add_argument("--config", required=True, help="TitanTrainConfig as JSON text")
    parser.add_argument("--out", required=True, help="where the rank writes its result JSON")
    args = parser.parse_args(argv)
    try:
        cfg = TitanTrainConfig(**json.loads(args.config))
    except (ValueError, TypeError) as err:
        print(f"python -m netmoe.app.reference.torchtitan_demo: error: {err}", file=sys.stderr)
        return 2
    write_atomic(args.out, train(cfg).to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
