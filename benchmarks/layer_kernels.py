"""The eager model's elementwise layers against one-pass Triton kernels, and what swapping them in
does to a whole prefill and to the compactor's share of it (an experiment: the engine does not use
these kernels yet).

The 8K prefill of the Llama-3.1-8B shape spends ~70 ms of ~260 ms of GPU time in elementwise kernels
(RMSNorm in eight ops, RoPE through chunk/neg/cat, silu then mul) and issues ~40 launches per layer,
so the host, not the GPU, sets its pace on slower machines (docs/benchmarks/compression_overhead.md).
`swapped_in()` replaces RMSNorm.forward, the attention's apply_rotary and GatedMLP.forward with
kernels/rms_norm.py, rotary.py and silu_mul.py for the duration of a block.

    python3 benchmarks/layer_kernels.py --out docs/benchmarks --date 2026-12-07     # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@contextlib.contextmanager
def swapped_in(fused_residual: bool = False, merged_gemms: bool = False) -> Iterator[None]:
    """The model's RMSNorm, RoPE and SwiGLU gate through the Triton kernels inside the block; with
    `fused_residual`, each decoder layer's residual adds go into the norms after them as well; with
    `merged_gemms`, q/k/v are one GEMM and gate/up another (weights concatenated on first use, a
    second copy of them held until the block ends)."""
    from engine.layers import attention, mlp, norm
    from engine.models import decoder
    from kernels.rms_norm import add_rms_norm, rms_norm
    from kernels.rotary import rotary
    from kernels.silu_mul import silu_mul

    saved = norm.RMSNorm.forward, attention.apply_rotary, mlp.GatedMLP.forward
    saved_model, saved_attention = decoder.DecoderModel.forward, attention.Attention.forward
    merged: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # id(linear group) -> weight, bias

    def merged_linear(x: torch.Tensor, *linears: torch.nn.Linear) -> torch.Tensor:
        key = id(linears[0])
        if key not in merged:
            with torch.no_grad():
                biases = [lin.bias for lin in linears]
                bias = torch.cat(biases) if all(b is not None for b in biases) else None  # type: ignore[misc]
                merged[key] = torch.cat([lin.weight for lin in linears]), bias
        return F.linear(x, *merged[key])

    def attention_forward(self: attention.Attention, x: torch.Tensor, rope: Any, batch: Any) -> torch.Tensor:
        n, hq, h, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = merged_linear(x, self.q_proj, self.k_proj, self.v_proj).split(
            [hq * d, h * d, h * d], dim=-1
        )
        q, k, v = q.view(n, hq, d), k.view(n, h, d), v.contiguous().view(n, h, d)  # v: a plain tensor
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        k_pre_rope = k
        q, k = rotary(q, *rope), rotary(k, *rope)
        out = batch.attend(self.layer_idx, q, k, v, k_pre_rope, self.scale)
        return self.o_proj(out.reshape(n, -1))

    def merged_mlp_forward(self: mlp.GatedMLP, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gate(*merged_linear(x, self.gate_proj, self.up_proj).chunk(2, dim=-1)))

    def model_forward(
        self: decoder.DecoderModel, input_ids: torch.Tensor, positions: torch.Tensor, batch: Any
    ) -> torch.Tensor:
        # The eager layer computes x + attn(norm1(x)), then that + mlp(norm2(that)); here the sums
        # are formed inside the next norm (the same roundings), and the stream carries (out, residual).
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        residual = None
        for layer in self.layers:
            n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
            if residual is None:
                h, residual = rms_norm(x, n1.weight, n1.eps), x
            else:
                h, residual = add_rms_norm(x, residual, n1.weight, n1.eps)
            h, residual = add_rms_norm(layer.self_attn(h, rope, batch), residual, n2.weight, n2.eps)
            x = layer.mlp(h)
        return self.norm(x + residual)  # through the module, so its forward hooks still see it

    def gate(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # silu(g) * u over [..., width]
        return silu_mul(g.reshape(-1, g.shape[-1]), u.reshape(-1, u.shape[-1])).view(g.shape)

    def norm_forward(self: norm.RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def mlp_forward(self: mlp.GatedMLP, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gate(self.gate_proj(x), self.up_proj(x)))

    norm.RMSNorm.forward, attention.apply_rotary, mlp.GatedMLP.forward = norm_forward, rotary, mlp_forward  # type: ignore[method-assign,assignment]
    if fused_residual:
        decoder.DecoderModel.forward = model_forward  # type: ignore[method-assign]
    if merged_gemms:
        attention.Attention.forward = attention_forward  # type: ignore[method-assign]
        mlp.GatedMLP.forward = merged_mlp_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        norm.RMSNorm.forward, attention.apply_rotary, mlp.GatedMLP.forward = saved  # type: ignore[method-assign]
        decoder.DecoderModel.forward, attention.Attention.forward = saved_model, saved_attention  # type: ignore[method-assign]
        merged.clear()


def kernel_times(device: torch.device, tokens: int = 2048) -> dict[str, Any]:
    """Each kernel against its eager layer on a 2048-token chunk of the 8B shape (CUDA-graph replays)."""
    from benchmarks.kernels import time_calls
    from engine.layers.norm import RMSNorm
    from engine.layers.rotary import RotaryEmbedding, apply_rotary
    from kernels.rms_norm import add_rms_norm, rms_norm
    from kernels.rotary import rotary
    from kernels.silu_mul import silu_mul

    dt = torch.bfloat16
    x, r = (torch.randn(tokens, 4096, device=device, dtype=dt) for _ in range(2))
    layer = RMSNorm(4096, 1e-5).to(device, dt)
    cos, sin = RotaryEmbedding(128, {"rope_theta": 500000.0}).to(device)(
        torch.arange(tokens, device=device), dt
    )
    q = torch.randn(tokens, 32, 128, device=device, dtype=dt)
    g, u = (torch.randn(tokens, 14336, device=device, dtype=dt) for _ in range(2))
    pairs = {
        "rms_norm": (lambda: layer(x), lambda: rms_norm(x, layer.weight, layer.eps)),
        "add_rms_norm": (lambda: layer(x + r), lambda: add_rms_norm(x, r, layer.weight, layer.eps)),
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
    from engine import CompressionParams, EngineConfig, LLMEngine

    engine = LLMEngine(
        EngineConfig(
            model=model or str(CONFIG_8B), load_format="dummy", dtype="bfloat16", prefill_chunk=2048,
            max_model_len=max(contexts) + 16, kv_cache_bytes=kv_cache_bytes,
        )
    )  # fmt: skip
    params = CompressionParams(method="compactor", retention=retention)
    modes = {
        "eager": (contextlib.nullcontext, None),
        "eager_compactor": (contextlib.nullcontext, params),
        "kernels": (swapped_in, None),
        "kernels_compactor": (swapped_in, params),
        "kernels_fused_residual": (lambda: swapped_in(fused_residual=True), None),
        "kernels_fused_residual_merged_gemms": (
            lambda: swapped_in(fused_residual=True, merged_gemms=True),
            None,
        ),
        "kernels_fused_residual_merged_gemms_compactor": (
            lambda: swapped_in(fused_residual=True, merged_gemms=True),
            params,
        ),
    }
    out: dict[str, Any] = {}
    for n in contexts:
        for ctx, comp in modes.values():  # warm-up: compilation, cuDNN plans, allocator
            with ctx():
                prefill_seconds(engine, n, comp, seed=0)
        times: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(reps):  # the modes take turns, so a slow spell of the host lands on all alike
            for m, (ctx, comp) in modes.items():
                with ctx():
                    times[m].append(prefill_seconds(engine, n, comp, seed=1 + r)[0])
        row = {m: dict(median_s=statistics.median(t), all_s=t) for m, t in times.items()}
        row["compactor_share_eager"] = row["eager_compactor"]["median_s"] / row["eager"]["median_s"] - 1
        row["compactor_share_kernels"] = row["kernels_compactor"]["median_s"] / row["kernels"]["median_s"] - 1
        all_in = "kernels_fused_residual_merged_gemms"
        row["compactor_share_all_in"] = row[f"{all_in}_compactor"]["median_s"] / row[all_in]["median_s"] - 1
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
