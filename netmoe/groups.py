"""Expert-parallel groups of a job: which ranks share one placement problem.

A job of ``world`` ranks runs expert parallelism inside groups of ``size`` ranks (the EP size)
and data parallelism across them. Every group holds every expert in the same layout and solves
its own rounds: samples never leave their group. By default group g is the contiguous block of
ranks [g * size, (g + 1) * size), the order Megatron-core and torchtitan give expert parallelism
when tensor and context parallelism are 1; explicit rank lists describe any other layout.

Inside a group, device d is the group's d-th rank in ascending order (``dist.new_group`` sorts
its ranks the same way), and the node of a rank is ``rank // gpus_per_node``. Every group must
span the same number of nodes with the same number of its ranks on each, so that one topology
(``nodes`` x ``gpus``) describes every group's problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from netmoe.checks import positive_int


@dataclass(frozen=True)
class EPGroups:
    """The groups of a job. ranks[g]: the global ranks of group g, ascending; nodes, gpus: the
    nodes one group spans and its ranks on each of them. Build with ``contiguous`` or
    ``explicit``, which raise ValueError naming the offending field and rank."""

    world: int
    gpus_per_node: int
    ranks: tuple[tuple[int, ...], ...]
    nodes: int
    gpus: int
    _where: dict[int, tuple[int, int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = {r: (g, d) for g, members in enumerate(self.ranks) for d, r in enumerate(members)}
        object.__setattr__(self, "_where", where)

    @property
    def size(self) -> int:
        """Ranks per group (the EP size)."""
        return self.nodes * self.gpus

    @property
    def count(self) -> int:
        return len(self.ranks)

    def locate(self, rank: int) -> tuple[int, int]:
        """(group, device in the group) of a global rank in [0, world)."""
        return self._where[rank]

    @classmethod
    def contiguous(cls, world: int, gpus_per_node: int, size: int = 0, prefix: str = ""
                   ) -> EPGroups:
        """Groups of ``size`` consecutive ranks (0: one group of all ``world`` ranks). prefix:
        put before the field names errors name ("spec." on the wire)."""
        world = positive_int(f"{prefix}world_size", world)
        gpus_per_node = positive_int(f"{prefix}topology.gpus_per_node", gpus_per_node)
        size = positive_int(f"{prefix}ep_size", size, minimum=0) or world
        if world % size:
            raise ValueError(f"{prefix}ep_size={size} does not divide {prefix}world_size={world}")
        if size % gpus_per_node and gpus_per_node % size:
            raise ValueError(f"{prefix}ep_size={size} must be a multiple or a divisor of "
                             f"gpus_per_node={gpus_per_node}: a group of consecutive ranks "
                             f"would cover its nodes unevenly")
        return cls.explicit(world, gpus_per_node,
                            [range(g, g + size) for g in range(0, world, size)], prefix)

    @classmethod
    def explicit(cls, world: int, gpus_per_node: int, groups: Sequence[Sequence[int]],
                 prefix: str = "") -> EPGroups:
        """Groups from rank lists that tile [0, world): every rank in exactly one group, all
        groups of one shape. Errors name ``{prefix}groups[g]``."""
        world = positive_int(f"{prefix}world_size", world)
        gpus_per_node = positive_int(f"{prefix}topology.gpus_per_node", gpus_per_node)
        name = f"{prefix}groups"
        if not groups:
            raise ValueError(f"{name} is empty, need groups that cover ranks [0, {world})")
        # Sizes first: a group listing millions of ranks is refused before it is sorted.
        if len(groups) > world:
            raise ValueError(f"{name} lists {len(groups)} groups, more than world_size={world}")
        for g, members in enumerate(groups):
            if len(members) > world:
                raise ValueError(f"{name}[{g}] lists {len(members)} ranks, more than "
                                 f"world_size={world}")
        owner: dict[int, int] = {}
        ranks = []
        for g, members in enumerate(groups):
            members = sorted(int(r) for r in members)
            if not members:
                raise ValueError(f"{name}[{g}] is empty")
            for r in members:
                if not 0 <= r < world:
                    raise ValueError(f"{name}[{g}] names rank {r}, outside [0, {world})")
                if r in owner:
                    where = "twice" if owner[r] == g else f"and in {name}[{owner[r]}]"
                    raise ValueError(f"{name}[{g}] holds rank {r} {where}")
                owner[r] = g
            ranks.append(tuple(members))
        if len(owner) != world:
            gap = next(r for r in range(world) if r not in owner)
            raise ValueError(f"{name} leaves rank {gap} in no group (they must cover [0, {world}))")
        sizes = {len(m) for m in ranks}
        if len(sizes) > 1:
            g = next(g for g, m in enumerate(ranks) if len(m) != len(ranks[0]))
            raise ValueError(f"{name}[{g}] has {len(ranks[g])} ranks, {name}[0] has "
                             f"{len(ranks[0])}: groups must be of one size")
        shapes = [_shape(m, gpus_per_node, f"{name}[{g}]") for g, m in enumerate(ranks)]
        if len(set(shapes)) > 1:
            g = next(g for g, s in enumerate(shapes) if s != shapes[0])
            raise ValueError(
                f"{name}[{g}] spans {shapes[g][0]} nodes x {shapes[g][1]} ranks, {name}[0] "
                f"{shapes[0][0]} x {shapes[0][1]}: every group needs the same shape")
        nodes, gpus = shapes[0]
        return cls(world, gpus_per_node, tuple(ranks), nodes, gpus)


def _shape(members: Sequence[int], gpus_per_node: int, name: str) -> tuple[int, int]:
    """(nodes, ranks per node) of one group's ascending ranks; ValueError naming the first node
    whose number of the group's ranks differs from the first node's."""
    per_node: dict[int, int] = {}
    for r in members:
        per_node[r // gpus_per_node] = per_node.get(r // gpus_per_node, 0) + 1
    first, *_ = per_node.values()
    for node, k in per_node.items():
        if k != first:
            r = next(r for r in members if r // gpus_per_node == node)
            raise ValueError(
                f"{name} has {k} ranks on node {node} (rank {r}) but {first} on node "
                f"{members[0] // gpus_per_node}: a group needs as many ranks on each of its nodes")
    return len(per_node), first
