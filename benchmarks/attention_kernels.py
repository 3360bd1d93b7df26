"""Benchmark the Triton attention kernels against PyTorch SDPA on the dense cache.

Decode: Llama-3.1-8B attention shape (32 q / 8 kv heads, head_dim 128, bf16) over batch x context x
retention; our kernel reads a scattered head-sparse paged pool whose heads keep `retention` of the
context on average (varied per head), SDPA reads the dense full cache. Both are timed as CUDA-graph
replays that rotate over enough input copies to defeat the L2 cache. The device copy bandwidth is
measured in the same run. Prefill: one whole causal sequence (same FLOPs as SDPA causal) and a last
chunk over a long cached prefix. Cached context (`--cached-context`, issue 21): a question chunk over
a compressed context whose heads keep their own whole pages (retention of the context on average,
0.5x..1.5x per head), the Triton kernel with per-head prefix lengths, against the same kernel over
a uniform prefix of the same mean (the cost of raggedness) and the engine's path over the whole
uncompressed context (the dense cuDNN path where it applies, else Triton).

    python3 benchmarks/attention_kernels.py --out docs/benchmarks            # on a GPU
    python3 benchmarks/attention_kernels.py --plot docs/benchmarks/kernels.json  # redraw the PNG only
    python3 benchmarks/attention_kernels.py --cached-context --out docs/benchmarks   # prefill_cached_context.{json,png}
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

HQ, H, D = 32, 8, 128  # Llama-3.1-8B attention
L2_DEFEAT_BYTES = 256 << 20  # rotate input copies until each replay streams this much


def time_calls(fns: list[Callable[[], object]], device: torch.device, trials: int = 7) -> float:
    """Median seconds per call of fns (run in turn), from CUDA-graph replays timed with events."""
    for f in fns:
        f()
    if device.type != "cuda":  # dry run on CPU (interpreter): correctness of the script only
        t = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t) / len(fns)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    reps = max(1, min(200, int(0.01 / max(time.perf_counter() - t, 1e-6))))  # ~10 ms a trial
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / (reps * len(fns)))
    del graph
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], device)
    return 2 * nbytes / t


def matmul_rate(device: torch.device, n: int) -> float:
    """bf16 n x n x n matrix product through torch, FLOP/s (random operands)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / time_calls([lambda: a @ b], device)


def check_targets(report: dict) -> list[dict]:
    """The issue's targets, each with its worst cell (and every cell's value)."""

    def target(name: str, want: float, cells: list[tuple[str, float]]) -> dict:
        worst = min((v for _, v in cells), default=float("nan"))
        return dict(name=name, want=f">= {want}", worst=worst, met=bool(worst >= want), cells=dict(cells))

    dec = report["decode"]
    report.setdefault("prefill", [])

    def key(r: dict) -> str:
        return f"B{r['batch']}_ctx{r['context']}_r{r['retention']}"

    return [
        target("decode r=1.0 speed vs SDPA", 0.95, [(key(r), r["speedup_vs_sdpa"]) for r in dec if r["retention"] == 1.0]),
        target("decode r=0.5 speedup vs SDPA on the full cache", 1.8,
               [(key(r), r["speedup_vs_sdpa"]) for r in dec if r["retention"] == 0.5]),
        target("decode share of copy bandwidth, context >= 32K", 0.85,
               [(key(r), r["ours_GBps"] / report["copy_GBps"]) for r in dec if r["context"] >= 32768]),
        target("prefill TFLOP/s vs SDPA causal, Triton kernel", 0.9,
               [(f"ctx{r['context']}", r["ratio_vs_sdpa"]) for r in report["prefill"] if "ratio_vs_sdpa" in r]),
        target("prefill TFLOP/s vs SDPA causal, engine CUDA path (dense where it applies)", 0.9,
               [(f"ctx{r['context']}", r["dense_ratio_vs_sdpa"]) for r in report["prefill"]
                if "dense_ratio_vs_sdpa" in r]),
    ]  # fmt: skip


def head_lengths(batch: int, context: int, retention: float, gen: torch.Generator) -> torch.Tensor:
    """[B, H] kept tokens: retention * context on average, varied per head (0.5x..1.5x), >= 1."""
    if retention >= 1.0:
        return torch.full((batch, H), context, dtype=torch.int32)
    f = 0.5 + torch.rand(batch, H, generator=gen)
    f = f / f.mean(dim=1, keepdim=True)
    return (retention * context * f).round().clamp(1, context).to(torch.int32)


def sdpa_backends() -> dict[str, list]:
    from torch.nn.attention import SDPBackend

    return {
        "default": [],
        "flash": [SDPBackend.FLASH_ATTENTION],
        "cudnn": [SDPBackend.CUDNN_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    }


def time_sdpa(make_calls: Callable[[], list[Callable[[], object]]], device: torch.device) -> dict[str, float]:
    """Seconds per call of SDPA under each backend that accepts the inputs (default = PyTorch's pick)."""
    from torch.nn.attention import sdpa_kernel

    out: dict[str, float] = {}
    for name, backends in sdpa_backends().items():
        if device.type != "cuda" and name != "default":
            continue
        try:
            if backends:
                with sdpa_kernel(backends):
                    out[name] = time_calls(make_calls(), device)
            else:
                out[name] = time_calls(make_calls(), device)
        except RuntimeError as e:  # backend refuses these inputs
            out[name] = float("nan")
            print(f"    sdpa {name}: {str(e).splitlines()[0][:100]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def decode_kwargs(cfg: dict, batch: int, width: int, page_size: int, device) -> dict:
    """Kernel keyword arguments from a config; `programs_per_sm` and `min_split` become an explicit
    split count (as the launcher's own choose_num_splits would pick with them)."""
    from kvferry.kernels.decode_attention import choose_num_splits

    split_keys = ("programs_per_sm", "min_split")
    kw = {k: v for k, v in cfg.items() if k not in split_keys}
    if any(k in cfg for k in split_keys):
        chosen = {k: cfg[k] for k in split_keys if k in cfg}
        kw["num_splits"] = choose_num_splits(batch, H, width * page_size, device, **chosen)
    return kw


def parse_variant(text: str) -> tuple[str, dict]:
    """'engine' (what the engine calls: kernels.decode_attention), or 'split' or 'balanced' with
    optional ':key=int,...' launcher arguments, e.g. 'balanced:block_n=64,programs_per_sm=2'."""
    kind, _, args = text.partition(":")
    if kind not in ("engine", "split", "balanced") or (kind == "engine" and args):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a variant is engine, split[:k=v,...] or balanced[:k=v,...]"
        )
    try:
        cfg = {k: int(v) for k, v in (a.split("=") for a in args.split(",") if a)}
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: arguments are key=integer, comma-separated") from e
    return kind, cfg


def variant_call(
    kernels, variant: str, batch: int, width: int, page_size: int, device, lens: torch.Tensor
) -> tuple[Callable[..., torch.Tensor], float, str]:
    """A decode call for one variant over these head lengths, its per-layer planning cost (s) and
    the kernel it runs: the balanced kernel's plan is built once per decode step for all 32 layers
    of an 8B model, as the engine does."""
    from kvferry.kernels import decode_balanced as bal

    kind, cfg = parse_variant(variant)
    if kind == "engine":
        kind = "balanced" if kernels.use_balanced(batch, H) else "split"
    if kind == "split":
        kw = decode_kwargs(cfg, batch, width, page_size, device)
        return (
            (lambda q, pool, t, ln: kernels.decode_attention_split(q, pool, t, ln, D**-0.5, **kw)),
            0.0,
            kind,
        )
    from kvferry.kernels._common import num_sms

    programs = cfg.pop("programs_per_sm", bal.PROGRAMS_PER_SM) * num_sms(device)
    block_n, min_tiles = cfg.pop("block_n", bal.BLOCK_N), cfg.pop("min_tiles", bal.MIN_TILES)
    plan = bal.plan_decode(lens, block_n, programs, min_tiles)
    layers = lens[None].expand(32, -1, -1).contiguous()  # [L, B, H]
    plan_s = time_calls([lambda: bal.plan_decode(layers, block_n, programs, min_tiles)], device) / 32
    call = lambda q, pool, t, ln: bal.decode_attention_balanced(q, pool, t, ln, D**-0.5, plan=plan, **cfg)  # noqa: E731
    return call, plan_s, kind


def bench_decode_cell(
    kernels,
    batch: int,
    context: int,
    retentions: list[float],
    page_size: int,
    device,
    cfg: dict,
    dry: bool = False,
    sdpa: bool = True,
    variants: list[str] = (),
) -> list[dict]:
    dtype = torch.bfloat16
    dense_bytes = batch * H * context * D * 2 * 2  # K + V
    sets = max(1, math.ceil(L2_DEFEAT_BYTES / dense_bytes)) if device.type == "cuda" else 1
    pages_per_head = -(-context // page_size)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 40
    need = 2 * sets * dense_bytes * 1.05 + (256 << 20)
    if need > 0.9 * free:
        print(f"  skip B={batch} ctx={context}: needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} free")
        return []
    gen = torch.Generator().manual_seed(batch * 1000 + context)
    num_pages = sets * batch * H * pages_per_head
    pool = torch.empty(num_pages, 2, page_size, D, dtype=dtype, device=device).normal_()
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    tables = perm.view(sets, batch, H, pages_per_head).to(device)  # scattered pages
    qs = [torch.randn(batch, HQ, D, device=device, dtype=dtype) for _ in range(sets)]
    scale = D**-0.5
    rows = []
    for r in retentions:
        lens = head_lengths(batch, context, r, gen).to(device)  # [B, H]
        width = -(-int(lens.max()) // page_size)  # as DecodeBatch slices its tables
        ours = "engine" if not cfg else "split:" + ",".join(f"{k}={v}" for k, v in cfg.items())
        call, plan_s, kernel = variant_call(kernels, ours, batch, width, page_size, device, lens)
        t = time_calls(
            [lambda q=q, t=t[:, :, :width], c=call, ln=lens: c(q, pool, t, ln) for q, t in zip(qs, tables)],
            device,
        )
        t += plan_s
        kv_bytes = int(lens.sum()) * D * 2 * 2
        meta_bytes = int((-(-lens // page_size)).sum()) * 4 + 2 * batch * HQ * D * 2
        rows.append(
            dict(batch=batch, context=context, retention=r, kept_tokens=int(lens.sum()), ours_s=t,
                 ours_kernel=kernel, ours_plan_s=plan_s, ours_bytes=kv_bytes + meta_bytes,
                 ours_GBps=(kv_bytes + meta_bytes) / t / 1e9)
        )  # fmt: skip
        want = kernels_ref_decode(qs[0], pool, tables[0, :, :, :width], lens, scale) if dry else None
        if dry:
            got = call(qs[0], pool, tables[0, :, :, :width], lens)
            assert (got.float() - want).abs().max() < 5e-2
        # Other kernels and configs over the same inputs; the balanced kernel's time includes its
        # plan's share (one plan per decode step serves all layers).
        rows[-1]["variants"] = {}
        for name in variants:
            call, plan_s, _ = variant_call(kernels, name, batch, width, page_size, device, lens)
            try:
                vt = time_calls(
                    [
                        lambda q=q, t=t[:, :, :width], c=call, ln=lens: c(q, pool, t, ln)
                        for q, t in zip(qs, tables)
                    ],
                    device,
                )
            except Exception as e:  # noqa: BLE001  (a config beyond the GPU's resources)
                print(f"  {name}: failed {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                rows[-1]["variants"][name] = dict(s=float("nan"), error=str(e).splitlines()[0][:200])
                continue
            rows[-1]["variants"][name] = dict(
                s=vt + plan_s, plan_s=plan_s, GBps=(kv_bytes + meta_bytes) / (vt + plan_s) / 1e9
            )
            if dry:
                got = call(qs[0], pool, tables[0, :, :, :width], lens)
                assert (got.float() - want).abs().max() < 5e-2, name
    pool = tables = None  # free before the dense caches
    if not sdpa:
        return rows
    ks = [torch.randn(batch, H, context, D, device=device, dtype=dtype) for _ in range(sets)]
    vs = [torch.randn(batch, H, context, D, device=device, dtype=dtype) for _ in range(sets)]
    q4 = [q[:, :, None, :] for q in qs]  # [B, Hq, 1, D]

    def make() -> list[Callable[[], object]]:
        return [
            (lambda i=i: F.scaled_dot_product_attention(q4[i], ks[i], vs[i], enable_gqa=True))
            for i in range(sets)
        ]

    sdpa = time_sdpa(make, device)
    ks = vs = None
    for row in rows:
        row["sdpa_s"] = sdpa
        row["sdpa_GBps"] = dense_bytes / sdpa["default"] / 1e9
        row["speedup_vs_sdpa"] = sdpa["default"] / row["ours_s"]
        best = min(v for v in sdpa.values() if v == v)
        row["speedup_vs_best_sdpa"] = best / row["ours_s"]
        for v in row.get("variants", {}).values():
            v["speedup_vs_sdpa"] = sdpa["default"] / v["s"]
        print(
            f"  B={batch:3d} ctx={context:6d} r={row['retention']:.2f}: ours ({row['ours_kernel']}) {row['ours_s'] * 1e6:8.1f} us "
            f"{row['ours_GBps']:7.0f} GB/s | sdpa {sdpa['default'] * 1e6:8.1f} us "
            f"{row['sdpa_GBps']:7.0f} GB/s | x{row['speedup_vs_sdpa']:.2f}"
            + "".join(
                f" | {k} {v['s'] * 1e6:.1f} us x{v['speedup_vs_sdpa']:.2f}"
                for k, v in row["variants"].items()
            )
        )
    return rows


def kernels_ref_decode(q, pool, tables, lens, scale):
    from kvferry.engine.layers import paged_attention as ref

    return ref.decode_attention(q.float(), pool.float(), tables, lens, scale)


def prefill_case(context: int, chunk: int, page_size: int, device: torch.device) -> dict:
    """The last `chunk` tokens of a `context`-token sequence over scattered pages (chunk == context:
    the whole causal sequence); the chunk's own K/V (k_new, v_new) are in its pages too."""
    from kvferry.engine.layers import paged_attention as ref

    dtype = torch.bfloat16
    start = context - chunk
    pages = -(-context // page_size)
    gen = torch.Generator().manual_seed(context + chunk)
    pool = torch.empty(H * pages, 2, page_size, D, dtype=dtype, device=device).normal_()
    table = torch.randperm(H * pages, generator=gen).to(torch.int32).view(1, H, pages).to(device)
    q = torch.randn(chunk, HQ, D, device=device, dtype=dtype)
    k_new = torch.randn(chunk, H, D, device=device, dtype=dtype)
    v_new = torch.randn(chunk, H, D, device=device, dtype=dtype)
    pos = torch.arange(start, context, device=device)
    slots = table[0][:, pos // page_size].long()  # [H, T]
    ref.store_kv(pool, slots, (pos % page_size).expand(H, -1), k_new.transpose(0, 1), v_new.transpose(0, 1))
    pairs = chunk * start + chunk * (chunk + 1) / 2  # (query, key) pairs under the causal mask
    return dict(
        context=context,
        chunk=chunk,
        start=start,
        pool=pool,
        table=table,
        q=q,
        k_new=k_new,
        v_new=v_new,
        cu=torch.tensor([0, chunk], dtype=torch.int32, device=device),
        starts=torch.tensor([start], dtype=torch.int32, device=device),
        flops=4 * HQ * D * pairs,
    )


def bench_prefill(
    kernels, context: int, chunk: int | None, page_size: int, device, cfg: dict, sdpa: bool = True
) -> dict:
    """chunk=None: the whole causal sequence in one call; else the last `chunk` tokens over the rest."""
    from kvferry.kernels.prefill_dense import dense_prefill_applies, prefill_attention_dense

    t = context if chunk is None else chunk
    case = prefill_case(context, t, page_size, device)
    pool, table, q, k_new, v_new, start = (case[k] for k in ("pool", "table", "q", "k_new", "v_new", "start"))
    scale = D**-0.5
    out = torch.empty_like(q)
    ours = time_calls(
        [
            lambda: kernels.prefill_attention(
                q, pool, table, case["cu"], case["starts"], t, scale, out=out, **cfg
            )
        ],
        device,
        trials=5,
    )
    flops = case["flops"]
    row = dict(context=context, chunk=t, ours_s=ours, flops=flops, ours_TFLOPs=flops / ours / 1e12)
    if sdpa and dense_prefill_applies(q, start):  # the engine's CUDA path: cuDNN on the gathered prefix
        dense_out = torch.empty_like(q)
        dense = time_calls(
            [lambda: prefill_attention_dense(q, k_new, v_new, pool, table[0], start, scale, out=dense_out)],
            device,
            trials=5,
        )
        err = (dense_out.float() - out.float()).norm() / out.float().norm()
        row.update(dense_s=dense, dense_TFLOPs=flops / dense / 1e12, dense_rel_err_vs_triton=float(err))
    pool = case = None
    if chunk is None and sdpa:  # SDPA causal over the same sequence (identical FLOPs)
        qd = q.transpose(0, 1)[None]  # [1, Hq, T, D]
        kd = torch.randn(1, H, t, D, device=device, dtype=q.dtype)
        vd = torch.randn(1, H, t, D, device=device, dtype=q.dtype)
        sdpa = time_sdpa(
            lambda: [lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=True)],
            device,
        )
        row["sdpa_s"] = sdpa
        row["sdpa_TFLOPs"] = flops / sdpa["default"] / 1e12
        row["ratio_vs_sdpa"] = sdpa["default"] / ours
        best = min(v for v in sdpa.values() if v == v)
        row["ratio_vs_best_sdpa"] = best / ours
        if "dense_s" in row:
            row["dense_ratio_vs_sdpa"] = sdpa["default"] / row["dense_s"]
    print(
        f"  prefill ctx={context} chunk={t}: ours {ours * 1e3:.2f} ms {row['ours_TFLOPs']:.0f} TFLOP/s"
        + (
            f" | sdpa {row['sdpa_TFLOPs']:.0f} TFLOP/s | x{row['ratio_vs_sdpa']:.2f}"
            if "sdpa_s" in row
            else ""
        )
        + (f" | engine path (dense) {row['dense_TFLOPs']:.0f} TFLOP/s" if "dense_s" in row else "")
    )
    return row


def bench_cached_context(
    kernels, context: int, retention: float, chunk: int, page_size: int, device, cfg: dict
) -> dict:
    """A `chunk`-token question over a `context`-token context compressed to `retention` (per-head
    kept counts in whole pages), against a uniform prefix of the same mean and the whole context."""
    from kvferry.kernels.prefill_dense import dense_prefill_applies, prefill_attention_dense

    gen = torch.Generator().manual_seed(context + chunk)
    kept = -(-head_lengths(1, context, retention, gen)[0] // page_size) * page_size  # [H], rounded up
    kept = kept.clamp(max=context)  # to whole pages as the engine rounds them
    dtype, scale = torch.bfloat16, D**-0.5
    q = torch.randn(chunk, HQ, D, device=device, dtype=dtype)
    cu = torch.tensor([0, chunk], dtype=torch.int32, device=device)

    def paged(prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A pool and a scattered page table [1, H, n] holding prefix[h] + chunk keys per head."""
        pages = -(-(prefix + chunk) // page_size)  # [H]
        width = int(pages.max())
        pool = torch.empty(int(pages.sum()), 2, page_size, D, dtype=dtype, device=device).normal_()
        table = torch.full((H, width), -1, dtype=torch.int32)
        used = torch.arange(width)[None, :] < pages[:, None]
        table[used] = torch.randperm(int(pages.sum()), generator=gen).to(torch.int32)
        return pool, table[None].to(device)

    def pairs(prefix: torch.Tensor) -> float:  # (query, key) pairs of every kv head under the mask
        return float((chunk * prefix + chunk * (chunk + 1) / 2).sum())

    def time_triton(prefix: torch.Tensor, per_head: bool) -> float:
        pool, table = paged(prefix)
        starts = (prefix.to(torch.int32)[None] if per_head else prefix[:1].to(torch.int32)).to(device)
        out = torch.empty_like(q)
        return time_calls(  # the calls are captured in a CUDA graph: no host copy inside them
            [lambda: kernels.prefill_attention(q, pool, table, cu, starts, chunk, scale, out=out, **cfg)],
            device,
            trials=5,
        )

    group = HQ // H
    row: dict = dict(context=context, retention=retention, chunk=chunk, kept_mean=float(kept.float().mean()))
    row["per_head_s"] = time_triton(kept, True)
    row["per_head_TFLOPs"] = 4 * group * D * pairs(kept) / row["per_head_s"] / 1e12
    uniform = torch.full((H,), int(kept.float().mean()) // page_size * page_size)
    row["uniform_mean_s"] = time_triton(uniform, False)
    full = torch.full((H,), context)
    case = prefill_case(context + chunk, chunk, page_size, device)
    if dense_prefill_applies(case["q"], context):
        out = torch.empty_like(case["q"])
        row["full_context_path"] = "dense"
        row["full_context_s"] = time_calls(
            [lambda: prefill_attention_dense(case["q"], case["k_new"], case["v_new"], case["pool"],
                                             case["table"][0], context, scale, out=out)],
            device,
            trials=5,
        )  # fmt: skip
    else:
        row["full_context_path"] = "triton"
        row["full_context_s"] = time_triton(full, False)
    row["full_context_TFLOPs"] = 4 * group * D * pairs(full) / row["full_context_s"] / 1e12
    row["per_head_over_full"] = row["per_head_s"] / row["full_context_s"]
    row["per_head_over_uniform"] = row["per_head_s"] / row["uniform_mean_s"]
    print(
        f"  cached context {context} r={retention} chunk {chunk}: per-head {row['per_head_s'] * 1e6:.0f} us "
        f"({row['per_head_TFLOPs']:.0f} TFLOP/s), uniform {row['uniform_mean_s'] * 1e6:.0f} us, whole context "
        f"({row['full_context_path']}) {row['full_context_s'] * 1e6:.0f} us: x{row['per_head_over_full']:.2f}"
    )
    return row


def plot_cached_context(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["cached_context"]
    fig, ax = plt.subplots(figsize=(max(7, 2 + 1.6 * len(rows)), 4.5))
    width = 0.27
    for j, (key, label) in enumerate(
        [("per_head_s", "per-head prefixes (Triton)"), ("uniform_mean_s", "uniform, same mean (Triton)"),
         ("full_context_s", "whole context (engine path)")]
    ):  # fmt: skip
        bars = ax.bar(
            [i + (j - 1) * width for i in range(len(rows))], [1e3 * r[key] for r in rows], width, label=label
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(
        range(len(rows)), [f"{r['context'] / 1024:g}K r={r['retention']:g}\nchunk {r['chunk']}" for r in rows]
    )
    ax.set_ylabel("ms per call")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title(
        f"question over a cached context, 8B attention, bf16, {report['gpu']}, {report['date']}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sweep(name: str, run: Callable[[dict], float], configs: list[dict]) -> dict:
    """Time each config; return the fastest (a compile failure just drops that config)."""
    results = []
    for cfg in configs:
        try:
            results.append((run(cfg), cfg))
            print(f"  {name} {cfg}: {results[-1][0] * 1e6:.1f} us")
        except Exception as e:  # noqa: BLE001  (resources exceeded etc.)
            print(f"  {name} {cfg}: failed {type(e).__name__}: {str(e).splitlines()[0][:80]}")
    best = min(results, key=lambda x: x[0])
    return dict(best=best[1], results=[dict(cfg=c, s=t) for t, c in results])


def fastest_overall(results: list[dict]) -> dict:
    """The config with the smallest time summed over cells, each cell's times relative to its best."""
    total: dict[str, float] = {}
    for res in results:
        fastest = min((r["s"] for r in res["results"] if r["s"] == r["s"]), default=float("nan"))
        for r in res["results"]:
            k = json.dumps(r["cfg"], sort_keys=True)
            total[k] = total.get(k, 0.0) + r["s"] / fastest
    complete = {k: v for k, v in total.items() if v == v}
    return json.loads(min(complete, key=complete.__getitem__)) if complete else {}


def sweep_decode(kernels, page_size: int, device, log: dict, cells: list[tuple[int, int]]) -> dict:
    """Block/warps/stages on a few decode cells (fastest by summed relative time), then the split count."""

    def run(cfg: dict, b: int, ctx: int) -> float:
        rows = bench_decode_cell(kernels, b, ctx, [0.5], page_size, device, cfg, sdpa=False)
        return rows[0]["ours_s"]

    configs = [
        dict(block_n=bn, num_warps=nw, num_stages=ns) for bn in (64, 128) for nw in (4, 8) for ns in (1, 2, 3)
    ]
    results = []
    for b, ctx in cells:
        results.append(sweep(f"decode B={b} ctx={ctx}", lambda cfg, b=b, ctx=ctx: run(cfg, b, ctx), configs))
        log[f"decode_B{b}_{ctx}"] = results[-1]
    best = fastest_overall(results)
    results = []
    for b, ctx in cells:
        results.append(
            sweep(
                f"decode splits B={b} ctx={ctx}",
                lambda cfg, b=b, ctx=ctx: run(cfg, b, ctx),
                [dict(best, programs_per_sm=f, min_split=m) for f in (8, 16, 32) for m in (64, 128, 256)],
            )
        )
        log[f"decode_splits_B{b}_{ctx}"] = results[-1]
    return fastest_overall(results)


def sweep_balanced(
    kernels, page_size: int, device, log: dict, cells: list[tuple[int, int]], split: str, configs: list[str]
) -> str:
    """The balanced kernel's block/stages/warps/programs on a few r=0.5 cells, the split kernel
    alongside; returns the fastest config by summed relative time, as a variant string."""
    configs = configs or [
        f"balanced:block_n={bn},num_stages={ns},num_warps=4,programs_per_sm={pps},min_tiles={mt}"
        for bn, ns, pps, mt in [
            (64, 2, 3, 1), (64, 2, 3, 2), (64, 2, 3, 4), (64, 2, 3, 8), (64, 3, 4, 1), (64, 3, 4, 4),
            (64, 3, 2, 4), (128, 2, 2, 1), (128, 2, 2, 2), (128, 2, 2, 4), (32, 3, 4, 8),
        ]
    ]  # fmt: skip
    results = []
    for b, ctx in cells:
        rows = bench_decode_cell(
            kernels, b, ctx, [0.5], page_size, device, {}, sdpa=False, variants=[split, *configs]
        )
        res = [dict(cfg=name, s=v["s"]) for name, v in rows[0]["variants"].items()]
        for r in res:
            print(f"  balanced sweep B={b} ctx={ctx} {r['cfg']}: {r['s'] * 1e6:.1f} us")
        results.append(dict(results=[r for r in res if r["cfg"] != split]))
        log[f"balanced_B{b}_{ctx}"] = res
    return fastest_overall(results)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["decode"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    labels = sorted({(r["batch"], r["context"]) for r in rows})
    x = range(len(labels))
    rets = sorted({r["retention"] for r in rows}, reverse=True)
    w = 0.8 / len(rets)
    for j, ret in enumerate(rets):
        by = {(r["batch"], r["context"]): r for r in rows if r["retention"] == ret}
        axes[0].bar([i + j * w for i in x], [by[k]["speedup_vs_sdpa"] for k in labels], w, label=f"r={ret}")
        axes[1].bar([i + j * w for i in x], [by[k]["ours_GBps"] for k in labels], w, label=f"ours r={ret}")
    axes[1].plot([i + 0.4 for i in x], [next(r["sdpa_GBps"] for r in rows if (r["batch"], r["context"]) == k)
                 for k in labels], "k^", label="SDPA (dense)")  # fmt: skip
    names = sorted({k for r in rows for k in r.get("variants", {})})
    for n, name in enumerate(names):  # other kernels measured in the same run: markers over the bars
        for j, ret in enumerate(rets):
            by = {(r["batch"], r["context"]): r for r in rows if r["retention"] == ret}
            ys = [
                by[k].get("variants", {}).get(name, {}).get("speedup_vs_sdpa", float("nan")) for k in labels
            ]
            axes[0].plot([i + j * w for i in x], ys, "ov^sd"[n % 5], ms=4, color=f"C{3 + n}",
                         label=name.split(":")[0] if j == 0 else None)  # fmt: skip
    axes[1].axhline(report["copy_GBps"], color="r", ls="--", label="device copy")
    axes[0].axhline(1.0, color="k", lw=0.8)
    for ax, title in zip(axes[:2], ["decode speedup vs SDPA on the full cache", "decode bandwidth (GB/s)"]):
        ax.set_xticks([i + 0.4 for i in x], [f"B{b}\n{c // 1024}K" for b, c in labels])
        ax.set_title(title)
        ax.legend(fontsize=7)
    pre = [r for r in report.get("prefill", []) if "sdpa_TFLOPs" in r]
    axes[2].bar(
        [i - 0.27 for i in range(len(pre))],
        [r["ours_TFLOPs"] for r in pre],
        0.27,
        label="Triton kernel (paged)",
    )
    axes[2].bar(
        range(len(pre)), [r.get("dense_TFLOPs", 0.0) for r in pre], 0.27, label="engine path (dense: cuDNN)"
    )
    axes[2].bar(
        [i + 0.27 for i in range(len(pre))], [r["sdpa_TFLOPs"] for r in pre], 0.27, label="SDPA causal"
    )
    axes[2].set_xticks(range(len(pre)), [f"{r['context'] // 1024}K" for r in pre])
    axes[2].set_title("causal prefill TFLOP/s")
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{report['gpu']}  {report['date']}  page_size={report['page_size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/benchmarks", help="folder for kernels.json and kernels.png")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--retentions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    p.add_argument("--prefill-contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--prefill-chunk", type=int, default=2048)
    p.add_argument("--decode-only", action="store_true", help="skip the prefill measurements")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--sweep", action="store_true", help="try a few kernel configs first and use the fastest")
    p.add_argument("--plot", metavar="JSON", help="only redraw the PNG from an earlier JSON")
    p.add_argument(
        "--decode-variants", nargs="*", default=[], type=lambda v: parse_variant(v) and v, metavar="VARIANT",
        help="also time these decode kernels on every cell, e.g. split, balanced:block_n=64,programs_per_sm=2",
    )  # fmt: skip
    p.add_argument("--balanced-sweep", action="store_true", help="sweep the balanced kernel's configs first")
    p.add_argument(
        "--sweep-configs", nargs="*", default=[], type=lambda v: parse_variant(v) and v, metavar="VARIANT",
        help="the balanced configs --balanced-sweep tries (default: a built-in list)",
    )  # fmt: skip
    p.add_argument("--date", help="date to record (default: today, UTC); the UTC clock is recorded too")
    p.add_argument(
        "--cached-context", action="store_true",
        help="only the question-over-a-cached-context mode: prefill_cached_context.{json,png} under --out",
    )  # fmt: skip
    p.add_argument("--cached-contexts", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--cached-chunks", type=int, nargs="+", default=[64, 512, 2048])
    args = p.parse_args()
    out = Path(args.out)
    if args.plot:
        report = json.loads(Path(args.plot).read_text())
        plot(report, Path(args.plot).with_suffix(".png"))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # dry run of the script at the sizes given
    import triton

    from kvferry import kernels

    out.mkdir(parents=True, exist_ok=True)
    report: dict = dict(
        command="python3 " + " ".join(sys.argv),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        date=args.date or datetime.date.today().isoformat(),
        measured_at_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=triton.__version__,
        shape=dict(q_heads=HQ, kv_heads=H, head_dim=D, dtype="bfloat16"),
        page_size=args.page_size,
    )
    if args.cached_context:
        report["cached_context"] = []
        path = out / "prefill_cached_context.json"
        for ctx in args.cached_contexts:
            for chunk in args.cached_chunks:
                for r in args.retentions:
                    if r < 1.0:
                        report["cached_context"].append(
                            bench_cached_context(kernels, ctx, r, chunk, args.page_size, device, {})
                        )
                        path.write_text(json.dumps(report, indent=1))
        plot_cached_context(report, path.with_suffix(".png"))
        print(f"wrote {path} and its PNG")
        return
    save = lambda: (out / "kernels.json").write_text(json.dumps(report, indent=1))  # noqa: E731
    report["copy_GBps"] = copy_bandwidth(device, 2 << 30 if device.type == "cuda" else 1 << 20) / 1e9
    print(f"device copy bandwidth (read+write): {report['copy_GBps']:.0f} GB/s")
    report["matmul_TFLOPs"] = matmul_rate(device, 8192 if device.type == "cuda" else 64) / 1e12
    print(f"bf16 matmul: {report['matmul_TFLOPs']:.0f} TFLOP/s")
    decode_cfg: dict = {}
    prefill_cfg: dict = {}
    if args.sweep:
        report["sweep"] = {}
        ctxs, batches = sorted(args.contexts), sorted(args.batches)
        cells = [
            (1, ctxs[-1]),
            (batches[-1], ctxs[len(ctxs) // 2]),
            (1, ctxs[0]),
            (batches[len(batches) // 2], ctxs[0]),
        ]
        decode_cfg = sweep_decode(kernels, args.page_size, device, report["sweep"], cells)
        pre_configs = [
            dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
            for bm in (64, 128) for bn in (32, 64) for nw in (4, 8) for ns in (3, 4)
        ]  # fmt: skip
        ctx = args.prefill_contexts[0]
        report["sweep"][f"prefill_{ctx}"] = res = sweep(
            "prefill",
            lambda cfg: bench_prefill(kernels, ctx, None, args.page_size, device, cfg, sdpa=False)["ours_s"],
            pre_configs,
        )
        prefill_cfg = res["best"]
        print(f"chosen: decode {decode_cfg}, prefill {prefill_cfg}")
        save()
    variants = list(args.decode_variants)
    if args.balanced_sweep:
        report.setdefault("sweep", {})
        ctxs, batches = sorted(args.contexts), sorted(args.batches)
        cells = [(1, ctxs[0]), (1, ctxs[len(ctxs) // 2]), (batches[len(batches) // 2], ctxs[0])]
        cells.append((batches[-1], ctxs[len(ctxs) // 2]))
        best = sweep_balanced(
            kernels, args.page_size, device, report["sweep"], cells, "split", args.sweep_configs
        )
        print(f"chosen balanced config: {best}")
        variants.append(best)
        save()
    report["decode_cfg"], report["prefill_cfg"] = decode_cfg, prefill_cfg
    report["decode_variants"] = variants
    report["decode"] = []
    for b in args.batches:
        for ctx in args.contexts:
            report["decode"] += bench_decode_cell(
                kernels,
                b,
                ctx,
                args.retentions,
                args.page_size,
                device,
                decode_cfg,
                device.type != "cuda",
                variants=variants,
            )
            save()
    report["prefill"] = []
    for ctx in [] if args.decode_only else args.prefill_contexts:
        report["prefill"].append(bench_prefill(kernels, ctx, None, args.page_size, device, prefill_cfg))
        report["prefill"].append(
            bench_prefill(kernels, ctx, args.prefill_chunk, args.page_size, device, prefill_cfg)
        )
        save()
    # The cost of paging: the same whole 8K sequence over pages that hold a whole key tile.
    if args.page_size < 128 and not args.decode_only:
        ctx = args.prefill_contexts[0]
        row = bench_prefill(kernels, ctx, None, 128, device, prefill_cfg, sdpa=False)
        report["prefill_page128"] = dict(row, page_size=128)
        save()
    report["targets"] = check_targets(report)
    save()
    plot(report, out / "kernels.png")
    for t in report["targets"]:
        print(
            f"  target {t['name']}: {'met' if t['met'] else 'MISSED'} (worst {t['worst']:.3g}, want {t['want']})"
        )
    print(f"wrote {out / 'kernels.json'} and {out / 'kernels.png'}")


if __name__ == "__main__":
    main()
