"""Expert maps, copies and route tables chosen for routes and load together.

Load of a device in layer l: the routes its experts and copies of layer l serve. The busiest
device sets the pace of the layer, so `fit_balanced` minimizes (inter, intra) routes on the fit
window subject to a load bound: per layer, the busiest device's load at most R x the mean, on
the fit window (routes of the layer summed over the fit rounds and the pairs it takes part in,
samples placed per round and pair by the exact replica-aware two-stage solver).

Route tables ([E, J] per layer: the device that serves expert e for samples on device d) follow
one rule, so that they never change a route's channel and sample placement stays exact
(`replicas.place_replicated`): a device that holds e serves itself; else a holder on d's node,
when the node has one; else any holder. Within that rule a table is free to pick among several
holders, which is how a copy splits a hot expert's load: `balanced_table` picks, for the cells
with a choice, the holders that minimize the busiest device's load (exhaustive when at most
EXACT_TABLES assignments exist, else heaviest cell first to the least loaded holder).

Method (`fit_balanced`), beyond tiny instances:
  1. maps for routes (`fit_experts`), or the current maps when a migration budget M is given;
     copies for routes (`fit_replicas`, slots per device and layer);
  2. samples placed for those holders; w[l] = [E, J] routes of layer l's experts from samples on
     each device over the fit window;
  3. per layer, at fixed samples, greedy exchanges of two experts' devices (copies stay with
     their expert): while the layer's load exceeds the bound, the exchange that removes the
     most excess per route it adds (routes weighed inter-node first); once within the bound,
     exchanges that save routes and keep the bound; with M, only while at most M experts of all
     layers sit off their current device. Then, while the layer still exceeds the bound, copies
     for load: a free slot filled, or a device's copy moved to another expert, whichever removes
     the most excess per route it adds (this is how a hot expert gets split). Loads here split
     a cell evenly among its candidates;
  4. back to 2, up to `rounds_max` times, each round aiming below the bound by the excess the
     last replay still showed; the best (within the bound, then fewest inter-, then intra-node
     routes, then fewest moves) of the candidates, as replayed with exact placements and
     tables, wins.
Tiny instances (at most EXACT_LIMIT candidate map-and-copy sets) are solved exhaustively on the
same objective: exact.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from netmoe.checks import positive_int

from .experts import check_maps, check_rounds, fit_experts
from .replicas import (
    Copies,
    _as_copies,
    _place_all,
    _with_devices,
    check_copies,
    check_slots,
    fit_replicas,
    route_table,
)
from .topology import Topology

EXACT_TABLES = 4096  # table assignments enumerated per layer at most
EXACT_LIMIT = 4096  # map-and-copy candidates enumerated at most


@dataclass(frozen=True)
class BalancedFit:
    """maps [L][E] owners; copies [L] sorted (expert, device); tables [L][J][E]: device serving
    expert e for samples on device d. loads [L][J]: fit-window routes each device serves per
    layer; ratios [L]: their max / mean. objective: (inter, intra) routes on the fit window.
    moved: experts off their current device. exact: solved by exhaustive search."""

    maps: tuple[tuple[int, ...], ...]
    copies: Copies
    tables: tuple[tuple[tuple[int, ...], ...], ...]
    loads: tuple[tuple[int, ...], ...]
    ratios: tuple[float, ...]
    max_load_ratio: float
    objective: tuple[int, int]
    moved: int
    exact: bool
    rounds: int

    @property
    def within_bound(self) -> bool:
        return max(self.ratios) <= self.max_load_ratio + 1e-12


# ---------------------------------------------------------------------------------- input checks


def check_ratio(name: str, value: object) -> float:
    """A load bound R >= 1 (float); None means no bound (inf)."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating) \
            or math.isnan(value) or value < 1:
        raise ValueError(f"{name} must be a number >= 1 (busiest device / mean load), "
                         f"got {value!r}")
    return float(value)


def check_budget(name: str, value: object) -> int | None:
    """A migration budget: experts that may move per re-plan, an integer >= 0, or None."""
    return None if value is None else positive_int(name, value, minimum=0)


def check_tables(name: str, tables: object, topo: Topology, holders: np.ndarray) -> np.ndarray:
    """Validates route tables [L][J][E] against holders [L, E, J] bool; returns [L, E, J] int64
    (table[l, e, d]: device serving expert e for samples on device d). Each entry must hold the
    expert and follow the rule in the module doc."""
    layers = holders.shape[0]
    arr = np.asarray(tables)
    want = (layers, topo.devices, topo.experts)
    if arr.shape != want or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers of shape {want} ([layers][devices][experts]), "
                         f"got shape {arr.shape} dtype {arr.dtype}")
    out = arr.transpose(0, 2, 1).astype(np.int64)
    g = topo.gpus_per_node
    for layer, e, d in itertools.product(range(layers), range(topo.experts), range(topo.devices)):
        h = int(out[layer, e, d])
        where = f"{name}[{layer}][{d}][{e}]={h}"
        if not 0 <= h < topo.devices or not holders[layer, e, h]:
            held = np.flatnonzero(holders[layer, e]).tolist()
            raise ValueError(f"{where} names a device that does not hold expert {e} of layer "
                             f"{layer} (its owner and copies: {held})")
        if holders[layer, e, d] and h != d:
            raise ValueError(f"{where}: device {d} holds expert {e} and must serve its own "
                             f"samples")
        if holders[layer, e, d // g * g:(d // g + 1) * g].any() and h // g != d // g:
            raise ValueError(f"{where}: node {d // g} holds expert {e}, the table sends its "
                             f"routes to node {h // g}")
    return out


# ---------------------------------------------------------------------------------- route tables


def candidates(topo: Topology, holders: np.ndarray) -> np.ndarray:
    """[E, J, J] bool: the holders the rule allows to serve expert e for samples on device d.
    holders: [E, J] bool."""
    g = topo.gpus_per_node
    node_has = holders.reshape(len(holders), topo.nodes, g)
    on_node = np.repeat(node_has.any(axis=2), g, axis=1)  # [E, J]: d's node holds e
    same = topo.device_node[:, None] == topo.device_node[None, :]  # [d, h]
    out = holders[:, None, :] & np.where(on_node[:, :, None], same[None], True)
    own = np.arange(topo.devices)
    out[holders] = False
    out[:, own, own] |= holders
    return out


def loads_of(table: np.ndarray, weight: np.ndarray, devices: int) -> np.ndarray:
    """[J] int64 routes each device serves: weight [E, J] routes of expert e from samples on
    device d, table [E, J] the serving device."""
    return np.bincount(table.ravel(), weights=weight.ravel(), minlength=devices).astype(np.int64)


def balanced_table(topo: Topology, weight: np.ndarray, holders: np.ndarray) -> np.ndarray:
    """[E, J] int64 route table within the rule minimizing the busiest device's load.

    weight: [E, J] int64 routes of expert e from samples on device d; holders: [E, J] bool.
    Exhaustive when the cells with a choice allow at most EXACT_TABLES assignments (ties: the
    first in lexicographic order of the cells, lowest device first); else heaviest cell first to
    its least loaded candidate (ties: lowest device).
    """
    allowed = candidates(topo, holders)
    count = allowed.sum(axis=2)
    table = np.argmax(allowed, axis=2).astype(np.int64)  # the only candidate, or the lowest
    free = np.argwhere((count > 1) & (weight > 0))
    if free.size == 0:
        return table
    fixed = np.ones_like(weight, dtype=bool)
    fixed[free[:, 0], free[:, 1]] = False
    base = loads_of(table, np.where(fixed, weight, 0), topo.devices)
    options = [np.flatnonzero(allowed[e, d]) for e, d in free]
    if math.prod(len(o) for o in options) <= EXACT_TABLES:
        best, best_max = None, None
        for pick in itertools.product(*options):
            load = base.copy()
            np.add.at(load, list(pick), weight[free[:, 0], free[:, 1]])
            if best_max is None or load.max() < best_max:
                best, best_max = pick, load.max()
        table[free[:, 0], free[:, 1]] = best
        return table
    order = np.lexsort((np.arange(len(free)), -weight[free[:, 0], free[:, 1]]))
    load = base.astype(np.int64)
    for k in order:
        e, d = free[k]
        h = int(options[k][np.argmin(load[options[k]])])
        table[e, d] = h
        load[h] += weight[e, d]
    return table


def ratio(load: np.ndarray) -> float:
    """max / mean of a [J] load vector (1.0 when nothing is served)."""
    mean = load.mean()
    return 1.0 if mean == 0 else float(load.max() / mean)


# ----------------------------------------------------------------------------------- the search


@dataclass(frozen=True)
class _Candidate:
    """One replayed candidate: key (within bound 0/1, excess, inter, intra, moved; lower is
    better), maps [L, E], holders [L, E, J], tables [L, E, J], loads [L, J], routes."""

    key: tuple
    maps: np.ndarray
    holders: np.ndarray
    tables: np.ndarray
    loads: np.ndarray
    inter: int
    intra: int


def _score(topo: Topology, data: list[np.ndarray], maps: np.ndarray, holders: np.ndarray,
           bound: float, now: np.ndarray) -> tuple[_Candidate, list[np.ndarray]]:
    """maps [L, E] and holders [L, E, J] replayed on the fit window: the candidate (samples
    placed, balanced tables, loads, key) and w[l], [E, J] routes of layer l's experts from the
    samples on each device."""
    place, inter, intra = _place_all(topo, data, holders)
    weights = [_with_devices(topo, data, place, layer) for layer in range(len(maps))]
    tables = np.stack([balanced_table(topo, w, h) for w, h in zip(weights, holders, strict=True)])
    loads = np.stack([loads_of(t, w, topo.devices) for t, w in zip(tables, weights, strict=True)])
    excess = sum(max(0.0, ratio(load) - bound) for load in loads)
    moved = int((maps != now).sum())
    key = (0, 0.0, inter, intra, moved) if excess <= 1e-12 else (1, excess, inter, intra, moved)
    return _Candidate(key, maps, holders, tables, loads, inter, intra), weights


def _row(topo: Topology, weight: np.ndarray, held: np.ndarray,
         inter_weight: float) -> tuple[float, np.ndarray]:
    """One expert with holders held [J] bool and routes weight [J] from samples on each device:
    (its routes' cost, inter-node ones weighing inter_weight; the load [J] float it puts on each
    device, each route split evenly among the holders the rule allows)."""
    allowed = candidates(topo, held[None])[0]  # [d, holder]
    share = allowed / allowed.sum(axis=1, keepdims=True)
    node = held.reshape(topo.nodes, topo.gpus_per_node).any(axis=1)[topo.device_node]
    return float(weight @ np.where(held, 0.0, np.where(node, 1.0, inter_weight))), weight @ share


def _rows(topo: Topology, weight: np.ndarray, holders: np.ndarray, maps: np.ndarray,
          inter_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """For each expert e and device x, e's routes cost and loads if its owner moved to x:
    (cost [E, J] float, load [E, J, J] float; inf cost where x already holds a copy of e)."""
    experts, j = weight.shape
    cost = np.full((experts, j), np.inf)
    load = np.zeros((experts, j, j))
    for e in range(experts):
        for x in range(j):
            if x != maps[e] and holders[e, x]:
                continue
            h = holders[e].copy()
            h[maps[e]], h[x] = False, True
            cost[e, x], load[e, x] = _row(topo, weight[e], h, inter_weight)
    return cost, load


def _recopy(topo: Topology, weight: np.ndarray, maps: np.ndarray, holders: np.ndarray,
            bound: float, slots: int) -> np.ndarray:
    """Copies for load, one layer at fixed samples: while the layer exceeds the bound, the copy
    (a free slot filled, or a copy moved to another expert on the same device) removing the most
    excess load per route it adds. Returns holders [E, J] bool."""
    holders = holders.copy()
    experts, j = weight.shape
    total = float(weight.sum())
    limit = bound * total / j
    inter_weight = total + 1.0
    rows = [_row(topo, weight[e], holders[e], inter_weight) for e in range(experts)]
    for _ in range(2 * j * slots):
        load = sum(r[1] for r in rows)
        excess = float(np.maximum(load - limit, 0).sum())
        if excess <= 1e-9:
            break
        best = None
        for x in range(j):
            held = np.flatnonzero(holders[:, x] & (maps != x))  # copies on x
            drops = list(held) + ([None] if len(held) < slots else [])
            for old in drops:
                base_cost, base_load = 0.0, load.copy()
                if old is not None:
                    h = holders[old].copy()
                    h[x] = False
                    c, lo = _row(topo, weight[old], h, inter_weight)
                    base_cost += c - rows[old][0]
                    base_load += lo - rows[old][1]
                for new in np.flatnonzero(~holders[:, x]):
                    h = holders[new].copy()
                    h[x] = True
                    c, lo = _row(topo, weight[new], h, inter_weight)
                    after = base_load + lo - rows[new][1]
                    gain = excess - float(np.maximum(after - limit, 0).sum())
                    if gain <= 1e-9:
                        continue
                    score = (base_cost + c - rows[new][0]) / gain
                    if best is None or score < best[0]:
                        best = (score, x, old, int(new))
        if best is None:
            break
        _, x, old, new = best
        for e, value in ((old, False), (new, True)):
            if e is not None:
                holders[e, x] = value
                rows[e] = _row(topo, weight[e], holders[e], inter_weight)
    return holders


def _exchange(topo: Topology, weight: np.ndarray, maps: np.ndarray, holders: np.ndarray,
              bound: float, now: np.ndarray, room: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Greedy exchanges for one layer at fixed samples (step 3 of the module doc). room: how many
    more experts may sit off their current device (inf: no budget). Returns (maps, holders,
    change in experts off their current device)."""
    maps, holders = maps.copy(), holders.copy()
    experts, j = weight.shape
    total = float(weight.sum())
    limit = bound * total / j
    inter_weight = total + 1.0
    cost, load = _rows(topo, weight, holders, maps, inter_weight)
    a, b = np.triu_indices(experts, 1)
    used = 0
    for _ in range(4 * experts):
        own_a, own_b = maps[a], maps[b]
        current = load[np.arange(experts), maps].sum(axis=0)
        excess = np.maximum(current - limit, 0).sum()
        delta = cost[a, own_b] + cost[b, own_a] - cost[a, own_a] - cost[b, own_b]
        after = (current[None] - load[a, own_a] - load[b, own_b] + load[a, own_b]
                 + load[b, own_a])
        new_excess = np.maximum(after - limit, 0).sum(axis=1)
        off = ((own_b != now[a]).astype(int) - (own_a != now[a]) + (own_a != now[b])
               - (own_b != now[b]))
        ok = (own_a != own_b) & np.isfinite(delta) & (used + off <= room)
        if excess > 1e-9:
            gain = excess - new_excess
            ok &= gain > 1e-9
            score = np.where(ok, delta / np.where(ok, gain, 1.0), np.inf)
        else:
            ok &= (new_excess <= 1e-9) & (delta < -1e-9)
            score = np.where(ok, delta, np.inf)
        if not ok.any():
            break
        k = int(np.argmin(score))
        ea, eb = int(a[k]), int(b[k])
        da, db = int(maps[ea]), int(maps[eb])
        holders[ea, da], holders[ea, db] = False, True
        holders[eb, db], holders[eb, da] = False, True
        maps[ea], maps[eb] = db, da
        used += int(off[k])
        for e in (ea, eb):
            c, lo = _rows(topo, weight[e:e + 1], holders[e:e + 1], maps[e:e + 1], inter_weight)
            cost[e], load[e] = c[0], lo[0]
    return maps, holders, used


def _layer_maps(topo: Topology, capacity: np.ndarray) -> list[np.ndarray]:
    slots = np.repeat(np.arange(topo.devices), capacity)
    return [np.array(p) for p in sorted(set(itertools.permutations(slots.tolist())))]


def _layer_copies(topo: Topology, owners: np.ndarray, slots: int) -> list[np.ndarray]:
    per_device = []
    for d in range(topo.devices):
        others = np.flatnonzero(owners != d).tolist()
        per_device.append([c for k in range(slots + 1) for c in itertools.combinations(others, k)])
    out = []
    for pick in itertools.product(*per_device):
        held = np.zeros((topo.experts, topo.devices), dtype=bool)
        held[np.arange(topo.experts), owners] = True
        for d, chosen in enumerate(pick):
            held[list(chosen), d] = True
        out.append(held)
    return out


def _exhaustive_size(topo: Topology, layers: int, capacity: np.ndarray, slots: int) -> int:
    maps = math.factorial(topo.experts) // math.prod(math.factorial(int(c)) for c in capacity)
    per_device = sum(math.comb(topo.experts - int(capacity.min()), k) for k in range(slots + 1))
    return (maps * per_device ** topo.devices) ** layers


def fit_balanced(
    topo: Topology,
    rounds: Sequence[object],
    *,
    slots: int = 0,
    max_load_ratio: float | None = None,
    current: object | None = None,
    migration_budget: int | None = None,
    starts: int = 8,
    seed: int = 0,
    rounds_max: int = 4,
) -> BalancedFit:
    """Expert maps, copies and route tables for routes under a load bound (see module doc).

    rounds: [L, I_r, E] integer routes per round (check_rounds). slots: copies per device and
    layer at most. max_load_ratio: R >= 1, busiest device / mean load per layer on the fit
    window (None: no bound). current: [L, E] or [E] device of each expert now (default
    topo.expert_device, E/J per device). migration_budget: at most this many experts (all
    layers) off their current device (None: no budget). starts, seed: as fit_experts.
    When no candidate meets the bound the one with the least excess is returned
    (within_bound False).
    """
    data = check_rounds("rounds", rounds, topo)
    layers = data[0].shape[0]
    now = check_maps("current", current, topo, layers)
    bound = check_ratio("max_load_ratio", max_load_ratio)
    budget = check_budget("migration_budget", migration_budget)
    positive_int("rounds_max", rounds_max)
    capacity = np.bincount(now[0], minlength=topo.devices)
    if any(not np.array_equal(np.bincount(m, minlength=topo.devices), capacity) for m in now):
        raise ValueError("current must put the same number of experts on each device in "
                         "every layer")
    k = check_slots(slots, topo, now)

    if _exhaustive_size(topo, layers, capacity, k) <= EXACT_LIMIT:
        best = _exhaustive(topo, data, now, capacity, k, bound, budget)
        exact = True
    else:
        best = _greedy(topo, data, now, k, bound, budget, starts, seed, rounds_max)
        exact = False
    ratios = tuple(ratio(load) for load in best.loads)
    return BalancedFit(
        maps=tuple(tuple(int(d) for d in m) for m in best.maps),
        copies=_as_copies(best.holders, best.maps),
        tables=tuple(tuple(tuple(int(h) for h in row) for row in t.T) for t in best.tables),
        loads=tuple(tuple(int(v) for v in load) for load in best.loads),
        ratios=ratios,
        max_load_ratio=bound,
        objective=(best.inter, best.intra),
        moved=int((best.maps != now).sum()),
        exact=exact,
        rounds=len(data),
    )


def _exhaustive(topo: Topology, data: list[np.ndarray], now: np.ndarray, capacity: np.ndarray,
                slots: int, bound: float, budget: int | None) -> _Candidate:
    layers = now.shape[0]
    options = []  # per layer: (maps [E], holders [E, J])
    for owners in _layer_maps(topo, capacity):
        options.extend((owners, held) for held in _layer_copies(topo, owners, slots))
    best = None
    for pick in itertools.product(options, repeat=layers):
        maps = np.stack([m for m, _ in pick])
        if budget is not None and int((maps != now).sum()) > budget:
            continue
        cand, _ = _score(topo, data, maps, np.stack([h for _, h in pick]), bound, now)
        if best is None or cand.key < best.key:
            best = cand
    if best is None:
        raise ValueError(f"no candidate within migration_budget={budget}")
    return best


def _greedy(topo: Topology, data: list[np.ndarray], now: np.ndarray, slots: int, bound: float,
            budget: int | None, starts: int, seed: int, rounds_max: int) -> _Candidate:
    if budget is None:
        maps = fit_experts(topo, data, current=now, starts=starts, seed=seed).array()
    else:
        maps = now.copy()
    copies = fit_replicas(topo, data, maps, slots=slots).copies
    holders = check_copies("copies", copies, topo, maps)
    best, weights = _score(topo, data, maps, holders, bound, now)
    # The steps bound an estimate at fixed samples; when the replay still exceeds the bound,
    # the next round aims lower by the excess seen.
    target = bound
    seen = max(ratio(load) for load in best.loads) - bound  # excess of the last replay
    for _ in range(rounds_max):
        new_maps, new_holders = maps.copy(), holders.copy()
        room = math.inf if budget is None else budget - int((maps != now).sum())
        for layer in range(len(maps)):
            new_maps[layer], new_holders[layer], used = _exchange(
                topo, weights[layer], maps[layer], holders[layer], target, now[layer], room)
            room -= used
            if slots and bound < math.inf:
                new_holders[layer] = _recopy(topo, weights[layer], new_maps[layer],
                                             new_holders[layer], target, slots)
        if np.array_equal(new_maps, maps) and np.array_equal(new_holders, holders):
            if seen <= 0 or target <= 1.0:
                break
            target = max(1.0, target - seen)
            continue
        maps, holders = new_maps, new_holders
        cand, weights = _score(topo, data, maps, holders, bound, now)
        if cand.key < best.key:
            best = cand
        seen = max(ratio(load) for load in cand.loads) - bound
        if seen > 0:
            target = max(1.0, target - seen)
        elif bound == math.inf:
            break
    return best


# ------------------------------------------------------------------------------------ reporting


def owner_loads(topo: Topology, rounds: Sequence[object], maps: object) -> np.ndarray:
    """[L-1, 2, J] int64 routes each device serves in the two layers of each pair, summed over
    rounds ([L, I_r, E] each), with every expert served by its owner (maps [L, E] or [E])."""
    data = check_rounds("rounds", rounds, topo)
    owners = check_maps("maps", maps, topo, data[0].shape[0])
    per_layer = sum(np.stack([np.bincount(m, weights=c.sum(axis=0), minlength=topo.devices)
                              for m, c in zip(owners, counts, strict=True)]) for counts in data)
    per_layer = np.asarray(per_layer, dtype=np.int64)
    return np.stack([per_layer[:-1], per_layer[1:]], axis=1)


def load_summary(loads: object) -> tuple[float, float]:
    """(mean, worst) of max / mean load over every layer of every pair: loads [P, 2, J]."""
    ratios = [ratio(np.asarray(layer)) for pair in loads for layer in pair]
    return float(np.mean(ratios)), float(max(ratios))


def fit_tables(topo: Topology, rounds: Sequence[object], maps: object,
               copies: object) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Balanced route tables [L][J][E] for given maps [L, E] and copies on a fit window: samples
    placed for those holders, then `balanced_table` per layer (how `eplb` copies are served)."""
    data = check_rounds("rounds", rounds, topo)
    owners = check_maps("maps", maps, topo, data[0].shape[0])
    holders = check_copies("copies", copies, topo, owners)
    place, _, _ = _place_all(topo, data, holders)
    return tuple(
        tuple(tuple(int(h) for h in row)
              for row in balanced_table(topo, _with_devices(topo, data, place, layer),
                                        holders[layer]).T)
        for layer in range(len(owners)))


PLACEMENTS = ("routes", "balanced", "eplb")


@dataclass(frozen=True)
class Choice:
    """Holders and route tables one method chose on a fit window: maps [L][E], copies [L]
    (expert, device), tables [L][J][E]."""

    method: str
    maps: tuple[tuple[int, ...], ...]
    copies: Copies
    tables: tuple[tuple[tuple[int, ...], ...], ...]


def choose(
    topo: Topology,
    rounds: Sequence[object],
    maps: object,
    *,
    method: str,
    slots: int,
    max_load_ratio: float | None = None,
    migration_budget: int | None = None,
    groups: int = 1,
) -> Choice:
    """Copies (and, for "balanced" and "eplb", maps) for a fit window of [L, I_r, E] rounds.

    routes: `fit_replicas` on maps ([L, E], routes only; default route tables);
    balanced: `fit_balanced` (maps as the current map, max_load_ratio, migration_budget);
    eplb: EPLB with slots redundant experts per device and `groups` expert groups on the
      window's loads (routes per expert), served by `fit_tables`.
    """
    data = check_rounds("rounds", rounds, topo)
    owners = check_maps("maps", maps, topo, data[0].shape[0])
    if method == "routes":
        copies = fit_replicas(topo, data, owners, slots=slots).copies
        holders = check_copies("copies", copies, topo, owners)
        tables = tuple(tuple(tuple(int(h) for h in row) for row in route_table(topo, held, m).T)
                       for held, m in zip(holders, owners, strict=True))
        return Choice(method, tuple(tuple(int(d) for d in m) for m in owners), copies, tables)
    if method == "balanced":
        fit = fit_balanced(topo, data, slots=slots, max_load_ratio=max_load_ratio,
                           current=owners, migration_budget=migration_budget)
        return Choice(method, fit.maps, fit.copies, fit.tables)
    if method == "eplb":
        from .eplb import eplb_placement

        eplb_maps, holders = eplb_placement(topo, sum(c.sum(axis=1) for c in data), slots=slots,
                                            groups=groups)
        copies = _as_copies(holders, eplb_maps)
        return Choice(method, tuple(tuple(int(d) for d in m) for m in eplb_maps), copies,
                      fit_tables(topo, data, eplb_maps, copies))
    raise ValueError(f"method must be one of {PLACEMENTS}, got {method!r}")
