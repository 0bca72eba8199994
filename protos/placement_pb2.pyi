from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CountsDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COUNTS_DTYPE_UNSPECIFIED: _ClassVar[CountsDtype]
    COUNTS_DTYPE_UINT8: _ClassVar[CountsDtype]
    COUNTS_DTYPE_UINT16: _ClassVar[CountsDtype]
    COUNTS_DTYPE_UINT32: _ClassVar[CountsDtype]

class PlanStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLAN_STATUS_UNSPECIFIED: _ClassVar[PlanStatus]
    PLAN_STATUS_OPTIMAL: _ClassVar[PlanStatus]
    PLAN_STATUS_FEASIBLE: _ClassVar[PlanStatus]
    PLAN_STATUS_FALLBACK: _ClassVar[PlanStatus]
    PLAN_STATUS_INVALID: _ClassVar[PlanStatus]
COUNTS_DTYPE_UNSPECIFIED: CountsDtype
COUNTS_DTYPE_UINT8: CountsDtype
COUNTS_DTYPE_UINT16: CountsDtype
COUNTS_DTYPE_UINT32: CountsDtype
PLAN_STATUS_UNSPECIFIED: PlanStatus
PLAN_STATUS_OPTIMAL: PlanStatus
PLAN_STATUS_FEASIBLE: PlanStatus
PLAN_STATUS_FALLBACK: PlanStatus
PLAN_STATUS_INVALID: PlanStatus

class Topology(_message.Message):
    __slots__ = ("nodes", "gpus_per_node", "experts", "expert_device", "alpha_intra", "alpha_inter", "bw_intra", "bw_inter", "bytes_per_route")
    NODES_FIELD_NUMBER: _ClassVar[int]
    GPUS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_DEVICE_FIELD_NUMBER: _ClassVar[int]
    ALPHA_INTRA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_INTER_FIELD_NUMBER: _ClassVar[int]
    BW_INTRA_FIELD_NUMBER: _ClassVar[int]
    BW_INTER_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_ROUTE_FIELD_NUMBER: _ClassVar[int]
    nodes: int
    gpus_per_node: int
    experts: int
    expert_device: _containers.RepeatedScalarFieldContainer[int]
    alpha_intra: float
    alpha_inter: float
    bw_intra: float
    bw_inter: float
    bytes_per_route: int
    def __init__(self, nodes: _Optional[int] = ..., gpus_per_node: _Optional[int] = ..., experts: _Optional[int] = ..., expert_device: _Optional[_Iterable[int]] = ..., alpha_intra: _Optional[float] = ..., alpha_inter: _Optional[float] = ..., bw_intra: _Optional[float] = ..., bw_inter: _Optional[float] = ..., bytes_per_route: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("topology", "world_size", "samples_per_device", "objective", "method", "deadline_ms", "layers", "device_counts", "ep_size", "groups")
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    topology: Topology
    world_size: int
    samples_per_device: int
    objective: str
    method: str
    deadline_ms: int
    layers: int
    device_counts: bool
    ep_size: int
    groups: _containers.RepeatedCompositeFieldContainer[RankGroup]
    def __init__(self, topology: _Optional[_Union[Topology, _Mapping]] = ..., world_size: _Optional[int] = ..., samples_per_device: _Optional[int] = ..., objective: _Optional[str] = ..., method: _Optional[str] = ..., deadline_ms: _Optional[int] = ..., layers: _Optional[int] = ..., device_counts: _Optional[bool] = ..., ep_size: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[RankGroup, _Mapping]]] = ...) -> None: ...

class RankGroup(_message.Message):
    __slots__ = ("ranks",)
    RANKS_FIELD_NUMBER: _ClassVar[int]
    ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class RegisterJobRequest(_message.Message):
    __slots__ = ("job", "spec")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    job: str
    spec: JobSpec
    def __init__(self, job: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class RegisterJobResponse(_message.Message):
    __slots__ = ("job", "created", "generation")
    JOB_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    job: str
    created: bool
    generation: int
    def __init__(self, job: _Optional[str] = ..., created: _Optional[bool] = ..., generation: _Optional[int] = ...) -> None: ...

class UnregisterJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class UnregisterJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("job", "step", "layer", "rank", "sample_ids", "gather", "scatter", "generation", "ranks", "micro_batch")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_IDS_FIELD_NUMBER: _ClassVar[int]
    GATHER_FIELD_NUMBER: _ClassVar[int]
    SCATTER_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    layer: int
    rank: int
    sample_ids: _containers.RepeatedScalarFieldContainer[int]
    gather: Counts
    scatter: Counts
    generation: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    micro_batch: int
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ..., layer: _Optional[int] = ..., rank: _Optional[int] = ..., sample_ids: _Optional[_Iterable[int]] = ..., gather: _Optional[_Union[Counts, _Mapping]] = ..., scatter: _Optional[_Union[Counts, _Mapping]] = ..., generation: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., micro_batch: _Optional[int] = ...) -> None: ...

class Counts(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: CountsDtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[CountsDtype, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Routes(_message.Message):
    __slots__ = ("inter", "intra", "local", "seconds")
    INTER_FIELD_NUMBER: _ClassVar[int]
    INTRA_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    inter: int
    intra: int
    local: int
    seconds: float
    def __init__(self, inter: _Optional[int] = ..., intra: _Optional[int] = ..., local: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("job", "step", "layer", "rank", "dest", "held_ids", "before", "after", "status", "reason", "error", "solve_seconds", "moved", "ranks", "micro_batch")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    DEST_FIELD_NUMBER: _ClassVar[int]
    HELD_IDS_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SOLVE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MOVED_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    layer: int
    rank: int
    dest: _containers.RepeatedScalarFieldContainer[int]
    held_ids: _containers.RepeatedScalarFieldContainer[int]
    before: Routes
    after: Routes
    status: PlanStatus
    reason: str
    error: str
    solve_seconds: float
    moved: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    micro_batch: int
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ..., layer: _Optional[int] = ..., rank: _Optional[int] = ..., dest: _Optional[_Iterable[int]] = ..., held_ids: _Optional[_Iterable[int]] = ..., before: _Optional[_Union[Routes, _Mapping]] = ..., after: _Optional[_Union[Routes, _Mapping]] = ..., status: _Optional[_Union[PlanStatus, str]] = ..., reason: _Optional[str] = ..., error: _Optional[str] = ..., solve_seconds: _Optional[float] = ..., moved: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., micro_batch: _Optional[int] = ...) -> None: ...

class SolveRequest(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[Report]
    def __init__(self, reports: _Optional[_Iterable[_Union[Report, _Mapping]]] = ...) -> None: ...

class SolveResponse(_message.Message):
    __slots__ = ("plans",)
    PLANS_FIELD_NUMBER: _ClassVar[int]
    plans: _containers.RepeatedCompositeFieldContainer[Plan]
    def __init__(self, plans: _Optional[_Iterable[_Union[Plan, _Mapping]]] = ...) -> None: ...

class ExpertMap(_message.Message):
    __slots__ = ("device",)
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    device: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, device: _Optional[_Iterable[int]] = ...) -> None: ...

class RecommendExpertsRequest(_message.Message):
    __slots__ = ("job", "horizon_steps", "bytes_per_expert", "held_out_steps", "unit", "starts", "seed", "replica_slots", "grad_bytes_per_expert", "max_load_ratio", "migration_budget")
    JOB_FIELD_NUMBER: _ClassVar[int]
    HORIZON_STEPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_STEPS_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    STARTS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_SLOTS_FIELD_NUMBER: _ClassVar[int]
    GRAD_BYTES_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    MAX_LOAD_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_BUDGET_FIELD_NUMBER: _ClassVar[int]
    job: str
    horizon_steps: int
    bytes_per_expert: int
    held_out_steps: int
    unit: str
    starts: int
    seed: int
    replica_slots: int
    grad_bytes_per_expert: int
    max_load_ratio: float
    migration_budget: int
    def __init__(self, job: _Optional[str] = ..., horizon_steps: _Optional[int] = ..., bytes_per_expert: _Optional[int] = ..., held_out_steps: _Optional[int] = ..., unit: _Optional[str] = ..., starts: _Optional[int] = ..., seed: _Optional[int] = ..., replica_slots: _Optional[int] = ..., grad_bytes_per_expert: _Optional[int] = ..., max_load_ratio: _Optional[float] = ..., migration_budget: _Optional[int] = ...) -> None: ...

class RouteTable(_message.Message):
    __slots__ = ("device",)
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    device: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, device: _Optional[_Iterable[int]] = ...) -> None: ...

class LoadRatio(_message.Message):
    __slots__ = ("mean", "worst")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    WORST_FIELD_NUMBER: _ClassVar[int]
    mean: float
    worst: float
    def __init__(self, mean: _Optional[float] = ..., worst: _Optional[float] = ...) -> None: ...

class ExpertCopy(_message.Message):
    __slots__ = ("expert", "device")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    expert: int
    device: int
    def __init__(self, expert: _Optional[int] = ..., device: _Optional[int] = ...) -> None: ...

class LayerCopies(_message.Message):
    __slots__ = ("copies",)
    COPIES_FIELD_NUMBER: _ClassVar[int]
    copies: _containers.RepeatedCompositeFieldContainer[ExpertCopy]
    def __init__(self, copies: _Optional[_Iterable[_Union[ExpertCopy, _Mapping]]] = ...) -> None: ...

class ReplicaAdvice(_message.Message):
    __slots__ = ("adopt", "reason", "copies", "replicated", "saving_per_step", "sync_per_step", "net_per_step", "migration_cost", "break_even_steps", "memory_bytes", "max_device_bytes", "cross_node_copies", "route_tables", "load", "joint_load")
    ADOPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    REPLICATED_FIELD_NUMBER: _ClassVar[int]
    SAVING_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    SYNC_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    NET_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_COST_FIELD_NUMBER: _ClassVar[int]
    BREAK_EVEN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DEVICE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CROSS_NODE_COPIES_FIELD_NUMBER: _ClassVar[int]
    ROUTE_TABLES_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    JOINT_LOAD_FIELD_NUMBER: _ClassVar[int]
    adopt: bool
    reason: str
    copies: _containers.RepeatedCompositeFieldContainer[LayerCopies]
    replicated: Routes
    saving_per_step: float
    sync_per_step: float
    net_per_step: float
    migration_cost: float
    break_even_steps: float
    memory_bytes: int
    max_device_bytes: int
    cross_node_copies: int
    route_tables: _containers.RepeatedCompositeFieldContainer[RouteTable]
    load: LoadRatio
    joint_load: LoadRatio
    def __init__(self, adopt: _Optional[bool] = ..., reason: _Optional[str] = ..., copies: _Optional[_Iterable[_Union[LayerCopies, _Mapping]]] = ..., replicated: _Optional[_Union[Routes, _Mapping]] = ..., saving_per_step: _Optional[float] = ..., sync_per_step: _Optional[float] = ..., net_per_step: _Optional[float] = ..., migration_cost: _Optional[float] = ..., break_even_steps: _Optional[float] = ..., memory_bytes: _Optional[int] = ..., max_device_bytes: _Optional[int] = ..., cross_node_copies: _Optional[int] = ..., route_tables: _Optional[_Iterable[_Union[RouteTable, _Mapping]]] = ..., load: _Optional[_Union[LoadRatio, _Mapping]] = ..., joint_load: _Optional[_Union[LoadRatio, _Mapping]] = ...) -> None: ...

class RecommendExpertsResponse(_message.Message):
    __slots__ = ("job", "adopt", "reason", "maps", "current", "moved_experts", "moved_inter", "migration_bytes", "migration_seconds", "unit", "saving_per_step", "migration_cost", "break_even_steps", "home", "sample_only", "joint", "fit_first_step", "fit_last_step", "held_out_first_step", "held_out_last_step", "window_bytes", "replicas")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ADOPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    MOVED_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MOVED_INTER_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    SAVING_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_COST_FIELD_NUMBER: _ClassVar[int]
    BREAK_EVEN_STEPS_FIELD_NUMBER: _ClassVar[int]
    HOME_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_ONLY_FIELD_NUMBER: _ClassVar[int]
    JOINT_FIELD_NUMBER: _ClassVar[int]
    FIT_FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    FIT_LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    WINDOW_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    job: str
    adopt: bool
    reason: str
    maps: _containers.RepeatedCompositeFieldContainer[ExpertMap]
    current: _containers.RepeatedCompositeFieldContainer[ExpertMap]
    moved_experts: int
    moved_inter: int
    migration_bytes: int
    migration_seconds: float
    unit: str
    saving_per_step: float
    migration_cost: float
    break_even_steps: float
    home: Routes
    sample_only: Routes
    joint: Routes
    fit_first_step: int
    fit_last_step: int
    held_out_first_step: int
    held_out_last_step: int
    window_bytes: int
    replicas: ReplicaAdvice
    def __init__(self, job: _Optional[str] = ..., adopt: _Optional[bool] = ..., reason: _Optional[str] = ..., maps: _Optional[_Iterable[_Union[ExpertMap, _Mapping]]] = ..., current: _Optional[_Iterable[_Union[ExpertMap, _Mapping]]] = ..., moved_experts: _Optional[int] = ..., moved_inter: _Optional[int] = ..., migration_bytes: _Optional[int] = ..., migration_seconds: _Optional[float] = ..., unit: _Optional[str] = ..., saving_per_step: _Optional[float] = ..., migration_cost: _Optional[float] = ..., break_even_steps: _Optional[float] = ..., home: _Optional[_Union[Routes, _Mapping]] = ..., sample_only: _Optional[_Union[Routes, _Mapping]] = ..., joint: _Optional[_Union[Routes, _Mapping]] = ..., fit_first_step: _Optional[int] = ..., fit_last_step: _Optional[int] = ..., held_out_first_step: _Optional[int] = ..., held_out_last_step: _Optional[int] = ..., window_bytes: _Optional[int] = ..., replicas: _Optional[_Union[ReplicaAdvice, _Mapping]] = ...) -> None: ...

class ConfirmExpertsRequest(_message.Message):
    __slots__ = ("job", "step", "maps", "copies", "route_tables")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    ROUTE_TABLES_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    maps: _containers.RepeatedCompositeFieldContainer[ExpertMap]
    copies: _containers.RepeatedCompositeFieldContainer[LayerCopies]
    route_tables: _containers.RepeatedCompositeFieldContainer[RouteTable]
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ..., maps: _Optional[_Iterable[_Union[ExpertMap, _Mapping]]] = ..., copies: _Optional[_Iterable[_Union[LayerCopies, _Mapping]]] = ..., route_tables: _Optional[_Iterable[_Union[RouteTable, _Mapping]]] = ...) -> None: ...

class ConfirmExpertsResponse(_message.Message):
    __slots__ = ("job", "step")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    job: str
    step: int
    def __init__(self, job: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...
