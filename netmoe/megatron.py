"""Reads Megatron-core router traces (``--moe-routing-trace-path DIR``) into a netmoe Trace.

Megatron-core's RouterTracer (megatron/core/transformer/moe/router_trace.py) writes one file
``router_trace_rank{r}.jsonl`` per global rank, one JSON line per router call:
``{"step", "stage": "pre_dispatch", "block": "decoder" | "mtp", "layer", "rank", "num_tokens",
"topk", ["mtp_idx",] "top_indices": [[...] * topk] * num_tokens}`` (sidecar .bin files and
their offset fields are ignored). In training, ``step`` is the iteration the training loop
passes to ``advance_step``; ``layer`` is the index N in the module name ``decoder.layers.N``.
The training router returns a boolean routing map, which the tracer turns into indices with
``nonzero``: each row lists its experts in ascending order, not by score (counts do not care).

Token -> sample rule (verified in megatron-core at commit d98e8a6, 2026-08-22):
- The embedding transposes [B, S, H] to sequence-first [S, B, H]; with sequence parallelism
  it keeps the contiguous slice t of the sequence on tensor-parallel rank t
  (``_split_along_first_dim``), so each rank holds [S/T, B, H].
- ``TopKRouter.routing`` takes ``seq_length, bsz = logits.shape[:2]`` and flattens with
  ``logits.view(-1, num_experts)``: row r of a record is position r // B (of that rank's
  slice) of micro-batch sequence r % B.
- One record per micro-batch: the forward-backward loop runs the micro-batches of an
  iteration in order, so a layer's records of one step are its micro-batches in order. A
  forward recomputed by activation checkpointing calls the router again on the same input
  right after (before the next micro-batch's forward): a record equal to the previous kept
  record of the same (rank, step, layer) is such a recompute and is dropped.
- Samples are (step, data-parallel rank, micro-batch, sequence in it), numbered in that order;
  tokens are written sample by sample, position by position.
- Ranks: Megatron-LM's orders ``tp-cp-ep-dp-pp`` (default) and ``tp-cp-ep-pp-dp``
  (``--use-tp-pp-dp-mapping``) with pipeline and context parallel size 1, where both give
  tensor-parallel rank = r % T and data-parallel rank = r // T (parallel_state.RankGenerator;
  expert parallelism does not change the attention side's data-parallel rank). Without
  sequence parallelism the T ranks of one data-parallel rank hold identical copies (one is
  kept, the others must agree); with it their slices are joined in tensor-parallel rank order.
  Pipeline parallelism (ranks recording different layers) and context parallelism are not
  supported.

Layers: the decoder's MoE layers by layer number (dense layers have no router, so they never
appear and consecutive MoE layers form the pairs); MTP layers only when asked for, after the
decoder, by (mtp_idx, layer), numbered on from the last decoder layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from netmoe.trace import Trace

FILE_RE = re.compile(r"^router_trace_rank(\d+)\.jsonl$")
FIELDS = ("step", "block", "layer", "rank", "num_tokens", "topk", "top_indices")

LayerKey = tuple[str, int, int]  # (block, mtp_idx or -1, layer); sorts decoder before mtp


@dataclass(frozen=True)
class Layout:
    """How the run was parallelized and batched (the Megatron arguments of the same names)."""

    seq_length: int
    micro_batch_size: int
    tensor_parallel: int = 1
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("seq_length", "micro_batch_size", "tensor_parallel"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, "
                                 f"got {value!r}")
        if self.sequence_parallel and self.seq_length % self.tensor_parallel:
            raise ValueError(
                f"--seq-length={self.seq_length} is not divisible by "
                f"--tensor-parallel={self.tensor_parallel} (sequence parallelism splits it)"
            )

    @property
    def local_seq(self) -> int:
        """Sequence positions per rank: S, or S / T with sequence parallelism."""
        return self.seq_length // self.tensor_parallel if self.sequence_parallel \
            else self.seq_length


@dataclass(frozen=True)
class _Record:
    where: str  # "file:line" for errors
    step: int
    key: LayerKey
    ids: np.ndarray  # [num_tokens, topk] int64


def _field_error(where: str, field: str, msg: str) -> ValueError:
    return ValueError(f"{where}: field {field!r} {msg}")


def _int_field(rec: dict, field: str, where: str) -> int:
    value = rec[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _field_error(where, field, f"must be a non-negative integer, got {value!r}")
    return value


def _parse(line: str, where: str, rank: int, layout: Layout) -> _Record | None:
    """One JSON line -> a record; None for records that carry no routing (other stages)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a complete JSON record ({err.msg}); truncated file?") \
            from err
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    for field in FIELDS:
        if field not in rec:
            raise _field_error(where, field, "is missing")
    if rec.get("stage", "pre_dispatch") != "pre_dispatch":
        return None
    step = _int_field(rec, "step", where)
    layer = _int_field(rec, "layer", where)
    if _int_field(rec, "rank", where) != rank:
        raise _field_error(where, "rank", f"is {rec['rank']}, but the file is rank {rank}'s")
    block = rec["block"]
    if block == "decoder":
        mtp = -1
    elif block == "mtp":
        if "mtp_idx" not in rec:
            raise _field_error(where, "mtp_idx", "is missing (needed for block 'mtp')")
        mtp = _int_field(rec, "mtp_idx", where)
    else:
        raise _field_error(where, "block", f"must be 'decoder' or 'mtp', got {block!r}")
    tokens = _int_field(rec, "num_tokens", where)
    topk = _int_field(rec, "topk", where)
    try:
        ids = np.asarray(rec["top_indices"])
    except ValueError as err:  # ragged rows
        raise _field_error(where, "top_indices", f"is not a [num_tokens, topk] list of "
                           f"lists ({err})") from err
    if ids.size and ids.dtype.kind not in "iu":
        raise _field_error(where, "top_indices", f"must hold integers, got {ids.dtype}")
    ids = ids.astype(np.int64).reshape(ids.shape if ids.size else (0, topk))
    if ids.shape != (tokens, topk):
        raise _field_error(where, "top_indices", f"has shape {ids.shape}, but num_tokens="
                           f"{tokens} and topk={topk} give ({tokens}, {topk})")
    if ids.size and int(ids.min()) < 0:
        raise _field_error(where, "top_indices", f"holds a negative expert {int(ids.min())}")
    if tokens % layout.local_seq:
        raise _field_error(where, "num_tokens", f"is {tokens}, not a multiple of the "
                           f"{layout.local_seq} sequence positions per rank (--seq-length)")
    if tokens != layout.local_seq * layout.micro_batch_size:
        raise _field_error(where, "num_tokens", f"is {tokens} = {tokens // layout.local_seq} "
                           f"sequences of {layout.local_seq}, but --micro-batch-size="
                           f"{layout.micro_batch_size}")
    return _Record(where, step, ("decoder" if mtp < 0 else "mtp", mtp, layer), ids)


def _records(path: Path, rank: int, layout: Layout) -> Iterator[_Record]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                rec = _parse(line, f"{path}:{number}", rank, layout)
                if rec is not None:
                    yield rec


def _rank_files(trace_dir: Path) -> list[Path]:
    if not trace_dir.is_dir():
        raise ValueError(f"--trace {str(trace_dir)!r} is not a directory of Megatron router "
                         f"traces (router_trace_rank*.jsonl)")
    found = {int(m.group(1)): p for p in trace_dir.iterdir() if (m := FILE_RE.match(p.name))}
    if not found:
        raise ValueError(f"--trace {str(trace_dir)!r} holds no router_trace_rank*.jsonl file")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ValueError(f"--trace {str(trace_dir)!r} lacks router_trace_rank{missing[0]}.jsonl "
                         f"(ranks 0..{max(found)} must all be there)")
    return [found[r] for r in range(len(found))]


def _micro_batches(
    path: Path, rank: int, layout: Layout, steps: tuple[int | None, int | None], mtp: bool
) -> dict[int, dict[LayerKey, list[_Record]]]:
    """step -> layer -> its micro-batches in order, recomputed forwards dropped."""
    first, last = steps
    out: dict[int, dict[LayerKey, list[_Record]]] = {}
    for rec in _records(path, rank, layout):
        if (rec.key[0] == "mtp" and not mtp) or (first is not None and rec.step < first) \
                or (last is not None and rec.step > last):
            continue
        kept = out.setdefault(rec.step, {}).setdefault(rec.key, [])
        if kept and np.array_equal(kept[-1].ids, rec.ids):
            continue  # the router ran again on the same micro-batch: a recompute
        kept.append(rec)
    return out


def _check_shapes(per_rank: list[dict[int, dict[LayerKey, list[_Record]]]]) -> int:
    """Every rank, step and layer must hold the same micro-batches of the same topk."""
    ref_rank = per_rank[0]
    ref_steps = sorted(ref_rank)
    ref_layers = sorted(ref_rank[ref_steps[0]])
    ref = ref_rank[ref_steps[0]][ref_layers[0]][0]
    topk = int(ref.ids.shape[1])
    for rank, by_step in enumerate(per_rank):
        if sorted(by_step) != ref_steps:
            raise ValueError(f"rank {rank} recorded steps {sorted(by_step)}, rank 0 {ref_steps}")
        for step in ref_steps:
            layers = by_step[step]
            if sorted(layers) != ref_layers:
                raise ValueError(
                    f"rank {rank} recorded layers {sorted(layers)} at step {step}, rank 0 "
                    f"{ref_layers}: pipeline parallelism is not supported"
                )
            counts = {key: len(recs) for key, recs in layers.items()}
            want = len(ref_rank[step][ref_layers[0]])
            for key, recs in layers.items():
                if counts[key] != want:
                    raise _field_error(
                        recs[0].where, "layer",
                        f"{key[2]} ({key[0]}) has {counts[key]} micro-batches at step {step} "
                        f"(after dropping recomputes), layer {ref_layers[0][2]} of rank 0 has "
                        f"{want}: layers must see the same tokens",
                    )
                for rec in recs:
                    if rec.ids.shape[1] != topk:
                        raise _field_error(rec.where, "topk", f"is {rec.ids.shape[1]}, but "
                                           f"{ref.where} has {topk}")
    return topk


def _join_tensor_parallel(recs: list[_Record], layout: Layout) -> np.ndarray:
    """The T tensor-parallel ranks' records of one micro-batch -> [B, S, K] by sample."""
    s_local, b = layout.local_seq, layout.micro_batch_size
    if layout.sequence_parallel:
        parts = [r.ids.reshape(s_local, b, -1) for r in recs]
        return np.concatenate(parts, axis=0).transpose(1, 0, 2)
    for other in recs[1:]:
        if not np.array_equal(other.ids, recs[0].ids):
            raise ValueError(
                f"{other.where} differs from {recs[0].where}: tensor-parallel ranks without "
                f"sequence parallelism route identical copies; pass --sequence-parallel?"
            )
    return recs[0].ids.reshape(s_local, b, -1).transpose(1, 0, 2)


def parse_steps(text: str | None) -> tuple[int | None, int | None]:
    """'FIRST:LAST' (inclusive, either side may be empty) -> (first, last)."""
    if text is None:
        return None, None
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        first, last = (int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise ValueError(f"--steps must be FIRST:LAST (inclusive), got {text!r}") from None
    if first is not None and last is not None and first > last:
        raise ValueError(f"--steps FIRST:LAST needs FIRST <= LAST, got {text!r}")
    return first, last


def load_megatron(
    trace_dir: str | Path,
    layout: Layout,
    steps: tuple[int | None, int | None] = (None, None),
    mtp: bool = False,
) -> Trace:
    """Reads a router trace directory. Returns topk_ids [L, T, K] int64, sample_ids [T] int64
    and layer_ids [L] int64 (no num_experts: the trace does not say it)."""
    files = _rank_files(Path(trace_dir))
    world, tp = len(files), layout.tensor_parallel
    if world % tp:
        raise ValueError(f"--tensor-parallel={tp} does not divide the {world} ranks in "
                         f"{str(trace_dir)!r}")
    per_rank = [_micro_batches(p, r, layout, steps, mtp) for r, p in enumerate(files)]
    if not per_rank[0]:
        raise ValueError(f"{files[0]}: no router records"
                         + ("" if steps == (None, None) else f" in --steps {steps}"))
    topk = _check_shapes(per_rank)
    dp = world // tp
    keys = sorted(per_rank[0][min(per_rank[0])])
    layers: list[list[np.ndarray]] = [[] for _ in keys]  # per layer: [B, S, K] blocks in order
    for step in sorted(per_rank[0]):
        for d in range(dp):
            group = per_rank[d * tp : (d + 1) * tp]
            for li, key in enumerate(keys):
                for m in range(len(group[0][step][key])):
                    layers[li].append(_join_tensor_parallel([g[step][key][m] for g in group],
                                                            layout))
    topk_ids = np.stack([np.concatenate(blocks).reshape(-1, topk) for blocks in layers])
    samples = sum(block.shape[0] for block in layers[0])
    sample_ids = np.repeat(np.arange(samples, dtype=np.int64), layout.seq_length)
    decoder = [k[2] for k in keys if k[0] == "decoder"]
    base = max(decoder) + 1 if decoder else 0
    layer_ids = (*decoder, *range(base, base + len(keys) - len(decoder)))
    return Trace(topk_ids, sample_ids, None, layer_ids, "megatron")
