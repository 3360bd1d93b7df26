"""Accuracy-vs-retention plot and Markdown tables of a quality benchmark JSON.

One panel per prompt length plus the mean over lengths; kvferry's methods are solid lines, kvpress's
presses (when merged in, `report["kvpress"]`) dashed in the colour of the kvferry method they match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {
    "compactor": "tab:red",
    "compactor:adaptive": "tab:orange",
    "snapkv": "tab:blue",
    "kvcompress": "tab:purple",
    "kvcompress:global": "tab:pink",
    "streaming": "tab:green",
    "random": "tab:gray",
}


def _curves(report: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(label, cells by retention, plot style) for every line."""
    lines = []
    for spec, cells in report["summary"]["table"].items():
        style = {"color": COLORS.get(spec), "marker": "o", "linestyle": "-"}
        style["linewidth"] = 2.4 if spec == "compactor" else 1.3
        lines.append((spec, cells, style))
    kvpress = report.get("kvpress", {})
    for spec, cells in kvpress.get("summary", {}).get("table", {}).items():
        style = {"color": COLORS.get(spec), "marker": "s", "linestyle": "--", "linewidth": 1.6}
        lines.append((f"kvpress {spec}", cells, style))
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    lengths = summary["lengths"]
    retentions = report["settings"]["retentions"]
    panels = [(f"mean@{length}", f"~{length} tokens") for length in lengths] + [("mean", "all lengths")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.4), sharey=True)
    for ax, (key, title) in zip(axes, panels):
        for label, cells, style in _curves(report):
            rs = [r for r in retentions if str(r) in cells and key in cells[str(r)]]
            ax.plot(rs, [cells[str(r)][key] for r in rs], label=label, **style)
        ax.set_title(f"{title} (avg over {len(summary['tasks'])} tasks)")
        ax.set_xlabel("retention (fraction of KV kept)")
        ax.set_xscale("log")
        ax.set_xticks(retentions, [f"{r:g}" for r in retentions])
        ax.minorticks_off()
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    env = report["environment"]
    note = ""
    if report.get("kvpress", {}).get("summary"):
        note = f"; kvpress (dashed): {report['kvpress']['samples_per_task_and_length']} samples/task/length"
    fig.suptitle(
        f"KV compression quality, {Path(report['model']).name}, CPU — {env.get('date_label', env['date'][:10])}; "
        f"kvferry (solid): {report['settings']['samples_per_task_and_length']} samples/task/length{note}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(summary: dict[str, Any], retentions: list[float], key: str = "mean") -> str:
    """Rows: method; columns: retention; cells: accuracy (`key` of the summary cells)."""
    head = "| method | " + " | ".join(f"r = {r:g}" for r in retentions) + " |"
    rule = "| --- |" + " ---: |" * len(retentions)
    rows = [head, rule]
    for spec, cells in summary["table"].items():
        rows.append(f"| {spec} | " + " | ".join(f"{cells[str(r)][key]:.3f}" for r in retentions) + " |")
    return "\n".join(rows)


def task_table(summary: dict[str, Any], spec: str, retentions: list[float]) -> str:
    """Rows: task@length; columns: retention; for one method."""
    cells = summary["table"][spec]
    keys = [k for k in cells[str(retentions[0])] if "@" in k and not k.startswith("mean")]
    head = f"| {spec}: task@tokens | " + " | ".join(f"r = {r:g}" for r in retentions) + " |"
    rows = [head, "| --- |" + " ---: |" * len(retentions)]
    for k in sorted(keys, key=lambda k: (int(k.split("@")[1]), k)):
        rows.append(f"| {k} | " + " | ".join(f"{cells[str(r)][k]:.2f}" for r in retentions) + " |")
    return "\n".join(rows)
