"""Reads Megatron-core router traces (``--moe-routing-trace-path DIR``) into a netmoe Trace.

Megatron-core's RouterTracer (megatron/core/transformer/moe/router_trace.py) writes one file
``router_trace_rank{r}.jsonl`` per global rank, one JSON line per router call:
``{"step", "stage": "pre_dispatch", "block": "decoder" | "mtp", "layer", "rank", "num_tokens",
"topk", ["mtp_idx",] "top_indices": [[...] * topk] * num_tokens}`` (sidecar .bin files and
their offset fields are ignored). ``layer`` is the index N in the module name
``decoder.layers.N``. The training router returns a boolean routing map, which the tracer turns
into indices with ``nonzero``: each row lists its experts in ascending order, not by score
(counts do not care). Verified against megatron-core at commit d98e8a6 (2026-08-22).

Training (``training_mode=True``): records are buffered and stamped, when the training loop
calls ``advance_step(iteration)`` after each forward-backward run, with that iteration. So a
step's records of one rank hold, in file order:
- evaluation forwards: ``evaluate()`` runs the model with the hooks live and no advance_step,
  so its forwards are stamped with the next training iteration and come first (forward only:
  nothing is recomputed; their micro-batch size may differ); an evaluation after the last
  captured iteration is stamped with the iteration after it;
- the training micro-batches in order, each a forward pass (every MoE layer once, in layer
  order; a repeated MTP layer, ``mtp_use_repeated_layer``, once per MTP depth) followed by the
  layers activation checkpointing recomputes in the backward;
- a rerun of the step (the rerun state machine, ``validate_results``) repeats the whole
  forward-backward with the same data and calls advance_step(iteration) again: the step's
  micro-batches come twice.
The reader cuts each rank's step into forward passes by structure (the full sequence of MoE
layers), attaches the records that follow a forward and are not a new one to it as recomputes
(never by comparing routing), and keeps the last M passes of training size as the step's
micro-batches; M is --global-batch-size / (micro-batch size x data-parallel size), or without it
the number most steps have. Passes before them are reruns (they recompute, like training) or
evaluation forwards (``--forwards evaluation`` reads these instead). With activation recompute,
training passes are those with the recompute pattern most passes show and evaluation forwards
those without. Limits: without recompute, a rerun cannot be told from an evaluation forward and
counts as one, and an evaluation after the last captured iteration reads as that step's
micro-batches; when most steps evaluate, give --global-batch-size; a block recompute of every
MoE layer in one block re-runs the routers in forward order and reads as another micro-batch.
Megatron's tracer skips a router call whose routing map lost tokens (token dropping): a trace
with such a gap is refused.

Token -> sample rule:
- The embedding transposes [B, S, H] to sequence-first [S, B, H]; with sequence parallelism
  it keeps the contiguous slice t of the sequence on tensor-parallel rank t
  (``_split_along_first_dim``), so each rank holds [S/T, B, H].
- ``TopKRouter.routing`` takes ``seq_length, bsz = logits.shape[:2]`` and flattens with
  ``logits.view(-1, num_experts)``: row r of a record is position r // B (of that rank's
  slice) of micro-batch sequence r % B.
- Samples are (step, data-parallel rank, micro-batch, sequence in it), numbered in that order;
  tokens are written sample by sample, position by position; the trace's round fields say each
  sample's step, micro-batch and data-parallel rank.
- Ranks: Megatron-LM's orders ``tp-cp-ep-dp-pp`` (default) and ``tp-cp-ep-pp-dp``
  (``--use-tp-pp-dp-mapping``) with pipeline and context parallel size 1, where both give
  tensor-parallel rank = r % T and data-parallel rank = r // T (parallel_state.RankGenerator;
  expert parallelism does not change the attention side's data-parallel rank). Without
  sequence parallelism the T ranks of one data-parallel rank hold identical copies (one is
  kept, the others must agree); with it their slices are joined in tensor-parallel rank order.
  Pipeline parallelism (ranks recording different layers) and context parallelism are not
  supported.

Inference (``training_mode=False``, or ``record_indices`` from the text generation controller):
each step is one forward of the engine with every request's tokens flattened together (prefill
and decode tokens; ``record_indices`` numbers layers from 1, as ``layer_number`` does), so a step
holds one record per layer and the token count changes from step to step. Such a trace is read
as an inference trace: each step's tokens on one data-parallel rank form one sample (requests
are not told apart in the file), layer numbers as written, model_type "megatron-inference".

Layers: the decoder's MoE layers by layer number (dense layers have no router, so they never
appear and consecutive MoE layers form the pairs); MTP layers only when asked for, after the
decoder, by (mtp_idx, layer, depth), numbered on from the last decoder layer.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from netmoe.trace import Trace

FILE_RE = re.compile(r"^router_trace_rank(\d+)\.jsonl$")
FIELDS = ("step", "block", "layer", "rank", "num_tokens", "topk", "top_indices")
FORWARDS = ("training", "evaluation")

LayerKey = tuple[str, int, int]  # (block, mtp_idx or -1, layer); sorts decoder before mtp


@dataclass(frozen=True)
class Layout:
    """How the run was parallelized and batched (the Megatron arguments of the same names;
    global_batch_size None: micro-batches per step taken from the trace)."""

    seq_length: int
    micro_batch_size: int
    tensor_parallel: int = 1
    sequence_parallel: bool = False
    global_batch_size: int | None = None

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

    def micro_batches(self, dp: int) -> int | None:
        """Training micro-batches per step on each data-parallel rank, if the batch is given."""
        if self.global_batch_size is None:
            return None
        per_step = self.micro_batch_size * dp
        if self.global_batch_size % per_step:
            raise ValueError(f"--global-batch-size={self.global_batch_size} is not a multiple "
                             f"of --micro-batch-size={self.micro_batch_size} x {dp} "
                             f"data-parallel ranks")
        return self.global_batch_size // per_step


@dataclass(frozen=True)
class _Record:
    where: str  # "file:line" for errors
    step: int
    key: LayerKey
    ids: np.ndarray  # [num_tokens, topk] int64

    @property
    def tokens(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class _Pass:
    """One forward pass of a micro-batch (its records in forward order) and the records the
    backward recomputed after it."""

    forward: list[_Record]
    recomputes: list[_Record] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.forward[0].tokens


def _field_error(where: str, field_name: str, msg: str) -> ValueError:
    return ValueError(f"{where}: field {field_name!r} {msg}")


def _int_field(rec: dict, name: str, where: str) -> int:
    value = rec[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _field_error(where, name, f"must be a non-negative integer, got {value!r}")
    return value


def _parse(line: str, where: str, rank: int) -> _Record | None:
    """One JSON line -> a record; None for records that carry no routing (other stages)."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not a complete JSON record ({err.msg}); truncated file?") \
            from err
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
    for name in FIELDS:
        if name not in rec:
            raise _field_error(where, name, "is missing")
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
    return _Record(where, step, ("decoder" if mtp < 0 else "mtp", mtp, layer), ids)


def _records(path: Path, rank: int, steps: tuple[int | None, int | None]
             ) -> dict[int, list[_Record]]:
    """step -> the rank's records of that step, in file order."""
    first, last = steps
    out: dict[int, list[_Record]] = {}
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = _parse(line, f"{path}:{number}", rank)
            if rec is None or (first is not None and rec.step < first) \
                    or (last is not None and rec.step > last):
                continue
            out.setdefault(rec.step, []).append(rec)
    return out


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


def _name(key: LayerKey) -> str:
    return f"layer {key[2]} ({key[0]}" + ("" if key[1] < 0 else f" {key[1]}") + ")"


def _pattern(per_rank: list[dict[int, list[_Record]]]) -> list[LayerKey]:
    """The keys of one forward pass in order: every layer once, a repeated MTP layer once per
    depth (its first run of consecutive records, as a forward calls it depth after depth)."""
    have = [{r.key for recs in by_step.values() for r in recs} for by_step in per_rank]
    keys = sorted(have[0])
    for rank, by_step in enumerate(per_rank):
        if have[rank] != have[0]:
            raise ValueError(f"rank {rank} recorded layers {sorted(k[2] for k in have[rank])}, "
                             f"rank 0 {[k[2] for k in keys]}: pipeline parallelism is not "
                             f"supported")
        for step, recs in sorted(by_step.items()):
            gone = sorted(set(keys) - {r.key for r in recs})
            if gone:
                raise ValueError(
                    f"{recs[0].where}: rank {rank} has no record of {_name(gone[0])} at step "
                    f"{step}: Megatron's tracer writes no record for a router call whose "
                    f"routing map lost tokens (token dropping, --moe-expert-capacity-factor), "
                    f"so this trace cannot be read")
    recs = per_rank[0][min(per_rank[0])]
    depth = dict.fromkeys(keys, 1)
    for key in keys:
        first = next(i for i, r in enumerate(recs) if r.key == key)
        while first + depth[key] < len(recs) and recs[first + depth[key]].key == key:
            depth[key] += 1
    return [k for k in keys for _ in range(depth[k] if k[0] == "mtp" else 1)]


def _passes(recs: list[_Record], pattern: list[LayerKey], rank: int, step: int) -> list[_Pass]:
    """A rank's records of one step -> its forward passes with their recomputes."""
    n, out, i = len(pattern), [], 0
    cap = Counter(pattern)
    while i < len(recs):
        window = recs[i:i + n]
        if [r.key for r in window] == pattern and len({r.tokens for r in window}) == 1:
            out.append(_Pass(window))
            i += n
            continue
        rec = recs[i]
        if out and sum(r.key == rec.key for r in out[-1].recomputes) < cap[rec.key] \
                and rec.tokens == out[-1].tokens:
            out[-1].recomputes.append(rec)
            i += 1
            continue
        raise ValueError(
            f"{rec.where}: rank {rank}'s records of step {step} are not whole forward passes "
            f"(layers {[k[2] for k in pattern]} in order) each followed by recomputed layers: "
            f"{_name(rec.key)} with num_tokens={rec.tokens} is out of place; Megatron's tracer "
            f"writes no record for a router call whose routing map lost tokens (token "
            f"dropping), so such a trace cannot be read")
    return out


def _select(per_rank: list[dict[int, list[_Pass]]], layout: Layout, dp: int, forwards: str
            ) -> list[dict[int, list[_Pass]]]:
    """Each rank's chosen passes per step: the training micro-batches (the last M passes of
    training size) or the evaluation forwards (the forward-only passes before them)."""
    size = layout.local_seq * layout.micro_batch_size
    last = max(max(by_step) for by_step in per_rank)
    # Activation recompute is configured once: every training micro-batch recomputes the same
    # layers in its backward (the pattern most passes of training size show), and an evaluation
    # forward recomputes nothing.
    def redo(p: _Pass) -> tuple[LayerKey, ...]:
        return tuple(r.key for r in p.recomputes)

    shapes = Counter(redo(p) for by_step in per_rank for passes in by_step.values()
                     for p in passes if p.tokens == size)
    usual = max(shapes, key=lambda k: (shapes[k], k)) if shapes else ()
    for by_step in per_rank:
        for step, passes in by_step.items():
            for p in passes:
                if p.recomputes and redo(p) != usual:
                    rec = p.recomputes[0]
                    raise ValueError(
                        f"{rec.where}: {_name(rec.key)} follows a complete forward pass at step "
                        f"{step} as no other micro-batch's backward does (recomputed "
                        f"{[k[2] for k in redo(p)]}, usually {[k[2] for k in usual]}): a router "
                        f"record is missing; Megatron's tracer writes none for a router call "
                        f"whose routing map lost tokens (token dropping), so this trace cannot "
                        f"be read")

    def trains(p: _Pass) -> bool:
        return p.tokens == size and redo(p) == usual

    m = layout.micro_batches(dp)
    if m is None:
        counts = Counter(sum(trains(p) for p in passes)
                         for by_step in per_rank for passes in by_step.values())
        m = max(counts, key=lambda c: (counts[c], -c))
    if m == 0:
        rec = per_rank[0][min(per_rank[0])][0].forward[0]
        if rec.tokens % layout.local_seq:
            raise _field_error(rec.where, "num_tokens", f"is {rec.tokens}, not a multiple of the "
                               f"{layout.local_seq} sequence positions per rank (--seq-length)")
        raise _field_error(rec.where, "num_tokens", f"is {rec.tokens} = "
                           f"{rec.tokens // layout.local_seq} sequences of {layout.local_seq}, "
                           f"but --micro-batch-size={layout.micro_batch_size}")
    out = []
    for rank, by_step in enumerate(per_rank):
        chosen: dict[int, list[_Pass]] = {}
        for step, passes in sorted(by_step.items()):
            sized = [p for p in passes if trains(p)]
            if len(sized) < m:
                if step != last or sized:
                    raise ValueError(
                        f"{passes[0].forward[0].where}: rank {rank} has {len(sized)} forward "
                        f"passes of {size} tokens at step {step}, but a step has {m} training "
                        f"micro-batches (" + ("--global-batch-size" if layout.global_batch_size
                                              else "most steps") + " say so); a router record "
                        "is missing (Megatron's tracer skips a router call whose routing map "
                        "lost tokens to token dropping) or the batch size changed")
                train: list[_Pass] = []  # an evaluation after the last captured iteration
            else:
                train = sized[-m:]
            if forwards == "training":
                chosen[step] = train
            else:
                chosen[step] = [p for p in passes
                                if not p.recomputes and all(p is not t for t in train)]
            for p in chosen[step]:
                if p.tokens % layout.local_seq:
                    raise _field_error(p.forward[0].where, "num_tokens",
                                       f"is {p.tokens}, not a multiple of the {layout.local_seq}"
                                       f" sequence positions per rank (--seq-length)")
        out.append(chosen)
    return out


def _join_tensor_parallel(recs: list[_Record], layout: Layout) -> np.ndarray:
    """The T tensor-parallel ranks' records of one micro-batch -> [B, S, K] by sample."""
    s_local = layout.local_seq
    b = recs[0].tokens // s_local
    if layout.sequence_parallel:
        parts = [r.ids.reshape(s_local, b, -1) for r in recs]
        return np.concatenate(parts, axis=0).transpose(1, 0, 2)
    _check_copies(recs)
    return recs[0].ids.reshape(s_local, b, -1).transpose(1, 0, 2)


def _check_copies(recs: list[_Record]) -> None:
    for other in recs[1:]:
        if not np.array_equal(other.ids, recs[0].ids):
            raise ValueError(
                f"{other.where} differs from {recs[0].where}: tensor-parallel ranks without "
                f"sequence parallelism route identical copies; pass --sequence-parallel?"
            )


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


def is_inference(per_rank: list[dict[int, list[_Record]]]) -> bool:
    """An inference trace: every step holds each layer once, and the token count changes from
    step to step (a training step holds whole micro-batches of the same size)."""
    tokens = set()
    for by_step in per_rank:
        for recs in by_step.values():
            keys = [r.key for r in recs]
            if len(keys) != len(set(keys)):
                return False
            tokens |= {r.tokens for r in recs}
    return len(tokens) > 1


def _inference(per_rank: list[dict[int, list[_Record]]], tp: int, mtp: bool) -> Trace:
    """Each step's tokens on each data-parallel rank as one sample."""
    keys = sorted({r.key for by_step in per_rank for recs in by_step.values() for r in recs
                   if mtp or r.key[0] == "decoder"})
    dp = len(per_rank) // tp
    layers: list[list[np.ndarray]] = [[] for _ in keys]
    fields: list[tuple[int, int, int]] = []
    for step in sorted(per_rank[0]):
        for d in range(dp):
            group = [{r.key: r for r in per_rank[d * tp + t].get(step, [])} for t in range(tp)]
            missing = [k for k in keys if k not in group[0]]
            if missing:
                raise ValueError(f"inference trace: rank {d * tp} has no record of "
                                 f"{_name(missing[0])} at step {step}")
            for li, key in enumerate(keys):
                recs = [g[key] for g in group if key in g]
                if len(recs) != tp or len({r.tokens for r in recs}) != 1:
                    raise ValueError(f"inference trace: the {tp} tensor-parallel ranks of "
                                     f"data-parallel rank {d} disagree on {_name(key)} at step "
                                     f"{step}")
                _check_copies(recs)
                layers[li].append(recs[0].ids)
            fields.append((step, 0, d))
    sizes = [block.shape[0] for block in layers[0]]
    topk_ids = np.stack([np.concatenate(blocks) for blocks in layers])
    per_token = np.repeat(np.asarray(fields, dtype=np.int64), sizes, axis=0)
    sample_ids = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    layer_ids = tuple(_numbers(keys))
    return Trace(topk_ids, sample_ids, None, layer_ids, "megatron-inference",
                 per_token[:, 0], per_token[:, 1], per_token[:, 2])


def _numbers(keys: list[LayerKey]) -> list[int]:
    """Decoder layers by their number, MTP layers numbered on after the last decoder layer."""
    decoder = [k[2] for k in keys if k[0] == "decoder"]
    base = max(decoder) + 1 if decoder else 0
    return [*decoder, *range(base, base + len(keys) - len(decoder))]


def load_megatron(
    trace_dir: str | Path,
    layout: Layout | None,
    steps: tuple[int | None, int | None] = (None, None),
    mtp: bool = False,
    forwards: str = "training",
    tensor_parallel: int = 1,
) -> Trace:
    """Reads a router trace directory. Returns topk_ids [L, T, K] int64, sample_ids [T] int64,
    layer_ids [L] int64 and the round fields [T] int64 (no num_experts: the trace does not say
    it). layout None: only an inference trace can be read (tensor_parallel says its T)."""
    if forwards not in FORWARDS:
        raise ValueError(f"--forwards must be one of {', '.join(FORWARDS)}, got {forwards!r}")
    files = _rank_files(Path(trace_dir))
    world = len(files)
    tp = layout.tensor_parallel if layout is not None else tensor_parallel
    if world % tp:
        raise ValueError(f"--tensor-parallel={tp} does not divide the {world} ranks in "
                         f"{str(trace_dir)!r}")
    records = [_records(p, r, steps) for r, p in enumerate(files)]
    if not records[0]:
        raise ValueError(f"{files[0]}: no router records"
                         + ("" if steps == (None, None) else f" in --steps {steps}"))
    if is_inference(records):
        return _inference(records, tp, mtp)
    if layout is None:
        raise ValueError("--trace-format megatron needs --seq-length and --micro-batch-size "
                         "(the trace is a training trace)")
    pattern = _pattern(records)
    ref = records[0][min(records[0])][0]
    for by_step in records:
        for recs in by_step.values():
            for rec in recs:
                if rec.ids.shape[1] != ref.ids.shape[1]:
                    raise _field_error(rec.where, "topk", f"is {rec.ids.shape[1]}, but "
                                       f"{ref.where} has {ref.ids.shape[1]}")
    passes = [{step: _passes(recs, pattern, r, step) for step, recs in by_step.items()}
              for r, by_step in enumerate(records)]
    dp = world // tp
    chosen = _select(passes, layout, dp, forwards)
    for rank, by_step in enumerate(chosen):
        if sorted(by_step) != sorted(chosen[0]):
            raise ValueError(f"rank {rank} recorded steps {sorted(by_step)}, rank 0 "
                             f"{sorted(chosen[0])}")
        for step, mine in by_step.items():
            ref_passes = chosen[0].get(step, [])
            if [p.tokens for p in mine] != [p.tokens for p in ref_passes]:
                where = mine[0].forward[0].where if mine else str(files[rank])
                raise ValueError(f"{where}: rank {rank} has {forwards} micro-batches of "
                                 f"{[p.tokens for p in mine]} tokens at step {step}, rank 0 "
                                 f"{[p.tokens for p in ref_passes]}")
    keep = [i for i, k in enumerate(pattern) if mtp or k[0] == "decoder"]
    layers: list[list[np.ndarray]] = [[] for _ in keep]  # per layer: [B, S, K] blocks in order
    fields: list[tuple[int, int, int]] = []  # per sample: step, micro-batch, data-parallel rank
    for step in sorted(chosen[0]):
        for d in range(dp):
            group = chosen[d * tp:(d + 1) * tp]
            for j in range(len(chosen[0][step])):
                micro = [g[step][j] for g in group]
                for li, idx in enumerate(keep):
                    layers[li].append(_join_tensor_parallel([p.forward[idx] for p in micro],
                                                            layout))
                fields += [(step, j, d)] * layers[0][-1].shape[0]
    if not fields:
        raise ValueError(f"{str(trace_dir)!r} holds no {forwards} forward passes"
                         + ("" if steps == (None, None) else f" in --steps {steps}"))
    topk_ids = np.stack([np.concatenate([b.reshape(-1, b.shape[2]) for b in blocks])
                         for blocks in layers])
    seqs = [b.shape[1] for b in layers[0] for _ in range(b.shape[0])]
    sample_ids = np.repeat(np.arange(len(seqs), dtype=np.int64), seqs)
    per_token = np.repeat(np.asarray(fields, dtype=np.int64), seqs, axis=0)
    return Trace(topk_ids, sample_ids, None, tuple(_numbers([pattern[i] for i in keep])),
                 "megatron", per_token[:, 0], per_token[:, 1], per_token[:, 2])
