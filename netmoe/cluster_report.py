"""Markdown report and PNG plots of a `netmoe bench cluster` result (matplotlib, Agg)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
        ax.plot([t * 1e3 for t in r[mode]["a2a_seconds_iterations"]], marker="o", label=mode)
    ax.set(xlabel="step", ylabel="All-to-All ms per step", title="Measured All-to-All time")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [c["name"] for c in r[modes[0]]["calls"]]
    width = 0.8 / len(modes)
    for k, mode in enumerate(modes):
        ax.bar([x + k * width for x in range(len(names))],
               [sum(c["link_tx_bytes"]) / 1e6 for c in r[mode]["calls"]], width, label=mode)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names, rotation=45,
                  ha="right", fontsize=7)
    ax.set(ylabel="MB on inter-node links", title="Inter-node bytes per All-to-All (counters)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "inter_bytes.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    points = [(p["median_seconds"], p["predicted_seconds"], "calibration")
              for p in r["calibration"]["points"]]
    points += [(c["measured_seconds"], c["predicted_seconds"], mode)
               for mode in modes for c in r[mode]["calls"]]
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

    (out / "report.md").write_text(_markdown(r))


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
