"""Time the compactor's scoring kernels stage by stage, old and new variants side by side.

Shape: Llama-3.1-8B (32 q / 8 kv heads, head_dim 128, bf16), the compactor's defaults (sketch k=48
padded to 64, leverage blocks of 1024 tokens, attention-mass blocks of 128). Two spans: one
2048-token prefill chunk of a 32K prompt (what one launch per layer per chunk sees) and a whole 32K
prompt in one launch (what deferring the scoring to the prompt's end would see).

Each measurement is a CUDA-graph replay of N calls rotating over enough input sets to defeat the L2
cache (the timer of benchmarks/attention_kernels.py), plus, for the whole calls, eager wall time (back-to-back
calls, and one call then a synchronise) to expose host launch overhead. Every variant is also checked
against the PyTorch reference on fresh random inputs: relative error, and for leverage the overlap of
the top half of each (block, head) with the reference's, on keys with a moderate and a large shared
offset. One failing measurement is recorded and the rest go on.

    python3 benchmarks/scoring_kernels.py --out docs/benchmarks/scoring_kernels.json   # on a GPU
    python3 benchmarks/scoring_kernels.py --cpu-smoke    # tiny shapes, Triton interpreter, no timing claims
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

L2_DEFEAT_BYTES = 256 << 20  # input sets rotated until one replay streams at least this much


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", help="JSON report path (default docs/benchmarks/scoring_kernels.json; smoke: a temp file)"
    )
    p.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes under TRITON_INTERPRET=1 (logic only)"
    )
    p.add_argument("--date", help="date to record (default: today, UTC)")
    p.add_argument("--no-32k", action="store_true", help="skip the whole-32K-prompt span")
    p.add_argument("--eager-calls", type=int, default=50, help="back-to-back eager calls per timing")
    p.add_argument("--plot", metavar="JSON", help="draw JSON's PNG (same name, .png) and exit")
    p.add_argument(
        "--lev-heads",
        type=int,
        help="kv heads of one leverage launch (default 8, one layer; the compactor's group of 8 layers: 64)",
    )
    p.add_argument("--variants", help="comma-separated variant names to run (default: all)")
    p.add_argument("--no-mass", action="store_true", help="skip the attention-mass kernels")
    p.add_argument(
        "--host-glue",
        action="store_true",
        help="CPU: the compactor's per-layer host path with the Triton launches stubbed (ops, launches, us)",
    )
    return p.parse_args()


args = parse_args() if __name__ == "__main__" else None

import torch  # noqa: E402  (after --help, which needs no torch)

if args is not None and (args.cpu_smoke or args.host_glue or not torch.cuda.is_available()):
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

# ---- timers ----


def _graph_timer() -> Callable:
    """time_calls of benchmarks/attention_kernels.py, loaded from its path (run as a script from benchmarks/, its
    module name would shadow the kernels package)."""
    spec = importlib.util.spec_from_file_location(
        "bench_kernels", ROOT / "benchmarks" / "attention_kernels.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.time_calls


time_calls = _graph_timer()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def eager_times(fns: list[Callable[[], object]], device: torch.device, calls: int) -> dict:
    """Wall seconds per call: back-to-back (max of host and device time) and one call + synchronise."""
    for f in fns:
        f()
    sync(device)
    t = time.perf_counter()
    for i in range(calls):
        fns[i % len(fns)]()
    host = time.perf_counter() - t  # enqueue time alone (host side)
    sync(device)
    loop = time.perf_counter() - t
    singles = []
    for i in range(min(calls, 20)):
        sync(device)
        t = time.perf_counter()
        fns[i % len(fns)]()
        sync(device)
        singles.append(time.perf_counter() - t)
    return dict(
        eager_loop_s=loop / calls, eager_host_s=host / calls, eager_single_s=statistics.median(singles)
    )


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_calls([lambda: dst.copy_(src)], device)
    return 2 * nbytes / t


# ---- inputs and references ----


class Shape:
    def __init__(self, smoke: bool) -> None:
        if smoke:
            self.hq, self.h, self.d, self.k = 4, 2, 32, 12
            self.lev_block, self.mass_block = 128, 40
            self.spans = {"chunk": (600, 100, 500)}  # prompt length, span lo, span hi
        else:
            self.hq, self.h, self.d, self.k = 32, 8, 128, 48
            self.lev_block, self.mass_block = 1024, 128
            self.spans = {"chunk2048": (32768, 8192, 10240), "span32k": (32768, 0, 32768)}


def qkv_views(t: int, s: Shape, device, dtype, offset_scale: float, gen: torch.Generator):
    """q [T, Hq, D], k_pre [T, H, D], k [T, H, D] as strided views of one fused qkv row (as the
    model's projection leaves them); pre-RoPE keys carry a shared offset of offset_scale."""
    width = (s.hq + 2 * s.h) * s.d
    qkv = torch.randn(t, width, generator=gen).to(device=device)
    kpre = qkv[:, s.hq * s.d : (s.hq + s.h) * s.d].view(t, s.h, s.d)
    kpre += offset_scale * torch.randn(s.d, generator=gen).to(device)
    qkv = qkv.to(dtype)
    q = qkv[:, : s.hq * s.d].view(t, s.hq, s.d)
    kpre = qkv[:, s.hq * s.d : (s.hq + s.h) * s.d].view(t, s.h, s.d)
    k = qkv[:, (s.hq + s.h) * s.d :].view(t, s.h, s.d)
    return q, kpre, k


def outlier_keys(t: int, s: Shape, device, dtype, gen: torch.Generator) -> torch.Tensor:
    """Keys [T, H, D] with 3 dims 300x the others (as real pre-RoPE keys have) and a shared offset:
    a near-singular sketched Gram, where the ridge alone bounds the condition number."""
    keys = torch.randn(t, s.h, s.d, generator=gen)
    keys[..., :3] *= 300.0
    return (keys + 50.0 * torch.randn(s.d, generator=gen)).to(device=device, dtype=dtype)


def leverage_ref(keys: torch.Tensor, bounds: list[int], sketch: torch.Tensor) -> torch.Tensor:
    """float64: keys [T, H, D] -> [H, T], each block's leverage over its block mean."""
    out = []
    for a, b in zip(bounds, bounds[1:]):
        kb = keys[a - bounds[0] : b - bounds[0]].double().transpose(0, 1)  # [H, b, D]
        x = (kb - kb.mean(dim=1, keepdim=True)) @ sketch.double()
        gram = x.transpose(1, 2) @ x
        lift = 1e-4 * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-12)
        eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=keys.device)
        o = ((x @ torch.linalg.inv(gram + lift[:, None, None] * eye)) * x).sum(dim=-1)
        out.append(o / o.mean(dim=1, keepdim=True).clamp(min=1e-12))
    return torch.cat(out, dim=1)


def mass_ref(q, k, bounds: list[int], scale: float) -> torch.Tensor:
    from kvferry.engine.compression.attention_scores import block_attention_mass

    lo = bounds[0]
    return torch.cat(
        [
            block_attention_mass(q[a - lo : b - lo], k[a - lo : b - lo], scale)
            for a, b in zip(bounds, bounds[1:])
        ],
        dim=1,
    )


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    if out.isnan().any():
        return float("nan")
    return float((out.double() - want.double()).norm() / want.double().norm())


def topk_overlap(out: torch.Tensor, want: torch.Tensor, bounds: list[int], frac: float = 0.5) -> float:
    """Smallest share, over (block, head), of the reference's top `frac` that out's top `frac` holds."""
    worst = 1.0
    lo = bounds[0]
    for a, b in zip(bounds, bounds[1:]):
        n = max(1, int(frac * (b - a)))
        got = out[:, a - lo : b - lo].topk(n, dim=1).indices
        ref = want[:, a - lo : b - lo].topk(n, dim=1).indices
        hit = torch.zeros(want.shape[0], b - a, dtype=torch.bool, device=want.device)
        hit.scatter_(1, ref, True)
        worst = min(worst, float(hit.gather(1, got).float().mean(dim=1).min()))
    return worst


# ---- the benchmark ----


def leverage_variants(kernels_mod) -> dict[str, dict]:
    """name -> keyword arguments of leverage_scores (ws: a reused workspace)."""
    return {
        "split3_fresh": dict(method="split3", ws=False),  # the engine's path of 2026-11-23
        "split3_ws": dict(method="split3", ws=True),
        "sketch3_ws": dict(method="sketch3", ws=True),  # the new default (compactor keeps a workspace)
        "sketch3_fresh": dict(method="sketch3", ws=False),
        "sketch3_ws_x3": dict(method="sketch3", ws=True, sketch_precision="tf32x3"),
        "sketch3_ws_inv4": dict(method="sketch3", ws=True, invert_warps=4),
        "sketch3_ws_inv16": dict(method="sketch3", ws=True, invert_warps=16),
        "sketch2_ws": dict(method="sketch2", ws=True),
        "sketch2_ws_inv4": dict(method="sketch2", ws=True, invert_warps=4),
        # one program per (block, head): stream, invert, score (warps, pipeline stages of the loops)
        "fused_w8_s2": dict(method="fused", ws=True, invert_warps=8),
        "fused_w4_s2": dict(method="fused", ws=True, invert_warps=4),
        "fused_w4_s1": dict(method="fused", ws=True, invert_warps=4, fused_stages=1),
        "fused_w4_s3": dict(method="fused", ws=True, invert_warps=4, fused_stages=3),
        "fused_w2_s2": dict(method="fused", ws=True, invert_warps=2),
        "fused_w8_s1": dict(method="fused", ws=True, fused_stages=1),
        "fused_w8_s3": dict(method="fused", ws=True, fused_stages=3),
        "fused_w16_s2": dict(method="fused", ws=True, invert_warps=16),
    }


def chosen(variants: dict[str, dict]) -> dict[str, dict]:
    """The variants named by --variants (all without it)."""
    if args is None or not args.variants:
        return variants
    names = set(args.variants.split(","))
    return {k: v for k, v in variants.items() if k in names}


class Report:
    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.failures: list[dict] = []

    def run(self, what: str, fn: Callable[[], dict]) -> None:
        """One measurement; an exception is recorded and the benchmark goes on."""
        t = time.perf_counter()
        try:
            row = dict(what=what, **fn())
            self.rows.append(row)
            print(
                f"  {what}: " + ", ".join(f"{k}={fmt(k, v)}" for k, v in row.items() if k != "what"),
                flush=True,
            )
        except Exception as e:  # noqa: BLE001
            self.failures.append(
                dict(what=what, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
            )
            print(
                f"  {what}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
                flush=True,
            )
        finally:
            print(f"    ({time.perf_counter() - t:.1f} s)", flush=True)


def fmt(k: str, v) -> str:
    if isinstance(v, float):
        return f"{v * 1e6:.1f}us" if k.endswith("_s") else f"{v:.4g}"
    return str(v)


def span_blocks(
    span, block: int, s: Shape, device, dtype
) -> tuple[list[int], int, int, int, torch.Tensor, int]:
    """The whole blocks of `block` tokens inside span (n, lo, hi): (edges as a list, first token, tokens,
    longest block, edges on the device, input sets that defeat L2 when cycled)."""
    from kvferry.engine.compression.blocks import block_bounds

    n, lo, hi = span
    bounds = [b for b in block_bounds(n, block) if lo <= b <= hi]
    lo, hi = bounds[0], bounds[-1]
    t = hi - lo
    max_block = max(b - a for a, b in zip(bounds, bounds[1:]))
    edges = torch.tensor(bounds, dtype=torch.int32, device=device)
    per_set = t * (s.hq + 2 * s.h) * s.d * dtype.itemsize
    sets = max(1, math.ceil(L2_DEFEAT_BYTES / per_set)) if device.type == "cuda" else 1
    return bounds, lo, t, max_block, edges, sets


def bench_leverage(
    report: Report, kernels_mod, lev, s: Shape, span_name: str, span, device, dtype, eager_calls
):
    from kvferry.engine.compression.leverage import gaussian_sketch

    bounds, lo, t, max_block, edges, sets = span_blocks(span, s.lev_block, s, device, dtype)
    sketch = gaussian_sketch(s.d, s.k, device)
    padded = kernels_mod.padded_sketch(sketch)
    gen = torch.Generator().manual_seed(1234)
    inputs = [qkv_views(t, s, device, dtype, 4.0, gen)[1] for _ in range(sets)]
    outs = [torch.empty(s.h, t, device=device) for _ in range(sets)]
    kp = padded.shape[1]
    # bytes: keys read twice (Gram and score passes), scores written; FLOPs: x = KΦ twice, Σ x xᵀ, x G⁻¹
    key_bytes = t * s.h * s.d * dtype.itemsize
    nbytes = 2 * key_bytes + t * s.h * 4
    flops = t * s.h * (2 * 2 * s.d * kp + 2 * kp * kp + 2 * kp * kp)
    meta = dict(
        span=span_name,
        tokens=t,
        blocks=len(bounds) - 1,
        max_block=max_block,
        sets=sets,
        bytes=nbytes,
        flops=flops,
    )

    for name, cfg in chosen(leverage_variants(kernels_mod)).items():
        cfg = dict(cfg)
        use_ws = cfg.pop("ws")
        wss = [lev.LeverageWorkspace() if use_ws else None for _ in range(sets)]

        def call(i, stages=None, cfg=cfg, wss=wss):
            return kernels_mod.leverage_scores(
                inputs[i], edges, padded, s.k, outs[i], offset=lo, max_block=max_block, workspace=wss[i],
                stages=stages, **cfg,
            )  # fmt: skip

        def whole(call=call, name=name):
            fns = [lambda i=i: call(i) for i in range(sets)]
            res = dict(meta, variant=name, graph_s=time_calls(fns, device))
            res.update(eager_times(fns, device, eager_calls if device.type == "cuda" else 2))
            res["roofline_x"] = res["graph_s"] / (nbytes / COPY_BPS) if COPY_BPS else float("nan")
            return res

        report.run(f"leverage {span_name} {name} whole", whole)
        if use_ws:  # stages alone, on workspaces a whole call filled
            for stage in lev.STAGES[cfg["method"]]:

                def one(call=call, stage=stage, name=name):
                    for i in range(sets):
                        call(i)
                    fns = [lambda i=i: call(i, (stage,)) for i in range(sets)]
                    return dict(meta, variant=name, stage=stage, graph_s=time_calls(fns, device))

                report.run(f"leverage {span_name} {name} stage {stage}", one)

        def check(call=call, name=name, cfg=cfg):
            res = dict(span=span_name, variant=name)
            for label, offset_scale in (("offset4", 4.0), ("offset50", 50.0), ("outliers", 0.0)):
                g = torch.Generator().manual_seed(99 + int(offset_scale))
                if label == "outliers":
                    keys = outlier_keys(t, s, device, dtype, g)
                else:
                    keys = qkv_views(t, s, device, dtype, offset_scale, g)[1]
                out = torch.full((s.h, t), float("nan"), device=device)
                ws = lev.LeverageWorkspace()
                for _ in range(2):  # twice on one workspace: the tickets must be reset by the first
                    out.fill_(float("nan"))
                    kernels_mod.leverage_scores(
                        keys, edges, padded, s.k, out, offset=lo, max_block=max_block, workspace=ws, **cfg
                    )
                want = leverage_ref(keys, bounds, sketch)
                res[f"rel_err_{label}"] = rel_err(out, want)
                res[f"top50_overlap_{label}"] = topk_overlap(out, want, bounds)
            return res

        report.run(f"leverage {span_name} {name} check", check)
    return dict(span=span_name, setup="done")


def bench_mass(report: Report, kernels_mod, s: Shape, span_name: str, span, device, dtype, eager_calls):

    bounds, lo, t, max_block, edges, sets = span_blocks(span, s.mass_block, s, device, dtype)
    scale = s.d**-0.5
    gen = torch.Generator().manual_seed(4321)
    inputs = []
    for _ in range(sets):
        q, _, k = qkv_views(t, s, device, dtype, 0.0, gen)
        inputs.append((q, k))
    outs = [torch.empty(s.h, t, device=device) for _ in range(sets)]
    nbytes = t * (s.hq + s.h) * s.d * dtype.itemsize + t * s.h * 4
    flops = sum(2 * s.hq * (b - a) ** 2 * s.d for a, b in zip(bounds, bounds[1:]))
    meta = dict(span=span_name, tokens=t, blocks=len(bounds) - 1, sets=sets, bytes=nbytes, flops=flops)
    variants = {
        "mass_w8": dict(num_warps=8),
        "mass_w4": dict(num_warps=4),
        "mass_w8_s1": dict(num_warps=8, num_stages=1),
        "mass_w8_s2": dict(num_warps=8, num_stages=2),
        # two programs per (block, kv head), half the queries each, added into zeros
        "mass_q2_w8": dict(num_warps=8, query_split=2),
        "mass_q2_w4": dict(num_warps=4, query_split=2),
    }
    for name, cfg in chosen(variants).items():

        def call(i, cfg=cfg):
            q, k = inputs[i]
            return kernels_mod.attention_mass(q, k, edges, max_block, scale, outs[i], offset=lo, **cfg)

        def whole(call=call, name=name):
            fns = [lambda i=i: call(i) for i in range(sets)]
            res = dict(meta, variant=name, graph_s=time_calls(fns, device))
            res.update(eager_times(fns, device, eager_calls if device.type == "cuda" else 2))
            res["roofline_x"] = res["graph_s"] / (nbytes / COPY_BPS) if COPY_BPS else float("nan")
            res["TFLOPs"] = flops / res["graph_s"] / 1e12
            return res

        report.run(f"attention_mass {span_name} {name} whole", whole)

        def check(cfg=cfg, name=name):
            g = torch.Generator().manual_seed(77)
            q, _, k = qkv_views(t, s, device, dtype, 0.0, g)
            out = torch.full((s.h, t), 0.0 if cfg.get("query_split", 1) > 1 else float("nan"), device=device)
            kernels_mod.attention_mass(q, k, edges, max_block, scale * 2, out, offset=lo, **cfg)
            return dict(span=span_name, variant=name, rel_err=rel_err(out, mass_ref(q, k, bounds, scale * 2)))

        report.run(f"attention_mass {span_name} {name} check", check)
    return dict(span=span_name, setup="done")


COPY_BPS = 0.0


def host_glue(layers: int = 4, n: int = 8192, chunk: int = 2048, method: str | None = None) -> dict:
    """The compactor's per-layer observe on CPU with every Triton launch replaced by a counter: host
    time of the glue alone, aten ops (views included) and launches per layer-chunk. The side stream's
    calls (CUDA only) are not run here."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kvferry.engine import CompressionParams
    from kvferry.engine.compression.base import PromptShape
    from kvferry.engine.compression.compactor import CompactorScorer

    lev = importlib.import_module("kvferry.kernels.leverage_scores")
    mass = importlib.import_module("kvferry.kernels.attention_mass")
    launches = [0]

    class Stub:
        def __getitem__(self, grid):
            def launch(*a, **k):
                launches[0] += 1

            return launch

    for mod in (lev, mass):
        for name in dir(mod):
            if name.endswith("_kernel"):
                setattr(mod, name, Stub())

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] = self.ops.get(str(func), 0) + 1
            return func(*args, **(kwargs or {}))

    h, g, d = 8, 4, 128
    params = CompressionParams()
    qkv = torch.randn(chunk, (h * g + 2 * h) * d)
    q = qkv[:, : h * g * d].view(chunk, h * g, d)
    kpre = qkv[:, h * g * d : (h * g + h) * d].view(chunk, h, d)
    k = qkv[:, (h * g + h) * d :].view(chunk, h, d)
    res = {}
    with torch.inference_mode():
        for rep in range(3):  # the last repetition counts (the first pays one-time costs)
            scorer = CompactorScorer(params, PromptShape(layers, h, n), seq_kv=None)  # type: ignore[arg-type]
            scorer._start(k)
            scorer.fused = scorer.fused_scoring()
            if method is not None:
                scorer.fused.leverage_method = method
            launches[0] = 0
            counter = Count()
            t_total, calls = 0.0, 0
            for start in range(0, n, chunk):
                for layer in range(layers):
                    if rep == 2 and start == chunk and layer == 0:
                        with counter:
                            scorer.observe(layer, q, kpre, k, start)
                        continue
                    t = time.perf_counter()
                    scorer.observe(layer, q, kpre, k, start)
                    t_total += time.perf_counter() - t
                    calls += 1
            res = dict(
                host_s_per_layer_chunk=t_total / calls,
                launches_per_layer_chunk=launches[0] / (calls + 1),
                aten_ops_per_layer_chunk=sum(counter.ops.values()),
                aten_ops=counter.ops,
            )
    return res


def table(report: Report) -> str:
    lines = [
        f"{'what':58s} {'graph us':>9s} {'eager us':>9s} {'host us':>8s} {'x roof':>7s} {'rel err':>9s} {'top50':>6s}"
    ]
    checks = {(r["span"], r["variant"]): r for r in report.rows if r["what"].endswith(" check")}
    for r in report.rows:
        if r["what"].endswith((" check", " setup")):
            continue
        c = checks.get((r.get("span"), r.get("variant")), {}) if "stage" not in r else {}
        err = c.get("rel_err", c.get("rel_err_offset50", float("nan")))
        top = c.get("top50_overlap_offset50", float("nan"))
        lines.append(
            f"{r['what']:58s} {r['graph_s'] * 1e6:9.1f} {r.get('eager_loop_s', float('nan')) * 1e6:9.1f} "
            f"{r.get('eager_host_s', float('nan')) * 1e6:8.1f} {r.get('roofline_x', float('nan')):7.1f} "
            f"{err:9.2e} {top:6.3f}"
        )
    for f in report.failures:
        lines.append(f"FAILED {f['what']}: {f['error'].splitlines()[0][:100] if f['error'] else ''}")
    return "\n".join(lines)


def main() -> None:
    global COPY_BPS
    assert args is not None
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    import triton

    from kvferry import kernels as kernels_mod

    lev = importlib.import_module(
        "kvferry.kernels.leverage_scores"
    )  # the package re-exports a function of this name

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    s = Shape(smoke=device.type != "cuda")
    if args.no_32k:
        s.spans.pop("span32k", None)
    report = Report()
    if device.type == "cuda":
        try:
            COPY_BPS = copy_bandwidth(device)
            print(f"copy bandwidth: {COPY_BPS / 1e9:.0f} GB/s (read + write)")
        except Exception as e:  # noqa: BLE001
            print(f"copy bandwidth failed: {e}")
    torch.manual_seed(0)
    for span_name, span in s.spans.items():
        print(f"leverage, {span_name}:", flush=True)
        lev_shape = copy.copy(s)
        lev_shape.h = args.lev_heads or s.h
        report.run(
            f"leverage {span_name} setup",
            lambda span_name=span_name, span=span, lev_shape=lev_shape: bench_leverage(
                report, kernels_mod, lev, lev_shape, span_name, span, device, dtype, args.eager_calls
            ),
        )
        if args.no_mass:
            continue
        print(f"attention mass, {span_name}:", flush=True)
        report.run(
            f"attention_mass {span_name} setup",
            lambda span_name=span_name, span=span: bench_mass(
                report, kernels_mod, s, span_name, span, device, dtype, args.eager_calls
            ),
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    info = dict(
        command="python3 " + " ".join(sys.argv),
        gpu=torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "cpu (smoke run, interpreter: no timing claims)",
        date=args.date or datetime.datetime.now(datetime.UTC).date().isoformat(),
        measured_at_utc=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        torch=torch.__version__,
        triton=triton.__version__,
        copy_GBps=COPY_BPS / 1e9,
        shape=dict(
            hq=s.hq,
            h=s.h,
            leverage_heads=args.lev_heads or s.h,
            d=s.d,
            sketch=s.k,
            leverage_block=s.lev_block,
            attention_block=s.mass_block,
            dtype=str(dtype),
            spans=s.spans,
        ),  # fmt: skip
        default_leverage_method=lev.DEFAULT_METHOD,
        seconds=time.perf_counter() - started,
        rows=report.rows,
        failures=report.failures,
    )
    default = (
        "docs/benchmarks/scoring_kernels.json" if device.type == "cuda" else "/tmp/scoring_kernels_smoke.json"
    )
    out = Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=1, default=str) + "\n")
    plot(out)
    print(f"\n{info['gpu']}, {info['date']}, {info['seconds']:.0f} s; JSON: {out}")
    print(table(report))
    if report.failures:
        sys.exit(1)


STAGE_COLORS = {"gram": "tab:blue", "invert": "tab:orange", "score": "tab:green"}


def plot(path: Path) -> Path:
    """Stacked GPU time of each leverage variant's stages (graph replay) and attention mass, beside the
    eager time of one call, per span: where a scoring launch's time goes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = json.loads(path.read_text())
    rows = info["rows"]
    spans = sorted({r["span"] for r in rows if "span" in r}, key=lambda x: x != "chunk2048")
    fig, axes = plt.subplots(1, len(spans), figsize=(6.5 * len(spans), 4.2), squeeze=False)
    for ax, span in zip(axes[0], spans):
        whole = [r for r in rows if r.get("span") == span and r["what"].endswith(" whole")]
        names = [r["variant"] for r in whole]
        bottoms = [0.0] * len(whole)
        labelled: set[str] = set()
        for i, r in enumerate(whole):
            stages = [x for x in rows if x["what"].startswith(f"leverage {span} {r['variant']} stage ")]
            if not stages:
                ax.bar(i, 1e6 * r["graph_s"], color="tab:gray")
                continue
            for stage in stages:
                name = stage["what"].rsplit(" ", 1)[-1]
                kind = "score" if name == "score" else "invert" if name == "invert" else "gram"
                ax.bar(i, 1e6 * stage["graph_s"], bottom=bottoms[i], color=STAGE_COLORS[kind],
                       label=kind if kind not in labelled else None)  # fmt: skip
                labelled.add(kind)
                bottoms[i] += 1e6 * stage["graph_s"]
        ax.scatter(range(len(whole)), [1e6 * r.get("eager_single_s", 0) for r in whole], color="black",
                   marker="x", zorder=3, label="one eager call (host included)")  # fmt: skip
        ax.set_xticks(range(len(whole)), names, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("µs per launch")
        ax.set_title(f"{span}: GPU time by stage (graph replay)")
        ax.legend(fontsize=7)
    fig.suptitle(f"scoring kernels, Llama-3.1-8B shape — {info['gpu']}, {info['date']}", fontsize=9)
    fig.tight_layout()
    png = path.with_suffix(".png")
    fig.savefig(png, dpi=120)
    return png


if __name__ == "__main__":
    if args is not None and args.plot:
        print(plot(Path(args.plot)))
    elif args is not None and args.host_glue:
        print(json.dumps(host_glue(), indent=1))
    else:
        main()
