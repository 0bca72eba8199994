"""Markdown report and PNG plots of a `netmoe bench cluster` result (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _mode(r: dict[str, Any], mode: str) -> dict[str, Any]:
    """A mode's full figures: under "modes" (training) or top-level (synthetic, with calls)."""
    return r["modes"][mode] if "calls" in r["modes"][mode] else r[mode]


def write_report(out: Path, r: dict[str, Any]) -> None:
    """Write report.md, result.json, step_time.png, inter_bytes.png, predicted.png into out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    modes = list(r["modes"])
    (out / "result.json").write_text(json.dumps(r, indent=1))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode in modes:
        ax.plot([t * 1e3 for t in _mode(r, mode)["a2a_seconds_iterations"]], marker="o",
                label=mode)
    ax.set(xlabel="step", ylabel="All-to-All ms per step", title="Measured All-to-All time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    # modes may differ in calls (only placed modes move side tensors): union, in order
    names = list(dict.fromkeys(c["name"] for m in modes for c in _mode(r, m)["calls"]))
    width = 0.8 / len(modes)
    # Training reads the counters per step, not per call: per call it plots the payload.
    counters = "link_tx_bytes" in _mode(r, modes[0])["calls"][0]
    for k, mode in enumerate(modes):
        mb = {c["name"]: (sum(c["link_tx_bytes"]) if counters else c["payload_inter_bytes"])
              / 1e6 for c in _mode(r, mode)["calls"]}
        ax.bar([x + k * width for x in range(len(names))], [mb.get(n, 0.0) for n in names],
               width, label=mode)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=45,
                  ha="right", fontsize=7)
    ax.set(ylabel="MB on inter-node links" if counters else "inter-node payload MB",
           title="Inter-node bytes per All-to-All" + (" (counters)" if counters else
                                                     " (median step)"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "inter_bytes.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    points = [(p["median_seconds"], p["predicted_seconds"], "calibration")
              for p in r["calibration"]["points"]]
    points += [(c["measured_seconds"], c["predicted_seconds"], mode)
               for mode in modes for c in _mode(r, mode)["calls"]]
    for label in dict.fromkeys(p[2] for p in points):
        xs = [p[0] * 1e3 for p in points if p[2] == label]
        ys = [p[1] * 1e3 for p in points if p[2] == label]
        ax.scatter(xs, ys, label=label, s=14)
    top = max(max(p[0], p[1]) for p in points) * 1e3 * 1.05
    ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
    ax.set(xlabel="measured ms", ylabel="model ms", title="Alpha-beta model vs measured")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "predicted.png", dpi=100)
    plt.close(fig)

    (out / "report.md").write_text(_markdown_training(r) if r["workload"] == "training"
                                   else _markdown(r))


def _markdown(r: dict[str, Any]) -> str:
    c, cal = r["config"], r["calibration"]
    lines = [
        "# netmoe bench cluster",
        "",
        f"Emulated {c['nodes']} nodes x {c['gpus_per_node']} ranks (network namespaces, gloo "
        f"over TCP). Inter-node link {c['rate_mbit']:.0f} Mbit/s per node and direction, "
        f"intra-node (lo) {c['intra_rate_mbit']:.0f} Mbit/s per node. Workload: "
        f"{r['workload']} routing, {c['layers']} layers, {c['samples_per_device']} samples x "
        f"{c['tokens']} tokens per rank, top-2, {c['bytes_per_route']} bytes per route; "
        f"{c['steps']} measured steps per mode, modes interleaved; objective {r['objective']}.",
        "",
        "## Calibration (t = alpha + bytes / bandwidth, bytes over the whole machine)",
        "",
        "| channel | alpha ms | bandwidth MB/s | r2 |",
        "|---|---|---|---|",
    ]
    for ch in ("intra", "inter"):
        f = cal[ch]
        lines.append(f"| {ch} | {f['alpha'] * 1e3:.2f} | {f['bandwidth'] / 1e6:.1f} | "
                     f"{f['r2']:.4f} |")
    lines += ["", f"Measured intra:inter bandwidth ratio {r['measured_ratio']:.2f}.", "",
              "| probe | bytes per peer | measured ms | model ms | error |",
              "|---|---|---|---|---|"]
    for p in cal["points"]:
        lines.append(f"| {p['channel']} | {p['bytes_per_peer']} | "
                     f"{p['median_seconds'] * 1e3:.1f} | {p['predicted_seconds'] * 1e3:.1f} | "
                     f"{p['error']:+.1%} |")
    lines += ["", "## Modes (medians over steps)", "",
              "| mode | a2a ms/step | model ms | model error | inter-node link MB/step | "
              "inter payload MB | intra payload MB | plan wait ms/step |",
              "|---|---|---|---|---|---|---|---|"]
    for mode in r["modes"]:
        m = r[mode]
        wait = m.get("plan_wait_seconds_per_step")
        lines.append(
            f"| {mode} | {m['a2a_seconds_per_step'] * 1e3:.1f} | "
            f"{m['predicted_a2a_seconds'] * 1e3:.1f} | {m['model_error']:+.1%} | "
            f"{m['inter_node_bytes'] / 1e6:.2f} | {m['payload_inter_bytes'] / 1e6:.2f} | "
            f"{m['payload_intra_bytes'] / 1e6:.2f} | "
            f"{'-' if wait is None else f'{wait * 1e3:.1f}'} |")
    lines += ["", f"Speedup of the All-to-Alls: **{r['speedup_a2a']:.2f}x**; inter-node bytes "
              f"(link counters) **-{r['inter_bytes_reduction']:.1%}**.", "",
              "![time per step](step_time.png)", "", "![inter-node bytes](inter_bytes.png)", "",
              "![model vs measured](predicted.png)", ""]
    return "\n".join(lines)


def _markdown_training(r: dict[str, Any]) -> str:
    c, cal = r["config"], r["calibration"]
    modes = r["modes"]
    lines = [
        "# netmoe bench cluster (real training)",
        "",
        f"Emulated {c['nodes']} nodes x {c['gpus_per_node']} ranks (network namespaces, gloo "
        f"over TCP). Inter-node link {c['rate_mbit']:.0f} Mbit/s per node and direction, "
        f"intra-node (lo) {c['intra_rate_mbit']:.0f} Mbit/s per node. The demo's MoE "
        f"({c['layers']} layers, E={c['experts']}, top-{c['top_k']}, d_model {c['d_model']}), "
        f"{c['samples_per_device']} samples x {c['tokens']} tokens per rank, from the "
        f"{c['warmup_steps']}-step warm-up checkpoint; the expert map was fitted on "
        f"{c['fit_steps']} recorded steps before the {c['steps']} measured ones. A barrier "
        "precedes each timed All-to-All; a call lasts from the earliest start to the latest "
        "end over ranks.",
        "",
        "## Calibration (t = alpha + bytes / bandwidth, bytes over the whole machine)",
        "",
        "| channel | alpha ms | bandwidth MB/s | r2 |",
        "|---|---|---|---|",
    ]
    for ch in ("intra", "inter"):
        f = cal[ch]
        lines.append(f"| {ch} | {f['alpha'] * 1e3:.2f} | {f['bandwidth'] / 1e6:.2f} | "
                     f"{f['r2']:.4f} |")
    lines += ["", "## Modes (medians over steps)", "",
              "| mode | a2a ms/step | model ms | model error | speedup a2a | step ms | "
              "inter-node link MB/step | vs home | inter payload MB | all-reduce link MB | "
              "plan wait ms/step (share) | max loss rel. diff |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in modes.items():
        wait = (f"{m['plan_wait_seconds_per_step'] * 1e3:.1f} ({m['plan_wait_fraction']:.1%})"
                if "plan_wait_fraction" in m else "-")
        lines.append(
            f"| {name} | {m['a2a_seconds_per_step'] * 1e3:.0f} | "
            f"{m['predicted_a2a_seconds'] * 1e3:.0f} | {m['model_error']:+.1%} | "
            f"{m['speedup_a2a']:.2f}x | {m['step_seconds'] * 1e3:.0f} | "
            f"{m['inter_node_bytes'] / 1e6:.2f} | {-m['inter_bytes_reduction']:+.1%} | "
            f"{m['payload_inter_bytes'] / 1e6:.2f} | {m['allreduce_inter_node_bytes'] / 1e6:.2f} | "
            f"{wait} | {m['max_loss_rel_diff']:.1e} |")
    lines += ["", "## All-to-All per layer and phase (median ms per step, measured / model)", ""]
    rows = [{row["name"]: row for row in m["calls"]} for m in modes.values()]
    names = list(dict.fromkeys(name for by_name in rows for name in by_name))
    lines += ["| call | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for name in names:
        cells = [f"{by_name[name]['measured_seconds'] * 1e3:.0f} / "
                 f"{by_name[name]['predicted_seconds'] * 1e3:.0f}" if name in by_name else "-"
                 for by_name in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    placed = {k: m for k, m in modes.items() if "plan_wait_seconds_per_step" in m}
    if placed:
        lines += ["", "## Plan waiting (ms per step, mean over ranks)", "",
                  "| mode | wait | of it: reply | of it: agreement all-gather | solver median ms "
                  "| fallbacks |", "|---|---|---|---|---|---|"]
        for name, m in placed.items():
            lines.append(f"| {name} | {m['plan_wait_seconds_per_step'] * 1e3:.1f} | "
                         f"{m['plan_reply_seconds_per_step'] * 1e3:.1f} | "
                         f"{m['plan_agree_seconds_per_step'] * 1e3:.1f} | "
                         f"{m['solver_ms_median']:.2f} | {m['fallbacks']} |")
    fit = r["expert_fit"]
    lines += ["", f"Expert fit: {fit['rounds']} rounds, objective (inter, intra) per "
              f"iteration {fit['history']}, {fit['seconds']:.1f} s.", "",
              f"Best mode **{r['best_mode']}**: All-to-All **{r['speedup_a2a']:.2f}x**, "
              f"inter-node link bytes **{-r['inter_bytes_reduction']:+.1%}** vs home. "
              f"Objective winner on measured time: {r['objective_winner'] or r['objective']}. "
              f"Targets (experts mode): {r['targets']}.", "",
              "![time per step](step_time.png)", "", "![inter-node bytes](inter_bytes.png)", "",
              "![model vs measured](predicted.png)", ""]
    return "\n".join(lines)
