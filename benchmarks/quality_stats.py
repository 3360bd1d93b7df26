"""Statistics of a quality run: macro means over task families with 95% bootstrap confidence
intervals, shares of the full cache, paired differences between cells on the same samples, and
per-family / per-length / per-depth breakdowns.

A cell is "<setting>|<variant>@<retention>" (kvpress's merged in as "context|kvpress.<press>@<r>").
Every mean is a macro mean: the mean over families of each family's mean, so a family counts the
same whatever its number of samples. The bootstrap resamples samples within each family
(stratified; scipy.stats.bootstrap with one sample per family), and a paired statistic resamples
the same samples for both sides.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
from scipy.stats import bootstrap

RESAMPLES = 2000
BASELINE = "compactor"  # paired differences are taken against this variant, per setting and retention


def parse_cell(key: str) -> tuple[str, str, float]:
    """'whole|compactor@0.5' -> ('whole', 'compactor', 0.5)."""
    setting, _, rest = key.partition("|")
    variant, _, r = rest.rpartition("@")
    return setting, variant, float(r)


def _ci(groups: list[np.ndarray], statistic: Any) -> list[float]:
    if sum(g.shape[-1] for g in groups) < 2 or min(g.shape[-1] for g in groups) < 1:
        return [float("nan"), float("nan")]
    if any(g.shape[-1] < 2 for g in groups):  # a family of one sample cannot be resampled on its own
        return [float("nan"), float("nan")]
    res = bootstrap(
        groups, statistic, n_resamples=RESAMPLES, method="percentile", vectorized=True, axis=-1,
        random_state=np.random.default_rng(0),
    )  # fmt: skip
    return [float(res.confidence_interval.low), float(res.confidence_interval.high)]


def macro(groups: list[np.ndarray]) -> dict[str, Any]:
    """Mean over groups of each group's mean, with its 95% CI."""

    def stat(*xs: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean([x.mean(axis=axis) for x in xs], axis=0)

    return {"mean": float(stat(*groups)), "ci": _ci(groups, stat)}


def macro_ratio(groups: list[np.ndarray]) -> dict[str, Any]:
    """groups of [2, n_f] (numerator row, denominator row, paired): ratio of the macro means."""

    def stat(*xs: np.ndarray, axis: int = -1) -> np.ndarray:
        num = np.mean([x[0].mean(axis=axis) for x in xs], axis=0)
        den = np.mean([x[1].mean(axis=axis) for x in xs], axis=0)
        return num / np.where(den == 0, np.nan, den)

    return {"mean": float(stat(*groups)), "ci": _ci(groups, stat)}


def _values(samples: list[dict[str, Any]], key: str, field: str = "score") -> list[float | None]:
    if key == "full":
        return [s["full"]["score"] for s in samples]
    return [s["cells"][key][field] if key in s["cells"] else None for s in samples]


def _by_family(samples: list[dict[str, Any]], *columns: list[float | None]) -> list[np.ndarray]:
    """[k, n_f] arrays per family of the samples where every column has a value."""
    rows: dict[str, list[list[float]]] = defaultdict(list)
    for s, *vals in zip(samples, *columns):
        if all(v is not None for v in vals):
            rows[s["family"]].append([float(v) for v in vals])  # type: ignore[arg-type]
    return [np.array(v).T for _, v in sorted(rows.items())]


def _breakdown(samples: list[dict[str, Any]], key: str, by: str) -> dict[str, float]:
    acc: dict[str, list[float]] = defaultdict(list)
    for s, v in zip(samples, _values(samples, key)):
        if v is not None:
            acc[str(s[by])].append(v)
    return {k: float(np.mean(v)) for k, v in sorted(acc.items())}


def summarize(samples: list[dict[str, Any]]) -> dict[str, Any]:
    keys = sorted(
        {k for s in samples for k in s["cells"]},
        key=lambda k: (parse_cell(k)[0], parse_cell(k)[1], -parse_cell(k)[2]),
    )
    full = _values(samples, "full")
    out: dict[str, Any] = {
        "samples": len(samples),
        "families": sorted({s["family"] for s in samples}),
        "lengths": sorted({s["target_tokens"] for s in samples}),
        "full": {
            **macro([g[0] for g in _by_family(samples, full)]),
            "by_family": _breakdown(samples, "full", "family"),
            "by_length": _breakdown(samples, "full", "target_tokens"),
        },
        "cells": {},
    }
    for key in keys:
        setting, variant, r = parse_cell(key)
        vals = _values(samples, key)
        groups = _by_family(samples, vals)
        cell: dict[str, Any] = {
            "setting": setting,
            "variant": variant,
            "retention": r,
            "samples": sum(v is not None for v in vals),
            **macro([g[0] for g in groups]),
            "share_of_full": macro_ratio(_by_family(samples, vals, full)),
            "first_token_agreement": macro(
                [g[0] for g in _by_family(samples, _values(samples, key, "first_token_agrees"))]
            ),
            "kept": float(np.mean([v for v in _values(samples, key, "kept") if v is not None])),
            "by_family": _breakdown(samples, key, "family"),
            "by_length": _breakdown(samples, key, "target_tokens"),
            "by_depth": _breakdown([s for s in samples if s["depth_bucket"]], key, "depth_bucket"),
        }
        base = f"{setting}|{BASELINE}@{r}"
        if variant != BASELINE and base in keys:
            diffs = [None if a is None or b is None else a - b for a, b in zip(vals, _values(samples, base))]
            cell["minus_compactor"] = macro([g[0] for g in _by_family(samples, diffs)])
        out["cells"][key] = cell
    return out


def merge_kvpress(report: dict[str, Any], kv: dict[str, Any]) -> None:
    """Add kvpress's cells (benchmarks/quality_kvpress.py: the context setting, the same token ids)
    to the samples they were run on, as 'context|kvpress.<press>@<r>'. Several kvpress runs (e.g. one on
    a GPU, one on the CPU for the other samples) may be merged one after the other; each is listed."""
    by_id = {(s["family"], s["target_tokens"], s["seed"]): s for s in report["samples"]}
    merged = differ = 0
    for k in kv["samples"]:
        s = by_id.get((k["family"], k["target_tokens"], k["seed"]))
        if s is None:
            continue
        merged += 1
        # kvferry stops decoding once the answer is complete: compare the common prefix
        a, b = k["full"]["text"], s["full"]["text"]
        differ += not (a.startswith(b) or b.startswith(a))
        for key, cell in k["cells"].items():
            s["cells"][f"context|kvpress.{key}"] = cell
        s.setdefault("kvpress_full", k["full"])
    run = {
        "environment": kv["environment"],
        "settings": kv["settings"],
        "samples_merged": merged,
        "full_cache_answers_differ": differ,
    }
    runs = report.get("kvpress", {}).get("runs")
    if runs is None:  # a report merged before runs were listed holds one run's fields at the top
        old = {k: v for k, v in report.get("kvpress", {}).items() if k != "status"}
        runs = [old] if old else []
    runs = [r for r in runs if r.get("environment") != run["environment"]] + [run]
    report["kvpress"] = {"status": "merged", "runs": runs}


def paired_difference(samples: list[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """Cell a minus cell b on the samples that have both: the macro mean over families, its 95% CI,
    and the number of samples."""
    diffs = [
        None if x is None or y is None else x - y for x, y in zip(_values(samples, a), _values(samples, b))
    ]
    return {**macro([g[0] for g in _by_family(samples, diffs)]), "samples": sum(d is not None for d in diffs)}
