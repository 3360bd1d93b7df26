"""Compression overhead: compactor scoring + selection + packing as a share of prefill wall time.

Llama-3.1-8B shape (benchmarks/configs/llama-3.1-8b, load_format="dummy": random weights, bf16) on
one GPU, one prompt of random token ids at each context, retention 0.5, chunked prefill.

retention="auto" adds the calibration signal (the context's NLL: the lm_head on one prompt position in
16, engine/compression/calibration.py) and one host read at the end of prefill. Its mode, `auto`, runs
the default compactor with the calibration pinned to the same retention, so its difference from
`fused_side_stream` is the signal's cost alone (`signal_share`); the component `calibration_signal`
times the signal's lm_head work over the whole prompt by itself.

End to end: the wall time of the whole prefill (every chunk, then selection and in-place
compaction) with compression, against the same prefill without it, in three modes: the fused
kernels on a side stream (the default), the fused kernels inline on the prefill's stream, and the
PyTorch scorers (the reference) with the Triton pack. Components, timed alone with CUDA events on
inputs of the same shapes: the two scoring kernels per launch (and their PyTorch references),
selection (z-scores, top-k, kept positions), the pack kernel (and the PyTorch pack), and the page
scatter a receiver runs (and index_copy_), each with its bytes or FLOPs and achieved rate; the
device copy bandwidth is measured in the same run.

    python3 benchmarks/compression_overhead.py --out docs/benchmarks     # on a GPU
    python3 benchmarks/compression_overhead.py --model bundled --load-format auto --contexts 2048 \
        --prefill-chunk 512 --reps 5 --no-reference --out /tmp/cpu      # CPU: SmolLM2, real weights
    python3 benchmarks/compression_overhead.py --profile --contexts 8192 --out /tmp/prof  # where time goes
    python3 benchmarks/compression_overhead.py --plot docs/benchmarks/compression_overhead.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

if not torch.cuda.is_available():  # a dry run of the script: kernels in Triton's CPU interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

CONFIG_8B = ROOT / "benchmarks" / "configs" / "llama-3.1-8b"
TARGET_SHARE = 0.03
SIGNAL_TARGET_SHARE = 0.01  # retention="auto"'s calibration signal, on a GPU (issue 23)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def clock() -> float:
    """Wall time on a GPU; on CPU the process's CPU time, which a busy shared machine leaves intact
    (its wall clock measures the neighbours: one 2K prefill took 30 to 95 s on a 2-core runner)."""
    return time.perf_counter() if torch.cuda.is_available() else time.process_time()


def time_gpu(fn: Callable[[], object], reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of one call (CUDA events around each call; wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = clock()
            fn()
            times.append(clock() - t)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_gpu(lambda: dst.copy_(src))


# ---- end to end --------------------------------------------------------------------------------------
def prefill_seconds(engine: Any, n: int, compression: Any, seed: int) -> tuple[float, Any]:
    """Time (clock()) of one whole prefill of n random tokens (the request stops after its first token)."""
    from kvferry.engine import SamplingParams

    vocab = engine.loaded.config.vocab_size
    edge = min(1000, vocab // 4)  # away from special tokens (small vocabularies: CPU smoke runs)
    prompt = torch.randint(edge, vocab - edge, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    sp = SamplingParams(temperature=0.0, max_new_tokens=1, ignore_eos=True)
    sync()
    t = clock()
    seq = engine.add_request(prompt, sp, compression)
    while engine.has_unfinished():
        engine.step()
    sync()
    return clock() - t, seq.stats


def end_to_end(
    engine: Any, n: int, retention: float, reps: int, variants: list[str], reference: bool = True
) -> dict[str, Any]:
    """variants: extra side-stream modes "METHOD:SPLIT" (the compactor's leverage method and attention-
    mass query split), measured in turn with the others."""
    from kvferry.engine import CompressionParams
    from kvferry.engine.compression.calibration import Calibration, ModelCalibration
    from kvferry.engine.compression.compactor import CompactorScorer

    params = CompressionParams(method="compactor", retention=retention)
    defaults = (CompactorScorer.leverage_method, CompactorScorer.mass_query_split, 0)
    group_bytes = CompactorScorer.group_bytes
    modes = {
        "none": (None, True, True, defaults),
        "fused_side_stream": (params, True, True, defaults),
        "auto": (CompressionParams(method="compactor", retention="auto"), True, True, defaults),
        "fused_inline": (params, True, False, defaults),
    }
    # auto chooses `retention` whatever the context: the same selection and packing as fused_side_stream
    pinned = Calibration(0.0, 0.0, retention, retention, source="compression_overhead: pinned")
    shipped, engine.calibration = engine.calibration, ModelCalibration({"compactor": pinned})
    for v in variants:
        method, split, *per_launch = v.split(":")
        group = int(per_launch[0]) if per_launch else 0
        modes[f"fused_side_stream[{v}]"] = (params, True, True, (method or None, int(split), group))
    if reference:
        modes["reference_scoring"] = (params, False, False, defaults)
    out: dict[str, Any] = {name: {"all_seconds": []} for name in modes}
    prefill_seconds(engine, n, None, seed=0)  # warm-up (kernel compilation, allocator)
    prefill_seconds(engine, n, params, seed=0)
    # The modes take turns within each repetition, so a slow spell of the host (the prefill loop is
    # Python: its wall time varied 275-346 ms at 8K in one run) lands on every mode alike.
    for r in range(reps):
        for name, (comp, kernels_on, side, (method, split, group)) in modes.items():
            CompactorScorer.use_kernels, CompactorScorer.use_side_stream = kernels_on, side
            CompactorScorer.leverage_method, CompactorScorer.mass_query_split = method, split
            CompactorScorer.group_bytes = 1 if group == 1 else group_bytes  # 1: a launch per layer
            t, stats = prefill_seconds(engine, n, comp, seed=1 + r)
            out[name]["all_seconds"].append(t)
            if comp is not None:
                out[name]["retention"] = stats.retention
                out[name].setdefault("observer_host_all_seconds", []).append(stats.scoring_seconds)
    for name, row in out.items():
        row["seconds"] = statistics.median(row["all_seconds"])
        row["min_seconds"] = min(row["all_seconds"])
        if "observer_host_all_seconds" in row:
            row["observer_host_seconds"] = statistics.median(row["observer_host_all_seconds"])
        print(
            f"  ctx {n} {name}: median {row['seconds'] * 1e3:.1f} ms, min {row['min_seconds'] * 1e3:.1f} ms"
        )
    CompactorScorer.use_kernels, CompactorScorer.use_side_stream = True, True
    CompactorScorer.leverage_method, CompactorScorer.mass_query_split, _ = defaults
    CompactorScorer.group_bytes = group_bytes
    engine.calibration = shipped
    base = out["none"]["seconds"]
    for name in modes:
        row = out[name]
        row["overhead_share"] = row["seconds"] / base - 1.0
        row["overhead_share_of_min"] = row["min_seconds"] / out["none"]["min_seconds"] - 1.0
        # each repetition against the uncompressed prefill of the same repetition: a slow spell of the
        # machine shifts both, so the ratio's median is steadier than the ratio of medians
        ratios = [a / b - 1.0 for a, b in zip(row["all_seconds"], out["none"]["all_seconds"])]
        row["paired_share"] = statistics.median(ratios)
        row["paired_share_quartiles"] = (
            statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else [ratios[0], ratios[0]]
        )
        if name != "none":
            q1, q3 = row["paired_share_quartiles"]
            print(
                f"  ctx {n} {name}: share {row['overhead_share']:+.2%} (median of ratios "
                f"{row['paired_share']:+.2%}, quartiles {q1:+.2%} .. {q3:+.2%})"
            )
    # the calibration signal: auto against the same compression without it, paired per repetition
    signal = [
        (a - b) / c
        for a, b, c in zip(
            out["auto"]["all_seconds"], out["fused_side_stream"]["all_seconds"], out["none"]["all_seconds"]
        )
    ]
    out["auto"]["signal_share"] = statistics.median(signal)
    out["auto"]["signal_share_all"] = signal
    print(
        f"  ctx {n} calibration signal (auto - fused_side_stream): {out['auto']['signal_share']:+.2%} of prefill"
    )
    engine.pool.assert_no_leaks()
    return out


# ---- profile -----------------------------------------------------------------------------------------
def merged_busy(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) spans."""
    total, reach = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def profile_prefill(engine: Any, n: int, compression: Any, trace: Path | None) -> dict[str, Any]:
    """One prefill under torch.profiler: GPU busy time per stream, the main stream's idle time (the
    host not keeping up, or waits on the side stream), and the kernels that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _ = prefill_seconds(engine, n, compression, seed=99)
    path = trace or Path("/tmp/compression_overhead_trace.json")
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    kernels_ = [e for e in events if e.get("cat") == "kernel"]
    by_stream: dict[int, list[tuple[float, float]]] = {}
    by_name: dict[str, float] = {}
    for e in kernels_:
        by_stream.setdefault(e["args"]["stream"], []).append((e["ts"], e["ts"] + e["dur"]))
        by_name[e["name"][:80]] = by_name.get(e["name"][:80], 0.0) + e["dur"]
    main = max(by_stream, key=lambda s: len(by_stream[s]))
    first = min(a for spans in by_stream.values() for a, _ in spans)
    last = max(b for spans in by_stream.values() for _, b in spans)
    busy = {str(s): merged_busy(spans) / 1e3 for s, spans in by_stream.items()}
    out = dict(
        wall_ms=wall * 1e3,
        gpu_span_ms=(last - first) / 1e3,
        gpu_busy_ms=merged_busy([x for spans in by_stream.values() for x in spans]) / 1e3,
        main_stream=main,
        busy_ms_by_stream=busy,
        main_idle_ms=(last - first) / 1e3 - busy[str(main)],
        kernels_by_stream={str(s): len(v) for s, v in by_stream.items()},
        top_kernels_ms={k: v / 1e3 for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:25]},
    )
    out["host_ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    if trace is None:
        path.unlink()
    return out


def host_profile(engine: Any, n: int, compression: Any, rows: int = 30) -> str:
    """cProfile of one prefill: where the host's time goes (by own time, then by cumulative time)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    prefill_seconds(engine, n, compression, seed=98)
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return "\n".join(line for line in text.getvalue().splitlines() if line.strip())


def profile_modes(engine: Any, n: int, retention: float, out_dir: Path | None) -> dict[str, Any]:
    from kvferry.engine import CompressionParams

    params = CompressionParams(method="compactor", retention=retention)
    prefill_seconds(engine, n, None, seed=0)  # warm-up
    prefill_seconds(engine, n, params, seed=0)
    result = {}
    for name, comp in (("none", None), ("compactor", params)):
        trace = out_dir / f"trace_{n}_{name}.json" if out_dir else None
        result[name] = profile_prefill(engine, n, comp, trace)
        r = result[name]
        print(
            f"  ctx {n} {name}: wall {r['wall_ms']:.1f} ms, GPU span {r['gpu_span_ms']:.1f}, busy "
            f"{r['gpu_busy_ms']:.1f}, main idle {r['main_idle_ms']:.1f}, by stream {r['busy_ms_by_stream']}",
            flush=True,
        )
    for name in result:
        print(f"  host ops, {name}:\n" + result[name]["host_ops"], flush=True)
    for name, comp in (("none", None), ("compactor", params)):
        result[name]["host_profile"] = host_profile(engine, n, comp)
        print(f"  host profile, {name}:\n" + result[name]["host_profile"], flush=True)
    for k in result["compactor"]["top_kernels_ms"]:
        a, b = result["none"]["top_kernels_ms"].get(k, 0.0), result["compactor"]["top_kernels_ms"][k]
        print(f"    {b:8.2f} ms (none {a:8.2f})  {k}")
    return result


# ---- components --------------------------------------------------------------------------------------
def calibration_signal(engine: Any, n: int, chunk: int) -> dict[str, Any]:
    """The retention="auto" signal alone: ContextNLL over an n-token prompt's chunks (random hidden
    states through the model's own lm_head), and the one host read at the end."""
    from kvferry.engine.compression.calibration import ContextNLL

    device = engine.device
    dtype = engine.dtype
    hidden = torch.randn(n, engine.loaded.config.hidden_size, device=device).to(dtype)
    vocab = engine.loaded.config.vocab_size
    prompt = torch.randint(0, vocab, (n,)).tolist()

    def run() -> float | None:
        with torch.inference_mode():
            signal = ContextNLL(prompt, device)
            for start in range(0, n, chunk):
                signal.observe(engine.model.logits, hidden[start : start + chunk], start)
            return signal.mean()

    t = time_gpu(run, reps=5)
    probe = ContextNLL(prompt, device)
    flops = 2 * probe.count * engine.loaded.config.hidden_size * vocab
    return dict(
        total_seconds=t, samples=probe.count, stride=probe.stride, flops=flops, tflops=flops / t / 1e12
    )


def components(n: int, chunk: int, layers: int, heads: int, group: int, dim: int, retention: float) -> dict:
    """Each piece timed alone at the model's shape; totals scale a launch to the whole prefill."""
    from kvferry import kernels
    from kvferry.engine import CompressionParams
    from kvferry.engine.compression.attention_scores import block_attention_mass
    from kvferry.engine.compression.blocks import block_bounds
    from kvferry.engine.compression.compactor import (
        CompactorScorer,
        layers_per_leverage_launch,
        standardize_per_layer,
    )
    from kvferry.engine.compression.leverage import gaussian_sketch, sketched_leverage
    from kvferry.engine.compression.select import compact_in_place, pack_kept, select_tokens
    from kvferry.engine.kv_pool import KVPool
    from kvferry.engine.page_table import SequenceKV

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    params = CompressionParams(retention=retention)
    launches = layers * -(-n // chunk)  # one attention-mass launch per layer per chunk
    span = min(chunk, n)
    # the leverage of a chunk's keys is launched once per group of layers (compactor.py)
    glayers = layers_per_leverage_launch(
        layers, span, heads, dim, torch.empty(0, dtype=dtype).element_size(), params.sketch_size,
        CompactorScorer.group_bytes,
    )  # fmt: skip
    leverage_launches = -(-layers // glayers) * -(-n // chunk)
    res: dict[str, Any] = dict(
        launches=launches,
        span_tokens=span,
        leverage_group_layers=glayers,
        leverage_launches=leverage_launches,
    )

    # leverage: a chunk-long span of pre-RoPE keys of a group of layers (blocks of leverage_block)
    gheads = glayers * heads
    keys = (torch.randn(span, gheads, dim, device=device) + 3 * torch.randn(dim, device=device)).to(dtype)
    sketch = gaussian_sketch(dim, params.sketch_size, device)
    padded = kernels.padded_sketch(sketch)
    lb = block_bounds(span, params.leverage_block)
    lbounds = torch.tensor(lb, dtype=torch.int32, device=device)
    out = torch.empty(gheads, span, device=device)
    t = time_gpu(lambda: kernels.leverage_scores(keys, lbounds, padded, params.sketch_size, out))

    def lev_ref() -> None:
        for a, b in zip(lb, lb[1:]):
            o = sketched_leverage(keys[a:b].transpose(0, 1), sketch)
            out[:, a:b] = o / o.mean(dim=1, keepdim=True)

    kp = padded.shape[1]
    flops = span * gheads * (2 * 2 * dim * kp + 2 * 2 * kp * kp)  # sketch twice, Gram, x G⁻¹
    res["leverage"] = dict(
        launch_seconds=t, total_seconds=t * leverage_launches, flops_per_launch=flops, tflops=flops / t / 1e12,
        bytes_per_launch=3 * keys.numel() * keys.element_size(),
        reference_launch_seconds=time_gpu(lev_ref, reps=3),
    )  # fmt: skip

    # attention mass: the same span of queries and post-RoPE keys (blocks of attention_block)
    q = torch.randn(span, heads * group, dim, device=device).to(dtype)
    k = torch.randn(span, heads, dim, device=device).to(dtype)
    mb = block_bounds(span, params.attention_block)
    out = torch.empty(heads, span, device=device)
    mbounds = torch.tensor(mb, dtype=torch.int32, device=device)
    max_block = max(b - a for a, b in zip(mb, mb[1:]))
    scale = dim**-0.5
    split = CompactorScorer.mass_query_split
    t = time_gpu(lambda: kernels.attention_mass(q, k, mbounds, max_block, scale, out, query_split=split))

    def mass_ref() -> None:
        for a, b in zip(mb, mb[1:]):
            out[:, a:b] = block_attention_mass(q[a:b], k[a:b], scale)

    flops = sum(2 * (b - a) ** 2 * dim * heads * group for a, b in zip(mb, mb[1:]))  # Q Kᵀ
    res["attention_mass"] = dict(
        launch_seconds=t, total_seconds=t * launches, flops_per_launch=flops, tflops=flops / t / 1e12,
        bytes_per_launch=(q.numel() + k.numel()) * q.element_size(),
        reference_launch_seconds=time_gpu(mass_ref, reps=3),
    )  # fmt: skip

    # selection: z-scores of both statistics, top-k per head, kept positions ascending
    mass_all = torch.rand(layers, heads, n, device=device)
    lev_all = torch.rand(layers, heads, n, device=device)

    def select() -> tuple[torch.Tensor, torch.Tensor]:
        scores = standardize_per_layer(mass_all) + params.leverage_weight * standardize_per_layer(lev_all)
        return select_tokens(scores, params)

    res["selection"] = dict(total_seconds=time_gpu(select, reps=5))
    adaptive = CompressionParams(retention=retention, budget="adaptive")
    res["selection_adaptive"] = dict(
        total_seconds=time_gpu(lambda: select_tokens(mass_all, adaptive), reps=5)
    )

    # pack: every head's kept tokens into the first pages of its own chain (in place)
    kept, lens = select()
    page_size = 16
    pool = KVPool(layers * heads * -(-n // page_size) + 8, page_size, dim, dtype, device)
    seq = SequenceKV(pool, layers, heads, n)
    seq.grow(n)
    seq.head_lens += n
    src = seq.page_table.to(device)
    lens_cpu = lens.cpu()
    dst_cpu = seq.page_table.clone()
    dst_cpu[torch.arange(seq.max_pages) >= seq.pages_per_head(lens_cpu)[..., None]] = -1
    dst = dst_cpu.to(device)
    moved = 2 * int(lens_cpu.sum()) * 2 * dim * pool.kv.element_size()  # K and V rows, read + write
    lens_dev = lens.to(device)
    t = time_gpu(lambda: kernels.pack_kept(pool.kv, src, kept, lens_dev, dst), reps=5)
    t_ref = time_gpu(lambda: pack_kept(pool.kv, seq.page_table, kept, lens_cpu, dst_cpu), reps=2, warmup=1)
    res["pack"] = dict(
        total_seconds=t, bytes=moved, GBps=moved / t / 1e9, reference_seconds=t_ref,
        reference_GBps=moved / t_ref / 1e9,
    )  # fmt: skip
    # the engine's whole compaction step (tables, pack, page accounting), host work included
    sync()
    t0 = time.perf_counter()
    compact_in_place(seq, kept, lens)
    sync()
    res["compaction_step"] = dict(total_seconds=time.perf_counter() - t0)

    # receive: kept pages, packed in travel order, scattered into a pool
    ids = seq.ordered_page_ids().to(device)
    pages = torch.randn(ids.numel(), *pool.kv.shape[1:], device=device).to(dtype)
    page_bytes = 2 * pages.numel() * pages.element_size()
    t = time_gpu(lambda: kernels.scatter_pages(pool.kv, ids, pages))
    t_ref = time_gpu(lambda: pool.kv.index_copy_(0, ids, pages))
    res["scatter_pages"] = dict(
        total_seconds=t, bytes=page_bytes, GBps=page_bytes / t / 1e9, index_copy_seconds=t_ref,
        index_copy_GBps=page_bytes / t_ref / 1e9,
    )  # fmt: skip
    seq.free()
    pool.assert_no_leaks()
    return res


# ---- report ------------------------------------------------------------------------------------------
def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ctxs = [c["context"] for c in report["contexts"]]
    modes = [m for m in report["contexts"][0]["end_to_end"] if m != "none"]
    width = 0.8 / len(modes)
    for i, m in enumerate(modes):
        vals = [100 * c["end_to_end"][m]["overhead_share"] for c in report["contexts"]]
        bars = ax1.bar(
            [x + (i - (len(modes) - 1) / 2) * width for x in range(len(ctxs))], vals, width, label=m
        )
        ax1.bar_label(bars, fmt="%.1f%%", fontsize=7)
    ax1.axhline(100 * TARGET_SHARE, color="k", ls="--", lw=1, label="target 3%")
    ax1.set_xticks(range(len(ctxs)), [f"{c / 1024:g}K" for c in ctxs])
    timer = "CPU time" if report.get("timer") == "process CPU time" else "wall time"
    ax1.set_ylabel(f"prefill {timer} added (% of uncompressed prefill)")
    ax1.set_title("end to end (retention 0.5)")
    ax1.legend(fontsize=7)
    parts = ["leverage", "attention_mass", "selection", "pack", "calibration_signal"]
    parts = [p for p in parts if p in report["contexts"][0]["components"]]
    bottom = [0.0] * len(ctxs)
    for p in parts:
        vals = [
            100 * c["components"][p]["total_seconds"] / c["end_to_end"]["none"]["seconds"]
            for c in report["contexts"]
        ]
        ax2.bar(range(len(ctxs)), vals, 0.5, bottom=bottom, label=p)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for x, b in enumerate(bottom):
        ax2.text(x, b, f"{b:.2f}%", ha="center", va="bottom", fontsize=8)
    ax2.set_xticks(range(len(ctxs)), [f"{c / 1024:g}K" for c in ctxs])
    ax2.set_ylabel("% of uncompressed prefill")
    ax2.set_title("components timed alone, summed over the prefill")
    ax2.legend(fontsize=7)
    weights = "dummy weights" if report.get("load_format", "dummy") == "dummy" else "real weights"
    fig.suptitle(
        f"compression overhead, {report['model']} ({weights}), {report['device']}, {report['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def variant(text: str) -> str:
    """argparse type of --variants: METHOD:SPLIT[:1], checked before the model is built."""
    from kvferry.kernels.leverage_scores import STAGES

    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("", *STAGES) or parts[1] not in ("1", "2"):
        raise argparse.ArgumentTypeError(
            f"{text!r}: want METHOD:SPLIT[:1], METHOD in {sorted(STAGES)} or empty, SPLIT 1 or 2"
        )
    if len(parts) == 3 and parts[2] != "1":
        raise argparse.ArgumentTypeError(f"{text!r}: the third field can only be 1 (a launch per layer)")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for compression_overhead.{json,png}")
    p.add_argument("--plot", type=Path, help="redraw the PNG from this JSON and exit")
    p.add_argument(
        "--model", default=str(CONFIG_8B),
        help="folder with config.json (dummy weights), a model path, or 'bundled' (SmolLM2-135M-Instruct)",
    )  # fmt: skip
    p.add_argument("--load-format", default="dummy", choices=["dummy", "auto"], help="auto: real weights")
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--retention", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--date", help="date to record (default: today, UTC)")
    p.add_argument(
        "--variants", nargs="*", default=[], metavar="METHOD:SPLIT", type=variant,
        help="extra side-stream modes: leverage method (a key of kernels.leverage_scores.STAGES, empty "
        "for the default), attention-mass query split, and optionally :1 for one leverage launch per "
        "layer (no key copies), e.g. fused:1 fused:2 fused:2:1",
    )  # fmt: skip
    p.add_argument("--no-reference", action="store_true", help="skip the PyTorch-reference mode")
    p.add_argument(
        "--no-kernel-components", action="store_true",
        help="time no kernel alone (on CPU they run in Triton's interpreter); the calibration signal still is",
    )  # fmt: skip
    p.add_argument(
        "--profile", action="store_true",
        help="profile one prefill per context with and without compression, write profile.json (and "
        "the Chrome traces) under --out, and exit",
    )  # fmt: skip
    args = p.parse_args()
    if args.profile and not torch.cuda.is_available():
        p.error("--profile reads CUDA kernel timings: run it on a GPU")
    if args.plot:
        plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png"))
        return

    import triton

    from kvferry.engine import EngineConfig, LLMEngine

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        date=args.date or datetime.date.today().isoformat(),
        measured_at_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command="python3 " + " ".join(sys.argv),
        torch=torch.__version__,
        triton=triton.__version__,
        model=Path(args.model).name,
        load_format=args.load_format,
        prefill_chunk=args.prefill_chunk,
        retention=args.retention,
        page_size=16,
        target_share=TARGET_SHARE,
        timer="wall clock (components: CUDA events)" if device.type == "cuda" else "process CPU time",
    )
    report["copy_GBps"] = copy_bandwidth(device) / 1e9 if device.type == "cuda" else None
    t = time.perf_counter()
    engine = LLMEngine(
        EngineConfig(
            model=None if args.model == "bundled" else args.model,
            load_format=args.load_format,
            device=str(device),
            dtype="bfloat16" if device.type == "cuda" else "float32",
            prefill_chunk=args.prefill_chunk,
            max_model_len=max(args.contexts) + 16,
            kv_cache_bytes=(12 << 30) if device.type == "cuda" else (256 << 20),
        )
    )
    mc = engine.loaded.config
    print(f"model built in {time.perf_counter() - t:.1f} s", flush=True)
    if args.profile:
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
        report["profiles"] = {
            str(n): profile_modes(engine, n, args.retention, args.out) for n in args.contexts
        }
        if args.out:
            (args.out / "profile.json").write_text(json.dumps(report, indent=1))
        return
    report["contexts"] = []
    for n in args.contexts:
        e2e = end_to_end(engine, n, args.retention, args.reps, args.variants, not args.no_reference)
        comp: dict[str, Any] = {}
        if not args.no_kernel_components:
            comp = components(
                n, args.prefill_chunk, mc.num_hidden_layers, mc.num_key_value_heads,
                mc.num_attention_heads // mc.num_key_value_heads, engine.head_dim, args.retention,
            )  # fmt: skip
        comp["calibration_signal"] = calibration_signal(engine, n, args.prefill_chunk)
        base = e2e["none"]["seconds"]
        parts = [p for p in ("leverage", "attention_mass", "selection", "pack") if p in comp]
        comp["sum_share"] = sum(comp[p]["total_seconds"] for p in parts) / base
        comp["calibration_signal"]["share"] = comp["calibration_signal"]["total_seconds"] / base
        report["contexts"].append(dict(context=n, end_to_end=e2e, components=comp))
        print(json.dumps(report["contexts"][-1], indent=1), flush=True)
        report["targets"] = [
            dict(
                context=c["context"],
                want=f"<= {TARGET_SHARE:.0%}",
                end_to_end_share=c["end_to_end"]["fused_side_stream"]["overhead_share"],
                end_to_end_paired_share=c["end_to_end"]["fused_side_stream"]["paired_share"],
                components_share=c["components"]["sum_share"],
                met=bool(c["end_to_end"]["fused_side_stream"]["overhead_share"] <= TARGET_SHARE),
                calibration_signal_want=f"<= {SIGNAL_TARGET_SHARE:.0%}",
                calibration_signal_share=c["end_to_end"]["auto"]["signal_share"],
                calibration_signal_component_share=c["components"]["calibration_signal"]["share"],
                calibration_signal_met=bool(c["end_to_end"]["auto"]["signal_share"] <= SIGNAL_TARGET_SHARE),
            )
            for c in report["contexts"]
        ]
        if args.out:  # after every context, so a run cut short keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / "compression_overhead.json"
            path.write_text(json.dumps(report, indent=1))
            plot(report, path.with_suffix(".png"))
            print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
