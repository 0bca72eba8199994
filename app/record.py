"""`netmoe record`: the routing of a local Hugging Face MoE checkpoint, as a trace file.

Tokens come as text (tokenized with the checkpoint's own tokenizer) or as token ids; the
stream is cut into samples of --seq-length tokens, the last one padded (padding is not
recorded). Nothing is downloaded: config, weights and tokenizer are read from --hf-model only.

With --torchtitan FAMILY instead: a tiny torchtitan model of that family (qwen3, deepseek_v3)
trained expert-parallel on --nodes x --gpus-per-node local gloo ranks (home placement) on the
demo corpus, its routing recorded at every step (``netmoe.app.reference.torchtitan_demo``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from netmoe.app.cli import positive


def samples_from_stream(stream: np.ndarray, seq_length: int, pad_id: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [T] -> (input_ids [I, S] int64, attention_mask [I, S] int64), the last
    sample padded with pad_id where the mask is 0."""
    samples = -(-stream.shape[0] // seq_length)
    ids = np.full(samples * seq_length, pad_id, dtype=np.int64)
    mask = np.zeros(samples * seq_length, dtype=np.int64)
    ids[: stream.shape[0]] = stream
    mask[: stream.shape[0]] = 1
    return ids.reshape(samples, seq_length), mask.reshape(samples, seq_length)


def _token_ids(path: str, seq_length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"--token-ids {path!r}: cannot read a .npy array ({err})") from err
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"--token-ids {path!r} must hold integers, got "
                         f"{getattr(arr, 'dtype', type(arr).__name__)}")
    if arr.ndim == 1:
        return samples_from_stream(arr.astype(np.int64), seq_length, pad_id)
    if arr.ndim == 2 and arr.shape[1] == seq_length:
        return arr.astype(np.int64), np.ones_like(arr, dtype=np.int64)
    raise ValueError(f"--token-ids {path!r} must be a stream [T] or samples [N, {seq_length}] "
                     f"(--seq-length), got shape {arr.shape}")


def _text_ids(path: str, model_dir: str, seq_length: int, pad_id: int
              ) -> tuple[np.ndarray, np.ndarray]:
    from transformers import AutoTokenizer

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--text {path!r}: cannot read UTF-8 text ({err})") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"--hf-model {model_dir!r} has no usable tokenizer for --text "
                         f"(pass --token-ids instead): {err}") from err
    stream = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    if stream.size == 0:
        raise ValueError(f"--text {path!r} holds no tokens")
    return samples_from_stream(stream, seq_length, pad_id)


def _record_torchtitan(args: argparse.Namespace) -> int:
    given = [flag for flag in ("hf_model", "text", "token_ids", "samples")
             if getattr(args, flag) is not None]  # fmt: skip
    if given:
        raise ValueError(f"--torchtitan trains its own tiny model on the demo corpus: "
                         f"--{given[0].replace('_', '-')} does not apply")
    from netmoe.app.reference.data import load_corpus
    from netmoe.app.reference.launch import run_ranks
    from netmoe.app.reference.torchtitan_demo import RANK_IMPORTS, VOCAB, TitanTrainConfig

    cfg = TitanTrainConfig(family=args.torchtitan, layers=args.layers, nodes=args.nodes,
                           gpus_per_node=args.gpus_per_node, steps=args.steps,
                           samples_per_device=args.batch_size,
                           seq_len=args.seq_length or 64, experts=2 * args.nodes
                           * args.gpus_per_node, record_trace=str(args.out))  # fmt: skip
    load_corpus(VOCAB, None)  # built once here; the ranks read the cache
    run_ranks(cfg, module="netmoe.app.reference.torchtitan_demo", preload=RANK_IMPORTS)
    print(f"wrote {args.out}: torchtitan {cfg.family} (tiny), {cfg.layers} MoE layers, "
          f"{cfg.steps} steps of {cfg.global_samples} samples x {cfg.seq_len} tokens, "
          f"{cfg.experts} experts, top-{cfg.top_k}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.torchtitan:
        return _record_torchtitan(args)
    if args.hf_model is None or (args.text is None and args.token_ids is None):
        raise ValueError("give --hf-model DIR with --text FILE or --token-ids FILE.npy, or "
                         "--torchtitan FAMILY")
    if args.seq_length is None:
        raise ValueError("--seq-length is required with --hf-model")
    for flag in ("seq_length", "batch_size", "samples"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as err:
        raise ValueError(f"netmoe record needs transformers and torch: pip install "
                         f"'netmoe[hf]' ({err})") from err
    from tqdm import tqdm

    from netmoe.client.hf_recorder import HFRecorder, family_of

    if not Path(args.hf_model).is_dir():
        raise ValueError(f"--hf-model {args.hf_model!r} is not a directory (a local "
                         f"checkpoint: config.json and weights; nothing is downloaded)")
    try:
        config = AutoConfig.from_pretrained(args.hf_model, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"--hf-model {args.hf_model!r}: no readable transformers config "
                         f"(local files only): {err}") from err
    family_of(config.model_type)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    pad_id = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    if args.text is not None:
        ids, mask = _text_ids(args.text, args.hf_model, args.seq_length, pad_id)
    else:
        ids, mask = _token_ids(args.token_ids, args.seq_length, pad_id)
    if args.samples is not None:
        ids, mask = ids[: args.samples], mask[: args.samples]
    vocab = config.vocab_size
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}) (the model's vocab_size), got "
                         f"{int(ids.min())}..{int(ids.max())}")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(args.hf_model, local_files_only=True,
                                                     dtype=dtype)
    except OSError as err:
        raise ValueError(f"--hf-model {args.hf_model!r}: cannot load the weights (local files "
                         f"only): {err}") from err
    model.to(args.device).eval()
    recorder = HFRecorder(model)
    with tqdm(total=ids.shape[0], unit="sample", disable=None, file=sys.stderr) as bar:
        for first in range(0, ids.shape[0], args.batch_size):
            batch = slice(first, first + args.batch_size)
            recorder.record(torch.from_numpy(ids[batch]), torch.from_numpy(mask[batch]))
            bar.update(ids[batch].shape[0])
    recorder.save(args.out)
    trace = recorder.trace()
    print(f"wrote {args.out}: {config.model_type}, MoE layers {recorder.layer_ids}, "
          f"{trace.tokens} tokens of {ids.shape[0]} samples, {recorder.num_experts} experts, "
          f"top-{trace.topk_ids.shape[2]}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "record",
        help="record the routing of a local Hugging Face MoE checkpoint as a trace",
        description="Runs a local transformers checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE, "
        "OLMoE, DeepSeek-V3, GPT-OSS) on your tokens with forward hooks on its routers and "
        "writes the trace `netmoe evaluate` reads. Never downloads anything. With --torchtitan "
        "FAMILY: trains a tiny torchtitan model expert-parallel on local ranks and records it.",
    )
    p.add_argument("--hf-model", default=None, metavar="DIR",
                   help="checkpoint directory (config.json and weights; a tokenizer for --text)")
    p.add_argument("--torchtitan", choices=("qwen3", "deepseek_v3"), default="",
                   help="record a tiny torchtitan model of this family instead, trained "
                   "expert-parallel (home placement) on the demo corpus")
    p.add_argument("--nodes", type=positive, default=2, help="--torchtitan: emulated nodes")
    p.add_argument("--gpus-per-node", type=positive, default=2,
                   help="--torchtitan: ranks per node")
    p.add_argument("--steps", type=positive, default=4, help="--torchtitan: training steps")
    p.add_argument("--layers", type=positive, default=2, help="--torchtitan: MoE layers")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="FILE", help="UTF-8 text, tokenized as one stream")
    src.add_argument("--token-ids", metavar="FILE.npy",
                     help="token ids: a stream [T] or samples [N, seq-length]")
    p.add_argument("--seq-length", type=positive, default=None,
                   help="tokens per sample (required with --hf-model; --torchtitan: 64)")
    p.add_argument("--samples", type=positive, default=None,
                   help="record at most this many samples (default: all)")
    p.add_argument("--batch-size", type=positive, default=8,
                   help="samples per forward pass (--torchtitan: per rank)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the model runs")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the model's parameter dtype while recording")
    p.add_argument("--out", required=True, metavar="TRACE.npz", help="the trace file to write")
    p.set_defaults(func=run)
