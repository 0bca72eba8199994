"""Jobs: the registered spec of each job, the registry with its caps and generations, and the
binding of streams to a job's ranks.

Pure bookkeeping on the event loop (no rounds, no solving): ``rounds.Coordinator`` asks the
registry which job a report belongs to and whether its sender may report for its rank.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from netmoe.checks import positive_int
from netmoe.groups import EPGroups
from netmoe.round import RoundKey
from netmoe.solver import METHODS, OBJECTIVES, Prices, Topology

from .errors import FieldError, JobConflict, JobLimit, RankBound, StaleGeneration

if TYPE_CHECKING:
    from .rounds import Outcome, Round

MAX_DEADLINE_S = 60.0
MAX_JOB_ID = 128
MAX_LAYERS = 1024
MAX_STEP = (1 << 63) - 1  # steps index int64 arrays downstream (expert windows)


def check_deadline(name: str, seconds: float, given: object = None) -> float:
    """seconds, or ValueError naming ``name`` and the value (``given``: as the caller wrote it,
    e.g. "60001 ms") unless it is in (0, MAX_DEADLINE_S]."""
    if not 0 < seconds <= MAX_DEADLINE_S:
        value = repr(seconds) if given is None else given
        raise ValueError(f"{name} must be in (0, {MAX_DEADLINE_S:g}] seconds, got {value}")
    return seconds


def check_layers(name: str, layers: int) -> int:
    """layers, or ValueError naming ``name`` and the value unless it is in [1, MAX_LAYERS]."""
    if not 1 <= positive_int(name, layers) <= MAX_LAYERS:
        raise ValueError(f"{name} must be in [1, {MAX_LAYERS}], got {layers!r}")
    return layers


@dataclass(frozen=True)
class JobSpec:
    """A registered job: topology, balance and how to solve its rounds.

    topology: one expert-parallel group's (its nodes x ranks per node, expert map in the
    group's devices); every group solves its rounds on it. ep_groups: the job's groups (None:
    one group of world_size = topology.devices ranks). Every rank reports samples_per_device
    samples. deadline: seconds from a round's first report until its ranks get the home
    placement. layers: MoE layers of the model; reports name layers in [0, layers).
    device_counts: reports carry [n, J] routes per device instead of [n, E] routes per expert
    (``counts_topology``); the expert placement advisor does not serve such a job.
    """

    job: str
    topology: Topology
    world_size: int
    samples_per_device: int
    objective: str = "volume"
    method: str = "two_stage"
    deadline: float = 0.05
    layers: int = MAX_LAYERS
    ep_groups: EPGroups | None = None
    device_counts: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.job, str) or not self.job or len(self.job) > MAX_JOB_ID:
            raise ValueError(f"job must be a non-empty id of at most {MAX_JOB_ID} characters, "
                             f"got {self.job!r}")
        if not self.job.isprintable():
            raise ValueError(f"job must be printable, got {self.job!r}")
        positive_int("world_size", self.world_size)
        positive_int("samples_per_device", self.samples_per_device)
        t = self.topology
        if self.ep_groups is None:
            if self.world_size != t.devices:
                raise ValueError(
                    f"world_size={self.world_size} must equal nodes x gpus_per_node = "
                    f"{t.nodes} x {t.gpus_per_node} = {t.devices}"
                )
            object.__setattr__(self, "ep_groups",
                               EPGroups.contiguous(self.world_size, t.gpus_per_node))
        groups = self.groups
        if groups.world != self.world_size:
            raise ValueError(f"ep_groups cover {groups.world} ranks, world_size is "
                             f"{self.world_size}")
        if (groups.nodes, groups.gpus) != (t.nodes, t.gpus_per_node):
            raise ValueError(f"a group spans {groups.nodes} nodes x {groups.gpus} ranks, the "
                             f"topology {t.nodes} x {t.gpus_per_node}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        check_layers("layers", self.layers)
        check_deadline("deadline", self.deadline)
        if not isinstance(self.device_counts, bool):
            raise ValueError(f"device_counts must be a bool, got {self.device_counts!r}")

    @property
    def groups(self) -> EPGroups:
        assert self.ep_groups is not None  # set by __post_init__
        return self.ep_groups

    @property
    def ep_size(self) -> int:
        """J, the ranks of one group."""
        return self.topology.devices

    @property
    def samples(self) -> int:
        """I, the samples of one round (of one group)."""
        return self.ep_size * self.samples_per_device

    @cached_property
    def counts_topology(self) -> Topology:
        """The topology whose experts the reports' count columns are: the registered one, or
        for device_counts one pseudo-expert per device (``Topology.per_device``)."""
        return self.topology.per_device() if self.device_counts else self.topology

    def node_ranks(self, rank: int) -> list[int]:
        """The ranks of ``rank``'s group on its node: what a node report of ``rank`` carries."""
        gpn = self.groups.gpus_per_node
        g, _ = self.groups.locate(rank)
        return [r for r in self.groups.ranks[g] if r // gpn == rank // gpn]


@dataclass(frozen=True)
class Binding:
    """A stream's (job, rank) in one registration (generation) of the job id."""

    job: str
    rank: int
    generation: int


@dataclass(eq=False)
class Group:
    """One expert-parallel group's open rounds, and per layer the prices (Plan.prices) of its
    last solved round there: a layer's rounds are alike from step to step, so the next one's
    solve starts from them (solve's warm; at most one small Prices per layer)."""

    pending: dict[RoundKey, Round] = field(default_factory=dict)
    prices: dict[int, Prices] = field(default_factory=dict)


@dataclass(eq=False)
class Job:
    """One registration of a job id and what it holds.

    bound: rank -> the owner (an opaque stream token) of the one stream reporting for it.
    groups: one Group per expert-parallel group of the spec. finished: (group, round) -> how
    it ended, for the job's last fallback rounds (late reports get the same answer); one
    memory per job, whatever its number of groups. solving: the job's solves running now, at
    most its share of the solver threads (``pool.SolverThreads.share``); turn: where its
    rounds wait for that.
    """

    spec: JobSpec
    generation: int
    groups: list[Group] = field(default_factory=list)
    last: dict[int, RoundKey] = field(default_factory=dict)
    bound: dict[int, object] = field(default_factory=dict)
    unary: set[Round] = field(default_factory=set)  # rounds of Solve calls in flight
    finished: OrderedDict[tuple[int, RoundKey], Outcome] = field(default_factory=OrderedDict)
    solving: int = 0
    turn: asyncio.Condition = field(default_factory=asyncio.Condition)
    pending_bytes: int = 0  # of the reports its open rounds hold

    def __post_init__(self) -> None:
        self.groups = [Group() for _ in range(self.spec.groups.count)]

    def open_rounds(self) -> list[Round]:
        return [rnd for g in self.groups for rnd in g.pending.values()]

    def check_generation(self, generation: int) -> None:
        """Raises StaleGeneration unless ``generation`` is 0 (any) or this registration's."""
        if generation and generation != self.generation:
            raise StaleGeneration(
                f"generation {generation} of job {self.spec.job!r} was unregistered; the job "
                f"id is now generation {self.generation} (register again)")


class Jobs:
    """The registered jobs, capped in number and size. Each new registration of a job id gets
    a new generation, unique over the server's life."""

    def __init__(self, *, max_jobs: int, max_world_size: int, max_report_cells: int) -> None:
        self._max_jobs = positive_int("max_jobs", max_jobs)
        self.max_world_size = positive_int("max_world_size", max_world_size)
        self._max_report_cells = positive_int("max_report_cells", max_report_cells)
        self._jobs: dict[str, Job] = {}
        self._generation = 0  # of the last registration

    def __len__(self) -> int:
        return len(self._jobs)

    def __getitem__(self, job: str) -> Job:
        return self._jobs[job]

    def get(self, job: str) -> Job | None:
        return self._jobs.get(job)

    def all(self) -> list[Job]:
        return list(self._jobs.values())

    def check_limits(
        self, job: str, *, world_size: int, devices: int, samples_per_device: int, experts: int
    ) -> None:
        """Raises JobLimit naming the value and the limit. Cheap on raw numbers, so it runs
        before a spec is built (a Topology allocates arrays of devices and experts)."""
        for name, value in (("world_size", world_size), ("nodes x gpus_per_node", devices)):
            if value > self.max_world_size:
                raise JobLimit(f"job {job!r}: {name}={value} exceeds the server's "
                               f"max_world_size={self.max_world_size}")
        cells = max(samples_per_device, 1) * experts
        if cells > self._max_report_cells:
            raise JobLimit(
                f"job {job!r}: samples_per_device x experts = {samples_per_device} x {experts} = "
                f"{cells} per report exceeds the server's max_report_cells="
                f"{self._max_report_cells}"
            )

    def register(self, spec: JobSpec) -> Job | None:
        """The new job; None if it exists with the same spec. Raises JobConflict / JobLimit."""
        t = spec.topology
        self.check_limits(spec.job, world_size=spec.world_size, devices=t.devices,
                          samples_per_device=spec.samples_per_device, experts=t.experts)
        old = self._jobs.get(spec.job)
        if old is not None:
            if old.spec != spec:
                raise JobConflict(f"job {spec.job!r} is already registered with another spec")
            return None
        if len(self._jobs) >= self._max_jobs:
            raise JobLimit(f"job {spec.job!r}: the server already holds max_jobs={self._max_jobs}")
        self._generation += 1
        state = self._jobs[spec.job] = Job(spec, self._generation)
        return state

    def remove(self, job: str) -> Job:
        """Forgets a job with all it holds. Raises KeyError if unknown."""
        return self._jobs.pop(job)

    def spec(self, job: str) -> JobSpec:
        return self.find(job).spec

    def find(self, job: str) -> Job:
        """Raises FieldError naming ``job`` unless it is registered."""
        state = self._jobs.get(job)
        if state is None:
            raise FieldError("job", f"job {job!r} is not registered")
        return state

    def find_rank(self, job: str, rank: int) -> Job:
        """Raises FieldError unless ``job`` is registered and ``rank`` is one of its ranks."""
        state = self.find(job)
        world = state.spec.world_size
        if not 0 <= rank < world:
            raise FieldError("rank", f"rank {rank} is outside [0, {world}) for job {job!r}")
        return state

    def bind(self, job: str, rank: int, owner: object, generation: int = 0) -> Binding:
        """Binds (job, rank) to the stream ``owner`` until ``release``.

        generation: the registration the stream's client knows (0: the current one). Raises
        FieldError (unknown job, rank out of range), StaleGeneration (the job id was registered
        anew since) or RankBound (another open stream holds the rank).
        """
        state = self.find_rank(job, rank)
        state.check_generation(generation)
        holder = state.bound.get(rank)
        if holder is not None and holder is not owner:
            raise RankBound(f"rank {rank} of job {job!r} is already bound to another open "
                            f"stream (one stream per rank; close it first)")
        state.bound[rank] = owner
        return Binding(job, rank, state.generation)

    def bound_job(self, binding: Binding) -> Job:
        """The job of a stream's binding; StaleGeneration if the job id was registered anew."""
        state = self.find(binding.job)
        if state.generation != binding.generation:
            raise StaleGeneration(
                f"generation {binding.generation} of job {binding.job!r} was unregistered; "
                f"the job id is now generation {state.generation}")
        return state

    def release(self, binding: Binding, owner: object) -> None:
        """Frees the ranks of a closed stream (its own and those its node reports carried). The
        ranks' next streams start afresh: their steps may restart (a worker resumed from a
        checkpoint), rounds still refuse a second report."""
        state = self._jobs.get(binding.job)
        if state is None or state.generation != binding.generation:
            return
        for rank in [r for r, o in state.bound.items() if o is owner]:
            del state.bound[rank]
            state.last.pop(rank, None)
