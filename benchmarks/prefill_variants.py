"""Prefill-attention variants on one GPU, in one process: tile configs x loop variants, against SDPA.

Each variant is a set of `kernels.prefill_attention` keyword arguments. Every variant is timed on the
same inputs as `benchmarks/attention_kernels.py` (Llama-3.1-8B attention: 32/8 heads, head_dim 128, bf16,
scattered 16-token pages): a whole causal 8K sequence and the last 2048-token chunk over a 32K
context; the fastest few also on a whole 32K sequence. Its output is checked against the default
kernel's on the same inputs, and SDPA (every backend) is timed in the same run. A variant that fails
to compile or launch is recorded with its error and skipped.

    python3 benchmarks/prefill_variants.py --out docs/benchmarks          # on a GPU
    python3 benchmarks/prefill_variants.py --plot docs/benchmarks/prefill_variants.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from attention_kernels import (  # noqa: E402
    D,
    H,
    copy_bandwidth,
    matmul_rate,
    prefill_case,
    time_calls,
    time_sdpa,
)

# Measured 2026-12-06 on an H100 and dropped: num_stages 2, block_n 128 (spills), 64-row tiles, and a
# loop issuing the next tile's Q K^T before this tile's softmax (2.3x slower: Triton waits on it).
TILES = [  # (block_m, block_n, num_warps, num_stages)
    (128, 64, 4, 3),
    (128, 64, 4, 4),
    (256, 64, 8, 3),
    (256, 64, 8, 4),
    (256, 32, 8, 3),
]
LOOPS = {"plain": {}, "fold": {"fold_scale": True}}


def variants() -> dict[str, dict]:
    out = {}
    for bm, bn, w, s in TILES:
        for loop, kw in LOOPS.items():
            out[f"m{bm}n{bn}w{w}s{s}_{loop}"] = dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s, **kw)
    out["dense"] = {"dense": True}  # kernels/prefill_dense.py: gathered prefix + cuDNN + merge
    return out


def run_variant(kernels, case: dict, kw: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    return kernels.prefill_attention(
        case["q"],
        case["pool"],
        case["table"],
        case["cu"],
        case["starts"],
        case["chunk"],
        D**-0.5,
        out=out,
        **kw,
    )


def run_dense(case: dict, out: torch.Tensor | None = None) -> torch.Tensor:
    from kvferry.kernels.prefill_dense import prefill_attention_dense

    return prefill_attention_dense(
        case["q"],
        case["k_new"],
        case["v_new"],
        case["pool"],
        case["table"][0],
        case["start"],
        D**-0.5,
        out=out,
    )


def time_variant(kernels, case: dict, kw: dict, device: torch.device) -> float:
    out = torch.empty_like(case["q"])
    if kw.get("dense"):
        return time_calls([lambda: run_dense(case, out)], device, trials=5)
    return time_calls([lambda: run_variant(kernels, case, kw, out)], device, trials=5)


def dense_first_calls(device: torch.device) -> dict:
    """Eager seconds of the dense path's first and second call at chunk shapes it has not seen
    (cuDNN builds an execution plan per shape): what a new prompt length costs."""
    out = {}
    for context, chunk in [(4096 + 1999, 1999), (8192 + 777, 777)]:
        case = prefill_case(context, chunk, 16, device)
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t = time.perf_counter()
            run_dense(case)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[f"ctx{context}_chunk{chunk}"] = dict(first_s=times[0], second_s=times[1])
        print(
            f"dense first calls ctx {context} chunk {chunk}: {times[0] * 1e3:.1f} / {times[1] * 1e3:.1f} ms"
        )
    return out


def sdpa_row(case: dict, device: torch.device) -> dict:
    t = case["chunk"]
    qd = case["q"].transpose(0, 1)[None]  # [1, Hq, T, D]
    kd = torch.randn(1, H, t, D, device=device, dtype=qd.dtype)
    vd = torch.randn(1, H, t, D, device=device, dtype=qd.dtype)
    sdpa = time_sdpa(
        lambda: [lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)], device
    )
    best = min(v for v in sdpa.values() if v == v)
    return dict(sdpa_s=sdpa, sdpa_best_s=best, sdpa_TFLOPs=case["flops"] / best / 1e12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--plot", type=Path, help="redraw the PNG of an existing JSON and exit")
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    p.add_argument("--top", type=int, default=4, help="variants also timed on a whole 32K sequence")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument(
        "--engine", action="store_true", help="also time whole prefills of an 8B-shape dummy model"
    )
    p.add_argument("--engine-only", action="store_true", help="only the engine prefills")
    p.add_argument("--reps", type=int, default=5, help="engine prefills per context and backend")
    args = p.parse_args()
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return
    assert torch.cuda.is_available(), "a GPU run (the CPU interpreter would take hours at these shapes)"
    from kvferry import kernels

    device = torch.device("cuda")
    torch.manual_seed(0)
    report: dict = dict(
        command=" ".join(["python3", *sys.argv]),
        gpu=torch.cuda.get_device_name(),
        date=args.date,
        measured_at_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        page_size=args.page_size,
        copy_GBps=copy_bandwidth(device) / 1e9,
        matmul_TFLOPs=matmul_rate(device, 8192) / 1e12,
    )
    print(f"copy {report['copy_GBps']:.0f} GB/s, matmul {report['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    if args.engine or args.engine_only:
        report["engine_prefill"] = engine_prefill(args.reps)
    if args.engine_only:
        write(report, args.out)
        return
    cases = {
        "whole_8k": prefill_case(8192, 8192, args.page_size, device),
        "chunk2k_of_32k": prefill_case(32768, 2048, args.page_size, device),
    }
    report["sdpa_whole_8k"] = sdpa_row(cases["whole_8k"], device)
    print(f"sdpa whole 8K: {report['sdpa_whole_8k']['sdpa_TFLOPs']:.0f} TFLOP/s", flush=True)
    want = {name: run_variant(kernels, c, {}).float() for name, c in cases.items()}  # the default kernel
    rows = []
    report["dense_first_calls"] = dense_first_calls(device)
    for name, kw in variants().items():
        if args.only and name not in args.only:
            continue
        row: dict = dict(name=name, kwargs=kw)
        try:
            for cname, c in cases.items():
                if kw.get("dense"):  # its own K/V inputs: compare with the default kernel on them
                    ref_out = kernels.prefill_attention(
                        c["q"], c["pool"], c["table"], c["cu"], c["starts"], c["chunk"], D**-0.5
                    ).float()
                    got = run_dense(c).float()
                    row[f"{cname}_max_err_vs_triton"] = float(
                        (got - ref_out).abs().max() / ref_out.abs().max()
                    )
                    s = time_variant(kernels, c, kw, device)
                    row[f"{cname}_s"] = s
                    row[f"{cname}_TFLOPs"] = c["flops"] / s / 1e12
                    continue
                got = run_variant(kernels, c, kw).float()
                row[f"{cname}_max_err"] = float((got - want[cname]).abs().max() / want[cname].abs().max())
                s = time_variant(kernels, c, kw, device)
                row[f"{cname}_s"] = s
                row[f"{cname}_TFLOPs"] = c["flops"] / s / 1e12
            row["vs_sdpa_whole_8k"] = report["sdpa_whole_8k"]["sdpa_best_s"] / row["whole_8k_s"]
            print(
                f"{name:28s} 8K {row['whole_8k_TFLOPs']:5.0f} TFLOP/s (x{row['vs_sdpa_whole_8k']:.3f} SDPA)"
                f" | chunk {row['chunk2k_of_32k_TFLOPs']:5.0f}"
                f" | err {row.get('whole_8k_max_err', row.get('whole_8k_max_err_vs_triton')):.1e}",
                flush=True,
            )
        except Exception as e:  # noqa: BLE001  (compile failures, out of resources)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"{name:28s} failed: {row['error'][:150]}", flush=True)
            traceback.print_exc(limit=1)
        rows.append(row)
        torch.cuda.empty_cache()
    report["variants"] = rows
    for c in cases.values():
        c.clear()
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r["whole_8k_s"])
    big = prefill_case(32768, 32768, args.page_size, device)
    report["sdpa_whole_32k"] = sdpa_row(big, device)
    report["whole_32k"] = []
    for r in ok[: args.top] + [r for r in ok[args.top :] if r["name"] in ("m128n64w4s3_plain", "dense")]:
        s = time_variant(kernels, big, r["kwargs"], device)
        report["whole_32k"].append(
            dict(
                name=r["name"],
                s=s,
                TFLOPs=big["flops"] / s / 1e12,
                vs_sdpa=report["sdpa_whole_32k"]["sdpa_best_s"] / s,
            )
        )
        print(f"32K {r['name']:28s} {report['whole_32k'][-1]['TFLOPs']:.0f} TFLOP/s", flush=True)
    write(report, args.out)


def write(report: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "prefill_variants.json"
    path.write_text(json.dumps(report, indent=1))
    if "variants" in report:
        plot(report, path.with_suffix(".png"))
    print(f"wrote {path}")


def engine_prefill(reps: int, contexts: tuple[int, ...] = (8192, 32768)) -> dict:
    """Wall seconds of whole prefills (2048-token chunks) of the Llama-3.1-8B shape with dummy weights,
    prefill attention through the Triton kernel against the engine's default (dense where it applies)."""
    from benchmarks.compression_overhead import CONFIG_8B, prefill_seconds
    from kvferry.engine import EngineConfig, LLMEngine

    engine = LLMEngine(
        EngineConfig(
            model=str(CONFIG_8B),
            load_format="dummy",
            dtype="bfloat16",
            prefill_chunk=2048,
            max_model_len=max(contexts) + 16,
            kv_cache_bytes=12 << 30,
        )
    )
    out: dict = {}
    for n in contexts:
        for backend, dense in (("triton", False), ("auto", True)):
            engine.runner.dense_prefill = dense
            first, _ = prefill_seconds(engine, n, None, seed=0)  # compiles / builds cuDNN plans
            times = [prefill_seconds(engine, n, None, seed=1 + r)[0] for r in range(reps)]
            out[f"ctx{n}_{backend}"] = dict(first_s=first, median_s=statistics.median(times), all_s=times)
            print(
                f"engine prefill {n} {backend}: first {first:.3f} s, median {statistics.median(times):.3f} s"
            )
        out[f"ctx{n}_speedup"] = out[f"ctx{n}_triton"]["median_s"] / out[f"ctx{n}_auto"]["median_s"]
    engine.pool.assert_no_leaks()
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in report["variants"] if "error" not in r), key=lambda r: -r["whole_8k_TFLOPs"])
    fig, ax = plt.subplots(figsize=(10, 0.3 * len(rows) + 2))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [r["whole_8k_TFLOPs"] for r in rows], 0.4, label="whole causal 8K")
    ax.barh([i - 0.2 for i in y], [r["chunk2k_of_32k_TFLOPs"] for r in rows], 0.4, label="2K chunk over 32K")
    sdpa = report["sdpa_whole_8k"]["sdpa_TFLOPs"]
    ax.axvline(sdpa, color="k", ls="--", label=f"SDPA causal 8K ({sdpa:.0f})")
    ax.axvline(0.9 * sdpa, color="r", ls=":", label="target 0.9x SDPA")
    ax.set_yticks(list(y), [r["name"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("TFLOP/s (causal work counted once)")
    ax.set_title(f"prefill attention variants, {report['gpu']}, {report['date']}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
