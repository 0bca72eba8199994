"""``netmoe demo --hf-model DIR``: train a local Hugging Face MoE checkpoint expert-parallel on N x
G emulated GPUs, with home placement and with plans from the placement service.

The ranks run ``train(cfg)`` (``python -m netmoe.app.reference.hf_demo --config JSON --out
FILE``, started by ``netmoe.app.reference.launch.run_ranks``; the driver is netmoe.app.demo) on
the demo corpus, tokenised by DIR's tokenizer when DIR has one, else taken as the demo's own
ids. ``write_tiny`` (``python -m netmoe.app.reference.hf_demo --write-tiny DIR``) saves a tiny
random checkpoint to try it on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from netmoe.app.reference.data import DOMAINS, Corpus
from netmoe.app.reference.results import ModelInfo, RankResult
from netmoe.app.reference.train import (
    RunConfig,
    check_run,
    join_ranks,
    placement_result,
    progress_writer,
    write_atomic,
)

# Every rank imports these (about 4 s of CPU after torch): the fork server imports them once.
RANK_IMPORTS = ("transformers.modeling_utils",)
DEMO_VOCAB = 2048  # the reference demo's vocabulary: the ids a checkpoint without tokenizer sees
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                    "merges.txt", "special_tokens_map.json")  # fmt: skip


@dataclass(frozen=True)
class HFTrainConfig(RunConfig):
    """A training run of the checkpoint in ``model_dir`` (RunConfig's fields)."""

    model_dir: str = field(kw_only=True)
    job: str = "netmoe-hf"

    def __post_init__(self) -> None:
        check_run(self, ("steps",))
        if not (Path(self.model_dir) / "config.json").is_file():
            raise ValueError(f"model_dir {self.model_dir!r} holds no config.json (a checkpoint "
                             "saved with save_pretrained)")


def tiny_config(model_type: str = "mixtral", vocab: int = DEMO_VOCAB, hidden: int = 64,
                layers: int = 4, experts: int = 8, top_k: int = 2) -> Any:
    """A small transformers config of a supported MoE family (4 heads, 2 KV heads, every layer
    MoE, load-balancing loss on)."""
    from transformers import AutoConfig

    from netmoe.client.hf import SUPPORTED

    if model_type not in SUPPORTED:
        raise ValueError(f"model type {model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED)}")  # fmt: skip
    common = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                  num_experts_per_tok=top_k, max_position_embeddings=1024,
                  output_router_logits=True, router_aux_loss_coef=0.02, initializer_range=0.1,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    ffn = 2 * hidden
    specific: dict[str, Any] = {
        "mixtral": dict(num_local_experts=experts, intermediate_size=ffn),
        "olmoe": dict(num_experts=experts, intermediate_size=ffn),
        "qwen3_moe": dict(num_experts=experts, moe_intermediate_size=ffn, intermediate_size=ffn,
                          norm_topk_prob=True),
        "qwen2_moe": dict(num_experts=experts, moe_intermediate_size=ffn, intermediate_size=ffn,
                          shared_expert_intermediate_size=ffn),
    }[model_type]
    return AutoConfig.for_model(model_type, **common, **specific)


def write_tiny(path: str | Path, model_type: str = "mixtral", experts: int = 8, seed: int = 0
               ) -> Path:
    """Saves a tiny random checkpoint (config.json + weights, no tokenizer) to path."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, experts=experts))
    model.save_pretrained(path)
    return Path(path)


def _tokenizer_files(model_dir: str) -> list[Path]:
    return [Path(model_dir) / f for f in _TOKENIZER_FILES if (Path(model_dir) / f).is_file()]


def load_hf_corpus(model_dir: str, vocab_size: int, cache_dir: str | None) -> Corpus:
    """The demo corpus as ids of model_dir's tokenizer (cached by the tokenizer files' hash),
    or the demo's own ids without one. Raises ValueError if the ids exceed vocab_size."""
    from netmoe.app.reference.data import default_cache_dir, load_corpus, raw_texts

    files = _tokenizer_files(model_dir)
    if not files:
        if vocab_size < DEMO_VOCAB:
            raise ValueError(f"{model_dir} has no tokenizer and its vocab_size={vocab_size} does "
                             f"not cover the demo's {DEMO_VOCAB} token ids: give the checkpoint "
                             f"a tokenizer or a vocab_size >= {DEMO_VOCAB}")
        return load_corpus(DEMO_VOCAB, cache_dir)
    digest = hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files))
    path = (Path(cache_dir) if cache_dir else default_cache_dir()) / (
        f"hf-corpus-{digest.hexdigest()[:16]}.npz")
    if not path.exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        texts = raw_texts()
        streams = {d: np.asarray(tok(texts[d])["input_ids"], dtype=np.int32) for d in DOMAINS}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **streams)
        os.replace(tmp, path)
    with np.load(path, allow_pickle=False) as z:
        streams = {d: z[d] for d in DOMAINS}
    top = max(int(s.max()) for s in streams.values())
    if top >= vocab_size:
        raise ValueError(f"{model_dir}'s tokenizer gives ids up to {top}, beyond its model's "
                         f"vocab_size={vocab_size}")  # fmt: skip
    return Corpus((), streams)


def train(cfg: HFTrainConfig) -> RankResult:
    """Trains cfg.steps steps on this rank (env:// gloo, like netmoe.app.reference.train.train);
    returns the common results (losses, route counts from split sizes, timings) and the
    model's."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from netmoe.app.reference.train import route_totals
    from netmoe.client.hf import parallelize
    from netmoe.client.planning import Placement, RandomPlans
    from netmoe.client.recorder import TraceRecorder

    rank = join_ranks(cfg.world, cfg.threads)
    client = None
    clean = False
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, local_files_only=True,
                                                     dtype=torch.float32)  # fmt: skip
        mcfg = model.config
        corpus = load_hf_corpus(cfg.model_dir, mcfg.vocab_size, cfg.cache_dir or None)
        n, s, big_i = cfg.samples_per_device, cfg.seq_len, cfg.global_samples
        placement = None
        experts = experts_of(mcfg)
        if cfg.placement == "random":
            placement = Placement(RandomPlans(rank, cfg.world, n, cfg.seed), rank, cfg.world, n,
                                  cfg.plan_timeout)  # fmt: skip
        elif cfg.placement == "service":
            from netmoe.client.placement_client import PlacementClient, job_spec

            spec = job_spec(cfg.nodes, cfg.gpus_per_node, experts, n,
                            hidden_size=mcfg.hidden_size, dtype_bytes=4,
                            objective=cfg.objective, deadline_ms=cfg.deadline_ms)
            client = PlacementClient(cfg.server, cfg.job, rank, spec)
            placement = Placement(client, rank, cfg.world, n, cfg.plan_timeout)
        ep = parallelize(model, placement=placement, gpus_per_node=cfg.gpus_per_node)
        layers = len(ep.moe_layers)
        opt = torch.optim.AdamW(ep.parameters(), lr=cfg.lr)
        recorder = TraceRecorder(layers, experts) if cfg.record_trace else None
        losses, step_seconds, allreduce_seconds = [], [], 0.0
        step_routes, so_far = [], np.zeros((layers, 3), dtype=np.int64)
        done = progress_writer()
        dist.barrier()
        for step in range(cfg.steps):
            t_step = time.perf_counter()
            ep.stats.step = step
            batch = corpus.batch(cfg.data_offset + step, big_i, s, cfg.seed)
            ids = torch.from_numpy(batch[rank * n : (rank + 1) * n, :s])
            out = ep(ids, labels=ids, step=step)
            opt.zero_grad(set_to_none=False)
            out.loss.backward()
            t0 = time.perf_counter()
            (loss,) = ep.all_reduce_gradients(out.loss)
            allreduce_seconds += time.perf_counter() - t0
            opt.step()
            losses.append(float(loss))
            step_seconds.append(time.perf_counter() - t_step)
            totals = route_totals(ep.stats.routes, rank, cfg.gpus_per_node, layers)
            step_routes.append((totals - so_far).tolist())
            so_far = totals
            if recorder is not None:
                recorder.record(step, big_i, rank * n, n, s, out.plans, out.topk)
            done(step + 1)
        if recorder is not None:
            recorder.save(cfg.record_trace, group_rank=rank)
        result = RankResult(
            rank=rank, loss=losses, step_seconds=step_seconds,
            a2a_seconds=ep.stats.a2a_seconds, control_seconds=ep.stats.control_seconds,
            allreduce_seconds=allreduce_seconds, routes=so_far.tolist(), step_routes=step_routes,
            bytes_per_route={phase: ep.stats.bytes_per_route(phase)
                             for phase in ("dispatch", "combine")},
            placement=placement_result(placement, client) if placement is not None else None,
            model=ModelInfo(parameters=sum(p.numel() for p in ep.parameters()), layers=layers,
                            experts=experts, top_k=ep.top_k, model_type=mcfg.model_type),
        )  # fmt: skip
        dist.barrier()  # every rank's last round is in before the job is unregistered
        clean = True
        return result
    finally:
        if client is not None:
            client.close(unregister=clean and rank == 0)
        if clean:
            dist.barrier()  # no rank tears down the group while a peer still talks to it
        dist.destroy_process_group()


def experts_of(config: Any) -> int:
    """Experts per MoE layer of a transformers MoE config."""
    return int(getattr(config, "num_local_experts", None) or config.num_experts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m netmoe.app.reference.hf_demo")
    parser.add_argument("--write-tiny", metavar="DIR",
                        help="save a tiny random checkpoint (config + weights) to DIR and exit")
    parser.add_argument("--model-type", default="mixtral",
                        help="family of the --write-tiny checkpoint (mixtral, olmoe, qwen2_moe, "
                        "qwen3_moe)")
    parser.add_argument("--experts", type=int, default=8, help="experts of the tiny checkpoint")
    parser.add_argument("--config", help="HFTrainConfig as JSON text (training rank)")
    parser.add_argument("--out", help="where a training rank writes its result JSON")
    args = parser.parse_args(argv)
    try:
        if args.write_tiny:
            path = write_tiny(args.write_tiny, args.model_type, args.experts)
            print(f"wrote a tiny {args.model_type} checkpoint to {path}")
            return 0
        if not (args.config and args.out):
            parser.error("give --write-tiny DIR, or --config JSON --out FILE (training rank)")
        cfg = HFTrainConfig(**json.loads(args.config))
    except ValueError as err:
        print(f"python -m netmoe.app.reference.hf_demo: error: {err}", file=sys.stderr)
        return 2
    write_atomic(args.out, train(cfg).to_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
