"""Expert replication on top of joint placement: copies of the experts whose routes still cross
nodes.

After `fit_experts`, a few experts per layer still carry most of the inter-node routes. A copy of
expert e on device d (a full replica of its parameters) serves every route of e from samples on
d's node: local on d itself, intra-node from the node's other devices. The copies of one expert
sum their gradients every step, which costs inter-node bytes for each copy off the owner's node.

Holders: the owner (maps[l][e]) and the copies of an expert. Route table: a sample on device d
sends its routes to expert e to d when d holds e, else to the holder on d's node (the owner
first, then the lowest copy), else to the owner.

Sample placement stays the paper's exact two-stage solver: `replica_costs` turns counts and
holders into the [I, J] matrix `place_two_stage` takes, whose stage costs equal the
replica-aware inter- and intra-node routes up to a per-sample constant and a common factor G.

Choosing copies (`fit_replicas`) alternates, like `fit_experts`, two steps on the fit window:
  copies given samples, exact: a copy of e on node n != owner's node saves the routes of e from
    the samples placed on n (over every round and pair layer l takes part in) and costs its sync;
    nodes are independent, so each node takes its G * slots best copies with a positive net
    saving, then a transportation problem puts them on the node's devices (slots per device)
    minimizing routes off device;
  samples given copies: the exact two-stage placement with replica-aware costs.
A step is kept only if it lowers (cost, intra) on the fit window. A copy on the owner's node
would save intra-node routes only, so the fit never makes one (they are valid input).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from netmoe.checks import positive_int
from netmoe.round import OPTIMAL, Traffic, copy_route_table, home_placement, rows_held

from .cost import check_counts, check_placement, traffic_of
from .experts import (
    UNITS,
    ExpertEvaluation,
    Routes,
    Unit,
    check_maps,
    check_rounds,
    evaluate_experts,
)
from .plan import Plan
from .topology import Topology
from .transport import transport
from .two_stage import place_two_stage

Copies = tuple[tuple[tuple[int, int], ...], ...]  # [L] sorted (expert, device) copies


@dataclass(frozen=True)
class ReplicaFit:
    """copies[l]: (expert, device) copies of layer l, sorted. slots: copies per device and layer
    at most. objective: (cost, intra) on the fit window with maps, copies and per-round optimal
    samples, cost = inter-node routes x bytes_per_route x passes + sync bytes of the copies over
    the window; inter: those inter-node routes. history[t]: objective after t alternations
    (history[0]: no copies, the joint placement)."""

    copies: Copies
    slots: int
    objective: tuple[int, int]
    inter: int
    history: tuple[tuple[int, int], ...]
    rounds: int


@dataclass(frozen=True)
class ReplicaEvaluation:
    """Held-out replay: experts (home / sample-only / joint, see ExpertEvaluation) plus
    replicated[p], pair p with the fitted maps, the copies and samples placed knowing them, and
    replicated_devices[r][p] the device of each sample ([R][L-1][I_r]). tables[l][d][e]: the
    device serving expert e of layer l for samples on device d ([L][J][E]); loads[p][k][d]:
    routes device d serves in layer l + k of pair p = (l, l + 1), summed over rounds
    ([L-1][2][J])."""

    experts: ExpertEvaluation
    copies: Copies
    replicated: tuple[Routes, ...]
    replicated_devices: tuple[tuple[tuple[int, ...], ...], ...]
    tables: tuple[tuple[tuple[int, ...], ...], ...] = ()
    loads: tuple[tuple[tuple[int, ...], ...], ...] = ()

    @property
    def total(self) -> Routes:
        return Routes(sum(r.inter for r in self.replicated), sum(r.intra for r in self.replicated),
                      sum(r.seconds for r in self.replicated))


@dataclass(frozen=True)
class ReplicaRecommendation:
    """Whether to create the copies (on top of the fitted maps) and why.

    In unit "bytes" saving_per_step (inter-node route bytes joint + copies saves over joint
    alone, both passes), sync_per_step and migration_cost are inter-node bytes; in unit
    "seconds" they are modelled seconds. net_per_step = saving_per_step - sync_per_step.
    memory_bytes: bytes of all copies (parameters + optimizer state), max_device_bytes: those
    of the busiest device; migration creates every copy once (cross-node ones cost inter bytes).
    """

    adopt: bool
    reason: str
    copies: Copies
    n_copies: int
    cross_node_copies: int
    unit: str
    saving_per_step: float
    sync_per_step: float
    net_per_step: float
    memory_bytes: int
    max_device_bytes: int
    migration_cost: float
    horizon_steps: int
    break_even_steps: float


# ---------------------------------------------------------------------------------- input checks


def check_slots(slots: object, topo: Topology, maps: np.ndarray) -> int:
    """Copies per device and layer: an integer in 0..(experts a device does not own)."""
    k = positive_int("slots", slots, minimum=0)
    owned = np.stack([np.bincount(m, minlength=topo.devices) for m in maps])
    room = int(topo.experts - owned.max())
    if k > room:
        raise ValueError(
            f"slots={k} copies per device do not fit: a device owning {int(owned.max())} of "
            f"{topo.experts} experts can host at most {room} copies per layer"
        )
    return k


def slots_for_bytes(memory_bytes: object, bytes_per_expert: object, layers: object) -> int:
    """Copies per device and layer that memory_bytes of extra memory per device holds."""
    memory = positive_int("memory_bytes", memory_bytes, minimum=0)
    per = positive_int("bytes_per_expert", bytes_per_expert)
    return memory // (per * positive_int("layers", layers))


def check_copies(name: str, copies: object, topo: Topology, maps: np.ndarray,
                 slots: int | None = None) -> np.ndarray:
    """Validates copies ([L] sequences of (expert, device)) against maps [L, E]; returns the
    holders [L, E, J] bool (owners and copies). slots: copies per device and layer at most."""
    layers = maps.shape[0]
    if isinstance(copies, str | bytes) or not isinstance(copies, Sequence) or \
            len(copies) != layers:
        got = len(copies) if isinstance(copies, Sequence) else type(copies).__name__
        raise ValueError(f"{name} must list the copies of each of the {layers} layers, got {got}")
    holders = np.zeros((layers, topo.experts, topo.devices), dtype=bool)
    holders[np.arange(layers)[:, None], np.arange(topo.experts)[None, :], maps] = True
    for layer, pairs in enumerate(copies):
        for k, pair in enumerate(pairs):
            where = f"{name}[{layer}][{k}]"
            if len(pair) != 2 or not all(isinstance(v, int | np.integer) and
                                         not isinstance(v, bool) for v in pair):
                raise ValueError(f"{where} must be an (expert, device) pair of ints, got {pair!r}")
            e, d = int(pair[0]), int(pair[1])
            if not 0 <= e < topo.experts:
                raise ValueError(f"{where} names expert {e}, experts are 0..{topo.experts - 1}")
            if not 0 <= d < topo.devices:
                raise ValueError(f"{where} names device {d}, devices are 0..{topo.devices - 1}")
            if maps[layer, e] == d:
                raise ValueError(f"{where}: expert {e} of layer {layer} is owned by device {d}, "
                                 f"a copy there is pointless")
            if holders[layer, e, d]:
                raise ValueError(f"{where}: expert {e} already has a copy on device {d}")
            holders[layer, e, d] = True
        if slots is not None:
            extra = holders[layer].sum(axis=0) - np.bincount(maps[layer], minlength=topo.devices)
            if extra.max() > slots:
                d = int(np.argmax(extra))
                raise ValueError(f"{name}[{layer}] puts {int(extra[d])} copies on device {d}, "
                                 f"more than slots={slots}")
    return holders


def _as_copies(holders: np.ndarray, maps: np.ndarray) -> Copies:
    extra = holders.copy()
    extra[np.arange(maps.shape[0])[:, None], np.arange(maps.shape[1])[None, :], maps] = False
    return tuple(tuple((int(e), int(d)) for e, d in np.argwhere(layer)) for layer in extra)


# --------------------------------------------------------------------------- replica-aware costs


def _node_holders(topo: Topology, holders: np.ndarray) -> np.ndarray:
    """[E, N] int64: 1 where expert e has a holder on node n. holders: [E, J] bool."""
    return holders.reshape(holders.shape[0], topo.nodes, topo.gpus_per_node).any(axis=2) \
        .astype(np.int64)


def replica_costs(topo: Topology, pair: Sequence[np.ndarray],
                  holders: Sequence[np.ndarray]) -> np.ndarray:
    """[I, J] int64 matrix X such that place_two_stage(topo, X, home) is the exact two-stage
    placement for replica-aware costs. pair: counts [I, E] int64 of each All-to-All (gather l,
    scatter l+1); holders: their [E, J] bool holders.

    With on_dev[i, d] routes of sample i to experts held on d and on_node[i, n] to experts held
    on node n (counted once however many holders n has), both summed over the pair: when no node
    holds an expert twice (never, for copies fit_replicas makes), on_dev's node sums are on_node
    and X = on_dev. Otherwise X[i, d] = G * on_dev[i, d] - (sum of on_dev[i] over d's node -
    on_node[i, node(d)]): X's node sums are G * on_node, so stage 1 costs G * (inter-node
    routes) plus a per-sample constant and stage 2 costs G * (intra-node routes) plus a
    per-sample constant: the same optima and tie-breaks.
    """
    g = topo.gpus_per_node
    on_dev = sum(c @ h.astype(np.int64) for c, h in zip(pair, holders, strict=True))
    on_node = sum(c @ _node_holders(topo, h) for c, h in zip(pair, holders, strict=True))
    overlap = on_dev.reshape(len(on_dev), topo.nodes, g).sum(axis=2) - on_node  # [I, N] >= 0
    if not overlap.any():
        return on_dev
    return g * on_dev - np.repeat(overlap, g, axis=1)


def route_table(topo: Topology, holders: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """[E, J] int64: the device serving expert e for a sample on device d (see module doc and
    ``netmoe.round.copy_route_table``, which the client shares). holders: [E, J] bool; maps: [E]
    int64 owners."""
    return copy_route_table(holders, maps, topo.gpus_per_node)


def served(topo: Topology, counts: np.ndarray, table: np.ndarray, device: np.ndarray) -> np.ndarray:
    """[I, J] int64: routes of each sample served by each device when sample i sits on
    device[i] and routes follow table ([E, J] from route_table). counts: [I, E] int64."""
    out = np.zeros((len(counts), topo.devices), dtype=np.int64)
    onehot = np.eye(topo.devices, dtype=np.int64)
    for d in np.unique(device):
        rows = device == d
        out[rows] = counts[rows] @ onehot[table[:, d]]
    return out


def place_replicated(topo: Topology, pair: Sequence[np.ndarray], holders: Sequence[np.ndarray],
                     home: np.ndarray) -> np.ndarray:
    """[I] int64 two-stage placement of one pair: pair [2] counts [I, E] of layers l, l+1,
    holders [2] their [E, J] bool holders."""
    return place_two_stage(topo, replica_costs(topo, pair, holders), home)


def solve_replicated(
    topo: Topology,
    gather: object,
    scatter: object | None,
    holders: tuple[np.ndarray, np.ndarray | None],
    *,
    home: object,
    scatter_topology: Topology | None = None,
    tables: tuple[np.ndarray, np.ndarray | None] | None = None,
) -> Plan:
    """One round with copies in force: the exact two-stage placement for replica-aware costs
    (whatever objective or method the job asked for: the exact CP-SAT models know no copies).

    gather, scatter: [I, E] routes of layer l and (predicted) l+1, scatter may be None;
    holders: [E, J] bool holders of layer l and of l+1 (None: no scatter); owners are
    topo.expert_device and scatter_topology's (default topo's). home: [I] balanced devices.
    before / after: replica-aware routes at home and placed (routes follow tables, [E, J] int64
    of layer l and l+1 within the rule of balance.check_tables, default route_table's).
    """
    g = check_counts("gather", gather, samples=None, experts=topo.experts)
    base = check_placement("home", home, samples=g.shape[0], devices=topo.devices)
    mats, held, owners = [g], [holders[0]], [topo.expert_device]
    if scatter is not None:
        mats.append(check_counts("scatter", scatter, samples=g.shape[0], experts=topo.experts))
        held.append(holders[1])
        owners.append((scatter_topology or topo).expert_device)
    start = time.perf_counter()
    device = place_replicated(topo, mats, held, base)
    elapsed = time.perf_counter() - start
    if tables is None:
        tables = tuple(route_table(topo, h, m) for h, m in zip(held, owners, strict=True))
    tables = tables[:len(mats)]

    def routes(dev: np.ndarray) -> Traffic:
        return traffic_of(topo, dev, [served(topo, c, t, dev)
                                      for c, t in zip(mats, tables, strict=True)])

    after = routes(device)
    return Plan(
        dest=tuple(device.tolist()), home=tuple(base.tolist()),
        moved=int((device != base).sum()), rows_held=tuple(rows_held(device, topo.devices, base)),
        before=routes(base), after=after,
        objective="volume", method="two_stage", objective_value=after.seconds,
        status=OPTIMAL, optimal=True, gap=0.0, solve_seconds=elapsed,
    )


# ------------------------------------------------------------------------------- choosing copies


def _with_nodes(topo: Topology, rounds: list[np.ndarray],
                place: list[list[np.ndarray]]) -> np.ndarray:
    """[L, E, N] int64: routes of each expert from the samples placed on each node, over every
    round and pair each layer takes part in."""
    layers = rounds[0].shape[0]
    onehot = np.eye(topo.nodes, dtype=np.int64)
    out = np.zeros((layers, topo.experts, topo.nodes), dtype=np.int64)
    for layer in range(layers):
        for p in (layer - 1, layer):
            if 0 <= p < layers - 1:
                for r, counts in enumerate(rounds):
                    out[layer] += counts[layer].T @ onehot[topo.device_node[place[r][p]]]
    return out


def _with_devices(topo: Topology, rounds: list[np.ndarray], place: list[list[np.ndarray]],
                  layer: int) -> np.ndarray:
    """[E, J] int64: routes of layer's experts from the samples placed on each device."""
    layers = rounds[0].shape[0]
    onehot = np.eye(topo.devices, dtype=np.int64)
    out = np.zeros((topo.experts, topo.devices), dtype=np.int64)
    for p in (layer - 1, layer):
        if 0 <= p < layers - 1:
            for r, counts in enumerate(rounds):
                out += counts[layer].T @ onehot[place[r][p]]
    return out


def _choose_copies(topo: Topology, rounds: list[np.ndarray], place: list[list[np.ndarray]],
                   maps: np.ndarray, slots: int, route_value: int, sync_cost: int) -> np.ndarray:
    """Copies given samples: holders [L, E, J] bool maximizing, per layer and node, the net
    saving route_value x (routes saved) - sync_cost per copy; then each node's copies on its
    devices (slots each) minimizing routes off device."""
    g = topo.gpus_per_node
    layers = maps.shape[0]
    holders = np.zeros((layers, topo.experts, topo.devices), dtype=bool)
    holders[np.arange(layers)[:, None], np.arange(topo.experts)[None, :], maps] = True
    if slots == 0:
        return holders
    by_node = _with_nodes(topo, rounds, place)
    for layer in range(layers):
        by_dev = None
        owner_node = topo.device_node[maps[layer]]
        for n in range(topo.nodes):
            net = by_node[layer, :, n] * route_value - sync_cost
            ok = np.flatnonzero((owner_node != n) & (net > 0))
            # Best first; ties go to the lower expert id, so the choice is deterministic.
            chosen = ok[np.lexsort((ok, -net[ok]))][: g * slots]
            if chosen.size == 0:
                continue
            if by_dev is None:
                by_dev = _with_devices(topo, rounds, place, layer)
            devs = np.arange(n * g, (n + 1) * g)
            off = by_node[layer, chosen, n][:, None] - by_dev[np.ix_(chosen, devs)]
            # Zero-cost rows fill the slots no copy takes.
            pad = np.zeros((g * slots - chosen.size, g), dtype=np.int64)
            col = transport(np.vstack([off, pad]), np.full(g, slots, dtype=np.int64))
            holders[layer, chosen, devs[col[: chosen.size]]] = True
    return holders


def _place_all(topo: Topology, rounds: list[np.ndarray],
               holders: np.ndarray) -> tuple[list[list[np.ndarray]], int, int]:
    """Samples given copies: place[r][p] = device [I_r] per round and pair, and the
    replica-aware (inter, intra) routes summed over rounds and pairs."""
    place: list[list[np.ndarray]] = []
    inter = intra = 0
    for counts in rounds:
        home = home_placement(counts.shape[1], topo.devices)
        place.append([])
        for p in range(counts.shape[0] - 1):
            dev = place_replicated(topo, counts[p:p + 2], holders[p:p + 2], home)
            e, a = _routes(topo, counts[p:p + 2], holders[p:p + 2], dev)
            inter, intra = inter + e, intra + a
            place[-1].append(dev)
    return place, inter, intra


def _routes(topo: Topology, pair: np.ndarray, holders: np.ndarray,
            device: np.ndarray) -> tuple[int, int]:
    """Replica-aware (inter, intra) routes of a pair placed on device [I]."""
    rows = np.arange(len(device))
    node = topo.device_node[device]
    inter = intra = 0
    for counts, held in zip(pair, holders, strict=True):
        on_dev = (counts @ held.astype(np.int64))[rows, device]
        on_node = (counts @ _node_holders(topo, held))[rows, node]
        inter += int(counts.sum() - on_node.sum())
        intra += int(on_node.sum() - on_dev.sum())
    return inter, intra


def fit_replicas(
    topo: Topology,
    rounds: Sequence[object],
    maps: object,
    *,
    slots: int,
    grad_bytes: int = 0,
    passes: int = 2,
    max_iters: int = 10,
) -> ReplicaFit:
    """Chooses copies per layer for the fitted maps ([L, E]) on a window of rounds.

    slots: copies per device and layer at most (0: none). grad_bytes: gradient bytes of one
    expert; a copy off its owner's node costs 2 x grad_bytes inter-node bytes per step (its
    gradient to the owner's node, the sum back). passes: All-to-All passes per step the route
    saving applies to (2: forward and backward). Deterministic.
    """
    data = check_rounds("rounds", rounds, topo)
    fitted = check_maps("maps", maps, topo, data[0].shape[0])
    k = check_slots(slots, topo, fitted)
    grad = positive_int("grad_bytes", grad_bytes, minimum=0)
    passes = positive_int("passes", passes)
    max_iters = positive_int("max_iters", max_iters)
    route_value = topo.bytes_per_route * passes
    sync_cost = 2 * grad * len(data)  # per cross-node copy over the window

    def cost(holders: np.ndarray, inter: int, intra: int) -> tuple[int, int]:
        owners = topo.device_node[fitted]
        cross = holders & (topo.device_node[None, None, :] != owners[:, :, None])
        return inter * route_value + int(cross.sum()) * sync_cost, intra

    holders = check_copies("copies", [()] * len(fitted), topo, fitted)
    place, inter, intra = _place_all(topo, data, holders)
    objective = cost(holders, inter, intra)
    history = [objective]
    for _ in range(max_iters):
        new = _choose_copies(topo, data, place, fitted, k, route_value, sync_cost)
        if np.array_equal(new, holders):
            break
        new_place, new_inter, new_intra = _place_all(topo, data, new)
        new_objective = cost(new, new_inter, new_intra)
        if new_objective >= objective:
            break
        holders, place, inter, objective = new, new_place, new_inter, new_objective
        history.append(objective)
    return ReplicaFit(
        copies=_as_copies(holders, fitted), slots=k, objective=objective, inter=inter,
        history=tuple(history), rounds=len(data),
    )


# ---------------------------------------------------------------------- evaluation and decision


def evaluate_replicas(
    topo: Topology,
    rounds: Sequence[object],
    maps: object,
    copies: object,
    *,
    current: object | None = None,
    tables: object | None = None,
) -> ReplicaEvaluation:
    """Replays held-out rounds ([L, I_r, E] each): home, sample-only and joint as
    evaluate_experts, plus maps with copies ([L] (expert, device) lists) and samples placed
    knowing them; routes follow tables ([L][J][E], checked by balance.check_tables; default
    route_table)."""
    from .balance import check_tables  # balance builds on this module

    experts = evaluate_experts(topo, rounds, maps, current=current)
    data = check_rounds("rounds", rounds, topo)
    fitted = check_maps("maps", maps, topo, data[0].shape[0])
    holders = check_copies("copies", copies, topo, fitted)
    if tables is None:
        tables = [route_table(topo, h, m) for h, m in zip(holders, fitted, strict=True)]
    else:
        tables = list(check_tables("tables", tables, topo, holders))
    pairs = len(fitted) - 1
    totals = np.zeros((pairs, 2), dtype=np.int64)
    loads = np.zeros((pairs, 2, topo.devices), dtype=np.int64)
    seconds = np.zeros(pairs)
    devices = []
    for counts in data:
        home = home_placement(counts.shape[1], topo.devices)
        devices.append([])
        for p in range(pairs):
            dev = place_replicated(topo, counts[p:p + 2], holders[p:p + 2], home)
            by_device = [served(topo, counts[q], tables[q], dev) for q in (p, p + 1)]
            t = traffic_of(topo, dev, by_device)
            loads[p] += np.stack([s.sum(axis=0) for s in by_device])
            totals[p] += (t.inter, t.intra)
            seconds[p] += t.seconds
            devices[-1].append(tuple(int(d) for d in dev))
    return ReplicaEvaluation(
        experts=experts,
        copies=_as_copies(holders, fitted),
        replicated=tuple(Routes(int(totals[p, 0]), int(totals[p, 1]), float(seconds[p]))
                         for p in range(pairs)),
        replicated_devices=tuple(tuple(r) for r in devices),
        tables=tuple(tuple(tuple(int(h) for h in row) for row in t.T) for t in tables),
        loads=tuple(tuple(tuple(int(v) for v in k) for k in p) for p in loads),
    )


def recommend_replicas(
    topo: Topology,
    evaluation: ReplicaEvaluation,
    *,
    bytes_per_expert: int,
    grad_bytes: int,
    horizon_steps: int,
    unit: Unit = "bytes",
    passes: int = 2,
) -> ReplicaRecommendation:
    """Create the copies only if their held-out saving per step beats their sync per step and,
    over horizon_steps, the net saving pays the one-off creation of the copies.

    bytes_per_expert: parameters + optimizer state of one expert (memory, creation);
    grad_bytes: its gradient (sync, 2 x grad_bytes across nodes per cross-node copy and step).
    The saving is joint + copies against joint alone (the maps are decided by `recommend`).
    """
    bytes_per_expert = positive_int("bytes_per_expert", bytes_per_expert)
    grad = positive_int("grad_bytes", grad_bytes, minimum=0)
    horizon_steps = positive_int("horizon_steps", horizon_steps)
    passes = positive_int("passes", passes)
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    fitted = np.array(evaluation.experts.maps, dtype=np.int64)
    holders = check_copies("evaluation.copies", evaluation.copies, topo, fitted)
    owners = topo.device_node[fitted]
    cross = holders & (topo.device_node[None, None, :] != owners[:, :, None])
    per_layer_cross = cross.sum(axis=(1, 2))
    n_cross = int(per_layer_cross.sum())
    n_copies = int(holders.sum()) - fitted.size
    extra = holders.sum(axis=1) - np.stack([np.bincount(m, minlength=topo.devices)
                                            for m in fitted])  # [L, J] copies per device
    memory = n_copies * bytes_per_expert
    max_device = int(extra.sum(axis=0).max()) * bytes_per_expert if n_copies else 0
    rounds = evaluation.experts.rounds
    joint, rep = evaluation.experts.joint, evaluation.total
    if unit == "bytes":
        saving = (joint.inter - rep.inter) / rounds * topo.bytes_per_route * passes
        sync = float(n_cross * 2 * grad)
        migration = float(n_cross * bytes_per_expert)
        fmt = "{:.4g} inter-node bytes".format
    else:
        saving = (joint.seconds - rep.seconds) / rounds * passes
        # One bucketed all-reduce per layer that has cross-node copies.
        sync = float(sum(topo.alpha_inter + c * 2 * grad / topo.bw_inter
                         for c in per_layer_cross if c))
        migration = topo.alpha_inter + n_cross * bytes_per_expert / topo.bw_inter \
            if n_cross else 0.0
        fmt = "{:.3g} s".format
    net = saving - sync
    break_even = migration / net if net > 0 else math.inf
    expert_memory = fitted.size * bytes_per_expert
    memo = (f"memory +{memory} bytes (+{memory / expert_memory:.1%} of expert memory, "
            f"{max_device} on the busiest device)")
    if n_copies == 0:
        adopt, reason = False, (
            "no copy pays on the fit window: nothing to create" if grad == 0 else
            f"no copy saves more route bytes on the fit window than its gradient sync costs "
            f"(2 x {grad} inter-node bytes per copy and step): nothing to create")
    elif saving <= 0:
        adopt, reason = False, (
            f"no saving on {rounds} held-out rounds: per step the {n_copies} copies save "
            f"{fmt(saving)} against joint placement alone")
    elif net <= 0:
        adopt, reason = False, (
            f"the copies' sync costs more than they save: per step they save {fmt(saving)} of "
            f"routes and their gradient all-reduce costs {fmt(sync)}; {memo}")
    elif net * horizon_steps <= migration:
        adopt, reason = False, (
            f"horizon too short: {horizon_steps} steps save {fmt(net * horizon_steps)} net, "
            f"creating {n_copies} copies ({n_cross} across nodes) costs {fmt(migration)}; it pays "
            f"off after {math.ceil(break_even)} steps; {memo}")
    else:
        adopt, reason = True, (
            f"per step the {n_copies} copies save {fmt(saving)} of routes on {rounds} held-out "
            f"rounds and cost {fmt(sync)} of gradient sync; creating them ({n_cross} across "
            f"nodes) costs {fmt(migration)} and pays off after {math.ceil(break_even)} steps "
            f"of {horizon_steps}; {memo}")
    return ReplicaRecommendation(
        adopt=adopt, reason=reason, copies=evaluation.copies, n_copies=n_copies,
        cross_node_copies=n_cross, unit=unit, saving_per_step=saving, sync_per_step=sync,
        net_per_step=net, memory_bytes=memory, max_device_bytes=max_device,
        migration_cost=migration, horizon_steps=horizon_steps, break_even_steps=break_even,
    )

