"""The dense prefill path (kernels/prefill_dense.py) against the paged reference.

On CPU the dense calls run torch's CPU flash kernel and the merge runs in Triton's interpreter; on a
GPU (`gpu` marker) cuDNN runs at the Llama-3.1-8B shape.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # the root conftest.py sets it before any triton import
pytest.importorskip("triton")

from kvferry.engine.layers import paged_attention as ref  # noqa: E402
from kvferry.kernels.prefill_dense import (  # noqa: E402
    MIN_TOKENS,
    PREFIX_ALIGN,
    dense_prefill_applies,
    dense_prefill_supported,
    merge_attention_states,
    prefill_attention_dense,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    return float((out.float() - want.float()).norm() / want.float().norm())


def check_chunk(
    start: int, num_t: int, heads: int, group: int, dim: int, page_size: int, dtype, **kw
) -> None:
    """A chunk at `start` over scattered pages holding the prefix and the chunk itself."""
    total = start + num_t
    pages = -(-total // page_size)
    num_pages = heads * pages + 3
    pool = torch.randn(num_pages, 2, page_size, dim, device=DEVICE).to(dtype)
    table = torch.randperm(num_pages)[: heads * pages].view(heads, pages).int().to(DEVICE)
    q = torch.randn(num_t, heads * group, dim, device=DEVICE).to(dtype)
    k = torch.randn(num_t, heads, dim, device=DEVICE).to(dtype)
    v = torch.randn(num_t, heads, dim, device=DEVICE).to(dtype)
    pos = torch.arange(start, total, device=DEVICE)
    slot_pages = table[:, (pos // page_size)].long()  # [H, T]
    ref.store_kv(pool, slot_pages, (pos % page_size).expand(heads, -1), k.transpose(0, 1), v.transpose(0, 1))
    scale = dim**-0.5
    out = torch.full_like(q, float("nan"))
    got = prefill_attention_dense(q, k, v, pool, table, start, scale, out=out, **kw)
    assert got is out
    want = ref.prefill_attention(q.float(), pool.float(), table, start, scale)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert rel_err(out, want) < tol, (start, num_t)
    fresh = prefill_attention_dense(q, k, v, pool, table, start, scale, **kw)  # as the engine calls it
    assert fresh.shape == q.shape and torch.equal(fresh, out)


def test_merge_is_attention_over_the_union() -> None:
    """Two key sets attended apart and merged equal one attention over both; one set may be empty
    (log-sum-exp -inf) for some rows; strided inputs and the merged log-sum-exp."""
    torch.manual_seed(3)
    hq, t, d, sa, sb = 3, 37, 16, 20, 9
    q = torch.randn(hq, t, d)
    ka, va, kb, vb = (
        torch.randn(hq, sa, d),
        torch.randn(hq, sa, d),
        torch.randn(hq, sb, d),
        torch.randn(hq, sb, d),
    )
    sa_ = q @ ka.transpose(1, 2)
    sb_ = q @ kb.transpose(1, 2)
    sb_[:, :5] = float("-inf")  # rows 0..4 see nothing of set b
    lse_a, lse_b = sa_.logsumexp(-1), sb_.logsumexp(-1)
    o_a = sa_.softmax(-1) @ va
    o_b = torch.nan_to_num(sb_.softmax(-1)) @ vb
    both = torch.cat([sa_, sb_], -1)
    want = both.softmax(-1) @ torch.cat([va, vb], 1)  # [Hq, T, D]
    o_b_strided = o_b.transpose(0, 1).contiguous().transpose(0, 1)  # [Hq, T, D] with T outer in memory
    out = torch.full((t, hq, d), float("nan"))
    lse_out = torch.full((hq, t), float("nan"))
    merge_attention_states(o_a, lse_a, o_b_strided, lse_b.T.contiguous().T, out, lse_out)
    assert torch.allclose(out.transpose(0, 1), want, atol=1e-5)
    assert torch.allclose(lse_out, both.logsumexp(-1), atol=1e-5)


@pytest.mark.parametrize(
    "start,num_t,page_size,segment_keys",
    [(0, 23, 8, 64), (16, 9, 8, 64), (40, 17, 8, 16), (13 * 8, 1, 8, 24), (29, 11, 16, 64)],
)
@pytest.mark.parametrize("group", [1, 3])
def test_dense_prefill_matches_paged_reference(start, num_t, page_size, segment_keys, group) -> None:
    """A fresh prompt, a chunk over a cached prefix, a prefix in several segments (max_keys below
    the prefix), a one-token chunk, a prefix ending mid-page; GQA groups of 1 and 3; chunks padded
    to a bucket of 8 rows (unless they fill it) and unpadded."""
    torch.manual_seed(start + num_t + group)
    for t_bucket in (1, 8):
        check_chunk(
            start, num_t, 2, group, 32, page_size, torch.float32, segment_keys=segment_keys, t_bucket=t_bucket
        )


def test_dense_prefill_applies_only_where_shapes_stay_few() -> None:
    """Off a GPU never; on one, chunks of at least MIN_TOKENS rows over PREFIX_ALIGN-aligned prefixes."""
    assert not dense_prefill_supported("cpu", None, torch.bfloat16, 128)
    q = torch.empty(MIN_TOKENS, 4, 64, dtype=torch.bfloat16, device=DEVICE)
    on_gpu = DEVICE.type == "cuda"
    assert dense_prefill_applies(q, 0) == on_gpu
    assert dense_prefill_applies(q, 2 * PREFIX_ALIGN) == on_gpu
    assert not dense_prefill_applies(q, PREFIX_ALIGN + 16)
    assert not dense_prefill_applies(q[: MIN_TOKENS - 1], 0)
    assert not dense_prefill_applies(q.float(), 0)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_prefill_gpu_llama8b(dtype) -> None:
    """cuDNN at the 8B attention shape: a fresh 4K prompt, 2K chunks over 30K and 3K prefixes,
    a prefix split into segments, an odd-sized last chunk, one token."""
    assert dense_prefill_supported("cuda", torch.cuda.current_device(), dtype, 128)
    torch.manual_seed(11)
    check_chunk(0, 4096, 8, 4, 128, 16, dtype)
    check_chunk(30720, 2048, 8, 4, 128, 16, dtype)
    check_chunk(3000, 2048, 8, 4, 128, 16, dtype)
    check_chunk(20480, 777, 8, 4, 128, 16, dtype, segment_keys=8192)
    check_chunk(5000, 1, 8, 4, 128, 16, dtype)
    check_chunk(300, 256, 3, 3, 64, 16, dtype)  # SmolLM2's heads
