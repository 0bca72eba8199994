"""A placement plan as the training ranks apply it.

Rows are samples in rank-major order of where they are *now*: row r sits on device r // n at
local index r % n, n = samples per device. A plan says the new device of every row; each device
receives its rows in the order ``all_to_all_single`` delivers them: by source device, then source
local order, which for rank-major rows is simply ascending row order.

Every rank keeps the whole plan (I ints), not only its own rows: in the combine All-to-All a rank
forwards expert outputs of *other* ranks' tokens, so it must know where their samples go.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class SamplePlan:
    """New device of each sample row for one (step, layer).

    device: new device of each row, length I = devices * samples_per_device, balanced
        (each device receives exactly samples_per_device rows).
    devices: J, the number of ranks.
    solve_seconds: solver time reported by whoever made the plan (0 for the no-move plan).
    """

    device: tuple[int, ...]
    devices: int
    solve_seconds: float = 0.0
    _position: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices <= 0:
            raise ValueError(f"devices must be a positive integer, got {self.devices!r}")
        dev = np.asarray(self.device, dtype=np.int64)
        if dev.ndim != 1 or dev.size == 0 or dev.size % self.devices:
            raise ValueError(
                f"device must list one device per sample, a multiple of devices={self.devices} "
                f"rows, got length {dev.size}"
            )
        if dev.min() < 0 or dev.max() >= self.devices:
            raise ValueError(f"device entries must lie in [0, {self.devices}), got {dev.tolist()}")
        n = dev.size // self.devices
        counts = np.bincount(dev, minlength=self.devices)
        if (counts != n).any():
            raise ValueError(
                f"device is unbalanced: each device must receive {n} samples, got {counts.tolist()}"
            )
        # Position of each row in its new device's holds: rank among same-device rows by row id.
        order = np.argsort(dev, kind="stable")
        position = np.empty_like(dev)
        position[order] = np.arange(dev.size) % n
        object.__setattr__(self, "device", tuple(int(d) for d in dev))
        object.__setattr__(self, "_position", position)

    @classmethod
    def no_move(cls, devices: int, samples_per_device: int) -> SamplePlan:
        """Every sample stays where it is."""
        return cls(tuple(np.arange(devices * samples_per_device) // samples_per_device), devices)

    @property
    def samples(self) -> int:
        """I, the number of sample rows."""
        return len(self.device)

    @property
    def samples_per_device(self) -> int:
        return len(self.device) // self.devices

    @property
    def moves(self) -> bool:
        """True if any sample changes device."""
        n = self.samples_per_device
        return any(d != r // n for r, d in enumerate(self.device))

    @property
    def moved(self) -> int:
        """Number of samples that change device."""
        n = self.samples_per_device
        return sum(d != r // n for r, d in enumerate(self.device))

    def dest(self, rank: int) -> tuple[int, ...]:
        """New device of each of ``rank``'s local samples."""
        n = self.samples_per_device
        return self.device[rank * n : (rank + 1) * n]

    def holds(self, rank: int) -> tuple[int, ...]:
        """Rows ``rank`` holds after the move, in the order they arrive."""
        return tuple(r for r, d in enumerate(self.device) if d == rank)

    def position(self) -> np.ndarray:
        """[I] int64: local index of each row on its new device."""
        return self._position.copy()

    def fingerprint(self) -> int:
        """A 31-bit checksum so ranks can check they apply the same plan."""
        return zlib.crc32(np.asarray(self.device, dtype=np.int64).tobytes()) & 0x7FFFFFFF


@dataclass(frozen=True)
class LocalPlan:
    """One rank's view of a plan, as the service sends it.

    dest: new device of each of the rank's n local samples, in local order;
    holds: global row ids the rank holds after the move, in arrival order (by source rank, then
        source local order); solve_seconds: the solver's time for this round.
    """

    rank: int
    dest: tuple[int, ...]
    holds: tuple[int, ...]
    solve_seconds: float = 0.0

    def __post_init__(self) -> None:
        if len(self.dest) != len(self.holds):
            raise ValueError(
                f"dest and holds must both have one entry per local sample, got "
                f"{len(self.dest)} and {len(self.holds)}"
            )

    @classmethod
    def no_move(cls, rank: int, samples_per_device: int) -> LocalPlan:
        """The rank keeps its own samples."""
        n = samples_per_device
        return cls(rank, (rank,) * n, tuple(range(rank * n, (rank + 1) * n)))
