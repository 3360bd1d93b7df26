"""Compression kernels (fused scoring, select-and-pack) against their PyTorch references in
engine/compression/.

Without CUDA the kernels run on CPU under TRITON_INTERPRET=1 (set by the root conftest.py before
triton is imported) at small shapes; with CUDA the same tests run compiled, plus the `gpu` ones at
Llama-3.1-8B shapes. Inputs are fresh random (never zeros) and outputs are poisoned with NaN.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and "Interpreted" not in type(triton.language.max).__name__:
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set (see conftest.py)")

from kvferry import kernels  # noqa: E402  (after TRITON_INTERPRET)
from kvferry.engine import CompressionParams  # noqa: E402
from kvferry.engine.compression.attention_scores import block_attention_mass  # noqa: E402
from kvferry.engine.compression.base import PromptShape  # noqa: E402
from kvferry.engine.compression.blocks import block_bounds  # noqa: E402
from kvferry.engine.compression.compactor import CompactorScorer  # noqa: E402
from kvferry.engine.compression.leverage import gaussian_sketch, sketched_leverage  # noqa: E402
from kvferry.engine.compression.select import pack_kept, select_tokens  # noqa: E402
from kvferry.engine.kv_pool import KVPool  # noqa: E402
from kvferry.engine.page_table import SequenceKV  # noqa: E402
from kvferry.kernels.leverage_scores import STAGES as LEVERAGE_METHODS  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
leverage_module = sys.modules[
    "kvferry.kernels.leverage_scores"
]  # the package re-exports a function of this name
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output: an element was not written"
    return float((out.double() - want.double()).norm() / want.double().norm())


def random_keys(t: int, h: int, d: int, dtype: torch.dtype, offset_scale: float = 4.0) -> torch.Tensor:
    """Pre-RoPE-like keys [T, H, D] with a large shared offset (as real keys have), seen through a
    strided view (every other head of a wider tensor)."""
    wide = torch.randn(t, 2 * h, d, device=DEVICE) + offset_scale * torch.randn(d, device=DEVICE)
    return wide[:, ::2].to(dtype)


# ---- references, block by block, as compactor calls them ----


def leverage_ref(keys: torch.Tensor, bounds: list[int], sketch: torch.Tensor) -> torch.Tensor:
    """keys [T, H, D] (token 0 at bounds[0]) -> [H, T]: each block's leverage over its block mean."""
    out = []
    for a, b in zip(bounds, bounds[1:]):
        o = sketched_leverage(keys[a - bounds[0] : b - bounds[0]].transpose(0, 1), sketch)
        out.append(o / o.mean(dim=1, keepdim=True).clamp(min=1e-12))
    return torch.cat(out, dim=1)


def mass_ref(q: torch.Tensor, k: torch.Tensor, bounds: list[int], scale: float) -> torch.Tensor:
    lo = bounds[0]
    return torch.cat(
        [
            block_attention_mass(q[a - lo : b - lo], k[a - lo : b - lo], scale)
            for a, b in zip(bounds, bounds[1:])
        ],
        dim=1,
    )


def check_leverage(
    n: int,
    span: tuple[int, int],
    block: int,
    h: int,
    d: int,
    k: int,
    dtype,
    tol: float,
    method: str | None = None,
    offset_scale: float = 4.0,
    min_overlap: float | None = None,
) -> None:
    """Blocks of an n-token prompt; the launch covers the blocks inside span (prompt positions).
    Two launches on one reused workspace (sketch2's tickets must be back at zero after the first);
    min_overlap: the least share of each (block, head)'s reference top half that the kernel keeps."""
    if DEVICE.type == "cuda" and method != "split3":  # x = (K - s)Φ in tf32 (the CPU runs ieee)
        tol = max(tol, 1e-3)
    bounds = [b for b in block_bounds(n, block) if span[0] <= b <= span[1]]
    lo, hi = bounds[0], bounds[-1]
    keys = random_keys(hi - lo, h, d, dtype, offset_scale)
    sketch = gaussian_sketch(d, k, DEVICE)
    edges = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    max_block = max(b - a for a, b in zip(bounds, bounds[1:]))
    want = leverage_ref(keys.float(), bounds, sketch)
    workspace = leverage_module.LeverageWorkspace()
    for _ in range(2):
        full = torch.full((h, n + 5), float("nan"), device=DEVICE)  # a view into a wider [H, n] buffer
        out = full[:, lo:hi]
        kernels.leverage_scores(
            keys, edges, kernels.padded_sketch(sketch), k, out, offset=lo, max_block=max_block,
            method=method, workspace=workspace,
        )  # fmt: skip
        assert rel_err(out, want) < tol
        assert full[:, :lo].isnan().all() and full[:, hi:].isnan().all(), "wrote outside its span"
        if min_overlap is not None:
            assert top_half_overlap(out, want, bounds) >= min_overlap
    if "tickets" in workspace.bufs:
        assert not workspace.bufs["tickets"].any(), "tickets not reset"


def top_half_overlap(out: torch.Tensor, want: torch.Tensor, bounds: list[int]) -> float:
    """Smallest share, over (block, head), of the reference's top half that out's top half holds."""
    worst, lo = 1.0, bounds[0]
    for a, b in zip(bounds, bounds[1:]):
        n = (b - a) // 2
        hit = torch.zeros(want.shape[0], b - a, dtype=torch.bool, device=want.device)
        hit.scatter_(1, want[:, a - lo : b - lo].topk(n, dim=1).indices, True)
        got = out[:, a - lo : b - lo].topk(n, dim=1).indices
        worst = min(worst, float(hit.gather(1, got).float().mean(dim=1).min()))
    return worst


def check_mass(
    n: int, span: tuple[int, int], block: int, h: int, g: int, d: int, dtype, tol: float, query_split: int = 1
) -> None:
    """query_split 2 adds into zeros (the compactor's fresh mass rows); the rest of the row is poisoned."""
    bounds = [b for b in block_bounds(n, block) if span[0] <= b <= span[1]]
    lo, hi = bounds[0], bounds[-1]
    q = torch.randn(hi - lo, h * g, d, device=DEVICE).to(dtype)
    k = torch.randn(hi - lo, h, d, device=DEVICE).to(dtype)
    scale = d**-0.5 * 2  # sharper than uniform attention
    full = torch.full((h, n + 3), float("nan"), device=DEVICE)
    out = full[:, lo:hi]
    if query_split > 1:
        out.zero_()
    edges = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    max_block = max(b - a for a, b in zip(bounds, bounds[1:]))
    kernels.attention_mass(q, k, edges, max_block, scale, out, offset=lo, query_split=query_split)
    want = mass_ref(q.float(), k.float(), bounds, scale)
    assert rel_err(out, want) < tol
    assert full[:, :lo].isnan().all() and full[:, hi:].isnan().all(), "wrote outside its span"
    if query_split > 1:  # the halves' order does not change the sum
        again = torch.zeros_like(out)
        kernels.attention_mass(q, k, edges, max_block, scale, again, offset=lo, query_split=query_split)
        assert torch.equal(again, out)


def scattered_sequence(layers: int, heads: int, n: int, page_size: int, head_dim: int, dtype) -> SequenceKV:
    """A sequence holding n random tokens per head in pages scattered over a random pool."""
    max_pages = -(-n // page_size)
    pool = KVPool(layers * heads * max_pages + 7, page_size, head_dim, dtype, DEVICE)
    pool.kv.copy_(torch.randn(pool.kv.shape, device=DEVICE).to(dtype))
    seq = SequenceKV(pool, layers, heads, n)
    seq.grow(n)
    seq.head_lens += n
    seq.page_table.view(-1)[:] = seq.page_table.view(-1)[torch.randperm(seq.page_table.numel())]
    return seq


def check_pack(
    layers: int, heads: int, n: int, page_size: int, head_dim: int, dtype, budget: str, r: float
) -> None:
    seq = scattered_sequence(layers, heads, n, page_size, head_dim, dtype)
    pool = seq.pool.kv
    params = CompressionParams(retention=r, budget=budget, sink=3, recent=5)
    kept, lens = select_tokens(torch.randn(layers, heads, n, device=DEVICE), params)  # [L, H, K], [L, H]
    assert lens.device.type == "cpu"  # known on the host: compaction's bookkeeping waits for nothing
    lens = lens.to(DEVICE)
    table = seq.page_table.clone()
    table[torch.arange(table.shape[-1]) >= seq.pages_per_head(lens.cpu())[..., None]] = -1
    src, dst = seq.page_table.to(DEVICE), table.to(DEVICE)
    # into a separate packed buffer, pages in (layer, head, page) travel order
    pages = seq.pages_per_head(lens.cpu())
    buf_table = torch.full_like(table, -1)
    buf_table[torch.arange(table.shape[-1]) < pages[..., None]] = torch.arange(
        int(pages.sum()), dtype=torch.int32
    )
    buf = torch.full((int(pages.sum()), 2, page_size, head_dim), float("nan"), device=DEVICE).to(dtype)
    got = kernels.pack_kept(pool, src, kept, lens, buf_table.to(DEVICE), dst_kv=buf)
    assert got is buf
    want_buf = torch.full_like(buf, float("nan"))
    pack_kept_into(pool, src, kept, lens, buf_table.to(DEVICE), want_buf)
    written = ~want_buf.isnan()
    assert torch.equal(buf[written], want_buf[written]) and buf[~written].isnan().all()
    # in place: the first pages of each head's own chain, as compaction does
    want = pool.clone()
    pack_kept(want, src, kept, lens, dst)
    kernels.pack_kept(pool, src, kept, lens, dst)
    assert torch.equal(pool, want)


def pack_kept_into(pool, src, kept, lens, dst_table, dst_kv) -> None:
    """The reference pack into another buffer: pack into a copy of the pool extended by dst_kv."""
    joined = torch.cat([pool, dst_kv])
    pack_kept(joined, src, kept, lens, torch.where(dst_table >= 0, dst_table + pool.shape[0], -1))
    dst_kv.copy_(joined[pool.shape[0] :])


# ---- small shapes: CPU interpreter in CI, compiled on a GPU ----


@pytest.mark.parametrize("method", list(LEVERAGE_METHODS))
@pytest.mark.parametrize("dtype,k", [(torch.float32, 12), (torch.bfloat16, 20)])  # k padded to 16, 32
def test_leverage_small(method, dtype, k) -> None:
    torch.manual_seed(k)
    check_leverage(150, (0, 150), 40, 2, 32, k, dtype, tol=1e-4, method=method)  # 4 blocks of 37-38
    check_leverage(150, (38, 113), 40, 2, 32, k, dtype, tol=1e-4, method=method)  # mid-prompt span


@pytest.mark.parametrize("method", list(LEVERAGE_METHODS))
def test_leverage_blocks_longer_than_a_split_and_a_large_offset(method) -> None:
    """Blocks of 2-3 splits of 64 tokens (a shorter last block leaves splits unused), keys with a
    shared offset 50x their spread: the ranking of each block's tokens is the reference's."""
    torch.manual_seed(5)
    check_leverage(
        330,
        (0, 330),
        170,
        2,
        16,
        12,
        torch.float32,
        tol=1e-3,
        method=method,
        offset_scale=50.0,
        min_overlap=0.99,
    )


@pytest.mark.parametrize("method", list(LEVERAGE_METHODS))
def test_leverage_block_shorter_than_the_sketch(method) -> None:
    """A block of fewer tokens than k: the Gram is singular and only the relative ridge inverts it."""
    torch.manual_seed(3)
    check_leverage(30, (0, 30), 10, 2, 16, 12, torch.float32, tol=2e-3, method=method)


def leverage_ref64(keys: torch.Tensor, bounds: list[int], sketch: torch.Tensor, ridge: float = 1e-4):
    """leverage_ref in float64: keys [T, H, D] -> [H, T], and each block's (G + ridge)⁻¹ [NB, H, k, k]."""
    out, invs = [], []
    for a, b in zip(bounds, bounds[1:]):
        kb = keys[a - bounds[0] : b - bounds[0]].double().transpose(0, 1)  # [H, b, D]
        x = (kb - kb.mean(dim=1, keepdim=True)) @ sketch.double()  # [H, b, k]
        gram = x.transpose(1, 2) @ x
        eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=keys.device)
        lift = ridge * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-12)
        inv = torch.linalg.inv(gram + lift[:, None, None] * eye)
        o = ((x @ inv) * x).sum(dim=-1)
        out.append(o / o.mean(dim=1, keepdim=True))
        invs.append(inv)
    return torch.cat(out, dim=1), torch.stack(invs)


def spectrum_keys(kind: str, t: int, h: int, d: int, offset_scale: float) -> torch.Tensor:
    """Keys [T, H, D] whose sketched Gram is ill-conditioned: rank 6 plus 1e-3 noise, or a spread of
    1e-4 over the head dims, or a few huge dims (as real pre-RoPE keys have); a shared offset."""
    if kind == "lowrank":
        keys = torch.einsum(
            "thr,hrd->thd", torch.randn(t, h, 6, device=DEVICE), torch.randn(h, 6, d, device=DEVICE)
        )
        keys = keys + 1e-3 * torch.randn(t, h, d, device=DEVICE)
    elif kind == "decay":
        keys = torch.randn(t, h, d, device=DEVICE) * torch.logspace(0, -4, d, device=DEVICE)
    else:  # outliers
        keys = torch.randn(t, h, d, device=DEVICE)
        keys[..., :3] *= 300.0
    return keys + offset_scale * keys.std() * torch.randn(d, device=DEVICE)


@pytest.mark.parametrize("kind", ["lowrank", "decay", "outliers"])
@pytest.mark.parametrize("method", ["sketch3", "sketch2", "fused"])
def test_leverage_ill_conditioned(method, kind) -> None:
    """Keys whose Gram is near singular (the relative ridge alone bounds its condition number), or
    with a few 300x dims as real pre-RoPE keys have, blocks of 1-3 splits, a shared offset 50x the
    spread: the scores stay close to float64 and rank the same."""
    torch.manual_seed(7)
    h, d, k = 2, 32, 20
    bounds = block_bounds(330, 170)  # 165-token blocks of 3 splits
    keys = spectrum_keys(kind, 330, h, d, 50.0)
    sketch = gaussian_sketch(d, k, DEVICE)
    edges = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    want, _ = leverage_ref64(keys, bounds, sketch)
    out = torch.full((h, 330), float("nan"), device=DEVICE)
    kernels.leverage_scores(keys, edges, kernels.padded_sketch(sketch), k, out, max_block=170, method=method)
    assert rel_err(out, want) < 2e-3
    assert top_half_overlap(out, want, bounds) >= 0.98  # a few swaps at near-ties of the median


@pytest.mark.parametrize("method", ["sketch3", "sketch2", "split3", "fused"])
def test_leverage_span_of_a_longer_prompt(method) -> None:
    """The compactor's call: a span starting mid-prompt given by `blocks` over the prompt's block
    edges and `out_col` into the prompt's score row (no host slicing), keys at 1e-4 and 1e4 scale
    (the ridge is relative), blocks shorter than the sketch; nothing is written outside the span."""
    torch.manual_seed(8)
    h, d, k = 2, 16, 12
    bounds = block_bounds(160, 20)  # 8 blocks of 20 tokens
    sketch = kernels.padded_sketch(gaussian_sketch(d, k, DEVICE))
    edges = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    for scale in (1e-4, 1.0, 1e4):
        keys = random_keys(80, h, d, torch.float32) * scale  # the tokens of blocks 2..5
        want = leverage_ref64(keys, bounds[2:7], gaussian_sketch(d, k, DEVICE))[0]
        full = torch.full((h, 170), float("nan"), device=DEVICE)
        kernels.leverage_scores(
            keys, edges, sketch, k, full, offset=40, max_block=20, method=method, blocks=(2, 6),
            out_col=40, workspace=leverage_module.LeverageWorkspace(),
        )  # fmt: skip
        assert full[:, :40].isnan().all() and full[:, 120:].isnan().all(), "wrote outside its span"
        assert rel_err(full[:, 40:120], want) < 1e-4, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("query_split", [1, 2])
def test_attention_mass_small(dtype, group, query_split) -> None:
    torch.manual_seed(10 + group)
    check_mass(100, (0, 100), 30, 2, group, 32, dtype, tol=1e-5, query_split=query_split)
    check_mass(100, (25, 75), 30, 2, group, 32, dtype, tol=1e-5, query_split=query_split)
    check_mass(
        40, (0, 40), 40, 1, group, 16, dtype, tol=1e-5, query_split=query_split
    )  # one block, not a power of 2


@pytest.mark.parametrize("budget,retention", [("uniform", 0.4), ("adaptive", 0.3), ("uniform", 1.0)])
def test_pack_kept_small(budget, retention) -> None:
    torch.manual_seed(20)
    check_pack(2, 3, 53, 8, 16, torch.float32, budget, retention)


def test_scatter_pages_small() -> None:
    torch.manual_seed(30)
    pool = torch.randn(40, 2, 8, 16, device=DEVICE)
    ids = torch.randperm(40, device=DEVICE)[:13]
    pages = torch.randn(13, 2, 8, 16, device=DEVICE)
    want = pool.clone()
    want[ids] = pages
    kernels.scatter_pages(pool, ids, pages)
    assert torch.equal(pool, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_checksum_small(dtype) -> None:
    """sum64 through the kernel (pages read in place at their ids) equals the gathering reference,
    and a single flipped bit, a swapped pair of ids or a dropped page changes it."""
    from kvferry.kernels.page_checksum import page_checksum
    from kvferry.kvtransfer.device_util import _weighted_sum

    torch.manual_seed(31)
    pool = (torch.randn(50, 2, 8, 16, device=DEVICE) * 1e3).to(dtype)  # 8 * 16 * 2 values: 64+ words
    ids = torch.randperm(50, device=DEVICE)[:21]
    want = _weighted_sum(pool.index_select(0, ids), 0)
    got = page_checksum(pool, ids)
    assert got == want
    assert page_checksum(pool[ids].contiguous()) == want  # no ids: pages 0..N-1 of a packed payload
    swapped = ids.clone()
    swapped[[3, 7]] = swapped[[7, 3]]
    assert page_checksum(pool, swapped) != want
    assert page_checksum(pool, ids[:-1]) != want
    flipped = pool.clone()
    flipped.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)[ids[5], 1, 2, 3] ^= 1
    assert page_checksum(flipped, ids) != want
    assert page_checksum(pool, ids[:0]) == 0
    assert page_checksum(pool[:0]) == 0  # an empty payload (a transfer of no pages) sums to 0


def test_page_checksum_wide_pages_loop_over_blocks() -> None:
    """A page wider than one program's block (page_size 128 x head_dim 32: 8192 words)."""
    from kvferry.kernels.page_checksum import MAX_BLOCK, page_checksum
    from kvferry.kvtransfer.device_util import _weighted_sum

    torch.manual_seed(32)
    pool = torch.randint(-(2**31), 2**31 - 1, (6, 2, 128, 32), dtype=torch.int32, device=DEVICE).view(
        torch.float32
    )
    assert MAX_BLOCK < 2 * 128 * 32
    ids = torch.tensor([4, 0, 5], device=DEVICE)
    assert page_checksum(pool, ids) == _weighted_sum(pool.index_select(0, ids), 0)


@pytest.mark.parametrize("leverage_method,mass_query_split", [(None, 1), ("fused", 2)])
def test_compactor_scores_through_kernels_match_the_reference_path(
    monkeypatch, leverage_method, mass_query_split
) -> None:
    """The compactor scorer streaming chunks through the fused path (as on CUDA) against its PyTorch
    path, chunks not aligned with either block size, leverage launched for groups of 2 layers (the
    last group partial)."""
    torch.manual_seed(40)
    layers, h, g, d, n = 3, 2, 2, 32, 300
    monkeypatch.setattr(CompactorScorer, "group_bytes", 70 * h * (d * 4 + 4 * 64) * 2)
    monkeypatch.setattr(CompactorScorer, "leverage_method", leverage_method)
    monkeypatch.setattr(CompactorScorer, "mass_query_split", mass_query_split)
    params = CompressionParams(leverage_block=128, attention_block=40, sketch_size=12)
    q = torch.randn(layers, n, h * g, d, device=DEVICE)
    k_pre = random_keys(layers * n, h, d, torch.float32).view(layers, n, h, d)
    k = torch.randn(layers, n, h, d, device=DEVICE)
    results = []
    for fused in (False, True):
        scorer = CompactorScorer(params, PromptShape(layers, h, n), seq_kv=None)  # type: ignore[arg-type]
        scorer._start(k[0])  # on CUDA: the fused path on a side stream
        if not fused:
            scorer.fused, scorer.stream = None, None
        elif scorer.fused is None:  # on CPU: the same kernels under the interpreter
            scorer.fused = scorer.fused_scoring()
        for s in range(0, n, 70):
            for layer in range(layers):
                e = min(n, s + 70)
                scorer.observe(layer, q[layer, s:e], k_pre[layer, s:e], k[layer, s:e], s)
        assert scorer.group == 2
        results.append(scorer.scores())
    assert rel_err(results[1], results[0]) < 1e-3


def _compactor_launch_keys(monkeypatch, n: int, chunk: int) -> dict[str, set[tuple]]:
    """The compile keys of every scoring and compaction kernel launch of an n-token prompt scored in
    `chunk`-token chunks (the engine's CUDA path, under the interpreter) and compacted into its pages."""
    from kernel_keys import record_launches

    recorders = record_launches(
        monkeypatch,
        [
            ("leverage_scores", "_fused_kernel"),
            ("attention_mass", "_attention_mass_kernel"),
            ("pack_kept", "_pack_kept_kernel"),
        ],
    )
    monkeypatch.setattr(CompactorScorer, "leverage_method", "fused")
    torch.manual_seed(n)
    layers, h, g, d = 2, 2, 2, 32
    params = CompressionParams(retention=0.5, leverage_block=256, attention_block=32, sketch_size=12)
    scorer = CompactorScorer(params, PromptShape(layers, h, n), seq_kv=None)  # type: ignore[arg-type]
    scorer._start(torch.randn(1, h, d, device=DEVICE))
    scorer.fused = scorer.fused or scorer.fused_scoring()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        for layer in range(layers):
            q, k = torch.randn(e - s, h * g, d, device=DEVICE), torch.randn(e - s, h, d, device=DEVICE)
            scorer.observe(layer, q, k, k, s)
    seq = scattered_sequence(layers, h, n, 16, d, torch.float32)
    kept, lens = select_tokens(scorer.scores(), params)
    table = seq.page_table.clone()
    table[torch.arange(table.shape[-1]) >= seq.pages_per_head(lens)[..., None]] = -1
    kernels.pack_kept(seq.pool.kv, seq.page_table.to(DEVICE), kept, lens.to(DEVICE), table.to(DEVICE))
    monkeypatch.undo()
    return {name: set(r.keys) for name, r in recorders.items()}


def test_a_new_prompt_length_compiles_no_scoring_or_compaction_kernel_again(monkeypatch) -> None:
    """Prompts of lengths on and off multiples of 16 (row strides, page-table widths, kept-token
    counts and chunk starts follow them) launch the scoring and compaction kernels under the same
    compile keys: a served document of a new length compiles nothing (kernel_keys.py)."""
    seen = [_compactor_launch_keys(monkeypatch, n, 64) for n in (160, 161, 176, 203)]
    for name in seen[0]:
        assert seen[0][name], f"{name} was never launched"
        keys = set().union(*(s[name] for s in seen))
        assert len(keys) == len(seen[0][name]), f"{name} compiles again for a new prompt length: {keys}"


# ---- real shapes (GPU only): Llama-3.1-8B, 32 q / 8 kv heads, head_dim 128, bf16 ----


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", list(LEVERAGE_METHODS))
def test_leverage_gpu_llama8b(dtype, method) -> None:
    torch.manual_seed(50)
    lev = dict(method=method, min_overlap=0.99)
    check_leverage(32768, (8192, 10240), 1024, 8, 128, 48, dtype, tol=2e-3, **lev)  # one 2048-token chunk
    check_leverage(9000, (0, 9000), 1024, 8, 128, 48, dtype, tol=2e-3, **lev)  # 9 blocks of 1000
    check_leverage(2000, (0, 2000), 512, 8, 128, 48, dtype, tol=2e-3, **lev)
    check_leverage(4096, (0, 4096), 1024, 8, 128, 48, dtype, tol=2e-3, offset_scale=50.0, **lev)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("query_split", [1, 2])
def test_attention_mass_gpu_llama8b(dtype, query_split) -> None:
    torch.manual_seed(60)
    qs = dict(query_split=query_split)
    check_mass(32768, (8192, 10240), 128, 8, 4, 128, dtype, tol=2e-3, **qs)
    check_mass(9000, (0, 9000), 128, 8, 4, 128, dtype, tol=2e-3, **qs)  # blocks of 127-128 tokens
    check_mass(5000, (0, 5000), 64, 3, 3, 64, dtype, tol=2e-3, **qs)  # SmolLM2's heads


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [16, 64])
@pytest.mark.parametrize("budget", ["uniform", "adaptive"])
def test_pack_kept_gpu_llama8b(page_size, budget) -> None:
    torch.manual_seed(70 + page_size)
    check_pack(32, 8, 8192, page_size, 128, torch.bfloat16, budget, 0.5)
    check_pack(4, 8, 32768, page_size, 128, torch.bfloat16, budget, 0.25)


@gpu
@pytest.mark.gpu
def test_page_checksum_gpu_llama8b() -> None:
    """32K at retention 0.5 of the 8B shape: 262,144 scattered pages of 8 KiB (2 GiB), in place."""
    from kvferry.kvtransfer.device_util import _weighted_sum, pool_checksum

    torch.manual_seed(81)
    pool = torch.randn(300000, 2, 16, 128, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.randperm(300000, device=DEVICE)[:262144]
    want = 0
    for start in range(0, ids.numel(), 1 << 14):
        want = (want + _weighted_sum(pool.index_select(0, ids[start : start + (1 << 14)]), start)) & (
            (1 << 64) - 1
        )
    assert pool_checksum(pool, ids) == want


@gpu
@pytest.mark.gpu
def test_scatter_pages_gpu() -> None:
    torch.manual_seed(80)
    pool = torch.randn(100000, 2, 16, 128, device=DEVICE, dtype=torch.bfloat16)
    ids = torch.randperm(100000, device=DEVICE)[:60000]
    pages = torch.randn(60000, 2, 16, 128, device=DEVICE, dtype=torch.bfloat16)
    want = pool.clone()
    want.index_copy_(0, ids, pages)
    kernels.scatter_pages(pool, ids, pages)
    assert torch.equal(pool, want)


@gpu
@pytest.mark.gpu
def test_compactor_on_cuda_keeps_what_the_cpu_compactor_keeps() -> None:
    """The whole compactor (side stream, fused kernels, selection, in-place pack) on a CUDA pool
    against the PyTorch path on CPU, fed the same chunks: scores agree, kept positions agree up to
    near-ties, and compaction from the same scores puts every kept token where the CPU puts it.

    (Pools compacted from each device's own scores are not compared slot by slot: one near-tie
    swap shifts every later token of that head by a slot; that comparison gave 0.87.)"""
    from kvferry.engine.compression.select import compress_kv, select_tokens

    torch.manual_seed(90)
    layers, h, g, d, n, chunk = 4, 8, 4, 128, 5000, 2048
    q = torch.randn(layers, n, h * g, d)
    k_pre = torch.randn(layers, n, h, d) + 3 * torch.randn(d)
    k = torch.randn(layers, n, h, d)
    params = CompressionParams(retention=0.5)

    def prefilled(device: str) -> tuple[KVPool, SequenceKV]:
        pool = KVPool(layers * h * 320, 16, d, torch.float32, torch.device(device))
        seq = SequenceKV(pool, layers, h, n)
        seq.grow(n)
        seq.head_lens += n
        torch.manual_seed(91)
        pool.kv.copy_(torch.randn(pool.kv.shape))
        return pool, seq

    scores = {}
    for device in ("cpu", "cuda"):
        pool, seq = prefilled(device)
        scorer = CompactorScorer(params, PromptShape(layers, h, n), seq)
        for s in range(0, n, chunk):
            for layer in range(layers):
                e = min(n, s + chunk)
                scorer.observe(layer, *(x[layer, s:e].to(device) for x in (q, k_pre, k)), s)
        scores[device] = scorer.scores().cpu()
    assert rel_err(scores["cuda"], scores["cpu"]) < 1e-3
    kept = {dev: select_tokens(sc, params) for dev, sc in scores.items()}
    assert torch.equal(kept["cuda"][1], kept["cpu"][1])  # uniform budget: same counts
    as_sets = [torch.zeros(layers, h, n, dtype=torch.bool) for _ in range(2)]
    for mask, (pos, _) in zip(as_sets, kept.values()):
        mask.scatter_(2, pos.clamp(min=0), pos >= 0)
    agree = (as_sets[0] & as_sets[1]).sum() / as_sets[0].sum()
    assert agree > 0.99, float(agree)  # the rest are near-ties
    compacted = {}
    for device in ("cpu", "cuda"):  # the same scores: the same selection, so the same pool
        pool, seq = prefilled(device)
        compress_kv(seq, scores["cuda"].to(device), params)
        compacted[device] = (seq.head_lens.clone(), seq.page_table.clone(), pool.kv.cpu())
    assert torch.equal(compacted["cuda"][0], compacted["cpu"][0])
    assert torch.equal(compacted["cuda"][1], compacted["cpu"][1])
    table = compacted["cpu"][1]
    held = table[table >= 0].long()
    assert torch.equal(compacted["cuda"][2][held], compacted["cpu"][2][held])


def test_leverage_kernels_compile_few_variants_across_prompt_lengths() -> None:
    """Every new document length must not compile the leverage kernels again (seconds on a GPU, each
    cache miss of a served document paid it): their split count is one of a few powers of two, and
    still covers the longest block (test_leverage_blocks_longer_than_a_split_and_a_large_offset runs
    the kernels with more splits than its blocks need: 3 of 64 tokens rounded up to 4)."""
    from kvferry.kernels.leverage_scores import leverage_splits

    block, block_t = 8192, 64
    seen = set()
    for n in range(1, 40_000, 37):
        bounds = block_bounds(n, block)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        s = leverage_splits(longest, block_t)
        assert s * block_t >= longest and s & (s - 1) == 0, (n, longest, s)
        seen.add(s)
    assert len(seen) <= (block // block_t).bit_length(), sorted(seen)
