"""Cluster topology: devices grouped into nodes, experts mapped to devices, link costs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from netmoe.checks import positive_int
from netmoe.round import BW_INTER, BW_INTRA, check_devices


def _finite(name: str, value: float, *, positive: bool) -> float:
    v = float(value)
    if not np.isfinite(v) or v < 0 or (positive and v == 0):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a finite {kind} number, got {value!r}")
    return v


@dataclass(frozen=True, eq=False)
class Topology:
    """J = nodes * gpus_per_node devices; device d sits on node d // gpus_per_node.

    expert_device: device of each expert, [E] ints in [0, J). None means the default
    expert-parallel layout, expert e on device e // (E / J), which needs E divisible by J.
    Alpha is the fixed latency of one All-to-All on a channel (seconds), bandwidth is per
    channel (bytes/s), bytes_per_route is what one (token, top-k slot) carries
    (hidden size x dtype size).
    """

    nodes: int
    gpus_per_node: int
    experts: int
    expert_device: np.ndarray | None = None
    alpha_intra: float = 0.0
    alpha_inter: float = 0.0
    bw_intra: float = BW_INTRA
    bw_inter: float = BW_INTER
    bytes_per_route: int = 8192
    expert_node: np.ndarray = field(init=False, repr=False)
    device_node: np.ndarray = field(init=False, repr=False)
    # (expert ids sorted by device [E], start of each device's run in that order [J + 1]).
    experts_by_device: tuple[np.ndarray, np.ndarray] = field(init=False, repr=False)
    map_sorted: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        nodes = positive_int("nodes", self.nodes)
        gpus = positive_int("gpus_per_node", self.gpus_per_node)
        experts = positive_int("experts", self.experts)
        j = nodes * gpus
        if self.expert_device is None:
            if experts % j:
                raise ValueError(
                    f"experts={experts} is not divisible by devices={j} "
                    f"(nodes={nodes} x gpus_per_node={gpus}); pass an explicit expert_device map"
                )
            emap = np.arange(experts, dtype=np.int64) // (experts // j)
        else:
            raw = np.asarray(self.expert_device)
            if raw.shape != (experts,):
                raise ValueError(
                    f"expert_device must have shape ({experts},) for experts={experts}, "
                    f"got shape {raw.shape}"
                )
            emap = check_devices("expert_device", raw, j)
        emap.setflags(write=False)
        dnode = np.arange(j, dtype=np.int64) // gpus
        dnode.setflags(write=False)
        enode = dnode[emap]
        enode.setflags(write=False)
        for name, positive in (
            ("alpha_intra", False),
            ("alpha_inter", False),
            ("bw_intra", True),
            ("bw_inter", True),
        ):
            object.__setattr__(self, name, _finite(name, getattr(self, name), positive=positive))
        object.__setattr__(self, "bytes_per_route", positive_int("bytes_per_route",
                                                                  self.bytes_per_route))
        object.__setattr__(self, "nodes", nodes)
        object.__setattr__(self, "gpus_per_node", gpus)
        object.__setattr__(self, "experts", experts)
        object.__setattr__(self, "expert_device", emap)
        object.__setattr__(self, "expert_node", enode)
        object.__setattr__(self, "device_node", dnode)
        order = np.argsort(emap, kind="stable")
        bounds = np.searchsorted(emap[order], np.arange(j + 1))
        object.__setattr__(self, "experts_by_device", (order, bounds))
        object.__setattr__(self, "map_sorted", bool((np.diff(emap) >= 0).all()))

    @property
    def devices(self) -> int:
        return self.nodes * self.gpus_per_node

    def _key(self) -> tuple:
        return (
            self.nodes, self.gpus_per_node, self.experts, tuple(self.expert_device.tolist()),
            self.alpha_intra, self.alpha_inter, self.bw_intra, self.bw_inter, self.bytes_per_route,
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topology) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def per_device(self) -> Topology:
        """The same cluster with J pseudo-experts, pseudo-expert d on device d: routes per device
        ([I, J], ``cost.device_counts``) are its counts. Every cost depends on the counts only
        through routes per device, so a solve on them with this topology places samples as one
        on the expert counts with ``self`` does."""
        return Topology(
            self.nodes, self.gpus_per_node, self.devices, None, self.alpha_intra,
            self.alpha_inter, self.bw_intra, self.bw_inter, self.bytes_per_route,
        )

    def with_experts(self, expert_device: np.ndarray) -> Topology:
        """The same cluster with another expert-to-device map."""
        return Topology(
            self.nodes, self.gpus_per_node, self.experts, np.asarray(expert_device),
            self.alpha_intra, self.alpha_inter, self.bw_intra, self.bw_inter,
            self.bytes_per_route,
        )
