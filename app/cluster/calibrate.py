"""Calibrate the alpha-beta cost model on real All-to-Alls, as the paper profiles its cluster.

Traffic patterns that load one channel only (intra-node or inter-node, several sizes) plus a
uniform one for validation run through ``netmoe.app.cluster.probe``;
``t = alpha + bytes / bandwidth`` is fitted per channel by least squares on the median times.
Bytes are summed over the whole machine, as in the paper's model. An All-to-All lasts from the
earliest start to the latest end across ranks (gloo counts a send as done once it is in the
socket buffer, so one rank's view is short).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

CHANNELS = ("intra", "inter", "uniform")


def pattern(nodes: int, gpus_per_node: int, bytes_per_peer: int, channel: str) -> np.ndarray:
    """Bytes rank r sends to rank q: int64 [J, J], J = nodes * gpus_per_node.

    channel "intra": ``bytes_per_peer`` to every other rank on the same node, nothing else;
    "inter": to every rank on another node; "uniform": to every other rank (both channels).
    """
    if channel not in CHANNELS:
        raise ValueError(f"channel must be one of {CHANNELS}, got {channel!r}")
    if bytes_per_peer < 0:
        raise ValueError(f"bytes_per_peer must be >= 0, got {bytes_per_peer}")
    world = nodes * gpus_per_node
    node = np.arange(world) // gpus_per_node
    same_node = node[:, None] == node[None, :]
    other = ~np.eye(world, dtype=bool)
    mask = {"intra": same_node & other, "inter": ~same_node, "uniform": other}[channel]
    return np.where(mask, bytes_per_peer, 0).astype(np.int64)


def channel_bytes(send: np.ndarray, gpus_per_node: int) -> tuple[int, int]:
    """(intra-node, inter-node) bytes of a send matrix int64 [J, J]; self-sends are free."""
    node = np.arange(send.shape[0]) // gpus_per_node
    same_node = node[:, None] == node[None, :]
    off_diag = ~np.eye(send.shape[0], dtype=bool)
    return int(send[same_node & off_diag].sum()), int(send[~same_node].sum())


@dataclass(frozen=True)
class ChannelFit:
    """t = alpha + bytes / bandwidth for one channel; bytes summed over the whole machine."""

    alpha: float  # seconds
    bandwidth: float  # bytes per second, machine-wide
    r2: float

    def seconds(self, nbytes: float) -> float:
        return self.alpha + nbytes / self.bandwidth if nbytes > 0 else 0.0


def fit_channel(nbytes: Sequence[float], seconds: Sequence[float]) -> ChannelFit:
    """Least-squares fit of seconds = alpha + nbytes / bandwidth; alpha clipped at 0.

    nbytes, seconds: equal-length sequences (>= 2 distinct byte counts).
    """
    x = np.asarray(nbytes, dtype=np.float64)
    y = np.asarray(seconds, dtype=np.float64)
    if x.shape != y.shape or len(np.unique(x)) < 2:
        raise ValueError(f"need >= 2 distinct byte counts with one time each, got {x.tolist()}")
    slope, alpha = np.polyfit(x, y, 1)
    if alpha < 0:  # a negative latency is noise: refit through the origin
        alpha, slope = 0.0, float(x @ y / (x @ x))
    if slope <= 0:
        raise ValueError(f"time does not grow with bytes: slope {slope} s/byte")
    pred = alpha + slope * x
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return ChannelFit(alpha=float(alpha), bandwidth=float(1.0 / slope), r2=r2)


@dataclass(frozen=True)
class Calibration:
    """Fitted channels plus the measured medians they came from."""

    intra: ChannelFit
    inter: ChannelFit
    points: tuple[dict, ...]  # {"channel", "bytes_per_peer", "intra_bytes", "inter_bytes", ...}

    def predict(self, intra_bytes: float, inter_bytes: float) -> float:
        """Model time of one All-to-All: max over channels of alpha + bytes / bandwidth."""
        return max(self.intra.seconds(intra_bytes), self.inter.seconds(inter_bytes))


def durations(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Wall time of each call across ranks: float64 [calls] from starts/ends [ranks, calls]."""
    return ends.max(axis=0) - starts.min(axis=0)


def calibration_calls(nodes: int, gpus_per_node: int, sizes: Sequence[int],
                      ) -> list[tuple[str, str, np.ndarray]]:
    """Probe calls (name, group = channel, send bytes [J, J]) for every channel and size."""
    return [(f"{channel}-{size}", channel, pattern(nodes, gpus_per_node, size, channel))
            for size in sizes for channel in CHANNELS]


def calibrate(result: dict) -> Calibration:
    """Fit both channels from an ``netmoe.app.cluster.probe`` result holding ``calibration_calls``.

    Calls of other groups (the workload measured in the same launch) are ignored.
    """
    g = int(result["gpus_per_node"])
    points = []
    for call in result["calls"]:
        if call["group"] not in CHANNELS:
            continue
        send = np.asarray(call["send"], dtype=np.int64)
        intra, inter = channel_bytes(send, g)
        secs = durations(np.asarray(call["starts"]), np.asarray(call["ends"]))
        points.append({"channel": call["group"], "bytes_per_peer": int(send.max()),
                       "intra_bytes": intra, "inter_bytes": inter,
                       "median_seconds": float(np.median(secs)), "iterations": len(secs)})
    fits = {}
    for channel, key in (("intra", "intra_bytes"), ("inter", "inter_bytes")):
        pts = [p for p in points if p["channel"] == channel]
        try:
            fits[channel] = fit_channel([p[key] for p in pts],
                                        [p["median_seconds"] for p in pts])
        except ValueError as err:
            raise ValueError(f"calibration of the {channel}-node channel failed ({err}): fixed "
                             "costs swamp the transfer; lower the link rate") from err
    cal = Calibration(intra=fits["intra"], inter=fits["inter"], points=tuple(points))
    for p in points:
        p["predicted_seconds"] = cal.predict(p["intra_bytes"], p["inter_bytes"])
        p["error"] = p["predicted_seconds"] / p["median_seconds"] - 1.0
    return cal


def calibration_dict(cal: Calibration) -> dict:
    """JSON-ready form of a Calibration."""
    return {"intra": asdict(cal.intra), "inter": asdict(cal.inter), "points": list(cal.points)}
