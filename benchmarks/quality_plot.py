"""The plot and Markdown tables of a quality run's summary (quality_stats.summarize).

Plot: one panel per setting with the share of full-cache accuracy against retention for the
methods (kvpress's presses dashed, in the context panel), 95% CIs as bars; and one panel with every
lever's paired difference to the default compactor at one retention, in both settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {
    "compactor": "tab:red",
    "compactor:adaptive": "tab:orange",
    "compactor:global": "gold",
    "snapkv": "tab:blue",
    "kvcompress": "tab:purple",
    "streaming": "tab:green",
    "random": "tab:gray",
    "kvpress.compactor": "tab:red",
    "kvpress.snapkv": "tab:blue",
    "kvpress.expected_attention": "tab:brown",
    "kvpress.streaming": "tab:green",
    "kvpress.kvzip": "tab:pink",
    "lw_br_chunk8": "black",  # the new defaults (issue 23), under their run-2 name
}
LABELS = {"lw_br_chunk8": "lw_br_chunk8 (the new defaults)"}
LEVER_RETENTION = 0.25  # the lever panel's retention
FIELD_NAMES = {
    "mean": "accuracy",
    "share_of_full": "share of full",
    "minus_compactor": "minus compactor (paired)",
    "first_token_agreement": "first-token agreement",
}


def _cells(summary: dict[str, Any], setting: str) -> dict[str, dict[float, dict[str, Any]]]:
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for cell in summary["cells"].values():
        if cell["setting"] == setting:
            out.setdefault(cell["variant"], {})[cell["retention"]] = cell
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    settings = [s for s in ("whole", "context") if _cells(summary, s)]
    fig, axes = plt.subplots(1, len(settings) + 1, figsize=(5.2 * (len(settings) + 1), 4.8))
    for ax, setting in zip(axes, settings):
        for variant, by_r in _cells(summary, setting).items():
            if variant not in COLORS:
                continue  # levers go to the last panel
            rs = sorted(by_r)
            means = [by_r[r]["share_of_full"]["mean"] for r in rs]
            lo = [m - by_r[r]["share_of_full"]["ci"][0] for m, r in zip(means, rs)]
            hi = [by_r[r]["share_of_full"]["ci"][1] - m for m, r in zip(means, rs)]
            kvpress = variant.startswith("kvpress.")
            ax.errorbar(
                rs, means, yerr=[lo, hi], label=LABELS.get(variant, variant), color=COLORS[variant], capsize=2,
                marker="s" if kvpress else "o", linestyle="--" if kvpress else "-",
                linewidth=2.4 if variant in ("compactor", "lw_br_chunk8") else 1.3,
            )  # fmt: skip
        ax.set_title(f"{setting} setting: share of full-cache accuracy")
        ax.set_xlabel("retention (fraction of KV kept)")
        ax.set_xscale("log")
        rs = sorted({c["retention"] for c in summary["cells"].values()})
        ax.set_xticks(rs, [f"{r:g}" for r in rs])
        ax.minorticks_off()
        ax.set_ylim(-0.03, 1.25)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    ax = axes[-1]
    levers = sorted(
        {
            c["variant"]
            for c in summary["cells"].values()
            if "minus_compactor" in c and c["variant"] not in COLORS
        }
    )
    for j, setting in enumerate(settings):
        cells = _cells(summary, setting)
        ys = [i + 0.2 * (j - 0.5) for i in range(len(levers))]
        d = [
            cells.get(v, {})
            .get(LEVER_RETENTION, {})
            .get("minus_compactor", {"mean": float("nan"), "ci": [0, 0]})
            for v in levers
        ]
        means = [x["mean"] for x in d]
        err = [[m - x["ci"][0] for m, x in zip(means, d)], [x["ci"][1] - m for m, x in zip(means, d)]]
        ax.errorbar(means, ys, xerr=err, fmt="o", capsize=2, label=setting)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(levers)), levers, fontsize=7)
    ax.set_title(f"levers at r = {LEVER_RETENTION:g}: accuracy minus compactor's (paired)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    env = report["environment"]
    fig.suptitle(
        f"KV compression quality, {Path(report['model']).name}, {env['device']} — {env['date'][:10]}; "
        f"{summary['samples']} samples ({report['settings']['split']} split), macro means over "
        f"{len(summary['families'])} families, 95% bootstrap CIs",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(x: dict[str, Any]) -> str:
    return f"{x['mean']:.3f} [{x['ci'][0]:.2f}, {x['ci'][1]:.2f}]"


def cell_table(summary: dict[str, Any], setting: str, field: str = "mean") -> str:
    """Rows: variant; columns: retention; cells: macro accuracy (or `field`) with its CI."""
    cells = _cells(summary, setting)
    rs = sorted({r for by_r in cells.values() for r in by_r}, reverse=True)
    what = FIELD_NAMES.get(field, field)
    rows = [
        f"| {setting}: {what} | " + " | ".join(f"r = {r:g}" for r in rs) + " |",
        "| --- |" + " ---: |" * len(rs),
    ]
    for variant, by_r in cells.items():
        parts = []
        for r in rs:
            c = by_r.get(r)
            if c is None or (field != "mean" and field not in c):
                parts.append("")
            elif field == "mean":
                parts.append(_fmt(c))
            else:
                parts.append(_fmt(c[field]))
        rows.append(f"| {variant} | " + " | ".join(parts) + " |")
    return "\n".join(rows)


def family_table(summary: dict[str, Any], setting: str, variant: str) -> str:
    """Rows: family; columns: full cache, then retention; one variant."""
    by_r = _cells(summary, setting).get(variant, {})
    rs = sorted(by_r, reverse=True)
    rows = [f"| {setting} {variant}: family | full | " + " | ".join(f"r = {r:g}" for r in rs) + " |",
            "| --- | ---: |" + " ---: |" * len(rs)]  # fmt: skip
    for fam in summary["families"]:
        vals = [f"{by_r[r]['by_family'].get(fam, float('nan')):.2f}" for r in rs]
        rows.append(
            f"| {fam} | {summary['full']['by_family'].get(fam, float('nan')):.2f} | "
            + " | ".join(vals)
            + " |"
        )
    return "\n".join(rows)


def print_tables(report: dict[str, Any]) -> None:
    summary = report["summary"]
    full = summary["full"]
    print(f"full cache: {_fmt(full)} over {summary['samples']} samples")
    print("| family | " + " | ".join(full["by_family"]) + " |")
    print("| --- |" + " ---: |" * len(full["by_family"]))
    print("| full cache | " + " | ".join(f"{v:.2f}" for v in full["by_family"].values()) + " |\n")
    for setting in ("whole", "context"):
        if not _cells(summary, setting):
            continue
        print(cell_table(summary, setting), "\n")
        print(cell_table(summary, setting, "share_of_full"), "\n")
        print(cell_table(summary, setting, "minus_compactor"), "\n")
        print(cell_table(summary, setting, "first_token_agreement"), "\n")
        for variant in ("compactor", "kvpress.compactor"):
            if variant in _cells(summary, setting):
                print(family_table(summary, setting, variant), "\n")
