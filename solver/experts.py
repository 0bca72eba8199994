"""Expert placement advisor: where each layer's experts live, co-optimized with sample placement.

Sample placement alone cannot help a sample whose favourite experts sit on several nodes. Given
routing statistics over a window of rounds, `fit_experts` chooses an expert-to-device map per
layer that, together with the per-round sample placement, minimizes inter-node routes, then
intra-node routes, over all layer pairs. Layer l's experts appear in two pairs: as the scatter of
pair (l-1, l) and as the gather of pair (l, l+1); a pair's routes are the counts of both its
layers, and samples are placed per pair and per round.

The fit alternates two exact transportation problems, node stage then device stage, like the
paper's sample placement:
  samples given experts: `place_two_stage` per round and pair;
  experts given samples: expert e of layer l on device d costs its routes to samples off d's node,
    then off d, over every round and pair layer l takes part in; capacity[d] experts per device.
A step is kept only if it lowers (inter, intra) on the fit window, so the recorded objective
strictly decreases. Several starts (the current map, seeded random maps) guard against poor local
optima. `evaluate_experts` replays held-out rounds; `recommend` weighs the saving per step against
the bytes of expert parameters and optimizer state that must move.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from netmoe.checks import positive_int
from netmoe.round import home_placement

from .cost import channel_routes, check_counts, device_counts, traffic_of
from .topology import Topology, check_devices
from .transport import transport
from .two_stage import place_two_stage

Unit = Literal["seconds", "bytes"]
UNITS = ("seconds", "bytes")
Objective = tuple[int, int]  # (inter-node routes, intra-node routes), compared lexicographically


@dataclass(frozen=True)
class StartRun:
    """One alternation: label "current" or "random-k"; history[t] = (inter, intra) routes on the
    fit window after t alternations (history[0]: the start map with its optimal samples)."""

    label: str
    history: tuple[Objective, ...]

    @property
    def final(self) -> Objective:
        return self.history[-1]


@dataclass(frozen=True)
class ExpertFit:
    """maps[l][e]: device of expert e of layer l ([L][E]); capacity[d]: experts per device [J].
    objective: (inter, intra) routes on the fit window with maps and per-round optimal samples;
    at most history[-1] (renaming devices toward the current map can only lower intra).
    history: that of the winning start; starts: every start tried, in order."""

    maps: tuple[tuple[int, ...], ...]
    capacity: tuple[int, ...]
    objective: Objective
    history: tuple[Objective, ...]
    starts: tuple[StartRun, ...]
    best_start: int
    rounds: int

    def array(self) -> np.ndarray:
        """maps as [L, E] int64."""
        return np.array(self.maps, dtype=np.int64)


@dataclass(frozen=True)
class Routes:
    """Routes and modelled seconds (cost model, gather l + scatter l+1) summed over rounds."""

    inter: int
    intra: int
    seconds: float


@dataclass(frozen=True)
class PairEvaluation:
    """Layer pair (l, l+1) over the held-out rounds. home: current experts, samples at home;
    sample_only: current experts, samples placed; joint: fitted experts, samples placed."""

    layers: tuple[int, int]
    home: Routes
    sample_only: Routes
    joint: Routes


@dataclass(frozen=True)
class ExpertEvaluation:
    """Held-out replay of a fitted expert placement against the current one.

    maps, current: [L][E] device of each expert. joint_devices[r][p]: device of each sample of
    held-out round r in pair p under joint placement ([R][L-1][I_r]).
    """

    maps: tuple[tuple[int, ...], ...]
    current: tuple[tuple[int, ...], ...]
    rounds: int
    pairs: tuple[PairEvaluation, ...]
    joint_devices: tuple[tuple[tuple[int, ...], ...], ...]

    def _total(self, kind: str) -> Routes:
        parts = [getattr(p, kind) for p in self.pairs]
        return Routes(
            sum(p.inter for p in parts), sum(p.intra for p in parts), sum(p.seconds for p in parts)
        )

    @property
    def home(self) -> Routes:
        return self._total("home")

    @property
    def sample_only(self) -> Routes:
        return self._total("sample_only")

    @property
    def joint(self) -> Routes:
        return self._total("joint")

    @property
    def inter_saving_per_step(self) -> float:
        """Inter-node routes per round (one forward pass) joint saves over sample-only."""
        return (self.sample_only.inter - self.joint.inter) / self.rounds

    @property
    def seconds_saving_per_step(self) -> float:
        """Modelled All-to-All seconds per round (one forward pass) joint saves over sample-only."""
        return (self.sample_only.seconds - self.joint.seconds) / self.rounds


@dataclass(frozen=True)
class Recommendation:
    """Whether to adopt maps ([L][E] device of each expert) and why.

    moved_experts: experts whose device changes, of them moved_inter across nodes.
    migration_bytes = moved_experts x bytes_per_expert (parameters + optimizer state).
    In unit "seconds" saving_per_step and migration_cost are modelled seconds (forward and
    backward All-to-Alls count as `passes`); in unit "bytes" they are inter-node bytes.
    break_even_steps: steps until the saving pays the migration (inf when it never does).
    """

    adopt: bool
    reason: str
    maps: tuple[tuple[int, ...], ...]
    moved_experts: int
    moved_inter: int
    migration_bytes: int
    migration_seconds: float
    unit: str
    saving_per_step: float
    migration_cost: float
    horizon_steps: int
    break_even_steps: float


@dataclass(frozen=True)
class Advice:
    """advise(): the fit on the earlier window, its held-out replay, and the decision."""

    fit: ExpertFit
    evaluation: ExpertEvaluation
    recommendation: Recommendation


# ---------------------------------------------------------------------------------- input checks


def check_rounds(name: str, rounds: object, topo: Topology) -> list[np.ndarray]:
    """Validates a window of rounds; returns one [L, I_r, E] int64 array per round.

    rounds: a non-empty sequence; round r is [L, I_r, E] integer routes of each sample to each
    expert of each MoE layer (L >= 2, the same in every round; I_r a multiple of J).
    """
    if isinstance(rounds, np.ndarray) and rounds.ndim == 3:
        raise ValueError(f"{name} must be a sequence of [L, I, E] rounds, got one array "
                         f"of shape {rounds.shape}; wrap it in a list")
    if not isinstance(rounds, Sequence | np.ndarray) or len(rounds) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of rounds, got {rounds!r:.80}")
    out = []
    for r, raw in enumerate(rounds):
        arr = np.asarray(raw)
        if arr.ndim != 3 or arr.shape[0] < 2:
            raise ValueError(
                f"{name}[{r}] must have shape (layers >= 2, samples, {topo.experts}), "
                f"got shape {arr.shape}"
            )
        if out and arr.shape[0] != out[0].shape[0]:
            raise ValueError(
                f"{name}[{r}] has {arr.shape[0]} layers, {name}[0] has {out[0].shape[0]}"
            )
        samples = arr.shape[1]
        if samples == 0 or samples % topo.devices:
            raise ValueError(
                f"{name}[{r}] has samples={samples}, need a positive multiple of "
                f"devices={topo.devices}"
            )
        out.append(np.stack([
            check_counts(f"{name}[{r}][{layer}]", arr[layer], samples=samples,
                         experts=topo.experts)
            for layer in range(arr.shape[0])
        ]))
    return out


def check_maps(name: str, maps: object, topo: Topology, layers: int) -> np.ndarray:
    """[L, E] int64 expert maps; None means topo.expert_device in every layer, and a single [E]
    map is used for every layer."""
    if maps is None:
        return np.tile(topo.expert_device, (layers, 1))
    arr = np.asarray(maps)
    if arr.ndim == 1:
        arr = np.tile(arr, (layers, 1))
    if arr.shape != (layers, topo.experts):
        raise ValueError(
            f"{name} must have shape ({layers}, {topo.experts}) or ({topo.experts},), "
            f"got shape {np.asarray(maps).shape}"
        )
    return check_devices(name, arr, topo.devices)


def check_capacity(capacity: object, topo: Topology) -> np.ndarray:
    """[J] int64 experts per device; None means E/J on every device."""
    j, experts = topo.devices, topo.experts
    if capacity is None:
        if experts % j:
            raise ValueError(
                f"capacity must be given: experts={experts} is not divisible by devices={j}"
            )
        return np.full(j, experts // j, dtype=np.int64)
    arr = np.asarray(capacity)
    if arr.shape != (j,):
        raise ValueError(f"capacity must have shape ({j},), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"capacity must hold integers, got dtype {arr.dtype}")
    bad = np.flatnonzero(arr < 0)
    if bad.size:
        d = int(bad[0])
        raise ValueError(f"capacity[{d}]={int(arr[d])} is negative")
    if int(arr.sum()) != experts:
        raise ValueError(f"capacity sums to {int(arr.sum())}, need experts={experts}")
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------- the two sub-problems


def _layer_counts(
    topo: Topology, rounds: list[np.ndarray], maps: np.ndarray
) -> list[list[np.ndarray]]:
    """[r][l]: [I_r, J] int64 routes of each sample of round r to the experts of layer l on each
    device, with layer l's experts on maps[l]."""
    layer_topos = [topo.with_experts(m) for m in maps]
    return [[device_counts(t, c) for t, c in zip(layer_topos, counts, strict=True)]
            for counts in rounds]


def place_samples(
    topo: Topology, rounds: list[np.ndarray], maps: np.ndarray
) -> tuple[list[list[np.ndarray]], Objective]:
    """Samples given experts: place[r][p] = device [I_r] of each sample of round r in pair p,
    and the (inter, intra) routes summed over rounds and pairs."""
    place: list[list[np.ndarray]] = []
    inter = intra = 0
    for per_layer in _layer_counts(topo, rounds, maps):
        home = home_placement(per_layer[0].shape[0], topo.devices)
        place.append([])
        for first, second in itertools.pairwise(per_layer):
            on_dev = first + second
            dev = place_two_stage(topo, on_dev, home)
            e, a, _ = channel_routes(topo, dev, on_dev)
            inter, intra = inter + e, intra + a
            place[-1].append(dev)
    return place, (inter, intra)


def _assign_experts(
    topo: Topology, with_device: np.ndarray, capacity: np.ndarray, prefer: np.ndarray
) -> np.ndarray:
    """Experts given samples, one layer: [E] int64 device of each expert.

    with_device: [E, J] int64 routes of expert e with samples on device d. Stage 1 puts
    capacity-per-node experts on each node minimizing routes off node; stage 2 fills each node's
    devices minimizing routes off device. Ties go to prefer [E] (node, then device).
    """
    return place_two_stage(topo, with_device, prefer, capacity)


def _place_experts(
    topo: Topology,
    rounds: list[np.ndarray],
    place: list[list[np.ndarray]],
    capacity: np.ndarray,
    prefer: np.ndarray,
) -> np.ndarray:
    """[L, E] int64: each layer's experts given the sample placement of its two pairs."""
    layers, j = rounds[0].shape[0], topo.devices
    onehot = np.eye(j, dtype=np.int64)
    maps = np.empty((layers, topo.experts), dtype=np.int64)
    for layer in range(layers):
        with_device = np.zeros((topo.experts, j), dtype=np.int64)
        for p in (layer - 1, layer):
            if 0 <= p < layers - 1:
                for r, counts in enumerate(rounds):
                    with_device += counts[layer].T @ onehot[place[r][p]]
        maps[layer] = _assign_experts(topo, with_device, capacity, prefer[layer])
    return maps


def _alternate(
    topo: Topology,
    rounds: list[np.ndarray],
    start: np.ndarray,
    capacity: np.ndarray,
    prefer: np.ndarray,
    max_iters: int,
) -> tuple[np.ndarray, list[Objective]]:
    maps = start
    place, objective = place_samples(topo, rounds, maps)
    history = [objective]
    for _ in range(max_iters):
        new = _place_experts(topo, rounds, place, capacity, prefer)
        if np.array_equal(new, maps):
            break
        new_place, new_objective = place_samples(topo, rounds, new)
        # Both stages are exact for inter-node routes, so inter never rises; intra can, when a
        # stage trades it for nothing. Keeping only strict improvements makes the run monotone.
        if new_objective >= objective:
            break
        maps, place, objective = new, new_place, new_objective
        history.append(objective)
    return maps, history


def _relabel(topo: Topology, maps: np.ndarray, current: np.ndarray,
             capacity: np.ndarray) -> np.ndarray:
    """maps with devices renamed to keep as many experts as possible where current has them.

    Permuting nodes, and devices within a node, changes no route's channel once samples are
    re-placed, but random starts land on arbitrary labels. Picks the renaming (among those that
    keep every device's capacity) maximizing experts that stay: a device matching per node pair,
    then a node matching, both exact transportation problems.
    """
    nodes, gpus, j = topo.nodes, topo.gpus_per_node, topo.devices
    stays = np.zeros((j, j), dtype=np.int64)  # [new device, current device]: experts kept
    np.add.at(stays, (maps.ravel(), current.ravel()), 1)
    # A renaming that breaks capacity must lose to every one that keeps it.
    forbid = int(stays.max()) * j + 1
    loss = np.where(capacity[:, None] == capacity[None, :], int(stays.max()) - stays, forbid)
    ones = np.ones(gpus, dtype=np.int64)
    within = np.empty((nodes, nodes, gpus), dtype=np.int64)  # device matching per node pair
    node_loss = np.empty((nodes, nodes), dtype=np.int64)
    for a in range(nodes):
        for b in range(nodes):
            block = loss[a * gpus:(a + 1) * gpus, b * gpus:(b + 1) * gpus]
            within[a, b] = transport(block, ones)
            node_loss[a, b] = block[np.arange(gpus), within[a, b]].sum()
    node_to = transport(node_loss, np.ones(nodes, dtype=np.int64))
    rename = np.concatenate([node_to[a] * gpus + within[a, node_to[a]] for a in range(nodes)])
    if not np.array_equal(capacity[rename], capacity):
        return maps
    return rename[maps]


# ------------------------------------------------------------------------------------ public API


def fit_experts(
    topo: Topology,
    rounds: Sequence[object],
    *,
    current: object | None = None,
    capacity: object | None = None,
    starts: int = 8,
    seed: int = 0,
    max_iters: int = 20,
) -> ExpertFit:
    """Fits an expert-to-device map per layer on a window of rounds.

    rounds: sequence of [L, I_r, E] integer routes (see check_rounds). current: [L, E] or [E]
    device of each expert now (default topo.expert_device); it is the first start when it
    respects capacity, and ties (and the final renaming) favour it so fewer experts move.
    capacity: [J] experts per device (default E/J each). starts: number of extra random starts
    (seeded by seed). max_iters: alternations per start at most. Deterministic for a given seed.
    """
    data = check_rounds("rounds", rounds, topo)
    layers = data[0].shape[0]
    now = check_maps("current", current, topo, layers)
    cap = check_capacity(capacity, topo)
    starts = positive_int("starts", starts, minimum=0)
    max_iters = positive_int("max_iters", max_iters)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise ValueError(f"seed must be an integer, got {seed!r}")

    candidates: list[tuple[str, np.ndarray]] = []
    if all(np.array_equal(np.bincount(m, minlength=topo.devices), cap) for m in now):
        candidates.append(("current", now))
    rng = np.random.default_rng(int(seed))
    slots = np.repeat(np.arange(topo.devices, dtype=np.int64), cap)
    for k in range(starts):
        candidates.append((f"random-{k + 1}", np.stack([rng.permutation(slots)
                                                        for _ in range(layers)])))
    if not candidates:
        raise ValueError(
            "starts=0 and the current map does not respect capacity: nothing to start from"
        )

    ends, runs = [], []
    for label, start in candidates:
        maps, history = _alternate(topo, data, start, cap, now, max_iters)
        ends.append(maps)
        runs.append(StartRun(label, tuple(history)))
    best = min(range(len(runs)), key=lambda k: runs[k].final)  # ties: the earliest start
    best_maps, objective = ends[best], runs[best].final
    renamed = _relabel(topo, best_maps, now, cap)
    if not np.array_equal(renamed, best_maps):
        _, renamed_objective = place_samples(topo, data, renamed)
        if renamed_objective <= objective:
            best_maps, objective = renamed, renamed_objective
    return ExpertFit(
        maps=tuple(tuple(int(d) for d in m) for m in best_maps),
        capacity=tuple(int(c) for c in cap),
        objective=objective,
        history=runs[best].history,
        starts=tuple(runs),
        best_start=best,
        rounds=len(data),
    )


def evaluate_experts(
    topo: Topology,
    rounds: Sequence[object],
    maps: object,
    *,
    current: object | None = None,
) -> ExpertEvaluation:
    """Replays held-out rounds ([L, I_r, E] each) per layer pair with: current experts and samples
    at home (sample i on device i // (I_r/J)); current experts and samples placed by the
    two-stage solver; maps ([L, E] fitted experts) and samples placed."""
    data = check_rounds("rounds", rounds, topo)
    layers = data[0].shape[0]
    new = check_maps("maps", maps, topo, layers)
    now = check_maps("current", current, topo, layers)
    kinds = ("home", "sample_only", "joint")
    routes = {kind: np.zeros((layers - 1, 2), dtype=np.int64) for kind in kinds}
    seconds = {kind: np.zeros(layers - 1) for kind in kinds}
    joint_devices = []
    for r, (now_dc, new_dc) in enumerate(zip(_layer_counts(topo, data, now),
                                             _layer_counts(topo, data, new), strict=True)):
        home = home_placement(data[r].shape[1], topo.devices)
        joint_devices.append([])
        for p in range(layers - 1):
            alone = place_two_stage(topo, now_dc[p] + now_dc[p + 1], home)
            joint = place_two_stage(topo, new_dc[p] + new_dc[p + 1], home)
            joint_devices[-1].append(tuple(int(d) for d in joint))
            for kind, dev, dc in (("home", home, now_dc), ("sample_only", alone, now_dc),
                                  ("joint", joint, new_dc)):
                t = traffic_of(topo, dev, dc[p:p + 2])
                routes[kind][p] += (t.inter, t.intra)
                seconds[kind][p] += t.seconds
    pairs = tuple(
        PairEvaluation(
            layers=(p, p + 1),
            **{kind: Routes(int(routes[kind][p, 0]), int(routes[kind][p, 1]),
                            float(seconds[kind][p])) for kind in kinds},
        )
        for p in range(layers - 1)
    )
    return ExpertEvaluation(
        maps=tuple(tuple(int(d) for d in m) for m in new),
        current=tuple(tuple(int(d) for d in m) for m in now),
        rounds=len(data),
        pairs=pairs,
        joint_devices=tuple(tuple(r) for r in joint_devices),
    )


def migration(
    topo: Topology, maps: np.ndarray, current: np.ndarray, bytes_per_expert: int
) -> tuple[int, int, float]:
    """(experts moved, of them across nodes, modelled seconds) to go from current to maps
    ([L, E] int64 each). Moves run as one All-to-All: each channel pays its latency once."""
    moved = maps != current
    inter = moved & (topo.device_node[maps] != topo.device_node[current])
    n_moved, n_inter = int(moved.sum()), int(inter.sum())
    t_intra = (topo.alpha_intra + (n_moved - n_inter) * bytes_per_expert / topo.bw_intra
               if n_moved > n_inter else 0.0)
    t_inter = topo.alpha_inter + n_inter * bytes_per_expert / topo.bw_inter if n_inter else 0.0
    return n_moved, n_inter, max(t_intra, t_inter)


def recommend(
    topo: Topology,
    evaluation: ExpertEvaluation,
    *,
    bytes_per_expert: int,
    horizon_steps: int,
    unit: Unit = "seconds",
    passes: int = 2,
) -> Recommendation:
    """Adopt evaluation.maps only if the held-out saving over horizon_steps beats migration.

    bytes_per_expert: parameters + optimizer state of one expert (bytes). passes: All-to-All
    passes per step the saving applies to (2: forward and backward mirror each other).
    unit "seconds": saving = modelled seconds per step, cost = modelled migration seconds;
    unit "bytes": saving = inter-node bytes per step, cost = inter-node migration bytes.
    """
    bytes_per_expert = positive_int("bytes_per_expert", bytes_per_expert)
    horizon_steps = positive_int("horizon_steps", horizon_steps)
    passes = positive_int("passes", passes)
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    maps = np.array(evaluation.maps, dtype=np.int64)
    now = check_maps("evaluation.current", np.array(evaluation.current, dtype=np.int64), topo,
                     maps.shape[0])
    maps = check_maps("evaluation.maps", maps, topo, maps.shape[0])
    moved, moved_inter, seconds = migration(topo, maps, now, bytes_per_expert)
    if unit == "seconds":
        saving = evaluation.seconds_saving_per_step * passes
        cost = seconds
        fmt = "{:.3g} s".format
    else:
        saving = evaluation.inter_saving_per_step * topo.bytes_per_route * passes
        cost = float(moved_inter * bytes_per_expert)
        fmt = "{:.4g} inter-node bytes".format
    break_even = cost / saving if saving > 0 else math.inf
    horizon_saving = saving * horizon_steps

    if moved == 0:
        adopt, reason = False, "the fitted placement equals the current one: nothing to move"
    elif saving <= 0:
        adopt, reason = False, (
            f"no saving on {evaluation.rounds} held-out rounds: per step, joint placement costs "
            f"{fmt(-saving)} more than sample placement with the current experts"
        )
    elif horizon_saving <= cost:
        adopt, reason = False, (
            f"horizon too short: {horizon_steps} steps save {fmt(horizon_saving)}, moving "
            f"{moved} experts ({moved_inter} across nodes) costs {fmt(cost)}; it pays off "
            f"after {math.ceil(break_even)} steps"
        )
    else:
        adopt, reason = True, (
            f"{horizon_steps} steps save {fmt(horizon_saving)} ({fmt(saving)} per step on "
            f"{evaluation.rounds} held-out rounds), moving {moved} experts ({moved_inter} across "
            f"nodes) costs {fmt(cost)}; it pays off after {math.ceil(break_even)} steps"
        )
    return Recommendation(
        adopt=adopt,
        reason=reason,
        maps=evaluation.maps,
        moved_experts=moved,
        moved_inter=moved_inter,
        migration_bytes=moved * bytes_per_expert,
        migration_seconds=seconds,
        unit=unit,
        saving_per_step=saving,
        migration_cost=cost,
        horizon_steps=horizon_steps,
        break_even_steps=break_even,
    )


def advise(
    topo: Topology,
    fit_rounds: Sequence[object],
    held_out_rounds: Sequence[object],
    *,
    bytes_per_expert: int,
    horizon_steps: int,
    current: object | None = None,
    capacity: object | None = None,
    starts: int = 8,
    seed: int = 0,
    unit: Unit = "seconds",
    passes: int = 2,
) -> Advice:
    """fit_experts on fit_rounds, evaluate_experts on the later held_out_rounds, recommend."""
    fit = fit_experts(topo, fit_rounds, current=current, capacity=capacity, starts=starts,
                      seed=seed)
    evaluation = evaluate_experts(topo, held_out_rounds, fit.array(), current=current)
    rec = recommend(topo, evaluation, bytes_per_expert=bytes_per_expert,
                    horizon_steps=horizon_steps, unit=unit, passes=passes)
    return Advice(fit, evaluation, rec)
