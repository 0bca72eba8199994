"""Admission: whether a report fits its job, as named steps that each check one thing once.

coordinates (layer, step in range) -> members (a node report's ranks) -> sizes (ids and counts
against the job's spec) -> duplicates (ids repeated within the report), then, once a group's
reports are in, ``assemble`` (ids repeated across ranks, scatter on all ranks or none).

Every size is compared with the job's spec before any work proportional to it: a report's ids
are counted before they are searched (the search is a sort, O(n log n), on the n the spec
allows), a node report's ranks are at most the server's max_world_size by then
(``report_from_proto`` does not convert a longer list). Errors name the field and the value
and never echo a request's list whole (``netmoe.checks.shown``). Pure functions of the spec and
the report: no rounds, no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from netmoe.checks import shown
from netmoe.round import RoundCounts, RoundKey

from .errors import FieldError
from .jobs import MAX_STEP, JobSpec

# Below this many ids a set of Python ints is ~30x cheaper than sorting; above it the sort is,
# and it stays O(n log n) whatever the ids.
_SET_IDS = 4096


@dataclass(frozen=True, eq=False)
class Report:
    """One rank's report (or a node report of several ranks) as received, its shapes not yet
    checked against the job (``check_report`` does).

    ranks: a node report's ranks, rank first (``check_members`` checks them); () for rank alone.
    sample_ids: [n] uint64 global ids in local order (n per member in turn). gather, scatter:
    [rows, cols] routes of each local sample to each expert (to each device for device_counts
    jobs) in the smallest unsigned dtype holding them, shaped as sent (None: absent; scatter is
    absent when there is no next layer). generation: the job registration the sender knows (0:
    whichever is current). counts_error: why the counts on the wire did not decode (raised by
    check_report). micro_batch: the round's (see ``netmoe.round.RoundKey``). ranks_error: the
    wire listed more ranks than the server's largest job holds (raised by check_members; ranks
    is then empty).
    """

    job: str
    step: int
    layer: int
    rank: int
    sample_ids: np.ndarray
    gather: np.ndarray | None
    scatter: np.ndarray | None
    generation: int = 0
    counts_error: FieldError | None = None
    ranks: tuple[int, ...] = ()
    micro_batch: int = 0
    ranks_error: FieldError | None = None

    @property
    def key(self) -> RoundKey:
        return RoundKey(self.step, self.micro_batch, self.layer)

    @property
    def members(self) -> tuple[int, ...]:
        """The ranks whose samples the report carries, in row order."""
        return self.ranks or (self.rank,)


def check_coordinates(spec: JobSpec, report: Report) -> None:
    """Raises FieldError unless layer and step are in range; checked before any round is
    opened, so out-of-range coordinates touch no round."""
    if not 0 <= report.layer < spec.layers:
        raise FieldError(
            "layer", f"layer {report.layer} is outside [0, {spec.layers}) for job "
                     f"{spec.job!r} (spec.layers)")
    if not 0 <= report.step <= MAX_STEP:
        raise FieldError("step", f"step {report.step} exceeds {MAX_STEP}")


def check_members(spec: JobSpec, report: Report) -> tuple[int, ...]:
    """A node report's ranks (``Report.members``), or FieldError naming ``ranks`` unless they
    are ``rank`` first, then the other ranks of its group on its node, each once. O(k log k) on
    the k ranks listed, which ``report_from_proto`` bounds by the server's max_world_size."""
    if report.ranks_error is not None:
        raise report.ranks_error
    if not report.ranks:
        return (report.rank,)
    ranks = report.ranks
    if ranks[0] != report.rank:
        raise FieldError("ranks", f"ranks starts with {ranks[0]}, need the reporting rank "
                                  f"{report.rank} first")
    g, _ = spec.groups.locate(report.rank)
    node = report.rank // spec.groups.gpus_per_node
    want = spec.node_ranks(report.rank)
    if sorted(ranks) != want:
        listed = Counter(ranks)
        extra = (sorted(set(listed) - set(want))
                 or sorted(r for r, times in listed.items() if times > 1))
        missing = sorted(set(want) - set(listed))
        raise FieldError("ranks", (
            f"ranks {shown(ranks, 16)} must be the {len(want)} ranks of group {g} on node "
            f"{node}, {shown(want, 16)}" + (f"; not those: {shown(extra)}" if extra else "")
            + (f"; missing {shown(missing)}" if missing else "")))
    return tuple(ranks)


def first_duplicate(ids: np.ndarray) -> int | None:
    """The first id (in order) that occurs again in ``ids`` [n] uint64, or None; O(n log n)."""
    if len(ids) <= _SET_IDS:
        seen: set[int] = set()
        for i in ids.tolist():
            if i in seen:
                return i
            seen.add(i)
        return None
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    repeats = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if not len(repeats):
        return None
    # The duplicate seen first in order: the repeat (second occurrence) at the lowest index.
    return int(ids[order[repeats + 1].min()])


def check_report(spec: JobSpec, report: Report, prefix: str = "", members: int = 1
                 ) -> RoundCounts:
    """The report's ids and counts ([n, E] each, as received; [n, J] for device_counts), or
    FieldError unless they fit the job: n = members x samples_per_device unique ids, counts that
    decoded, shaped [n, E] ([n, J])."""
    n = spec.samples_per_device * members
    ids = report.sample_ids
    if len(ids) != n:
        need = (f"samples_per_device={n}" if members == 1 else
                f"samples_per_device x ranks = {spec.samples_per_device} x {members} = {n}")
        raise FieldError(f"{prefix}sample_ids",
                         f"{prefix}sample_ids has {len(ids)} ids, job {spec.job!r} needs {need}")
    dup = first_duplicate(ids)
    if dup is not None:
        raise FieldError(f"{prefix}sample_ids",
                         f"{prefix}sample_ids repeats id {dup} (rank {report.rank})")
    if report.counts_error is not None:
        err = report.counts_error
        raise FieldError(f"{prefix}{err.field}", f"{prefix}{err}")
    e = spec.counts_topology.experts
    rows = "samples_per_device" if members == 1 else "samples_per_device x ranks"
    columns = "devices" if spec.device_counts else "experts"
    need = f"[{rows}, {columns}] = [{n}, {e}] for job {spec.job!r}"
    if spec.device_counts:
        need += " (device_counts)"
    if report.gather is None:
        raise FieldError(f"{prefix}gather", f"{prefix}gather is missing, need {need}")
    for name, counts in (("gather", report.gather), ("scatter", report.scatter)):
        if counts is not None and counts.shape != (n, e):
            absent = " (or absent: no next layer)" if name == "scatter" else ""
            raise FieldError(f"{prefix}{name}", f"{prefix}{name}.shape is {list(counts.shape)}, "
                                                f"need {need}{absent}")
    return RoundCounts(ids, report.gather, report.scatter)


def assemble(parts: Sequence[RoundCounts], ranks: Sequence[int]) -> RoundCounts:
    """The round's rows from every rank's checked counts (in device order), rank-major, in
    the parts' compact dtypes.

    ranks: the global rank of each part, for the errors. Raises FieldError for ids repeated
    across ranks or ranks disagreeing on whether scatter is sent.
    """
    ids = np.concatenate([p.sample_ids for p in parts])
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        dup = uniq[counts > 1][0]
        named = [r for r, p in zip(ranks, parts, strict=True) if dup in p.sample_ids]
        raise FieldError("sample_ids", f"sample_ids: id {int(dup)} is reported by ranks {named}")
    with_scatter = [r for r, p in zip(ranks, parts, strict=True) if p.scatter is not None]
    if with_scatter and len(with_scatter) != len(parts):
        without = [r for r, p in zip(ranks, parts, strict=True) if p.scatter is None]
        raise FieldError("scatter", f"scatter: ranks {shown(with_scatter)} sent one but ranks "
                                    f"{shown(without)} did not")
    scatters = None if parts[0].scatter is None else [p.scatter for p in parts]
    # The rows stay compact (the parts' widest dtype): the solver widens what it needs in its
    # own thread, not on the event loop that assembles (an int64 copy of a group's rows took
    # 2 ms of it at I = 512, E = 256).
    return RoundCounts(
        ids, np.concatenate([p.gather for p in parts]),
        None if scatters is None else np.concatenate(scatters),
    )


def part_bytes(part: RoundCounts) -> int:
    """Bytes a pending report holds."""
    scatter = 0 if part.scatter is None else part.scatter.nbytes
    return part.sample_ids.nbytes + part.gather.nbytes + scatter
