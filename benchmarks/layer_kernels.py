"""The eager model's elementwise layers against the one-pass Triton kernels the engine runs on CUDA
(`EngineConfig.layer_kernels`, engine/layers/layer_kernels.py), and what they do to a whole prefill
and to the compactor's share of it.

Eagerly, the 8K prefill of the Llama-3.1-8B shape spends ~70 ms of ~260 ms of GPU time in
elementwise kernels (RMSNorm in eight ops, RoPE through chunk/neg/cat, silu then mul) and issues ~40
launches per layer, so the host, not the GPU, sets its pace on slower machines
(docs/benchmarks/compression_overhead.md). The kernels are kernels/rms_norm.py, rotary.py and silu_mul.py.

    python3 benchmarks/layer_kernels.py --out docs/benchmarks --date 2026-12-07     # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def kernel_times(device: torch.device, tokens: int = 2048) -> dict[str, Any]:
    """Each kernel against its eager layer on a 2048-token chunk of the 8B shape (CUDA-graph replays)."""
    from attention_kernels import time_calls

    from kvferry.engine.layers.norm import RMSNorm
    from kvferry.engine.layers.rotary import RotaryEmbedding, apply_rotary
    from kvferry.kernels.rms_norm import rms_norm
    from kvferry.kernels.rotary import rotary
    from kvferry.kernels.silu_mul import silu_mul

    dt = torch.bfloat16
    x = torch.randn(tokens, 4096, device=device, dtype=dt)
    layer = RMSNorm(4096, 1e-5).to(device, dt)
    cos, sin = RotaryEmbedding(128, {"rope_theta": 500000.0}).to(device)(
        torch.arange(tokens, device=device), dt
    )
    q = torch.randn(tokens, 32, 128, device=device, dtype=dt)
    g, u = (torch.randn(tokens, 14336, device=device, dtype=dt) for _ in range(2))
    pairs = {
        "rms_norm": (lambda: layer(x), lambda: rms_norm(x, layer.weight, layer.eps)),
        "rotary_q": (lambda: apply_rotary(q, cos, sin), lambda: rotary(q, cos, sin)),
        "silu_mul": (lambda: F.silu(g) * u, lambda: silu_mul(g, u)),
    }
    out = {}
    with torch.no_grad():
        for name, (eager, fused) in pairs.items():
            out[name] = dict(eager_s=time_calls([eager], device), kernel_s=time_calls([fused], device))
            print(
                f"{name}: eager {out[name]['eager_s'] * 1e6:.1f} us, kernel {out[name]['kernel_s'] * 1e6:.1f} us"
            )
    return out


def prefills(
    contexts: list[int], reps: int, retention: float, model: str | None = None, kv_cache_bytes: int = 12 << 30
) -> dict[str, Any]:
    """Whole prefills (2048-token chunks), eager layers and kernels in turn, with and without the
    compactor: the wall times and the compactor's share under each."""
    from benchmarks.compression_overhead import CONFIG_8B, prefill_seconds
    from kvferry.engine import CompressionParams, EngineConfig, LLMEngine
    from kvferry.engine.layers.layer_kernels import use_layer_kernels

    engine = LLMEngine(
        EngineConfig(
            model=model or str(CONFIG_8B), load_format="dummy", dtype="bfloat16", prefill_chunk=2048,
            max_model_len=max(contexts) + 16, kv_cache_bytes=kv_cache_bytes,
        )
    )  # fmt: skip
    params = CompressionParams(method="compactor", retention=retention)
    modes = {  # name -> (layer kernels on, compression)
        "eager": (False, None),
        "eager_compactor": (False, params),
        "kernels": (True, None),
        "kernels_compactor": (True, params),
    }
    out: dict[str, Any] = {}
    for n in contexts:
        for on, comp in modes.values():  # warm-up: compilation, cuDNN plans, allocator
            use_layer_kernels(engine.model, on)
            prefill_seconds(engine, n, comp, seed=0)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(reps):  # the modes take turns, so a slow spell of the host lands on all alike
            for m, (on, comp) in modes.items():
                use_layer_kernels(engine.model, on)
                times[m].append(prefill_seconds(engine, n, comp, seed=1 + r)[0])
        row = {m: dict(median_s=statistics.median(t), all_s=t) for m, t in times.items()}
        row["compactor_share_eager"] = row["eager_compactor"]["median_s"] / row["eager"]["median_s"] - 1
        row["compactor_share_kernels"] = row["kernels_compactor"]["median_s"] / row["kernels"]["median_s"] - 1
        row["kernels_speedup"] = row["eager"]["median_s"] / row["kernels"]["median_s"]
        out[str(n)] = row
        print(f"ctx {n}: " + ", ".join(f"{m} {row[m]['median_s'] * 1e3:.1f} ms" for m in modes), flush=True)
    engine.pool.assert_no_leaks()
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.5))
    names = list(report["kernels"])
    y = range(len(names))
    a.barh([i + 0.2 for i in y], [report["kernels"][k]["eager_s"] * 1e6 for k in names], 0.4, label="eager")
    a.barh([i - 0.2 for i in y], [report["kernels"][k]["kernel_s"] * 1e6 for k in names], 0.4, label="kernel")
    a.set_yticks(list(y), names)
    a.set_xlabel("µs per call (2048-token chunk, 8B shape)")
    a.legend()
    ctxs = list(report["prefills"])
    modes = [m for m in report["prefills"][ctxs[0]] if isinstance(report["prefills"][ctxs[0]][m], dict)]
    width = 0.8 / len(modes)
    for j, m in enumerate(modes):
        medians = [report["prefills"][c][m]["median_s"] * 1e3 for c in ctxs]
        b.bar([i + width * j for i in range(len(ctxs))], medians, width, label=m)
    b.set_xticks([i + 0.4 - width / 2 for i in range(len(ctxs))], [f"{int(c) // 1024}K" for c in ctxs])
    b.set_ylabel("whole prefill, ms (median)")
    b.set_yscale("log")
    b.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"elementwise layers: eager vs Triton kernels, {report['device']}, {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for layer_kernels.{json,png}")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--retention", type=float, default=0.5)
    p.add_argument("--date", help="date to record (default: today, UTC)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("a GPU run (tests/test_layer_kernels.py checks the kernels on CPU)")
    import triton

    device = torch.device("cuda")
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(0), date=args.date or datetime.date.today().isoformat(),
        command="python3 " + " ".join(sys.argv), torch=torch.__version__, triton=triton.__version__,
    )  # fmt: skip
    report["kernels"] = kernel_times(device)
    report["prefills"] = prefills(args.contexts, args.reps, args.retention)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "layer_kernels.json"
        path.write_text(json.dumps(report, indent=1))
        plot(report, path.with_suffix(".png"))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
