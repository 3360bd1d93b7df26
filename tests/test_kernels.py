"""Triton kernels against their PyTorch references (engine/layers/paged_attention.py).

Without CUDA the kernels run on CPU under TRITON_INTERPRET=1 (set here, before triton decorates
them) at small shapes; with CUDA the same tests run compiled, plus the `gpu` ones at real shapes.
Every check draws fresh random inputs and poisons the outputs, so unwritten elements show as NaN.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # the root conftest.py sets it before any triton import
triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and "Interpreted" not in type(triton.language.max).__name__:
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)")

from kvferry import kernels  # noqa: E402  (after TRITON_INTERPRET)
from kvferry.engine.layers import paged_attention as ref  # noqa: E402
from kvferry.kernels.decode_attention import choose_num_splits  # noqa: E402
from kvferry.kernels.decode_balanced import decode_attention_balanced, plan_decode  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # relative Frobenius error


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output: an element was not written"
    return float((out.double() - want.double()).norm() / want.double().norm())


def random_pool(num_pages: int, page_size: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(num_pages, 2, page_size, head_dim, device=DEVICE).to(dtype)  # [N, 2, P, D]


def random_page_tables(lens: torch.Tensor, page_size: int, num_pages: int, max_pages: int) -> torch.Tensor:
    """Scattered pages for heads of lengths `lens` [...]: page table [..., max_pages], -1 past each head."""
    need = (lens.cpu() + page_size - 1) // page_size
    table = torch.full((*need.shape, max_pages), -1, dtype=torch.int32)
    used = (torch.arange(max_pages) < need[..., None]).cpu()
    table[used] = torch.randperm(num_pages)[: int(used.sum())].int()
    return table.to(DEVICE)


def head_lens(shape: tuple[int, ...], max_len: int, page_size: int) -> torch.Tensor:
    """Random per-head lengths in [1, max_len], with 1, page multiples and off-page lengths present."""
    lens = torch.randint(1, max_len + 1, shape)
    flat = lens.view(-1)
    special = [1, max_len, page_size, 3 * page_size, page_size + 1, 2 * page_size - 1]
    for i, n in enumerate(special[: flat.numel()]):
        flat[i] = min(n, max_len)
    return flat[torch.randperm(flat.numel())].view(shape).to(DEVICE)


def check_decode(
    batch: int,
    kv_heads: int,
    group: int,
    head_dim: int,
    page_size: int,
    max_len: int,
    dtype,
    lens: torch.Tensor | None = None,
    balanced: bool = False,
    **kw,
) -> None:
    """`lens` [B, H] (default: random in [1, max_len]) may hold 0: those heads must come out zero.
    `balanced`: the work-balanced kernel (kw: block_n, num_programs, num_warps, num_stages)."""
    if lens is None:
        lens = head_lens((batch, kv_heads), max_len, page_size)  # [B, H]
    max_pages = -(-max_len // page_size) + 1
    num_pages = batch * kv_heads * max_pages + 3
    pool = random_pool(num_pages, page_size, head_dim, dtype)
    tables = random_page_tables(lens, page_size, num_pages, max_pages)  # [B, H, max_pages]
    q = torch.randn(batch, kv_heads * group, head_dim, device=DEVICE).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    if balanced:
        block_n = kw.pop("block_n", 32 if dtype == torch.float32 else 64)
        plan = plan_decode(lens, block_n, kw.pop("num_programs", None), kw.pop("min_tiles", 1))
        slots = 2 * plan.num_programs
        workspace = (
            torch.full((slots, group, head_dim), float("nan"), device=DEVICE),
            torch.full((slots, group), float("nan"), device=DEVICE),
        )
        got = decode_attention_balanced(
            q, pool, tables, lens, scale, plan=plan, out=out, workspace=workspace, **kw
        )
    else:
        # The launcher's own split count when none is given: its workspace is poisoned too.
        s = kw.get("num_splits") or choose_num_splits(batch, kv_heads, max_pages * page_size, DEVICE)
        workspace = None
        if s > 1:
            workspace = (
                torch.full((batch, kv_heads * group, s, head_dim), float("nan"), device=DEVICE),
                torch.full((batch, kv_heads * group, s), float("nan"), device=DEVICE),
            )
        got = kernels.decode_attention_split(q, pool, tables, lens, scale, out=out, workspace=workspace, **kw)
    assert got is out
    want = ref.decode_attention(q.float(), pool.float(), tables, lens, scale)  # NaN on empty heads
    empty = (lens == 0).repeat_interleave(group, dim=1)  # [B, Hq]
    assert not out[empty].any(), "a head with no tokens must come out zero"
    if not empty.all():
        assert rel_err(out[~empty], want[~empty]) < TOL[dtype]


def check_prefill(
    chunks: list[tuple[int, int]],
    kv_heads: int,
    group: int,
    head_dim: int,
    page_size: int,
    dtype,
    head_starts: list[list[int]] | None = None,
    **kw,
) -> None:
    """chunks: (start, num_tokens) of each sequence; each sequence's pages hold start + T tokens.
    head_starts [S][H]: each head's own prefix instead of `start` (a compressed cached context: the
    chunk follows every head's own kept tokens), passed to the kernel as starts [S, H]."""
    sizes = torch.tensor([t for _, t in chunks])
    if head_starts is None:
        starts = torch.tensor([s for s, _ in chunks])
        prefixes = starts[:, None].expand(-1, kv_heads)  # [S, H]
    else:
        starts = prefixes = torch.tensor(head_starts)  # [S, H]
    totals = prefixes + sizes[:, None]  # [S, H]
    max_pages = int(-(-totals.max() // page_size))
    num_pages = len(chunks) * kv_heads * max_pages + 5
    pool = random_pool(num_pages, page_size, head_dim, dtype)
    tables = random_page_tables(totals, page_size, num_pages, max_pages)  # [S, H, max_pages]
    cu = torch.zeros(len(chunks) + 1, dtype=torch.int32)
    cu[1:] = sizes.cumsum(0)
    q = torch.randn(int(cu[-1]), kv_heads * group, head_dim, device=DEVICE).to(dtype)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    kernels.prefill_attention(
        q,
        pool,
        tables,
        cu.to(DEVICE),
        starts.to(torch.int32).to(DEVICE),
        int(sizes.max()),
        scale,
        out=out,
        **kw,
    )
    pool32 = pool.float()
    for i in range(len(chunks)):
        lo, hi = int(cu[i]), int(cu[i + 1])
        start = int(starts[i]) if head_starts is None else prefixes[i]
        # The reference in pieces of rows: its scores are [H, G, rows, keys], 1 GB at 256 x 32K.
        want = torch.cat(
            [
                ref.prefill_attention(
                    q[r : min(r + 256, hi)].float(), pool32, tables[i], start + r - lo, scale
                )
                for r in range(lo, hi, 256)
            ]
        )
        assert rel_err(out[lo:hi], want) < TOL[dtype], i


# ---- small shapes: CPU interpreter in CI, compiled on a GPU ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "page_size,block_n", [(16, 16), (16, 32), (32, 16)]
)  # one page per block, several pages per block
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_small(dtype, page_size, block_n, num_splits) -> None:
    torch.manual_seed(1000 + page_size + block_n + num_splits)
    check_decode(3, 2, 3, 32, page_size, 70, dtype, num_splits=num_splits, block_n=block_n)


@pytest.mark.parametrize("group", [1, 4])
def test_decode_small_groups_and_auto_splits(group) -> None:
    torch.manual_seed(7 + group)
    check_decode(2, 2, group, 16, 16, 50, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 19])
def test_decode_ragged_empty_and_short_heads(num_splits) -> None:
    """Heads of 0 tokens (every split empty: CUDA-graph padding rows), 1 token, shorter than one
    split or one block, exactly one block, and long ones, in one batch; with many splits most of a
    short head's splits are empty."""
    torch.manual_seed(3000 + num_splits)
    lens = torch.tensor([[0, 1, 7, 16], [250, 0, 17, 0], [33, 180, 64, 5]], device=DEVICE)  # [B, H]
    kw = dict(num_splits=num_splits, block_n=16)
    check_decode(3, 4, 2, 16, 16, 250, torch.float32, lens=lens, **kw)
    check_decode(3, 4, 2, 16, 16, 250, torch.bfloat16, lens=lens, **kw)


@pytest.mark.parametrize(
    "num_programs,min_tiles", [(1, 1), (2, 1), (5, 1), (23, 1), (200, 1), (23, 4), (200, 3)]
)
def test_decode_balanced_ragged_empty_and_short_heads(num_programs, min_tiles) -> None:
    """The work-balanced kernel over the same ragged batch: one program walks every head; a few
    programs each cover several whole heads plus pieces; many programs cut long heads into many
    pieces (merged by log-sum-exp) and leave programs with no work (more of them when each must
    take at least `min_tiles`)."""
    torch.manual_seed(4000 + num_programs + min_tiles)
    lens = torch.tensor([[0, 1, 7, 16], [250, 0, 17, 0], [33, 180, 64, 5]], device=DEVICE)  # [B, H]
    kw = dict(block_n=16, num_programs=num_programs, min_tiles=min_tiles)
    for dtype in (torch.float32, torch.bfloat16):
        check_decode(3, 4, 2, 16, 16, 250, dtype, lens=lens, balanced=True, **kw)


@pytest.mark.parametrize("page_size,block_n", [(16, 16), (16, 32), (32, 16)])
def test_decode_balanced_small(page_size, block_n) -> None:
    torch.manual_seed(5000 + page_size + block_n)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        check_decode(3, 2, 3, 32, page_size, 70, dtype, balanced=True, block_n=block_n, num_programs=7)


def test_decode_balanced_head_over_many_programs() -> None:
    """One head cut into 100 pieces, more than the merge reads in one block (64)."""
    torch.manual_seed(4500)
    lens = torch.tensor([[1600, 5]], device=DEVICE)
    check_decode(1, 2, 2, 16, 16, 1600, torch.float32, lens=lens, balanced=True, block_n=16, num_programs=300)


def test_decode_balanced_all_heads_empty() -> None:
    """A batch of padding rows only (every head 0 tokens): zeros, and no program reads a page."""
    lens = torch.zeros(2, 3, dtype=torch.int32, device=DEVICE)
    check_decode(2, 3, 2, 16, 16, 40, torch.float32, lens=lens, balanced=True, block_n=16, num_programs=4)


def test_decode_attention_dispatch() -> None:
    """The engine's entry takes the balanced kernel from 64 heads on (or given a plan) and the split
    kernel below; both agree with the reference."""
    torch.manual_seed(6000)
    for batch, kv_heads in [(3, 4), (16, 4)]:
        assert kernels.use_balanced(batch, kv_heads) == (batch * kv_heads >= 64)
        lens = head_lens((batch, kv_heads), 40, 16)
        lens[0, 0] = 0
        pool = random_pool(batch * kv_heads * 4, 16, 16, torch.float32)
        tables = random_page_tables(lens, 16, pool.shape[0], 4)
        q = torch.randn(batch, kv_heads * 2, 16, device=DEVICE)
        want = ref.decode_attention(q, pool, tables, lens, 0.25)
        plans = [None, plan_decode(lens, 16, 5)]
        for plan in plans:
            got = kernels.decode_attention(q, pool, tables, lens, 0.25, plan=plan)
            assert not got[0, :2].any() and rel_err(got[:, 2:], want[:, 2:]) < TOL[torch.float32]


def test_plan_decode_shares_tiles_equally() -> None:
    """The plan of a stack of layers equals each layer's own plan; program starts land in the
    head holding that tile."""
    lens = torch.tensor([[[0, 40, 3], [17, 0, 100]], [[5, 5, 5], [0, 0, 0]]])  # [L=2, B=2, H=3]
    plan = plan_decode(lens, block_n=16, num_programs=4)
    assert plan.tile_ends.tolist() == [[0, 3, 4, 6, 6, 13], [1, 2, 3, 3, 3, 3]]
    # 13 tiles over 4 programs: 4 each; 3 tiles: 1 each, the last program idle.
    assert plan.runs.tolist() == [  # first head, its first tile, its length, tiles [lo, hi)
        [[1, 0, 40, 0, 4], [3, 4, 17, 4, 8], [5, 6, 100, 8, 12], [5, 6, 100, 12, 13]],
        [[0, 0, 5, 0, 1], [1, 1, 5, 1, 2], [2, 2, 5, 2, 3], [5, 3, 0, 3, 3]],
    ]
    runs = plan_decode(lens, 16, 4, min_tiles=5).runs  # at least 5 tiles each: programs left idle
    assert runs[0, :, 3:].tolist() == [[0, 5], [5, 10], [10, 13], [15, 13]]
    assert runs[1, :, 3:].tolist() == [[0, 3], [5, 3], [10, 3], [15, 3]]
    for i in range(2):
        one = plan_decode(lens[i], block_n=16, num_programs=4)
        assert torch.equal(one.tile_ends, plan.layer(i).tile_ends)
        assert torch.equal(one.runs, plan.layer(i).runs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size,block_n", [(16, 16), (8, 16)])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("fold_scale", [False, True])
def test_prefill_small(dtype, page_size, block_n, group, fold_scale) -> None:
    torch.manual_seed(2000 + page_size + group)
    chunks = [(0, 1), (0, 21), (13, 9), (32, 17), (40, 40)]  # a fresh 1-token sequence, unaligned starts
    kw = dict(block_m=16, block_n=block_n, num_warps=4, fold_scale=fold_scale)
    check_prefill(chunks, 2, group, 32, page_size, dtype, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size,block_n", [(16, 16), (8, 16)])
@pytest.mark.parametrize("group", [1, 3])
def test_prefill_small_per_head_prefixes(dtype, page_size, block_n, group) -> None:
    """Chunks over per-head prefixes (a compressed cached context): empty heads, whole pages, lengths
    off a page or block edge, one head far longer than its neighbours; 1-token and multi-block chunks."""
    torch.manual_seed(2500 + page_size + group)
    chunks = [(0, 1), (0, 21), (0, 9), (0, 40)]
    head_starts = [[0, 16], [32, 5], [48, 0], [17, 64]]
    for fold_scale in (False, True):
        kw = dict(block_m=16, block_n=block_n, num_warps=4, fold_scale=fold_scale)
        check_prefill(chunks, 2, group, 32, page_size, dtype, head_starts=head_starts, **kw)


def test_store_kv_one_token_with_broadcast_offsets() -> None:
    """A one-token prefill chunk: every head's slot offset is one broadcast value (a stride-0 view),
    which flattens to a view of one element; the kernel must still read one offset per row (it read
    past the element, wrote out of bounds and crashed the GPU engine's fp32 test)."""
    torch.manual_seed(5)
    page_size, head_dim, heads = 16, 32, 8
    pool = random_pool(40, page_size, head_dim, torch.float32)
    pages = torch.randperm(40)[:heads].view(1, heads).to(DEVICE)
    offsets = torch.tensor([[7]], device=DEVICE).expand(1, heads)
    k = torch.randn(1, heads, head_dim, device=DEVICE)
    v = torch.randn(1, heads, head_dim, device=DEVICE)
    want = pool.clone()
    ref.store_kv(want, pages.T, offsets.T, k.transpose(0, 1), v.transpose(0, 1))
    kernels.store_kv(pool, pages, offsets, k, v)
    assert torch.equal(pool, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv(dtype) -> None:
    torch.manual_seed(3)
    page_size, head_dim, heads, tokens = 16, 32, 3, 21
    pool = random_pool(40, page_size, head_dim, dtype)
    pos = torch.randint(0, 40 * page_size, (tokens * heads,))
    pos = pos.unique()[torch.randperm(pos.unique().numel())][: tokens * heads // 2]  # distinct slots
    pages, offsets = (pos // page_size).to(DEVICE), (pos % page_size).to(DEVICE)
    k = torch.randn(pos.numel(), head_dim, device=DEVICE).to(dtype)  # the engine's k/v have the pool's dtype
    v = torch.randn(pos.numel(), head_dim, device=DEVICE).to(dtype)
    want = pool.clone()
    ref.store_kv(want, pages, offsets, k, v)
    kernels.store_kv(pool, pages, offsets, k, v)
    assert torch.equal(pool, want)  # written slots match, every other slot untouched
    # A [H, T] slot grid with [H, T, D] rows seen through a transpose (as prefill passes them).
    pool2 = random_pool(40, page_size, head_dim, dtype)
    want2 = pool2.clone()
    grid = torch.randperm(40 * page_size)[: heads * tokens].view(heads, tokens)
    pg, off = (grid // page_size).to(DEVICE), (grid % page_size).to(DEVICE)
    kt = torch.randn(tokens, heads, head_dim, device=DEVICE).to(dtype)
    vt = torch.randn(tokens, heads, head_dim, device=DEVICE).to(dtype)
    ref.store_kv(want2, pg, off, kt.transpose(0, 1), vt.transpose(0, 1))
    kernels.store_kv(pool2, pg.T, off.T, kt, vt)
    assert torch.equal(pool2, want2)


# ---- real shapes (GPU only): Llama-3.1-8B attention, 32 q / 8 kv heads, head_dim 128 ----

GPU_DTYPES = [torch.bfloat16, torch.float16]
PAGE_SIZES = [16, 32, 64, 128]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_decode_gpu_llama8b(dtype, page_size) -> None:
    """Ragged per-head lengths (uniform in [1, max], with 1 and page edges present) up to 32K."""
    torch.manual_seed(100 + page_size)
    check_decode(4, 8, 4, 128, page_size, 32768, dtype)  # auto splits over long heads
    check_decode(32, 8, 4, 128, page_size, 4096, dtype)  # a full batch: few splits
    check_decode(1, 8, 4, 128, page_size, 32768, dtype, num_splits=1)  # one program walks a whole head
    check_decode(3, 8, 4, 128, page_size, 9000, dtype, num_splits=37)  # short heads leave splits empty


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_decode_balanced_gpu_llama8b(dtype, page_size) -> None:
    torch.manual_seed(200 + page_size)
    check_decode(4, 8, 4, 128, page_size, 32768, dtype, balanced=True)  # long heads, many pieces each
    check_decode(32, 8, 4, 128, page_size, 4096, dtype, balanced=True)  # programs span several heads
    check_decode(1, 8, 4, 128, page_size, 32768, dtype, balanced=True, num_programs=1)
    lens = head_lens((8, 8), 9000, page_size)
    lens[::3] = 0  # padding rows
    check_decode(8, 8, 4, 128, page_size, 9000, dtype, lens=lens, balanced=True)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_n", [32, 64, 128])
@pytest.mark.parametrize("num_warps,num_stages", [(4, 2), (4, 3), (4, 4), (8, 2), (8, 3)])
def test_decode_balanced_gpu_configs(block_n, num_warps, num_stages) -> None:
    """The configs the balanced sweep may pick (benchmarks/attention_kernels.py), pages smaller and larger than a block."""
    torch.manual_seed(300 + block_n + num_warps + num_stages)
    for page_size in (16, 128):
        kw = dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages)
        check_decode(3, 8, 4, 128, page_size, 6000, torch.bfloat16, balanced=True, **kw)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_n", [16, 32, 64, 128])
@pytest.mark.parametrize("num_warps,num_stages", [(4, 1), (4, 2), (4, 3), (4, 4), (8, 1), (8, 2), (8, 3)])
def test_decode_gpu_configs(block_n, num_warps, num_stages) -> None:
    """Every block/warp/stage choice the benchmark sweep may pick, on pages smaller and larger than a block."""
    torch.manual_seed(block_n + num_warps + num_stages)
    for page_size in (16, 128):
        kw = dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages)
        check_decode(3, 8, 4, 128, page_size, 6000, torch.bfloat16, **kw)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "kv_heads,group,head_dim", [(3, 3, 64), (4, 8, 128), (8, 1, 128), (2, 16, 64)]
)  # SmolLM2-135M, a Qwen3-like group of 8, no GQA, a group of 16
def test_decode_gpu_other_groups(kv_heads, group, head_dim) -> None:
    torch.manual_seed(kv_heads * group)
    for dtype in GPU_DTYPES:
        check_decode(5, kv_heads, group, head_dim, 16, 3000, dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_prefill_gpu_llama8b(dtype, page_size) -> None:
    """A varlen batch: a fresh 4K prompt, chunks over cached prefixes up to 32K, 1-token chunks."""
    torch.manual_seed(10 + page_size)
    chunks = [(0, 4096), (30000, 512), (4097, 300), (0, 1), (32768 - 777, 777), (63, 1)]
    check_prefill(chunks, 8, 4, 128, page_size, dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_prefill_gpu_llama8b_per_head_prefixes(dtype, page_size) -> None:
    """Questions over compressed 32K contexts: every head keeps its own whole pages of the context
    (about half of it, as at retention 0.5 with an adaptive budget), a whole-prefill chunk after a
    short context, and the engine's default tile and a sweep config."""
    torch.manual_seed(40 + page_size)
    gen = torch.Generator().manual_seed(page_size)
    kept = torch.randint(4096, 28672, (3, 8), generator=gen) // page_size * page_size  # [S, H]
    kept[1, 3] = 0  # a head that kept nothing of its context
    chunks = [(0, 2048), (0, 77), (0, 1)]
    check_prefill(chunks, 8, 4, 128, page_size, dtype, head_starts=kept.tolist())
    short = [[page_size * (h + 1) for h in range(8)]]
    check_prefill([(0, 2048)], 8, 4, 128, page_size, dtype, head_starts=short, block_m=128, block_n=64)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("block_n", [32, 64, 128])
@pytest.mark.parametrize("num_warps,num_stages", [(4, 2), (4, 3), (4, 4), (8, 3), (8, 4)])
def test_prefill_gpu_configs(block_m, block_n, num_warps, num_stages) -> None:
    """Every config the benchmark sweep may pick."""
    torch.manual_seed(block_m + block_n + num_warps)
    kw = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    for page_size in (16, 128):
        check_prefill([(0, 700), (2000, 300), (5, 1)], 8, 4, 128, page_size, torch.bfloat16, **kw)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_stages", [3, 4])
@pytest.mark.parametrize("fold_scale", [False, True])
def test_prefill_gpu_wide_tiles(num_stages, fold_scale) -> None:
    """The default 2-byte tile (256 rows, 8 warps) and benchmarks/prefill_variants.py's others."""
    torch.manual_seed(num_stages + fold_scale)
    kw = dict(block_m=256, block_n=64, num_warps=8, num_stages=num_stages, fold_scale=fold_scale)
    for page_size in (16, 128):
        check_prefill([(0, 700), (2000, 300), (5, 1)], 8, 4, 128, page_size, torch.bfloat16, **kw)


@gpu
@pytest.mark.gpu
def test_fp32_default_tiles_gpu() -> None:
    """fp32 pools (an engine run with dtype float32) on the launchers' default tiles: fp32 dots run
    on CUDA cores, and the 2-byte tiles once spilled so much that the launch ran out of memory."""
    torch.manual_seed(21)
    check_decode(4, 8, 4, 128, 16, 4096, torch.float32)
    check_decode(2, 3, 3, 64, 64, 2000, torch.float32)
    check_prefill([(0, 600), (1000, 300), (3, 1)], 8, 4, 128, 16, torch.float32)
    check_prefill([(0, 256), (100, 100)], 3, 3, 64, 16, torch.float32)


@gpu
@pytest.mark.gpu
def test_prefill_gpu_other_groups() -> None:
    torch.manual_seed(12)
    for dtype in GPU_DTYPES:
        check_prefill([(77, 256), (0, 100), (1000, 1)], 3, 3, 64, 16, dtype)  # SmolLM2's group of 3
        check_prefill([(0, 300), (513, 64)], 4, 8, 128, 32, dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_store_kv_gpu(dtype, page_size) -> None:
    torch.manual_seed(5 + page_size)
    num_pages = 80000 // page_size * 8
    pool = random_pool(num_pages, page_size, 128, dtype)
    grid = torch.randperm(num_pages * page_size)[: 8 * 4096].view(8, 4096)  # [H, T] distinct slots
    pg, off = (grid // page_size).to(DEVICE), (grid % page_size).to(DEVICE)
    k = torch.randn(4096, 8, 128, device=DEVICE, dtype=dtype)  # a prefill chunk's [T, H, D] rows
    v = torch.randn(4096, 8, 128, device=DEVICE)  # fp32 rows are rounded to the pool's dtype like .to()
    want = pool.clone()
    ref.store_kv(want, pg, off, k.transpose(0, 1), v.transpose(0, 1))
    kernels.store_kv(pool, pg.T, off.T, k, v)
    assert torch.equal(pool, want)
    # A decode step: one row per (sequence, head), [B, H] slots.
    slots = torch.randperm(num_pages * page_size)[: 32 * 8].view(32, 8)
    pg, off = (slots // page_size).to(DEVICE), (slots % page_size).to(DEVICE)
    k, v = (torch.randn(32, 8, 128, device=DEVICE, dtype=dtype) for _ in range(2))
    ref.store_kv(want, pg, off, k, v)
    kernels.store_kv(pool, pg, off, k, v)
    assert torch.equal(pool, want)


@gpu
@pytest.mark.gpu
def test_forward_batches_run_triton_on_cuda() -> None:
    """PrefillBatch/DecodeBatch on a CUDA pool (Triton path) against the references on the same pool."""
    from kvferry.engine.forward_batch import DecodeBatch, PrefillBatch
    from kvferry.engine.kv_pool import KVPool
    from kvferry.engine.page_table import SequenceKV

    torch.manual_seed(11)
    layers, heads, group, head_dim, dtype = 2, 8, 4, 128, torch.bfloat16
    scale = head_dim**-0.5
    pool = KVPool(4096, 16, head_dim, dtype, DEVICE)
    seqs = [SequenceKV(pool, layers, heads, 4096) for _ in range(3)]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=DEVICE).to(dtype)

    for seq, prompt in zip(seqs, [700, 1, 1500]):
        start = 0
        while start < prompt:
            chunk = min(512, prompt - start)
            seq.grow(chunk)
            batch = PrefillBatch(seq, start, chunk)
            for layer in range(layers):
                q, k, v = (
                    rand(chunk, heads * group, head_dim),
                    rand(chunk, heads, head_dim),
                    rand(chunk, heads, head_dim),
                )
                out = batch.attend(layer, q, k, v, k, scale)
                table = seq.page_table[layer].to(DEVICE)
                want = ref.prefill_attention(q.float(), pool.kv.float(), table, start, scale)
                assert rel_err(out, want) < TOL[dtype]
            batch.finish()
            start += chunk
    # As after compression: every head keeps its own number of tokens, pages past them are freed.
    for seq in seqs:
        kept = torch.minimum(torch.randint(1, 1600, seq.head_lens.shape), seq.head_lens)  # [L, H]
        table = seq.page_table.clone()
        table[torch.arange(table.shape[-1]) >= seq.pages_per_head(kept)[..., None]] = -1
        seq.set_heads(kept, table)
        seq.grow(1)
    batch = DecodeBatch(seqs, [int(s.head_lens.max()) for s in seqs])
    for layer in range(layers):
        q, k, v = rand(3, heads * group, head_dim), rand(3, heads, head_dim), rand(3, heads, head_dim)
        out = batch.attend(layer, q, k, v, k, scale)
        written = pool.kv[batch.write_pages[layer], 0, batch.write_offsets[layer]]  # [B, H, D]
        assert torch.equal(written, k)
        lens = batch.attn_lens[layer]
        want = ref.decode_attention(q.float(), pool.kv.float(), batch.page_tables[:, layer], lens, scale)
        assert rel_err(out, want) < TOL[dtype]
    batch.finish()
    for seq in seqs:
        seq.free()
    pool.assert_no_leaks()


def test_a_new_prompt_length_compiles_no_attention_kernel_again(monkeypatch) -> None:
    """Prefill chunks and decode batches whose page tables are 16 to 32 pages wide (the
    prompt's length sets the width) and chunks of 16 or 37 tokens launch the attention kernels
    under one compile key each: a served document of a new length compiles nothing (kernel_keys.py)."""
    from kernel_keys import record_launches

    recorders = record_launches(
        monkeypatch,
        [("prefill_attention", "_prefill_kernel"), ("decode_attention", "_decode_split_kernel"),
         ("decode_attention", "_decode_merge_kernel"), ("decode_balanced", "_decode_balanced_kernel"),
         ("decode_balanced", "_decode_balanced_merge_kernel")],
    )  # fmt: skip
    torch.manual_seed(7000)
    for tokens in (250, 256, 350, 495):
        for chunk in (16, 37):
            check_prefill([(tokens - chunk, chunk)], 2, 2, 16, 16, torch.float32, block_m=16, block_n=16)
        for balanced in (False, True):
            lens = head_lens((3, 2), tokens, 16)
            check_decode(3, 2, 2, 16, 16, tokens, torch.float32, lens=lens, balanced=balanced, block_n=16)
    for name, recorder in recorders.items():
        assert recorder.keys, f"{name} was never launched"
        assert len(set(recorder.keys)) == 1, (
            f"{name} compiles again for a new prompt length: {set(recorder.keys)}"
        )
