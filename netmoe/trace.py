"""Routing traces: the .npz format `netmoe evaluate` reads and the client's recorder writes.

Arrays in the file:
  topk_ids    int [L, T, K]  expert chosen by each token's k-th slot in each MoE layer
                             ([T, K] is read as one layer)
  sample_ids  int [T]        optional: the sample each token belongs to
  num_experts int scalar     optional: experts per layer (else given, or max id + 1)
  layer_ids   int [L]        optional: the model's number of each recorded MoE layer (increasing)
  model_type  str scalar     optional: where the routing comes from ("mixtral", "megatron", ...)
  step_ids        int [T]    optional, with the two below: the training step of each token's
                             sample
  micro_batch_ids int [T]    the micro-batch of that step the sample was in
  dp_ranks        int [T]    the data-parallel rank (device) the sample is at home on
Consecutive layers must be consecutive MoE layers of the model, so (l, l+1) pairs are real.
The three round fields come together: a round (one dispatch and combine) is the samples of one
(step, micro-batch) in one expert-parallel group of data-parallel ranks, and every token of a
sample carries the same values.
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROUND_FIELDS = ("step_ids", "micro_batch_ids", "dp_ranks")
KNOWN = {"topk_ids", "sample_ids", "num_experts", "layer_ids", "model_type", *ROUND_FIELDS}
# Largest route-count array sample_counts allocates (layers x samples x experts int64, 1 GiB):
# a corrupt expert id must end in an error, not in an out-of-memory kill.
MAX_COUNT_CELLS = 1 << 27


@dataclass(frozen=True)
class Trace:
    topk_ids: np.ndarray  # [L, T, K] int64
    sample_ids: np.ndarray | None  # [T] int64
    num_experts: int | None
    layer_ids: tuple[int, ...] | None = None  # [L]
    model_type: str | None = None
    step_ids: np.ndarray | None = None  # [T] int64; the round fields are all set or all None
    micro_batch_ids: np.ndarray | None = None  # [T] int64
    dp_ranks: np.ndarray | None = None  # [T] int64

    @property
    def has_rounds(self) -> bool:
        return self.step_ids is not None

    @property
    def layers(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.topk_ids.shape[1])


def _ints(name: str, arr: np.ndarray) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"field {name} must hold integers, got dtype {arr.dtype}")
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"field {name} holds a negative value {int(arr.min())}")
    return arr.astype(np.int64)


def _open(path: str | Path) -> np.lib.npyio.NpzFile:
    """The .npz archive at path; ValueError says what the file is instead."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as err:
        raise ValueError(f"cannot read trace {str(path)!r}: {err.strerror}") from None
    if magic == b"\x93NUMPY":
        raise ValueError(f"trace {str(path)!r} is a single .npy array, not an .npz archive: save "
                         f"it with np.savez(path, topk_ids=array)")
    if not magic.startswith(b"PK"):
        raise ValueError(f"trace {str(path)!r} is not an .npz archive (it starts with "
                         f"{magic!r}, not a zip header)")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"trace {str(path)!r} is not a readable .npz archive "
                         f"(truncated?): {err}") from None


def load_trace(path: str | Path) -> Trace:
    """Reads and checks a trace file; errors name the file, the field and the offending value."""
    data = _open(path)
    try:
        with data:
            return _parse(data)
    except ValueError as err:
        raise ValueError(f"trace {str(path)!r}: {err}") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        # A damaged member shows up only when it is read.
        raise ValueError(f"trace {str(path)!r} is damaged (truncated?): {err}") from None


def _field(data: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
    try:
        return data[name]
    except ValueError as err:  # object arrays need pickle, which a trace never does
        raise ValueError(f"field {name} cannot be read without pickle ({err}); a trace holds "
                         f"integer arrays only") from None


def _parse(data: np.lib.npyio.NpzFile) -> Trace:
    if "topk_ids" not in data.files:
        raise ValueError(f"has no topk_ids array (found {data.files})")
    topk = _ints("topk_ids", _field(data, "topk_ids"))
    if topk.ndim == 2:
        topk = topk[None]
    if topk.ndim != 3 or 0 in topk.shape:
        raise ValueError(f"field topk_ids must be [L, T, K], got shape {topk.shape}")
    sample_ids = None
    if "sample_ids" in data.files:
        sample_ids = _ints("sample_ids", _field(data, "sample_ids"))
        if sample_ids.shape != (topk.shape[1],):
            raise ValueError(
                f"field sample_ids must have shape ({topk.shape[1]},) to match "
                f"topk_ids {topk.shape}, got {sample_ids.shape}"
            )
    num_experts = None
    if "num_experts" in data.files:
        raw = _field(data, "num_experts")
        if raw.shape != () or not np.issubdtype(raw.dtype, np.integer) or int(raw) <= 0:
            raise ValueError(f"field num_experts must be a positive integer, got {raw!r}")
        num_experts = int(raw)
        if int(topk.max()) >= num_experts:
            raise ValueError(
                f"field topk_ids holds expert {int(topk.max())}, but num_experts={num_experts}"
            )
    layer_ids = None
    if "layer_ids" in data.files:
        raw = _ints("layer_ids", _field(data, "layer_ids"))
        if raw.shape != (topk.shape[0],) or np.any(np.diff(raw) <= 0):
            raise ValueError(f"field layer_ids must be {topk.shape[0]} increasing layer numbers "
                             f"(one per layer of topk_ids), got {raw.tolist()}")
        layer_ids = tuple(int(x) for x in raw)
    model_type = None
    if "model_type" in data.files:
        raw = _field(data, "model_type")
        if raw.shape != () or raw.dtype.kind != "U":
            raise ValueError(f"field model_type must be a string, got {raw!r}")
        model_type = str(raw)
    present = [name for name in ROUND_FIELDS if name in data.files]
    rounds: list[np.ndarray | None] = [None] * len(ROUND_FIELDS)
    if present:
        if len(present) != len(ROUND_FIELDS):
            raise ValueError(f"fields {', '.join(ROUND_FIELDS)} come together; the trace has "
                             f"only {', '.join(present)}")
        rounds = [_ints(name, _field(data, name)) for name in ROUND_FIELDS]
        for name, arr in zip(ROUND_FIELDS, rounds, strict=True):
            if arr.shape != (topk.shape[1],):
                raise ValueError(f"field {name} must have shape ({topk.shape[1]},) to match "
                                 f"topk_ids {topk.shape}, got {arr.shape}")
    return Trace(topk, sample_ids, num_experts, layer_ids, model_type, *rounds)


def save_trace(
    path: str | Path,
    topk_ids: np.ndarray,
    sample_ids: np.ndarray | None = None,
    num_experts: int | None = None,
    layer_ids: object | None = None,
    model_type: str | None = None,
    rounds: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> None:
    """Writes topk_ids [L, T, K] int, sample_ids [T] int, num_experts, layer_ids [L] int,
    model_type and rounds (step_ids, micro_batch_ids, dp_ranks: [T] int each) in the trace
    format."""
    arrays: dict[str, np.ndarray] = {"topk_ids": np.asarray(topk_ids)}
    if sample_ids is not None:
        arrays["sample_ids"] = np.asarray(sample_ids)
    if num_experts is not None:
        arrays["num_experts"] = np.asarray(int(num_experts))
    if layer_ids is not None:
        arrays["layer_ids"] = np.asarray(layer_ids)
    if model_type is not None:
        arrays["model_type"] = np.asarray(str(model_type))
    if rounds is not None:
        arrays.update(zip(ROUND_FIELDS, (np.asarray(r) for r in rounds), strict=True))
    np.savez_compressed(path, **arrays)


def write(path: str | Path, trace: Trace, num_experts: int | None = None) -> None:
    """save_trace of every field of trace (num_experts overrides the trace's when given)."""
    rounds = None if not trace.has_rounds else \
        (trace.step_ids, trace.micro_batch_ids, trace.dp_ranks)
    save_trace(path, trace.topk_ids, trace.sample_ids, num_experts or trace.num_experts,
               trace.layer_ids, trace.model_type, rounds)


def merge_traces(traces: list[Trace]) -> Trace:
    """The tokens of several traces of the same layers (e.g. one per data-parallel rank) one
    after another; each trace's sample ids are shifted past the previous ones' so samples stay
    apart. ValueError when the traces disagree on layers, experts, model or round fields."""
    first = traces[0]
    for t in traces[1:]:
        for name in ("layer_ids", "num_experts", "model_type", "has_rounds"):
            if getattr(t, name) != getattr(first, name):
                raise ValueError(f"traces to merge disagree on {name}: {getattr(first, name)!r} "
                                 f"and {getattr(t, name)!r}")
        if t.topk_ids.shape[::2] != first.topk_ids.shape[::2]:
            raise ValueError(f"traces to merge have topk_ids of shapes {first.topk_ids.shape} "
                             f"and {t.topk_ids.shape} (layers and top-k must agree)")
    if any(t.sample_ids is None for t in traces):
        raise ValueError("traces to merge need sample_ids")
    shifted, offset = [], 0
    for t in traces:
        _, local = np.unique(t.sample_ids, return_inverse=True)
        shifted.append(local.astype(np.int64) + offset)
        offset += int(local.max()) + 1
    rounds = [None if not first.has_rounds else np.concatenate([getattr(t, name) for t in traces])
              for name in ROUND_FIELDS]
    return Trace(np.concatenate([t.topk_ids for t in traces], axis=1), np.concatenate(shifted),
                 first.num_experts, first.layer_ids, first.model_type, *rounds)


def sample_counts(
    trace: Trace, experts: int, tokens_per_sample: int | None = None
) -> np.ndarray:
    """[L, I, E] int64: routes of each sample to each expert in each layer.

    Samples come from sample_ids (sorted, renumbered 0..I-1) or, without them, from cutting the
    token stream into consecutive pieces of tokens_per_sample tokens.
    """
    if int(trace.topk_ids.max()) >= experts:
        raise ValueError(f"trace names expert {int(trace.topk_ids.max())}, but experts={experts}")
    sample = sample_index(trace, tokens_per_sample)
    samples = int(sample.max()) + 1
    layers = trace.layers
    if layers * samples * experts > MAX_COUNT_CELLS:
        raise ValueError(
            f"route counts of {layers} layers x {samples} samples x {experts} experts would "
            f"exceed {MAX_COUNT_CELLS} cells; topk_ids names expert {int(trace.topk_ids.max())}: "
            f"a corrupt id, or give the number of experts"
        )
    counts = np.zeros((layers, samples * experts), dtype=np.int64)
    flat = (sample[:, None] * experts + trace.topk_ids).reshape(layers, -1)
    for layer in range(layers):
        counts[layer] = np.bincount(flat[layer], minlength=samples * experts)
    return counts.reshape(layers, samples, experts)


def sample_index(trace: Trace, tokens_per_sample: int | None = None) -> np.ndarray:
    """[T] int64: the sample (0..I-1) of each token, as sample_counts numbers them."""
    if trace.sample_ids is not None:
        _, sample = np.unique(trace.sample_ids, return_inverse=True)
    else:
        if tokens_per_sample is None or tokens_per_sample <= 0:
            raise ValueError(
                f"the trace has no sample_ids: pass a positive tokens_per_sample, "
                f"got {tokens_per_sample!r}"
            )
        if trace.tokens % tokens_per_sample:
            raise ValueError(
                f"tokens={trace.tokens} is not divisible by tokens_per_sample={tokens_per_sample}"
            )
        sample = np.arange(trace.tokens) // tokens_per_sample
    return sample.astype(np.int64)


def sample_rounds(trace: Trace, tokens_per_sample: int | None = None) -> np.ndarray | None:
    """[I, 3] int64: (step, micro-batch, data-parallel rank) of each sample, numbered as
    sample_counts numbers them; None when the trace has no round fields. ValueError when a
    sample's tokens disagree."""
    if not trace.has_rounds:
        return None
    sample = sample_index(trace, tokens_per_sample)
    samples = int(sample.max()) + 1
    out = np.zeros((samples, len(ROUND_FIELDS)), dtype=np.int64)
    for c, name in enumerate(ROUND_FIELDS):
        values = getattr(trace, name)
        out[sample, c] = values
        bad = np.flatnonzero(out[sample, c] != values)
        if bad.size:
            i = int(sample[bad[0]])
            seen = sorted({int(v) for v in values[sample == i]})
            raise ValueError(f"field {name} must be the same for every token of a sample; "
                             f"sample {i} has {seen}")
    return out
