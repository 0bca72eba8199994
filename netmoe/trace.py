"""Routing traces: the .npz format `netmoe evaluate` reads and the client's recorder writes.

Arrays in the file:
  topk_ids    int [L, T, K]  expert chosen by each token's k-th slot in each MoE layer
                             ([T, K] is read as one layer)
  sample_ids  int [T]        optional: the sample each token belongs to
  num_experts int scalar     optional: experts per layer (else given, or max id + 1)
  layer_ids   int [L]        optional: the model's number of each layer (dense layers skipped)
  model_type  str scalar     optional: where the routing comes from ("mixtral", "megatron", ...)
Consecutive layers must be consecutive MoE layers of the model, so (l, l+1) pairs are real.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

KNOWN = {"topk_ids", "sample_ids", "num_experts", "layer_ids", "model_type"}


@dataclass(frozen=True)
class Trace:
    topk_ids: np.ndarray  # [L, T, K] int64
    sample_ids: np.ndarray | None  # [T] int64
    num_experts: int | None
    layer_ids: np.ndarray | None = None  # [L] int64
    model_type: str | None = None

    @property
    def layers(self) -> int:
        return int(self.topk_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.topk_ids.shape[1])


def _ints(name: str, arr: np.ndarray) -> np.ndarray:
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"trace field {name} must hold integers, got dtype {arr.dtype}")
    if arr.size and int(arr.min()) < 0:
        raise ValueError(f"trace field {name} holds a negative value {int(arr.min())}")
    return arr.astype(np.int64)


def load_trace(path: str | Path) -> Trace:
    """Reads and checks a trace file; errors name the field and the offending value."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read trace {str(path)!r}: {err}") from err
    with data:
        if "topk_ids" not in data.files:
            raise ValueError(f"trace {str(path)!r} has no topk_ids array (found {data.files})")
        topk = _ints("topk_ids", data["topk_ids"])
        if topk.ndim == 2:
            topk = topk[None]
        if topk.ndim != 3 or 0 in topk.shape:
            raise ValueError(f"trace field topk_ids must be [L, T, K], got shape {topk.shape}")
        sample_ids = None
        if "sample_ids" in data.files:
            sample_ids = _ints("sample_ids", data["sample_ids"])
            if sample_ids.shape != (topk.shape[1],):
                raise ValueError(
                    f"trace field sample_ids must have shape ({topk.shape[1]},) to match "
                    f"topk_ids {topk.shape}, got {sample_ids.shape}"
                )
        num_experts = None
        if "num_experts" in data.files:
            raw = data["num_experts"]
            if raw.shape != () or not np.issubdtype(raw.dtype, np.integer) or int(raw) <= 0:
                raise ValueError(f"trace field num_experts must be a positive integer, got {raw!r}")
            num_experts = int(raw)
            if int(topk.max()) >= num_experts:
                raise ValueError(
                    f"trace field topk_ids holds expert {int(topk.max())}, "
                    f"but num_experts={num_experts}"
                )
        layer_ids = None
        if "layer_ids" in data.files:
            layer_ids = _ints("layer_ids", data["layer_ids"])
            if layer_ids.shape != (topk.shape[0],):
                raise ValueError(
                    f"trace field layer_ids must have shape ({topk.shape[0]},) to match "
                    f"topk_ids {topk.shape}, got {layer_ids.shape}"
                )
        model_type = None
        if "model_type" in data.files:
            raw = data["model_type"]
            if raw.shape != () or raw.dtype.kind != "U":
                raise ValueError(f"trace field model_type must be a string, got {raw!r}")
            model_type = str(raw)
    return Trace(topk, sample_ids, num_experts, layer_ids, model_type)


def save_trace(
    path: str | Path,
    topk_ids: np.ndarray,
    sample_ids: np.ndarray | None = None,
    num_experts: int | None = None,
    layer_ids: np.ndarray | None = None,
    model_type: str | None = None,
) -> None:
    """Writes topk_ids [L, T, K] int, sample_ids [T] int, num_experts, layer_ids [L] int and
    model_type in the trace format."""
    arrays: dict[str, np.ndarray] = {"topk_ids": np.asarray(topk_ids)}
    if sample_ids is not None:
        arrays["sample_ids"] = np.asarray(sample_ids)
    if num_experts is not None:
        arrays["num_experts"] = np.asarray(int(num_experts))
    if layer_ids is not None:
        arrays["layer_ids"] = np.asarray(layer_ids)
    if model_type is not None:
        arrays["model_type"] = np.asarray(str(model_type))
    np.savez_compressed(path, **arrays)


def sample_counts(
    trace: Trace, experts: int, tokens_per_sample: int | None = None
) -> np.ndarray:
    """[L, I, E] int64: routes of each sample to each expert in each layer.

    Samples come from sample_ids (sorted, renumbered 0..I-1) or, without them, from cutting the
    token stream into consecutive pieces of tokens_per_sample tokens.
    """
    if int(trace.topk_ids.max()) >= experts:
        raise ValueError(f"trace names expert {int(trace.topk_ids.max())}, but experts={experts}")
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
    samples = int(sample.max()) + 1
    layers = trace.layers
    counts = np.zeros((layers, samples * experts), dtype=np.int64)
    flat = (sample[:, None] * experts + trace.topk_ids).reshape(layers, -1)
    for layer in range(layers):
        counts[layer] = np.bincount(flat[layer], minlength=samples * experts)
    return counts.reshape(layers, samples, experts)
