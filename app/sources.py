"""Trace sources on the command line, and `netmoe convert` (any source -> the .npz format).

``add_source_arguments`` adds the flags that say how to read ``--trace`` (a netmoe .npz or a
Megatron-core router trace directory); ``read_trace`` reads it. `netmoe evaluate` uses both.
"""

from __future__ import annotations

import argparse

import numpy as np

from netmoe.app.cli import positive
from netmoe.app.megatron import FORWARDS, Layout, load_megatron, parse_steps
from netmoe.trace import Trace, load_trace, write


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trace source")
    g.add_argument("--trace-format", choices=("npz", "megatron"), default="npz",
                   help="npz: netmoe's trace file; megatron: a directory of "
                   "router_trace_rank*.jsonl written by --moe-routing-trace-path")
    g.add_argument("--seq-length", type=positive, default=None, help="megatron: --seq-length")
    g.add_argument("--micro-batch-size", type=positive, default=None,
                   help="samples per device per micro-batch: megatron's --micro-batch-size; "
                   "for netmoe evaluate also the samples each device holds in one round")
    g.add_argument("--tensor-parallel", type=positive, default=1,
                   help="megatron: --tensor-model-parallel-size (pipeline and context "
                   "parallel size must be 1)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="megatron: the run used --sequence-parallel")
    g.add_argument("--steps", default=None, metavar="FIRST:LAST",
                   help="megatron: only these iterations (inclusive; either side may be empty)")
    g.add_argument("--global-batch-size", type=positive, default=None,
                   help="megatron: --global-batch-size, which fixes the training micro-batches "
                   "per step (default: the number most steps hold)")
    g.add_argument("--forwards", choices=FORWARDS, default="training",
                   help="megatron: read the training micro-batches, or the evaluation forwards "
                   "(evaluate() runs with the tracer's hooks live)")
    g.add_argument("--mtp", action="store_true",
                   help="megatron: append multi-token-prediction layers after the decoder's")


def read_trace(args: argparse.Namespace) -> Trace:
    """The trace ``--trace`` names, read as ``--trace-format`` says."""
    if args.trace_format == "npz":
        return load_trace(args.trace)
    layout = None
    if args.seq_length is not None and args.micro_batch_size is not None:
        layout = Layout(args.seq_length, args.micro_batch_size, args.tensor_parallel,
                        args.sequence_parallel, args.global_batch_size)
    return load_megatron(args.trace, layout, parse_steps(args.steps), args.mtp, args.forwards,
                         args.tensor_parallel)


def run(args: argparse.Namespace) -> int:
    trace = read_trace(args)
    experts = args.experts or trace.num_experts
    if experts is not None and int(trace.topk_ids.max()) >= experts:
        raise ValueError(f"--experts={experts}, but the trace names expert "
                         f"{int(trace.topk_ids.max())}")
    write(args.out, trace, experts)
    samples = "?" if trace.sample_ids is None else len(np.unique(trace.sample_ids))
    print(f"wrote {args.out}: {trace.layers} layers, {trace.tokens} tokens, {samples} samples, "
          f"top-{trace.topk_ids.shape[2]}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="write a routing trace (e.g. Megatron-core's) once as netmoe's .npz",
        description="Reads --trace as --trace-format says and writes it in the .npz trace "
        "format (topk_ids, sample_ids, layer_ids, model_type, num_experts if known).",
    )
    p.add_argument("--trace", required=True, help="trace file (.npz) or directory (megatron)")
    add_source_arguments(p)
    p.add_argument("--experts", type=positive, default=None,
                   help="experts per layer to store (Megatron traces do not say it)")
    p.add_argument("--out", required=True, help="output .npz")
    p.set_defaults(func=run)
