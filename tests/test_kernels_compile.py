"""The decode kernels compile for Hopper (sm_90) on a machine without a GPU, with their K/V loads
pipelined through cp.async and their shared memory within an SM's 227 KB.

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
from kernels.decode_attention import _decode_merge_kernel, _decode_split_kernel
from kernels.decode_balanced import _decode_balanced_kernel, _decode_balanced_merge_kernel

TARGET = GPUTarget("cuda", 90, 32)
STRIDES = ["stride_qb", "stride_qh", "stride_pb", "stride_ph", "stride_lb", "stride_lh", "stride_ob", "stride_oh"]


def compile_for_sm90(fn, types, constexprs, **options):
    # Pointers and the larger strides aligned to 16, as a launch on real tensors specializes them.
    names = fn.arg_names
    signature = {n: types.get(n, "constexpr") for n in names}
    aligned = [n for n in names if n.endswith("_ptr") or n in ("stride_qb", "stride_qh", "stride_pb", "stride_ob", "stride_oh")]
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
json.dump(results, sys.stdout)
"""


def test_decode_kernels_compile_for_hopper() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout)
    assert len(results) == 2 * (2 * 4 + 3)
    for r in results:
        assert 0 < r["shared"] <= SM90_SHARED_BYTES, r
        if r["kernel"] in ("_decode_balanced_kernel", "_decode_split_kernel"):
            assert r["async_copies"] > 0, f"K/V loads not pipelined: {r}"
