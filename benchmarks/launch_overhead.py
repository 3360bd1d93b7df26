"""Host time per call of the engine's Triton kernels against eager PyTorch ops, at tiny shapes.

An 8K prefill of the Llama-3.1-8B shape is about as host-bound as GPU-bound (~40 launches per layer,
docs/benchmarks/compression_overhead.md), so what a launch costs the CPU decides whether fusing ops
into one Triton kernel saves wall time. Each call is enqueued `--calls` times back to back with no
synchronisation; the GPU work per call is a few microseconds, so the host sets the pace.

    python3 benchmarks/launch_overhead.py --out docs/benchmarks     # on a GPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def host_us_per_call(fn: Callable[[], Any], calls: int, rounds: int = 5) -> float:
    """Median over rounds of the host's wall time per call, the queue drained between rounds."""
    for _ in range(20):
        fn()
    per_call = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - t0) / calls)
    torch.cuda.synchronize()
    return 1e6 * statistics.median(per_call)


def cases(device: torch.device) -> dict[str, Callable[[], Any]]:
    from kvferry.engine.layers.norm import rms_norm_reference
    from kvferry.engine.layers.rotary import apply_rotary
    from kvferry.kernels import attention_mass, rms_norm, rotary, silu_mul

    dt = torch.bfloat16
    x = torch.randn(4, 4096, device=device, dtype=dt)
    w = torch.ones(4096, device=device, dtype=dt)
    q = torch.randn(4, 32, 128, device=device, dtype=dt)
    k = torch.randn(4, 8, 128, device=device, dtype=dt)
    cos, sin = (
        torch.randn(4, 1, 128, device=device, dtype=dt),
        torch.randn(4, 1, 128, device=device, dtype=dt),
    )
    g, u = torch.randn(4, 14336, device=device, dtype=dt), torch.randn(4, 14336, device=device, dtype=dt)
    bounds = torch.tensor([0, 4], device=device, dtype=torch.int32)
    mass = torch.empty(8, 4, device=device)
    return {
        "torch add (one eager op)": lambda: x + x,
        "eager RMSNorm (8 ops)": lambda: rms_norm_reference(x, w, 1e-5),
        "triton rms_norm": lambda: rms_norm(x, w, 1e-5),
        "eager RoPE of q (5 ops)": lambda: apply_rotary(q, cos, sin),
        "triton rotary": lambda: rotary(q, cos, sin),
        "eager silu * up (2 ops)": lambda: F.silu(g) * u,
        "triton silu_mul": lambda: silu_mul(g, u),
        "triton attention_mass": lambda: attention_mass(q, k, bounds, 4, 0.088, mass),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=400, help="calls per round (below the launch queue's depth)")
    p.add_argument("--out", type=Path, help="folder for launch_overhead.json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a GPU: it times kernel launches")
    import triton

    device = torch.device("cuda")
    result: dict[str, Any] = dict(
        device=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(),
        command="python3 " + " ".join(shlex.quote(a) for a in sys.argv), torch=torch.__version__,
        triton=triton.__version__, host_us_per_call={},
    )  # fmt: skip
    with torch.no_grad():
        for name, fn in cases(device).items():
            result["host_us_per_call"][name] = us = host_us_per_call(fn, args.calls)
            print(f"{name:28s} {us:7.1f} us", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "launch_overhead.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
