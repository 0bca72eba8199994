"""The alpha-beta All-to-All cost model and input checks for route counts.

A route is one (token, top-k slot) pair: sample i sends it to expert e in the scatter
(dispatch) and gets it back in the gather (combine). Its channel is set by where the sample's
device and the expert's device sit: same device (free), same node (intra), other node (inter).
"""

from __future__ import annotations

import numpy as np

from netmoe.round import Traffic

from .topology import Topology, check_devices

# Route counts are bounded so that every cost the solvers build (counts x tie-break weights)
# stays well inside int64.
MAX_ROUTES = 2**40


def check_counts(name: str, counts: object, *, samples: int | None, experts: int) -> np.ndarray:
    """Validates a route-count matrix and returns it as int64 [samples, experts].

    Accepts any integer dtype, or floats holding whole numbers; rejects NaN, infinities,
    fractions, negatives and counts above MAX_ROUTES, naming the first offending entry.
    """
    arr = np.asarray(counts)
    rows_ok = samples is None or (arr.ndim == 2 and arr.shape[0] == samples)
    if arr.ndim != 2 or arr.shape[1] != experts or not rows_ok:
        want = f"({samples if samples is not None else 'samples'}, {experts})"
        raise ValueError(f"{name} must have shape {want}, got shape {arr.shape}")
    if arr.dtype == bool or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(f"{name} must hold integer counts, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr) | (arr != np.floor(arr))
        if bad.any():
            i, e = (int(v) for v in np.argwhere(bad)[0])
            raise ValueError(f"{name}[{i}, {e}]={arr[i, e].item()!r} is not a whole number")
    if not arr.size:
        return arr.astype(np.int64)
    if arr.dtype == np.int64:
        # Read as uint64 a negative count exceeds 2**63: one pass checks both ends of the range.
        top = int(arr.view(np.uint64).max())
        bad_range = top > MAX_ROUTES
    else:
        top = arr.max()
        bad_range = top > MAX_ROUTES or (
            not np.issubdtype(arr.dtype, np.unsignedinteger) and arr.min() < 0
        )
    if bad_range:
        bad = (arr < 0) | (arr > MAX_ROUTES)
        i, e = (int(v) for v in np.argwhere(bad)[0])
        raise ValueError(
            f"{name}[{i}, {e}]={arr[i, e].item()!r} is out of range "
            f"(counts must be in 0..{MAX_ROUTES})"
        )
    out = arr.astype(np.int64, copy=False)
    # The sum is needed only when the largest entry does not already bound it.
    if float(top) * arr.size > MAX_ROUTES:
        total = float(out.sum(dtype=np.float64))
        if total > MAX_ROUTES:
            raise ValueError(f"{name} sums to {total:.0f} routes, more than {MAX_ROUTES}")
    return out


def check_placement(name: str, device: object, *, samples: int, devices: int) -> np.ndarray:
    """Validates a placement (device of each sample) and returns it as int64 [samples]."""
    arr = np.asarray(device)
    if arr.shape != (samples,):
        raise ValueError(f"{name} must have shape ({samples},), got shape {arr.shape}")
    return check_devices(name, arr, devices)


def _group_sums(counts: np.ndarray, size: int) -> np.ndarray:
    """[I, C / size]: sums of consecutive column groups of `size`. counts: [I, C] int64.

    Summing adjacent pairs halves the width per pass, so an even size reads the array about
    twice in all instead of `size` times for `size` strided views (measured: groups of 8 of
    4096 x 256, 1.0 ms vs 2.6 ms). Strided views finish an odd factor; either beats
    np.add.reduceat along a row by 5x or more for small groups.
    """
    out = counts
    while size % 2 == 0:
        out = out[:, 0::2] + out[:, 1::2]
        size //= 2
    if size == 1:
        return counts.copy() if out is counts else out
    summed = out[:, 0::size] + out[:, 1::size]
    for k in range(2, size):
        summed += out[:, k::size]
    return summed


def device_counts(topo: Topology, counts: np.ndarray) -> np.ndarray:
    """[I, J] int64: routes of each sample to the experts on each device. counts: [I, E] int64.

    Segment sums over experts sorted by device: O(I * E), whatever the expert map.
    """
    order, bounds = topo.experts_by_device
    # The default map is already sorted; skipping the column gather saves a copy of counts.
    sorted_counts = counts if topo.map_sorted else counts[:, order]
    sizes = np.diff(bounds)
    if sizes.min() == sizes.max() > 0:
        return _group_sums(sorted_counts, int(sizes[0]))
    starts = bounds[:-1]
    used = sizes > 0  # devices with at least one expert
    out = np.zeros((counts.shape[0], topo.devices), dtype=np.int64)
    if used.any():
        out[:, used] = np.add.reduceat(sorted_counts, starts[used], axis=1)
    return out


def node_counts(topo: Topology, dev_counts: np.ndarray) -> np.ndarray:
    """[I, N] int64 from device_counts [I, J], or from by_device [I, J * k]: devices of a node
    are consecutive."""
    return _group_sums(dev_counts, dev_counts.shape[1] // topo.nodes)


def by_device(topo: Topology, counts: np.ndarray) -> np.ndarray:
    """[I, J * k] int64: counts [I, E] with columns grouped by device, k per device.

    counts itself (no copy) when the expert map is sorted with k experts on every device, the
    common map; else device_counts (k = 1). node_counts and own_node take either form, so a
    solve need not build the [I, J] device counts, whose fresh 8 MB at I = 4096, J = 256 cost
    more in page faults than their sums (measured: two such arrays 10 ms, one 2 ms).
    """
    sizes = np.diff(topo.experts_by_device[1])
    if topo.map_sorted and sizes.min() == sizes.max() > 0:
        return counts
    return device_counts(topo, counts)


def own_node(topo: Topology, grouped: list[np.ndarray], node: np.ndarray) -> np.ndarray:
    """[I, G] int64: routes of each row to each device of node[i], summed over the matrices.
    grouped: [I, J * k] int64 matrices from by_device (the same k); node: [I] int64. Reads
    I * G * k entries of each, not the whole matrix."""
    width = grouped[0].shape[1] // topo.nodes
    at = np.arange(len(node)) * topo.nodes
    at += node
    # take on the rows' node blocks: 3x faster than indexing [rows, node] (measured, 4096 x 16).
    own = np.take(grouped[0].reshape(-1, width), at, axis=0)
    for m in grouped[1:]:
        own += np.take(m.reshape(-1, width), at, axis=0)
    return _group_sums(own, width // topo.gpus_per_node)


def channel_routes(
    topo: Topology, device: np.ndarray, dev_counts: np.ndarray, total: int | None = None,
    on_node: np.ndarray | None = None,
) -> tuple[int, int, int]:
    """(inter, intra, local) routes of one All-to-All.

    device: [I] int64 placement; dev_counts: [I, J * k] int64 routes by device (device_counts,
    k = 1, or by_device); total: its sum, and on_node: [I, N] int64 its node_counts, when the
    caller has them (they do not depend on the placement).
    """
    rows = np.arange(len(device))
    g = topo.gpus_per_node
    if on_node is None:
        own = own_node(topo, [dev_counts], device // g)  # [I, G]
        on_own_node = int(own.sum())
        local = int(own[rows, device % g].sum())
    else:
        on_own_node = int(on_node[rows, device // g].sum())
        # take on [I * J, k] rows: 7x faster than indexing [rows, device] of the [I, J, k] view
        # (measured, 4096 x 256 x 2).
        at = rows * topo.devices
        at += device
        local = int(np.take(dev_counts.reshape(-1, dev_counts.shape[1] // topo.devices), at,
                            axis=0).sum())
    if total is None:
        total = int(dev_counts.sum())
    return total - on_own_node, on_own_node - local, local


def traffic_of(
    topo: Topology, device: np.ndarray, mats: list[np.ndarray], totals: list[int] | None = None
) -> Traffic:
    """traffic() for checked inputs: device [I] int64, mats the [I, J] device_counts of each
    All-to-All, totals their sums if known."""
    return traffic_from_routes(topo, [
        channel_routes(topo, device, m, None if totals is None else totals[k])
        for k, m in enumerate(mats)
    ])


def traffic_from_routes(topo: Topology, routes: list[tuple[int, int, int]]) -> Traffic:
    """Traffic of All-to-Alls given each one's (inter, intra, local) routes (channel_routes)."""
    inter = intra = local = 0
    t_intra = t_inter = seconds = 0.0
    for e, a, lo in routes:
        ti = topo.alpha_intra + a * topo.bytes_per_route / topo.bw_intra
        te = topo.alpha_inter + e * topo.bytes_per_route / topo.bw_inter
        inter, intra, local = inter + e, intra + a, local + lo
        t_intra, t_inter, seconds = t_intra + ti, t_inter + te, seconds + max(ti, te)
    return Traffic(inter, intra, local, t_intra, t_inter, seconds)


def traffic(
    topo: Topology,
    device: object,
    gather: object,
    scatter: object | None = None,
) -> Traffic:
    """Routes and modelled time of placing sample i on device[i].

    device: [I] int, the device of each sample. gather, scatter: [I, E] integer route counts of
    the gather (combine) of layer l and the scatter (dispatch) of layer l+1; scatter may be
    omitted to cost a single All-to-All.
    """
    g = check_counts("gather", gather, samples=None, experts=topo.experts)
    dev = check_placement("device", device, samples=g.shape[0], devices=topo.devices)
    mats = [g]
    if scatter is not None:
        mats.append(check_counts("scatter", scatter, samples=g.shape[0], experts=topo.experts))
    return traffic_of(topo, dev, [device_counts(topo, m) for m in mats])


def node_loads(topo: Topology, device: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[N] int64: inter-node routes each node sends plus receives in one All-to-All.

    A route between a sample on node a and an expert on node b != a loads both a and b, in
    either direction, so the same count serves the scatter and the gather.
    """
    snode = topo.device_node[device]
    cross = snode[:, None] != topo.expert_node[None, :]
    loads = np.zeros(topo.nodes, dtype=np.int64)
    np.add.at(loads, snode, (counts * cross).sum(axis=1))
    np.add.at(loads, topo.expert_node, (counts * cross).sum(axis=0))
    return loads


def bottleneck_routes(
    topo: Topology, device: np.ndarray, gather: np.ndarray, scatter: np.ndarray | None = None
) -> int:
    """Sum over the All-to-Alls of the busiest node's inter-node routes (sent + received)."""
    mats = [gather] if scatter is None else [gather, scatter]
    return int(sum(node_loads(topo, device, m).max() for m in mats))
