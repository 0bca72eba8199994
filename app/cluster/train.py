"""Real MoE training on the emulated cluster: home, sample placement, expert + sample placement,
and the latter plus expert copies.

The bench process (server side, it may use the solver) prepares and measures; the training ranks
run ``python -m netmoe.app.reference.train`` inside the node namespaces of a
``netmoe.app.cluster.testbed.Testbed``:

1. The demo's cached warm-up checkpoint (``netmoe demo``'s pre-training) is the starting model.
2. Fit: one process on 127.0.0.1 trains ``fit_steps`` further steps from it and records the
   routing; ``netmoe.solver.experts.fit_experts`` fits an expert-to-device map per layer on it.
   The measured runs use later batches, so the map is judged on held-out data. The fit is
   deterministic and cached (keyed by checkpoint, data, shape, seed).
3. Calibration: the alpha-beta model is fitted on probe All-to-Alls (netmoe.app.cluster.calibrate);
   every measurement is cached per testbed shape and rates, and --quick reuses the latest one.
4. ``netmoe serve`` runs in node 0's namespace on its veth address; every run trains the same
   steps from the same checkpoint and seed, per mode: "home" (no plans), "sample" (plans from
   the service), "experts" (the fitted map in force from the start, plans from the service).
   All runs share one launch of the ranks (netmoe.app.cluster.rank), modes interleaved over repeats
   (home, sample, experts, home, ...) so drifting machine load hits every mode alike.
   The experts mode builds the model with an expert order (netmoe.app.reference.model):
   slot v of layer l holds the original expert order[l][v], and slot v lives on rank
   v // (E / J), so the service's default expert layout is exactly the fitted map and the
   function is unchanged.
5. The first home run records its routing; the exact optimum on it (locality_bound) is how much
   any placement could cut on these held-out steps.
6. "replicas" (replica_slots > 0): the experts mode plus copies chosen by
   ``netmoe.solver.replicas.fit_replicas`` on the fit trace (fit_copies), created from their
   owners before the first step and confirmed with the service (TrainConfig.copies); the
   trainer sums their gradients every step (``netmoe.client.replicas.sync_grads``, timed).
   replica_decision replays the measured steps' routing with the calibrated model and says
   whether the copies pay; replica_report sets that against the measured step.

Each rank records every tagged All-to-All (CommStats.calls, with a barrier before it so rank
skew is not counted); a call's wall time is max(end) - min(start) over ranks. The first rank of
each node reads its veth's byte counters around the forward+backward part and around the
gradient all-reduce of every step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from netmoe.app.reference.results import ExpertMoves, RankResult

PHASES = ("dispatch", "combine", "dispatch_bwd", "combine_bwd", "move", "move_bwd")
SERVER_PORT = 50051
_READY = """
import sys, grpc
ch = grpc.insecure_channel(sys.argv[1])
grpc.channel_ready_future(ch).result(timeout=float(sys.argv[2]))
"""


@dataclass(frozen=True)
class Call:
    """One All-to-All of one step, seen from all ranks.

    seconds: max(end) - min(start) over ranks; send: int64 [J, J] bytes rank r sent to rank q.
    """

    step: int
    layer: int
    phase: str
    seconds: float
    send: np.ndarray


def align_calls(per_rank: Sequence[Sequence[Sequence[Any]]]) -> list[Call]:
    """Joins the ranks' CommStats.calls records (same collective order on every rank).

    per_rank: for each rank r, its records (step, layer, phase, start, end, bytes [J]).
    Raises ValueError if the ranks disagree on the number or identity of calls.
    """
    counts = {len(c) for c in per_rank}
    if len(counts) != 1:
        raise ValueError(f"ranks recorded different numbers of calls: {sorted(counts)}")
    out = []
    for k, records in enumerate(zip(*per_rank, strict=True)):
        keys = {(int(r[0]), int(r[1]), str(r[2])) for r in records}
        if len(keys) != 1:
            raise ValueError(f"call {k} differs across ranks: {sorted(keys)}")
        step, layer, phase = keys.pop()
        starts = [float(r[3]) for r in records]
        ends = [float(r[4]) for r in records]
        send = np.asarray([r[5] for r in records], dtype=np.int64)
        out.append(Call(step, layer, phase, max(ends) - min(starts), send))
    return out


def summarize_mode(results: Sequence[RankResult], cal: Any, gpus_per_node: int,
                   ) -> dict[str, Any]:
    """Per-mode figures from the per-rank results of ``netmoe.app.reference.train`` (rank order).

    Medians over steps of: All-to-All wall time per step and per (layer, phase), the model's
    prediction (cal: a netmoe.app.cluster.calibrate.Calibration, or None), payload bytes per
    channel, inter-node link bytes (veth counters of each node's first rank, tx summed over
    nodes) of the forward+backward part and of the gradient all-reduce; step time is the
    slowest rank's.
    """
    from netmoe.app.cluster.calibrate import channel_bytes

    steps = len(results[0].loss)
    calls = align_calls([r.a2a_calls or [] for r in results])
    per_step = np.zeros(steps)
    predicted = np.zeros(steps)
    busiest_model = np.zeros(steps)
    nodes = len(results) // gpus_per_node
    inter_payload = np.zeros(steps)
    intra_payload = np.zeros(steps)
    by_key: dict[tuple[int, str], np.ndarray] = defaultdict(lambda: np.zeros((3, steps)))
    for c in calls:
        intra_b, inter_b = channel_bytes(c.send, gpus_per_node)
        model = cal.predict(intra_b, inter_b) if cal is not None else float("nan")
        per_step[c.step] += c.seconds
        predicted[c.step] += model
        if cal is not None:
            # The model spreads inter-node bytes over all links; a call really waits for its
            # busiest link direction (node egress or ingress), charged here as if every link
            # carried that much.
            node_send = c.send.reshape(nodes, gpus_per_node, nodes, gpus_per_node).sum((1, 3))
            np.fill_diagonal(node_send, 0)
            busiest = max(node_send.sum(0).max(), node_send.sum(1).max())
            busiest_model[c.step] += max(cal.intra.seconds(intra_b),
                                         cal.inter.seconds(float(busiest * nodes)))
        inter_payload[c.step] += inter_b
        intra_payload[c.step] += intra_b
        by_key[(c.layer, c.phase)][:, c.step] += (c.seconds, model, inter_b)
    rows = [{"name": f"L{layer}-{phase}" if layer >= 0 else phase, "layer": layer,
             "phase": phase, "measured_seconds": float(np.median(v[0])),
             "predicted_seconds": float(np.median(v[1])),
             "payload_inter_bytes": int(np.median(v[2]))}
            for (layer, phase), v in sorted(by_key.items(),
                                            key=lambda kv: (kv[0][0] < 0, kv[0][0],
                                                            PHASES.index(kv[0][1])))]
    step_seconds = np.max([r.step_seconds for r in results], axis=0)
    heads = [r.link_counters for r in results if r.link_counters]
    link = np.asarray(heads, dtype=np.int64).reshape(len(heads), steps, 3, 2)
    fwd_bwd = (link[:, :, 1] - link[:, :, 0])[..., 0].sum(axis=0)  # tx over nodes, per step
    allreduce = (link[:, :, 2] - link[:, :, 1])[..., 0].sum(axis=0)
    # From the last mark of step s to the first of step s + 1 only the copies' gradient sync
    # (when there are copies) crosses nodes, besides barrier and gRPC bytes.
    between = (link[:, 1:, 0] - link[:, :-1, 2])[..., 0].sum(axis=0)
    measured = float(np.median(per_step))
    model = float(np.median(predicted))
    out: dict[str, Any] = {
        "a2a_seconds_per_step": measured,
        "a2a_seconds_iterations": per_step.tolist(),
        "step_seconds": float(np.median(step_seconds)),
        "step_seconds_iterations": step_seconds.tolist(),
        "inter_node_bytes": int(np.median(fwd_bwd)),
        "inter_node_bytes_per_link": [int(x) for x in
                                      np.median(link[:, :, 1, 0] - link[:, :, 0, 0], axis=1)],
        "allreduce_inter_node_bytes": int(np.median(allreduce)),
        "between_steps_inter_node_bytes": int(np.median(between)) if steps > 1 else 0,
        # the slowest rank's mean per step (the trainer sums it over steps); in step_seconds
        "copy_sync_seconds_per_step": max(r.copy_sync_seconds or 0.0 for r in results) / steps,
        "payload_inter_bytes": int(np.median(inter_payload)),
        "payload_intra_bytes": int(np.median(intra_payload)),
        "predicted_a2a_seconds": model,
        "model_error": model / measured - 1.0,
        "predicted_busiest_link_seconds": float(np.median(busiest_model)),
        "loss": results[0].loss,
        "calls": rows,
    }
    placed = [r.placement for r in results if r.placement is not None]
    if placed:
        first = placed[0]
        wait = statistics.fmean(p.plan_wait_seconds for p in placed) / steps
        reply = statistics.fmean(p.reply_seconds for p in placed) / steps
        solve = [s for s in first.solve_seconds if s > 0]
        out.update(
            plan_wait_seconds_per_step=wait,
            plan_reply_seconds_per_step=reply,
            plan_agree_seconds_per_step=wait - reply,
            plan_wait_fraction=wait / out["step_seconds"],
            submit_seconds_per_step=statistics.fmean(p.submit_seconds for p in placed) / steps,
            solver_ms_median=1e3 * statistics.median(solve) if solve else 0.0,
            fallbacks=max(p.fallbacks for p in placed),
            fallback_reasons=first.fallback_reasons,
            moved_per_plan=first.moved / max(first.plans, 1),
        )
    return out


def merge_repeats(launches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One mode's figures over its interleaved launches (summarize_mode results, launch order).

    Every per-launch median (numbers) becomes the median over launches; per-step series are
    concatenated; per-call rows take medians over launches; "repeats" keeps each launch's All-to-All
    and step time; "repeat_loss_rel_diff" is the largest relative loss gap to the first launch.
    """
    first = launches[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, bool) or key == "fallbacks":
            continue
        if isinstance(value, int | float):
            med = statistics.median(m[key] for m in launches)
            out[key] = int(med) if isinstance(value, int) else float(med)
    out["model_error"] = out["predicted_a2a_seconds"] / out["a2a_seconds_per_step"] - 1.0
    for key in ("a2a_seconds_iterations", "step_seconds_iterations"):
        out[key] = [x for m in launches for x in m[key]]
    out["inter_node_bytes_per_link"] = [int(x) for x in np.median(
        [m["inter_node_bytes_per_link"] for m in launches], axis=0)]
    out["loss"] = first["loss"]
    out["repeat_loss_rel_diff"] = max(abs(a - b) / abs(b) for m in launches
                                      for a, b in zip(m["loss"], first["loss"], strict=True))
    out["repeats"] = [{"a2a_seconds_per_step": m["a2a_seconds_per_step"],
                       "step_seconds": m["step_seconds"]} for m in launches]
    out["calls"] = [{**row, **{k: float(statistics.median(by[row["name"]][k] for by in (
        {r["name"]: r for r in m["calls"]} for m in launches)))
        for k in ("measured_seconds", "predicted_seconds")}} for row in first["calls"]]
    if "fallbacks" in first:
        out["fallbacks"] = max(m["fallbacks"] for m in launches)
        reasons: dict[str, int] = defaultdict(int)
        for m in launches:
            for reason, count in m["fallback_reasons"].items():
                reasons[reason] += count
        out["fallback_reasons"] = dict(reasons)
    return out


def expert_order(maps: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """Per layer, the original expert in each slot: maps int [L, E] (device of each expert,
    E/J per device) -> order with order[l][v] on device v // (E/J), i.e. maps[l][order[l][v]]."""
    return tuple(tuple(int(e) for e in np.argsort(m, kind="stable")) for m in np.asarray(maps))


def trace_rounds(trace_path: Path, cfg: Any) -> list[np.ndarray]:
    """A recorded trace as one round per step: int64 [L, I, E] routes each, I = global samples."""
    from netmoe.trace import load_trace, sample_counts

    counts = sample_counts(load_trace(trace_path), cfg.experts)  # [L, rounds * I, E]
    big_i = cfg.global_samples
    return [counts[:, r * big_i:(r + 1) * big_i] for r in range(counts.shape[1] // big_i)]


def fit_order(trace_path: Path, cfg: Any, starts: int) -> tuple[tuple[tuple[int, ...], ...],
                                                                 dict[str, Any]]:
    """Fits expert maps on a recorded trace (one round per recorded step) for cfg's topology."""
    from netmoe.solver import Topology
    from netmoe.solver.experts import fit_experts

    topo = Topology(nodes=cfg.nodes, gpus_per_node=cfg.gpus_per_node, experts=cfg.experts)
    rounds = trace_rounds(trace_path, cfg)
    fit = fit_experts(topo, rounds, starts=starts, seed=cfg.seed)
    info = {"rounds": len(rounds), "objective_inter_intra": list(fit.objective),
            "history": [list(h) for h in fit.history], "maps": [list(m) for m in fit.maps]}
    return expert_order(fit.array()), info


def locality_bound(trace_path: Path, cfg: Any, maps: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Exact optimum on the measured (held-out) steps' real routing, per layer pair (combine of
    l + dispatch of l+1), summed over pairs and steps: inter-node routes at home, with the exact
    two-stage sample placement, and with the fitted expert maps [L, E] plus sample placement.
    The measured runs can only approach these cuts (they plan on predicted routing)."""
    from netmoe.solver import Topology
    from netmoe.solver.experts import evaluate_experts

    topo = Topology(nodes=cfg.nodes, gpus_per_node=cfg.gpus_per_node, experts=cfg.experts)
    ev = evaluate_experts(topo, trace_rounds(trace_path, cfg), np.asarray(maps))
    inter = {kind: sum(getattr(p, kind).inter for p in ev.pairs)
             for kind in ("home", "sample_only", "joint")}
    return {"rounds": ev.rounds, "inter_routes": inter,
            "sample_inter_reduction": 1.0 - inter["sample_only"] / inter["home"],
            "experts_inter_reduction": 1.0 - inter["joint"] / inter["home"]}


def expert_grad_bytes(cfg: Any) -> int:
    """Gradient bytes of one expert of cfg's model (float32, the size of its parameters)."""
    from netmoe.app.reference.model import Expert
    from netmoe.client.experts import state_bytes

    return state_bytes(Expert(cfg.d_model, cfg.ffn), None)


def fit_copies(trace_path: Path, cfg: Any, maps: Sequence[Sequence[int]],
               order: Sequence[Sequence[int]], slots: int, grad_bytes: int) -> dict[str, Any]:
    """Copies for the replicas mode, on top of the fitted maps [L, E]: fit_replicas on the fit
    trace's rounds, at most ``slots`` per device and layer, each copy's gradient sync weighed
    (2 x grad_bytes inter-node bytes per step). Returns "copies" ([L] (expert, device) by
    original id), "labels" (the same by slot of ``order``: TrainConfig.copies of a run built
    with expert_order=order), "objective_history" and "rounds"."""
    from netmoe.solver import Topology
    from netmoe.solver.replicas import fit_replicas

    topo = Topology(nodes=cfg.nodes, gpus_per_node=cfg.gpus_per_node, experts=cfg.experts,
                    bytes_per_route=cfg.d_model * 4)
    fit = fit_replicas(topo, trace_rounds(trace_path, cfg), np.asarray(maps), slots=slots,
                       grad_bytes=grad_bytes)
    slot_of = [{e: v for v, e in enumerate(o)} for o in order]
    labels = [sorted((slot_of[layer][e], d) for e, d in pairs)
              for layer, pairs in enumerate(fit.copies)]
    return {"slots": slots, "copies": [[list(c) for c in layer] for layer in fit.copies],
            "labels": [[list(c) for c in layer] for layer in labels],
            "objective_history": [list(h) for h in fit.history], "rounds": fit.rounds}


def replica_decision(trace_path: Path, cfg: Any, maps: Sequence[Sequence[int]],
                     copies: Sequence[Sequence[Sequence[int]]], cal: Any, grad_bytes: int,
                     horizon_steps: int) -> dict[str, Any]:
    """The model's verdict on the copies for the measured (held-out) steps' real routing:
    recommend_replicas in seconds with the calibrated alpha-beta channels (bytes over the whole
    machine, as the calibration). The saving is joint + copies against joint placement alone,
    both passes; the sync one all-reduce per layer with cross-node copies. Memory and creation
    count an expert's parameters plus AdamW's two moments (3 x grad_bytes)."""
    from netmoe.solver import Topology
    from netmoe.solver.replicas import evaluate_replicas, recommend_replicas

    topo = Topology(nodes=cfg.nodes, gpus_per_node=cfg.gpus_per_node, experts=cfg.experts,
                    alpha_intra=cal.intra.alpha, alpha_inter=cal.inter.alpha,
                    bw_intra=cal.intra.bandwidth, bw_inter=cal.inter.bandwidth,
                    bytes_per_route=cfg.d_model * 4)
    ev = evaluate_replicas(topo, trace_rounds(trace_path, cfg), np.asarray(maps),
                           [[tuple(c) for c in layer] for layer in copies])
    rec = recommend_replicas(topo, ev, bytes_per_expert=3 * grad_bytes, grad_bytes=grad_bytes,
                             horizon_steps=horizon_steps, unit="seconds")
    return {"pays": rec.adopt, "reason": rec.reason, "rounds": ev.experts.rounds,
            "predicted_saving_seconds_per_step": rec.saving_per_step,
            "predicted_sync_seconds_per_step": rec.sync_per_step,
            "predicted_net_seconds_per_step": rec.net_per_step,
            "predicted_creation_seconds": rec.migration_cost,
            "break_even_steps": rec.break_even_steps if np.isfinite(rec.break_even_steps)
            else None, "horizon_steps": horizon_steps,
            "n_copies": rec.n_copies, "cross_node_copies": rec.cross_node_copies,
            "memory_bytes": rec.memory_bytes, "grad_bytes_per_expert": grad_bytes,
            "held_out_inter_routes": {"joint": ev.experts.joint.inter,
                                      "replicated": ev.total.inter}}


def _record_fit_trace(cfg: Any, steps: int, path: Path) -> None:
    """Trains ``steps`` steps in one process from cfg's checkpoint, recording the routing."""
    from netmoe.app.reference.launch import run_ranks

    single = dataclasses.replace(
        cfg, nodes=1, gpus_per_node=1, experts_per_device=cfg.experts,
        samples_per_device=cfg.global_samples, steps=steps, placement="home", server="",
        record_trace=str(path), data_offset=cfg.data_offset - steps, threads=2,
        a2a_sync=False, link_counters=False,
    )  # fmt: skip
    run_ranks(single)


def _cached_fit(cfg: Any, fit_steps: int, starts: int, work: Path,
                ) -> tuple[tuple[tuple[int, ...], ...], dict[str, Any], Path]:
    """The fitted expert order, its info and the fit trace (the copies are fitted on it), from
    the cache when the same checkpoint, data, shape and seed were fitted before (the fit trace
    is deterministic, so the cached fit is exact)."""
    from netmoe.app.reference.data import default_cache_dir

    key = json.dumps([cfg.init_checkpoint, cfg.data_offset, fit_steps, starts, cfg.seed,
                      cfg.nodes, cfg.gpus_per_node, cfg.samples_per_device, cfg.seq_len,
                      cfg.layers, cfg.experts_per_device, cfg.top_k, cfg.vocab])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = (Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()) / f"fit-{digest}.json"
    trace = path.with_suffix(".npz")
    if path.exists() and trace.exists():
        cached = json.loads(path.read_text())
        info = {**cached["info"], "cached": True, "seconds": 0.0}
        return tuple(tuple(o) for o in cached["order"]), info, trace
    t0 = time.monotonic()
    _record_fit_trace(cfg, fit_steps, work / "fit-trace.npz")
    order, info = fit_order(work / "fit-trace.npz", cfg, starts)
    info.update(cached=False, seconds=time.monotonic() - t0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = trace.with_name(f"{trace.stem}.{os.getpid()}.tmp.npz")
    shutil.copyfile(work / "fit-trace.npz", tmp)
    os.replace(tmp, trace)
    _write_atomic(path, {"key": key, "order": order, "info": info})
    return order, info, trace


def _write_atomic(path: Path, obj: Any) -> None:
    """Cache files are shared by concurrent benches: never let one read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _train_all(tb: Any, runs: Sequence[tuple[str, Any]], work: Path, g: int,
               threads: int) -> dict[str, list[RankResult]]:
    """Every run, in order, in one launch of the ranks (netmoe.app.cluster.rank); returns per run
    name the per-rank results."""
    from netmoe.app.cluster.testbed import TestbedError

    plan = [{"name": name, "port": 29500 + k, "config": dataclasses.asdict(cfg)}
            for k, (name, cfg) in enumerate(runs)]
    (work / "plan.json").write_text(json.dumps(plan))
    procs = tb.launch_ranks(g, [sys.executable, "-m", "netmoe.app.cluster.rank", "--plan",
                                str(work / "plan.json"), "--out", str(work / "runs")],
                            work / "logs", env={"OMP_NUM_THREADS": str(threads)})
    try:
        tb.wait(procs, timeout=300 + 120 * len(runs), log_dir=work / "logs")
    except TestbedError as err:
        done = sorted(p.name for p in (work / "runs").glob("*") if p.is_dir())
        raise TestbedError(f"training runs (finished: {done}): {err}") from err
    world = tb.config.nodes * g
    return {name: [RankResult.from_json((work / "runs" / name / f"rank{r}.json").read_text(),
                                        f"{name} rank {r}'s result")
                   for r in range(world)] for name, _ in runs}


def _start_server(tb: Any, work: Path) -> str:
    """``netmoe serve`` in node 0's namespace on its veth address; returns host:port once up."""
    address = f"{tb.address(0)}:{SERVER_PORT}"
    with open(work / "server.log", "wb") as log:  # the server keeps its own descriptor
        tb.launch(0, [sys.executable, "-m", "netmoe.app.cli", "serve", "--host", tb.address(0),
                      "--port", str(SERVER_PORT), "--metrics-port", "-1",
                      "--log-level", "WARNING"],
                  env={"NETMOE_ALLOW_REMOTE": "1"}, stdout=log, stderr=log)
    probe = tb.launch(0, [sys.executable, "-c", _READY, address, "60"])
    tb.wait([probe], timeout=90)
    return address


def _calibrate(tb: Any, work: Path, g: int, sizes: Sequence[int], iters: int, cache: Path,
               reuse: bool) -> tuple[Any, dict[str, Any]]:
    """The alpha-beta calibration: read from ``cache`` (same testbed shape and rates) when
    ``reuse`` and it exists, else measured now and written to ``cache``."""
    from netmoe.app.cluster.calibrate import calibrate, calibration_calls
    from netmoe.app.cluster.probe import write_workload

    if reuse and cache.exists():
        cached = json.loads(cache.read_text())
        return calibrate(cached["result"]), {**cached["meta"], "cached": True}
    write_workload(work / "calibration.json", calibration_calls(tb.config.nodes, g, sizes), g)
    procs = tb.launch_ranks(g, [sys.executable, "-m", "netmoe.app.cluster.probe", "--workload",
                                str(work / "calibration.json"), "--iters", str(iters),
                                "--out", str(work / "calibration-result.json")],
                            work / "calibration-logs", env={"MASTER_PORT": "29400"})
    tb.wait(procs, timeout=600, log_dir=work / "calibration-logs")
    result = json.loads((work / "calibration-result.json").read_text())
    meta = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "load_average": os.getloadavg()[0], "cached": False,
            "bytes_per_peer": list(sizes), "iterations": iters}
    _write_atomic(cache, {"result": result, "meta": meta})
    return calibrate(result), meta


def run_bench(base: Any, *, rate_mbit: float, ratio: float, warmup_steps: int, fit_steps: int,
              objectives: Sequence[str], starts: int, sizes: Sequence[int],
              calibration_iters: int, repeats: int = 1,
              reuse_calibration: bool = False, replica_slots: int = 0,
              replica_weigh_sync: bool = True) -> dict[str, Any]:
    """The whole training bench; base: TrainConfig of the measured runs (steps, shape, seed).

    Modes run interleaved ``repeats`` times (home, sample, experts, home, ...) in one launch of
    the ranks; figures are medians over repeats of the per-launch medians over steps.
    reuse_calibration: take the cached calibration of this testbed shape when there is one.
    replica_slots > 0 adds the "replicas" mode: the experts mode plus copies (fit_copies, at
    most replica_slots per device and layer, their sync weighed unless not replica_weigh_sync)
    in force from the start; the report's "replicas" holds the model's verdict on them.
    Returns the report dict (see netmoe.app.bench.cluster for the keys)."""
    from netmoe.app.cluster.calibrate import calibration_dict
    from netmoe.app.cluster.testbed import Testbed, TestbedConfig
    from netmoe.app.reference.data import default_cache_dir, load_corpus
    from netmoe.app.reference.pretrain import pretrain

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    started = time.monotonic()
    load_start = os.getloadavg()
    phases: dict[str, float] = {}
    load_corpus(base.vocab, base.cache_dir or None)  # built once here; ranks read the cache
    if warmup_steps:
        base = dataclasses.replace(base, init_checkpoint=pretrain(base, warmup_steps,
                                                                  "netmoe bench cluster"))
    cfg = dataclasses.replace(base, data_offset=warmup_steps + fit_steps, a2a_sync=True,
                              link_counters=True)
    phases["prepare"] = time.monotonic() - started
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    # keyed by what the testbed is, not by how it was probed: any calibration of it is valid
    cal_cache = cache_dir / (f"calibration-{cfg.nodes}x{cfg.gpus_per_node}-{rate_mbit:g}mbit-"
                             f"x{ratio:g}.json")
    with tempfile.TemporaryDirectory(prefix="netmoe-cluster-train-") as tmp:
        work = Path(tmp)
        t0 = time.monotonic()
        order, fit_info, fit_trace = _cached_fit(cfg, fit_steps, starts, work)
        grad_bytes = expert_grad_bytes(cfg)
        copies = fit_copies(fit_trace, cfg, fit_info["maps"], order, replica_slots,
                            grad_bytes if replica_weigh_sync else 0) if replica_slots else None
        phases["expert_fit"] = time.monotonic() - t0
        tb_cfg = TestbedConfig(nodes=cfg.nodes, rate_mbit=rate_mbit,
                               intra_rate_mbit=rate_mbit * ratio)
        t0 = time.monotonic()
        with Testbed(tb_cfg) as tb:
            cal, cal_meta = _calibrate(tb, work, cfg.gpus_per_node, sizes, calibration_iters,
                                       cal_cache, reuse_calibration)
            phases["testbed_calibration"] = time.monotonic() - t0
            t0 = time.monotonic()
            server = _start_server(tb, work)
            phases["server"] = time.monotonic() - t0
            modes = [("home", cfg)]
            for objective in objectives:
                suffix = "" if objective == objectives[0] else f"-{objective}"
                place = dataclasses.replace(cfg, placement="service", server=server,
                                            objective=objective)
                modes.append((f"sample{suffix}", place))
                modes.append((f"experts{suffix}",
                              dataclasses.replace(place, expert_order=order)))
            if copies is not None:  # replica-aware rounds ignore the objective
                experts = dict(modes)["experts"]
                modes.insert(modes.index(("experts", experts)) + 1, (
                    "replicas", dataclasses.replace(experts, copies=copies["labels"])))
            trace = work / "held-out-trace.npz"
            runs = [(f"{name}#{rep}", dataclasses.replace(
                mode_cfg, job=f"{name}-{rep}", record_trace=str(trace)
                if name == "home" and rep == 0 else ""))
                for rep in range(repeats) for name, mode_cfg in modes]
            t0 = time.monotonic()
            results = _train_all(tb, runs, work, cfg.gpus_per_node, cfg.threads)
            phases["training"] = time.monotonic() - t0
        per_mode = {name: merge_repeats([summarize_mode(results[f"{name}#{rep}"], cal,
                                                        cfg.gpus_per_node)
                                         for rep in range(repeats)]) for name, _ in modes}
        for name, mode_cfg in modes:
            per_mode[name]["objective"] = mode_cfg.objective if name != "home" else None
        bound = locality_bound(trace, cfg, fit_info["maps"])
        if copies is not None:
            copies.update(weighed_sync=replica_weigh_sync, decision=replica_decision(
                trace, cfg, fit_info["maps"], copies["copies"], cal, grad_bytes,
                cfg.expert_horizon))
            moves = [r.expert_moves or ExpertMoves() for r in results["replicas#0"]]
            copies.update(confirmed=moves[0].copies_confirmed, error=moves[0].error,
                          creation_seconds=max(m.copy_seconds for m in moves))
    report = _report(per_mode, cal, calibration_dict(cal), cfg, fit_info, rate_mbit, ratio,
                     warmup_steps, fit_steps, time.monotonic() - started)
    if copies is not None:
        report["replicas"] = replica_report(per_mode, copies)
    report.update(repeats=repeats, locality_bound=bound, phase_seconds=phases,
                  calibration_meta=cal_meta,
                  load_average={"start": load_start[0], "end": os.getloadavg()[0]})
    return report


def replica_report(modes: dict[str, dict[str, Any]], copies: dict[str, Any]) -> dict[str, Any]:
    """The replicas mode against the experts mode (merged figures of both): the copies, the
    model's verdict (copies["decision"]), measured All-to-All, step and sync time per step, and
    whether the step got faster exactly when the model said the copies pay."""
    exp, rep = modes["experts"], modes["replicas"]
    step_saving = exp["step_seconds"] - rep["step_seconds"]
    spread = max((max(t) - min(t)) / statistics.median(t) for t in (
        [x["step_seconds"] for x in m["repeats"]] for m in (exp, rep)))
    return {
        **copies,
        "n_copies": sum(len(layer) for layer in copies["copies"]),
        "measured_a2a_saving_seconds_per_step": exp["a2a_seconds_per_step"]
        - rep["a2a_seconds_per_step"],
        "measured_step_saving_seconds_per_step": step_saving,
        "measured_sync_seconds_per_step": rep["copy_sync_seconds_per_step"],
        "sync_inter_node_bytes_per_step": rep["between_steps_inter_node_bytes"],
        # the calibrated model on the calls' real bytes (the decision models held-out routes)
        "predicted_a2a_saving_seconds_per_step_measured_bytes": exp["predicted_a2a_seconds"]
        - rep["predicted_a2a_seconds"],
        "step_faster": step_saving > 0,
        "step_launch_spread": spread,
        "agrees": copies["decision"]["pays"] == (step_saving > 0),
    }


def replica_verdict(r: dict[str, Any]) -> str:
    """One line: the model's decision on the copies (report["replicas"]) with its numbers, then
    the measured outcome against the experts mode."""
    d = r["decision"]
    saving, sync = d["predicted_saving_seconds_per_step"], d["predicted_sync_seconds_per_step"]
    said = "copies pay" if d["pays"] else "copies do not pay"
    step = r["measured_step_saving_seconds_per_step"]
    return (f"model: {said} (per step {saving * 1e3:.1f} ms of All-to-All saved vs "
            f"{sync * 1e3:.1f} ms of gradient sync; {d['reason']}); measured vs experts: step "
            f"{abs(step) * 1e3:.0f} ms {'faster' if step > 0 else 'slower'} (spread between "
            f"launches {r['step_launch_spread']:.0%}), All-to-All "
            f"{r['measured_a2a_saving_seconds_per_step'] * 1e3:+.0f} ms saved, sync "
            f"{r['measured_sync_seconds_per_step'] * 1e3:.0f} ms/step: "
            f"{'agrees' if r['agrees'] else 'disagrees'} with the model")


def _report(modes: dict[str, dict[str, Any]], cal: Any, cal_dict: dict, cfg: Any,
            fit_info: dict, rate: float, ratio: float, warmup: int, fit_steps: int,
            wall: float) -> dict[str, Any]:
    home = modes["home"]
    link_rate = rate * 1e6 / 8  # bytes per second per node link and direction
    for m in modes.values():
        m["speedup_a2a"] = home["a2a_seconds_per_step"] / m["a2a_seconds_per_step"]
        m["speedup_step"] = home["step_seconds"] / m["step_seconds"]
        m["inter_bytes_reduction"] = 1.0 - m["inter_node_bytes"] / home["inter_node_bytes"]
        m["payload_inter_reduction"] = 1.0 - m["payload_inter_bytes"] / home[
            "payload_inter_bytes"]
        m["max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in
                                     zip(m["loss"], home["loss"], strict=True))
        # Share of the All-to-All time the busiest node link needs at its nominal rate: near 1,
        # the link (not the CPU) sets the time.
        m["link_busy_share"] = (max(m["inter_node_bytes_per_link"]) / link_rate
                                / m["a2a_seconds_per_step"])
    placed = [k for k in modes if k != "home"]
    best = min(placed, key=lambda k: modes[k]["a2a_seconds_per_step"])
    objectives: dict[str, str] = {}
    for kind in ("sample", "experts"):
        cands = [k for k in placed if k.split("-")[0] == kind]
        if len(cands) > 1:
            win = min(cands, key=lambda k: modes[k]["a2a_seconds_per_step"])
            objectives[kind] = modes[win]["objective"]
    exp = modes.get("experts", modes[best])
    return {
        "home": home,
        "netmoe": modes[best],
        "best_mode": best,
        "speedup_a2a": modes[best]["speedup_a2a"],
        "inter_bytes_reduction": modes[best]["inter_bytes_reduction"],
        "modes": modes,
        "objective_winner": objectives,
        "targets": {
            "inter_bytes_reduction_ge_30pct": exp["inter_bytes_reduction"] >= 0.30,
            "speedup_a2a_ge_1_3": exp["speedup_a2a"] >= 1.3,
            "plan_wait_lt_5pct": exp.get("plan_wait_fraction", 0.0) < 0.05,
        },
        "expert_fit": fit_info,
        "workload": "training",
        "objective": modes[placed[0]]["objective"],
        "config": {"nodes": cfg.nodes, "gpus_per_node": cfg.gpus_per_node, "rate_mbit": rate,
                   "intra_rate_mbit": rate * ratio, "steps": cfg.steps,
                   "samples_per_device": cfg.samples_per_device, "layers": cfg.layers,
                   "tokens": cfg.seq_len, "d_model": cfg.d_model,
                   "experts": cfg.experts, "top_k": cfg.top_k,
                   "bytes_per_route": cfg.d_model * 4, "warmup_steps": warmup,
                   "fit_steps": fit_steps, "data_offset": cfg.data_offset, "seed": cfg.seed},
        "calibration": cal_dict,
        "measured_ratio": cal.intra.bandwidth / cal.inter.bandwidth,
        # machine-wide inter-node bandwidth the calibration found vs the links' nominal sum
        "inter_bandwidth_share_of_nominal": cal.inter.bandwidth / (link_rate * cfg.nodes),
        "wall_seconds": wall,
    }
