"""The attention, scoring and residual-norm kernels compile for Hopper (sm_90) on a machine without a GPU, the
attention kernels with their K/V loads pipelined through cp.async, every kernel's shared memory
within an SM's 227 KB, at the shapes and configs the engine launches.

CI has no GPU and runs the kernels in Triton's interpreter, which never sees the compiler: a kernel
that interprets fine may still fail to compile (a loop-carried value that changes type, an
unsupported construct). Compiling ahead of time (triton.compile with a GPUTarget) needs no driver. It
runs in a subprocess because the test session imports triton with TRITON_INTERPRET=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SM90_SHARED_BYTES = 227 * 1024

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvferry.kernels.decode_attention import _decode_merge_kernel, _decode_split_kernel
from kvferry.kernels.decode_balanced import _decode_balanced_kernel, _decode_balanced_merge_kernel
from kvferry.kernels.attention_mass import _attention_mass_kernel
from kvferry.kernels.leverage_scores import _fused_kernel
from kvferry.kernels.prefill_attention import _prefill_kernel
from kvferry.kernels.rms_norm import _rms_norm_kernel

TARGET = GPUTarget("cuda", 90, 32)
STRIDES = ["stride_qb", "stride_qh", "stride_pb", "stride_ph", "stride_lb", "stride_lh", "stride_ob", "stride_oh"]


def compile_for_sm90(fn, types, constexprs, **options):
    # Pointers and the larger strides aligned to 16, as a launch on real tensors specializes them.
    names = fn.arg_names
    signature = {n: types.get(n, "constexpr") for n in names}
    aligned = [n for n in names if n.endswith("_ptr") or (n.startswith("stride_") and n not in ("stride_lb", "stride_lh"))]
    src = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    k = triton.compile(src, target=TARGET, options=options)
    ttgir = k.asm["ttgir"]
    return dict(kernel=fn.__name__, options=options, constexprs={k: str(v) for k, v in constexprs.items()},
                shared=k.metadata.shared, async_copies=ttgir.count("async_copy_global_to_local"))


results = []
for dtype, precision in (("bf16", "tf32"), ("fp16", "tf32")):
    io = {"q_ptr": f"*{dtype}", "kv_ptr": f"*{dtype}", "pt_ptr": "*i32", "lens_ptr": "*i32", "out_ptr": f"*{dtype}",
          "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32", "scale_log2": "fp32", **{s: "i32" for s in STRIDES}}
    for page_size in (16, 128):
        tile = dict(H=8, G=4, BLOCK_G=16, D=128, PAGE_SIZE=page_size, PRECISION=precision, UPCAST=False)
        for block_n, stages in ((64, 2), (64, 3), (128, 2)):
            results.append(compile_for_sm90(_decode_balanced_kernel, {**io, "runs_ptr": "*i32", "num_heads": "i32"},
                                            dict(tile, BLOCK_N=block_n), num_warps=4, num_stages=stages))
        results.append(compile_for_sm90(_decode_split_kernel, {**io, "num_splits": "i32"},
                                        dict(tile, BLOCK_N=128, SPLIT=True), num_warps=4, num_stages=2))
    out = {"ends_ptr": "*i32", "mid_o_ptr": "*fp32", "mid_lse_ptr": "*fp32", "out_ptr": f"*{dtype}", "stride_ob": "i32",
           "stride_oh": "i32", "num_heads": "i32", "num_programs": "i32", "min_tiles": "i32"}
    for block_s in (16, 64):
        results.append(compile_for_sm90(_decode_balanced_merge_kernel, out, dict(H=8, G=4, D=128, BLOCK_S=block_s), num_warps=4))
    results.append(compile_for_sm90(_decode_merge_kernel, {k: v for k, v in out.items() if k not in ("ends_ptr", "num_heads", "min_tiles", "num_programs")} | {"num_splits": "i32"},
                                    dict(HQ=32, D=128, BLOCK_S=64), num_warps=4))
# Prefill (the Triton path: short chunks, unaligned prefixes; per-head prefixes over a cached
# context), the compactor's scoring kernels.
for head_starts in (False, True):
    results.append(compile_for_sm90(
        _prefill_kernel,
        {"q_ptr": "*bf16", "kv_ptr": "*bf16", "pt_ptr": "*i32", "cu_ptr": "*i32", "starts_ptr": "*i32", "out_ptr": "*bf16",
         "scale_log2": "fp32", **{s: "i32" for s in ["stride_qt", "stride_qh", "stride_ot", "stride_oh", "stride_ps", "stride_ph"]}},
        dict(H=8, G=4, D=128, PAGE_SIZE=16, BLOCK_M=256, BLOCK_N=64, PRECISION="tf32", UPCAST=False, FOLD=False,
             HEAD_STARTS=head_starts),
        num_warps=8, num_stages=3))
for block_b in (128, 256):
    results.append(compile_for_sm90(
        _attention_mass_kernel,
        {"q_ptr": "*bf16", "k_ptr": "*bf16", "bounds_ptr": "*i32", "out_ptr": "*fp32", "offset": "i32", "scale_log2": "fp32",
         **{s: "i32" for s in ["stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_oh"]}},
        dict(G=4, D=128, BLOCK_B=block_b, PRECISION="tf32", UPCAST=False, QSPLIT=2), num_warps=8))
results.append(compile_for_sm90(
    _fused_kernel,
    {"keys_ptr": "*bf16", "bounds_ptr": "*i32", "sketch_ptr": "*fp32", "x_ptr": "*fp32", "out_ptr": "*fp32", "offset": "i32",
     "blk0": "i32", "out_col": "i32", "ridge": "fp32", "stride_kt": "i32", "stride_kh": "i32", "stride_oh": "i32"},
    dict(H=64, S=8, D=128, K=48, KP=64, BLOCK_T=64, SKETCH_PRECISION="tf32", PRECISION="tf32x3", NUM_STAGES=3),
    num_warps=4))
# The residual add + RMSNorm of every decoder layer (and the plain norm), 8B hidden size.
for add in (False, True):
    results.append(compile_for_sm90(
        _rms_norm_kernel,
        {"x_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "stride_xt": "i32", "stride_xh": "i32",
         "heads": "i32", "stride_r": "i32", "stride_o": "i32", "hidden": "i32", "eps": "fp32"},
        dict(BLOCK=4096, ADD=add), num_warps=16))
json.dump(results, sys.stdout)
"""


def test_kernels_compile_for_hopper() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-P", "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    assert len(results) == 2 * (2 * 4 + 3) + 5 + 2
    for r in results:
        assert 0 < r["shared"] <= SM90_SHARED_BYTES, r
        if r["kernel"] in ("_decode_balanced_kernel", "_decode_split_kernel", "_prefill_kernel"):
            assert r["async_copies"] > 0, f"K/V loads not pipelined: {r}"
