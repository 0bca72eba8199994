"""What one training rank reports: ``RankResult``, the per-rank record every trainer (the
reference MoE, the Hugging Face and the torchtitan demos) writes as JSON and
``netmoe.app.reference.launch.run_ranks`` reads back for the demo and its report (the cluster
bench's ranks, ``netmoe.app.cluster.rank``, write the same for ``netmoe.app.cluster.train``).

Fields every trainer has come first; the placement's, when the run had a placement hook, are
one nested record; a family's own fields are optional (None where the family has none).
``from_json`` names the field (with its path, e.g. ``placement.plans``) that a rank's JSON lacks
or has unknown, so a trainer and its reader cannot drift apart silently.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class PlacementResult:
    """A rank that trained with a placement hook (netmoe.client.planning.PlacementStats), all
    steps together. Seconds: plan_wait (what placement added around the combines, the reply
    included), submit (histograms and submission), reply (blocked on the plan source),
    exchange (the combines' control exchanges that carried the offers). Counts: fallbacks
    (layers run with home placement for want of a plan) by reason, plans applied, samples
    moved; solve_seconds: the solver's time per plan; rejected: the service's refusal of the
    job ("" without a client or none)."""

    plan_wait_seconds: float
    submit_seconds: float
    reply_seconds: float
    exchange_seconds: float
    fallbacks: int
    fallback_reasons: dict[str, int]
    plans: int
    moved: int
    solve_seconds: list[float]
    rejected: str


@dataclass(frozen=True)
class ExpertAdvice:
    """RecommendExperts' answer as rank 0 got it: recommended (adopt the maps) and why; maps
    [L][E] (device of each expert); saving_per_step and migration_cost in ``unit`` (routes or
    seconds), break_even_steps (None: never); the move: moved_experts (moved_inter across
    nodes), migration_bytes; held_out: inter/intra routes of the held-out steps per kind
    (home, sample_only, joint); fit_steps and held_out_steps: [first, last] steps."""

    recommended: bool
    reason: str
    maps: list[list[int]]
    unit: str
    saving_per_step: float
    migration_cost: float
    break_even_steps: float | None
    moved_experts: int
    moved_inter: int
    migration_bytes: int
    held_out: dict[str, dict[str, int]]
    fit_steps: list[int]
    held_out_steps: list[int]


@dataclass(frozen=True)
class ReplicaAdvice:
    """The service's answer about expert copies (with replica_budget): recommended and why;
    per step, routes saved (saving_per_step) and the copies' gradient sync (sync_per_step) in
    the advice's unit; memory_bytes of all copies; held_out_inter: held-out inter-node routes
    with them; cross_node_copies."""

    recommended: bool
    reason: str
    saving_per_step: float
    sync_per_step: float
    memory_bytes: int
    held_out_inter: int
    cross_node_copies: int


@dataclass(frozen=True)
class ExpertMoves:
    """The reference trainer's expert placement (TrainConfig.adopt_experts_at, or copies in
    force from step 0): rank 0's calls to the service, the same on every rank, then this rank's
    share of the moves.

    error: "" or the failed call ("RecommendExperts: CODE: details", "ConfirmExperts: ...").
    With adopt_experts_at: step (the first step under the new maps), bytes_per_expert
    (parameters + optimizer state moved per expert), grad_bytes_weighed (an expert's gradient
    bytes the copies' sync was weighed with, 0 under "force"), advice (None when the call
    failed), adopted (the maps were confirmed and are in force).
    Copies: replicas (the service's answer), copies ([L] [expert, device] by original id:
    proposed, or TrainConfig.copies), route_tables ([L][J][E] holder of each expert per source
    rank, under max_load_ratio), load ({"predicted", "joint"}: [mean, worst] load ratio),
    copies_adopted (created), copies_confirmed (TrainConfig.copies confirmed with the service).
    This rank: sent_bytes and adopt_seconds moving experts, copy_sent_bytes and copy_seconds
    creating copies."""

    error: str = ""
    step: int | None = None
    bytes_per_expert: int | None = None
    grad_bytes_weighed: int | None = None
    advice: ExpertAdvice | None = None
    adopted: bool = False
    replicas: ReplicaAdvice | None = None
    copies: list[list[list[int]]] | None = None
    route_tables: list[list[list[int]]] | None = None
    load: dict[str, list[float]] | None = None
    copies_adopted: bool = False
    copies_confirmed: bool = False
    sent_bytes: int = 0
    adopt_seconds: float = 0.0
    copy_sent_bytes: int = 0
    copy_seconds: float = 0.0


@dataclass(frozen=True)
class ModelInfo:
    """The model a Hugging Face or torchtitan rank trained: this rank's parameter count, MoE
    layers, experts per layer, top_k, the model type (transformers' model_type, torchtitan's
    family)."""

    parameters: int
    layers: int
    experts: int
    top_k: int
    model_type: str


@dataclass(frozen=True)
class RankResult:
    """One training rank's results (see the module docstring).

    Every trainer: rank; loss: the global mean loss per step; step_seconds: wall seconds per
    step; a2a_seconds: seconds inside the All-to-Alls, control_seconds in the small control
    exchanges before them, allreduce_seconds in the gradient all-reduce (0.0 where torchtitan
    does not time it), all steps; routes: [L][3] inter-node, intra-node, local routes this
    rank sent (dispatch + combine, from the All-to-All split sizes), all steps; step_routes:
    [steps][L][3] the same per step; bytes_per_route: phase ("dispatch", "combine") -> bytes
    per route (None: torchtitan's stock path keeps no byte counts).

    placement: with a placement hook (placement "service" or "random"), else None.

    The reference trainer: first_step (a resumed run's first step); copy_sync_seconds (summing
    expert copies' gradients, all steps); expert_moves (None without expert placement);
    param_checksum: parameter name -> [sum, sum of squares], experts by original id;
    a2a_calls: one [step, layer, phase, start, end, bytes sent to each rank [J]] per tagged
    exchange (netmoe.client.dispatcher.CommStats.calls, time.monotonic() seconds);
    link_counters: [tx_bytes, rx_bytes] of the node's interface per mark (a node's first rank,
    with link_counters; else []).

    Hugging Face and torchtitan: model. torchtitan: stock (trained on its own EP path).
    """

    rank: int
    loss: list[float]
    step_seconds: list[float]
    a2a_seconds: float
    control_seconds: float
    allreduce_seconds: float
    routes: list[list[int]]
    step_routes: list[list[list[int]]]
    bytes_per_route: dict[str, float] | None = None
    placement: PlacementResult | None = None
    first_step: int | None = None
    copy_sync_seconds: float | None = None
    expert_moves: ExpertMoves | None = None
    param_checksum: dict[str, list[float]] | None = None
    a2a_calls: list[list[Any]] | None = None
    link_counters: list[list[int]] | None = None
    model: ModelInfo | None = None
    stock: bool | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str, source: str = "rank result") -> RankResult:
        """The result ``to_json`` wrote; ValueError naming ``source`` and the field when a
        field is missing (one without a default) or unknown, at any depth."""
        return _build(cls, json.loads(text), source, "")


def _build(cls: type[T], raw: Any, source: str, path: str) -> T:
    """cls from a JSON object at ``path`` (dotted field names, "" at the top), its nested
    dataclass fields (X or X | None) built likewise."""
    def named(name: str) -> str:
        return f"{path}.{name}" if path else name

    if not isinstance(raw, dict):
        raise ValueError(f"{source}: {path or 'the result'} must be a JSON object, got "
                         f"{type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ValueError(f"{source}: unknown field {', '.join(map(named, unknown))}")
    missing = [named(n) for n, f in fields.items() if n not in raw
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{source}: missing field {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        nested = [t for t in (hints[name], *typing.get_args(hints[name]))
                  if dataclasses.is_dataclass(t)]
        values[name] = (_build(nested[0], value, source, named(name))
                        if nested and value is not None else value)
    return cls(**values)
