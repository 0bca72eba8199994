"""All-to-All byte matrices of MoE training steps under a sample placement (pure numpy + solver).

A step of an L-layer MoE does, per layer l, a dispatch (tokens from their sample's device to the
experts' devices) and a combine (expert outputs back). With placement the combine of layer l
sends each output to the sample's new device, chosen by the solver for the pair (gather of l,
scatter of l+1); the dispatch of layer l+1 then starts there. Without it samples stay home.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from netmoe.solver import Topology, home_placement, solve

MODES = ("home", "netmoe")  # the expert placement advisor (issue 5) adds "experts" here


@dataclass(frozen=True)
class StepTraffic:
    """One step of one mode: calls in order, each (name, send bytes int64 [J, J])."""

    mode: str
    calls: tuple[tuple[str, np.ndarray], ...]
    solve_seconds: tuple[float, ...]  # per solved layer pair (empty for home)
    moved: int  # sample moves over the step


def send_matrix(topo: Topology, device: np.ndarray, counts: np.ndarray, *,
                to_experts: bool) -> np.ndarray:
    """Bytes between devices for one All-to-All: int64 [J, J].

    device: [I] int64 device of each sample; counts: [I, E] int64 routes. to_experts: True for a
    dispatch (sample's device sends to the expert's device), False for a combine (reverse).
    """
    j = topo.devices
    sample_dev = np.repeat(device[:, None], topo.experts, axis=1).ravel()
    expert_dev = np.tile(topo.expert_device, counts.shape[0])
    src, dst = (sample_dev, expert_dev) if to_experts else (expert_dev, sample_dev)
    out = np.zeros((j, j), dtype=np.int64)
    np.add.at(out, (src, dst), counts.ravel().astype(np.int64))
    return out * topo.bytes_per_route


def step_traffic(topo: Topology, counts: np.ndarray, mode: str,
                 objective: str = "volume") -> StepTraffic:
    """The All-to-Alls of one step. counts: [L, I, E] int64 routes per layer."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    layers, samples = counts.shape[0], counts.shape[1]
    device = home_placement(samples, topo.devices)
    calls, solves, moved = [], [], 0
    for layer in range(layers):
        calls.append((f"L{layer}-dispatch", send_matrix(topo, device, counts[layer],
                                                        to_experts=True)))
        if mode == "netmoe":
            nxt = counts[layer + 1] if layer + 1 < layers else None
            plan = solve(topo, counts[layer], nxt, home=device, objective=objective)
            solves.append(plan.solve_seconds)
            moved += plan.moved
            device = np.asarray(plan.dest, dtype=np.int64)
        calls.append((f"L{layer}-combine", send_matrix(topo, device, counts[layer],
                                                       to_experts=False)))
    return StepTraffic(mode, tuple(calls), tuple(solves), moved)
