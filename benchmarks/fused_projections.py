"""Fused projections (q/k/v as one matmul, gate/up as one) against one matmul per projection, in
one process on one GPU: decode steps under CUDA graphs (TPOT and the replayed graph alone) and a
whole prefill, the modes taking turns in each repetition. Two more modes: fusion at every input size
(prefill only; decode batches are under the cap anyway), and the engine's default with the residual
add as its own kernel instead of inside the RMSNorm kernel (RMSNorm.fuse_add).

    python3 benchmarks/fused_projections.py --out docs/benchmarks --reps 3    # on a GPU

Llama-3.1-8B's shape with random bf16 weights (`--config`), requests of `--context` random tokens.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from decode_step import add_decode_run_arguments, decode_run, report_header  # noqa: E402

from kvferry.engine.config import EngineConfig  # noqa: E402
from kvferry.engine.layers.fused_projections import FUSED_MAX_TOKENS, use_fused_projections  # noqa: E402
from kvferry.engine.layers.norm import RMSNorm  # noqa: E402
from kvferry.engine.llm_engine import LLMEngine  # noqa: E402
from kvferry.engine.loader import LoadedModel, load_model  # noqa: E402
from kvferry.engine.sampling_params import SamplingParams  # noqa: E402

# mode -> the most rows a fused matmul takes: 0 = never fused, the engine's default, or every size
MODES = {
    "separate": 0,
    "fused": FUSED_MAX_TOKENS,
    "fused_every_size": 1 << 30,
    "fused_add_separate": FUSED_MAX_TOKENS,
}
DECODED = ("separate", "fused", "fused_add_separate")  # fused_every_size decodes as "fused" does
# fused_add_separate: the engine's default but the residual add as its own kernel, not in the RMSNorm


def prefill_seconds(loaded: LoadedModel, args: argparse.Namespace, max_tokens: int) -> float:
    """Wall time of a whole `--prefill-len` prompt's prefill (the second of two: the first builds
    cuDNN plans and compiles kernels)."""
    engine = LLMEngine(
        EngineConfig(
            model=str(args.config),
            load_format="dummy",
            dtype="bfloat16",
            prefill_chunk=2048,
            max_model_len=args.prefill_len + 16,
            kv_cache_bytes=int(args.kv_cache_gib * (1 << 30)),
            max_num_seqs=1,
            enforce_eager=True,
        ),
        loaded=loaded,
    )
    use_fused_projections(engine.model, max_tokens > 0, max_tokens)
    vocab = loaded.config.vocab_size
    sp = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)
    took = 0.0
    for i in range(2):
        prompt = [(7 * j + i) % vocab for j in range(args.prefill_len)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        seq = engine.add_request(prompt, sp)
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        took = time.perf_counter() - t0
        assert seq.output_token_ids
    engine.pool.assert_no_leaks()
    return took


def plot(report: dict[str, Any], path: Path) -> None:
    """Speed-up of the fused projections over the separate ones, per case, with both times."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sep, fus = report["summary"]["separate"], report["summary"]["fused"]
    cases = [(f"decode B={b}\n(replayed step)", f"replay_ms_b{b}") for b in report["batch_sizes"]]
    cases += [(f"decode B={b}\n(TPOT)", f"tpot_ms_b{b}") for b in report["batch_sizes"]]
    cases.append((f"prefill {report['prefill_len'] // 1024}K\n(whole prompt)", "prefill_ms"))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ratios = [sep[key] / fus[key] for _, key in cases]
    bars = ax.bar(range(len(cases)), ratios, 0.6, color="tab:blue")
    for bar, (_, key) in zip(bars, cases):
        label = f"{sep[key]:.2f} → {fus[key]:.2f} ms"
        ax.annotate(
            label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
        )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(cases)), [c[0] for c in cases], fontsize=8)
    ax.set_ylim(min(0.95, min(ratios) - 0.02), max(ratios) + 0.04)
    ax.set_ylabel("speed-up (separate / fused)")
    ax.set_title(
        f"Fused q/k/v and gate/up projections (up to {report['fused_max_tokens']} rows), {report['model']} shape, {report['device']}, median of {report['reps']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_run_arguments(p, batch_sizes="1,32", steps=32)
    p.add_argument("--prefill-len", type=int, default=8192)
    p.add_argument("--reps", type=int, default=3, help="repetitions; the modes take turns in each")
    p.add_argument("--out", type=Path, help="folder for fused_projections.{json,png}")
    p.add_argument("--plot", type=Path, help="only draw the PNG next to an existing JSON")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    args = p.parse_args(argv)
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return 0
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    batches = [int(b) for b in args.batch_sizes.split(",")]
    loaded = load_model(str(args.config), torch.bfloat16, torch.device("cuda"), "dummy")
    runs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for mode, max_tokens in MODES.items():
            run_args = argparse.Namespace(
                **{**vars(args), "layer_kernels": True, "fused_projections": max_tokens > 0}
            )
            RMSNorm.fuse_add = mode != "fused_add_separate"
            for b in batches if mode in DECODED else []:
                r = decode_run(loaded, run_args, b, enforce_eager=False)
                r.pop("tokens")
                r.pop("logits")
                runs.append({"rep": rep, "projections": mode, **r})
                print(json.dumps(runs[-1]), flush=True)
            ms = 1e3 * prefill_seconds(loaded, args, max_tokens)
            runs.append({"rep": rep, "projections": mode, "mode": "prefill", "prefill_ms": ms})
            print(json.dumps(runs[-1]), flush=True)
            RMSNorm.fuse_add = True
    summary: dict[str, dict[str, float]] = {}
    for mode in MODES:
        mine = [r for r in runs if r["projections"] == mode]
        s = {"prefill_ms": statistics.median(r["prefill_ms"] for r in mine if r["mode"] == "prefill")}
        for b in batches if mode in DECODED else []:
            rows = [r for r in mine if r.get("batch") == b]
            s[f"tpot_ms_b{b}"] = statistics.median(r["tpot_ms"] for r in rows)
            s[f"replay_ms_b{b}"] = statistics.median(r["replay_ms"] for r in rows)
        summary[mode] = s
    for key in summary["fused"]:
        print(f"{key}: separate {summary['separate'][key]:.3f}, fused {summary['fused'][key]:.3f} "
              f"({summary['separate'][key] / summary['fused'][key]:.3f}x)")  # fmt: skip
    print(f"prefill_ms fused at every size: {summary['fused_every_size']['prefill_ms']:.3f}")
    for key, value in summary["fused_add_separate"].items():
        print(
            f"{key} with the residual add on its own: {value:.3f} (fused into the norm: {summary['fused'][key]:.3f})"
        )
    report = {
        **report_header(args),
        "prefill_len": args.prefill_len,
        "batch_sizes": batches,
        "reps": args.reps,
        "fused_max_tokens": FUSED_MAX_TOKENS,
        "prefill_ms_fused_every_size": summary["fused_every_size"]["prefill_ms"],
        "summary": summary,
        "runs": runs,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "fused_projections.json"
        path.write_text(json.dumps(report, indent=1))
        plot(report, path.with_suffix(".png"))
        print(f"wrote {path} and its PNG")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
