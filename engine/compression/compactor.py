"""compactor (default): approximate leverage of pre-RoPE keys blended with non-causal attention mass.

    score = z(a) + λ·z(o)

o: sketched leverage of each kv head's PRE-RoPE keys, block by block (`leverage_block` tokens,
   each block centred; divided by the block's mean so blocks of different sizes compare). Every
   (layer, head) is scored on its own, so a chunk's keys are gathered for a group of layers and
   scored in one launch over group x heads (fewer, fuller launches: the host issues 3 per group,
   not 3 per layer, and the inverse runs on group x heads programs at once).
a: non-causal attention mass inside `attention_block`-token blocks: column sums of
   softmax(Q Kᵀ · scale) (post-RoPE, no causal mask) over the block's queries and the GQA group;
   scale = `mass_sharpness` / sqrt(d).
z: standardise over the tokens x heads of one layer.
Both statistics stream with chunked prefill; nothing but [L, H, n] floats is kept.

λ = 1 - retention by default (`blend="ratio"`, kvpress's CompactorPress; `blend="fixed"`: λ =
`leverage_weight`). Options (CompressionParams; off by default): a weighted by the value norms ‖v‖
(`value_norm`) and average-pooled over
neighbouring positions (`mass_smoothing`), both as kvpress's non-causal attention press does, and
+ μ·z(snapkv votes of the last `window` queries) (`query_weight`: the question, when it ends the prompt).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from kvferry.engine.compression.attention_scores import block_attention_mass
from kvferry.engine.compression.base import PromptShape, Scorer
from kvferry.engine.compression.blocks import BlockStream, block_bounds
from kvferry.engine.compression.leverage import gaussian_sketch, sketched_leverage
from kvferry.engine.compression.params import CompressionParams
from kvferry.engine.compression.registry import SCORERS, register
from kvferry.engine.page_table import SequenceKV


def standardize_per_layer(x: torch.Tensor) -> torch.Tensor:
    """x [L, H, n] -> zero mean, unit std over each layer's heads and tokens."""
    mean = x.mean(dim=(1, 2), keepdim=True)
    std = x.std(dim=(1, 2), keepdim=True).nan_to_num(0.0).clamp(min=1e-6)
    return (x - mean) / std


def smooth_positions(x: torch.Tensor, width: int) -> torch.Tensor:
    """x [L, H, n] -> the mean over each position's `width` (odd) neighbours; the edges average
    over the neighbours that exist."""
    lead, n = x.shape[:-1], x.shape[-1]
    pooled = F.avg_pool1d(
        x.reshape(-1, 1, n), width, stride=1, padding=width // 2, count_include_pad=False
    )  # [L*H, 1, n]
    return pooled.reshape(*lead, n)


def layers_per_leverage_launch(
    num_layers: int, tokens: int, heads: int, head_dim: int, itemsize: int, sketch_size: int, budget: int
) -> int:
    """How many layers' keys of a `tokens`-long chunk fit `budget` bytes, with the leverage kernels'
    scratch (x = (K - s)Φ in fp32, the sketch padded to a power of two of at least 64 columns)."""
    sketch_cols = max(64, 1 << (sketch_size - 1).bit_length())
    per_layer = tokens * heads * (head_dim * itemsize + 4 * sketch_cols)
    return max(1, min(num_layers, budget // per_layer))


@register("compactor")
class CompactorScorer(Scorer):
    query_agnostic = True  # key leverage and block-local attention mass: the text alone decides
    # On CUDA: the fused Triton kernels (kernels/leverage_scores.py, kernels/attention_mass.py),
    # launched on a side stream so scoring overlaps the prefill's own work. Off CUDA, or with
    # use_kernels False: the PyTorch reference below. Class knobs, for tests and benchmarks.
    use_kernels: ClassVar[bool] = True
    use_side_stream: ClassVar[bool] = True
    # A chunk's pre-RoPE keys of this many bytes (with the sketch's scratch) are gathered before a
    # leverage launch: 8 layers of Llama-3.1-8B at 2048-token chunks.
    group_bytes: ClassVar[int] = 64 << 20
    # a key of kernels.leverage_scores.STAGES (None: its default)
    leverage_method: ClassVar[str | None] = None
    # 2: two programs per attention-mass block, each adding half the queries' column sums into the
    # zeroed mass rows (kernels/attention_mass.py): 16.6 us against 19.9 us per 2048-token layer
    # chunk of the 8B shape on an H100 (2026-12-06)
    mass_query_split: ClassVar[int] = 2

    def __init__(self, params: CompressionParams, shape: PromptShape, seq_kv: SequenceKV) -> None:
        super().__init__(params, shape, seq_kv)
        n = shape.prompt_len
        self.group = 0  # layers per leverage launch, planned from the first chunk's size
        # this chunk's pre-RoPE keys [T, H, D] of the group's layers so far, stacked when it completes:
        # one contiguous copy per group. Copying each layer into a strided [T, G, H, D] buffer ran at
        # about a third of the memory bandwidth (0.9 ms per 8K prefill of the 8B shape on an H100);
        # the stack takes 0.40 ms. One launch per layer (no copy) was slower: 32 small launches a chunk.
        self.group_keys: list[torch.Tensor] = []
        self.leverage_streams: list[BlockStream] = []  # one per group of layers
        self.mass_streams = [BlockStream(n, params.attention_block) for _ in range(shape.num_layers)]
        self.leverage: torch.Tensor | None = None  # [L, H, n]
        self.mass: torch.Tensor | None = None  # [L, H, n]
        self.sketch: torch.Tensor | None = None  # Φ [D, k]
        self.fused: FusedScoring | None = None
        self.stream: torch.cuda.Stream | None = None
        self.ready: torch.cuda.Event | None = None  # reused: the side stream waits for the prefill
        self.mass_rows: list[torch.Tensor] = []  # per layer: its mass [H, n]
        self.norms: torch.Tensor | None = None  # value_norm: ‖v‖ [L, H, n], read once
        # query_weight > 0: snapkv's votes of the last `window` prompt queries, observed alongside
        self.query: Scorer | None = (
            SCORERS["snapkv"](params, shape, seq_kv) if params.query_weight > 0 else None
        )

    def observe(
        self, layer: int, q: torch.Tensor, k_pre_rope: torch.Tensor, k: torch.Tensor, start: int
    ) -> None:
        if self.query is not None:
            self.query.observe(layer, q, k_pre_rope, k, start)
        if self.sketch is None:
            self._start(k)
        if not self.group:
            self._plan_groups(k_pre_rope)
        first = layer - layer % self.group
        size = min(self.group, self.shape.num_layers - first)
        if layer == first:
            self.group_keys = []
        self.group_keys.append(k_pre_rope)  # a fresh tensor of the layer's projection: kept as is
        keys = None
        if layer == first + size - 1:  # the group is complete: one copy for all its layers
            # [T, G, H, D], on the prefill's stream (a group of one layer is a view: no copy)
            keys = self.group_keys[0].unsqueeze(1) if size == 1 else torch.stack(self.group_keys, dim=1)
            self.group_keys = []
        if self.stream is None:
            self._observe(layer, q, k, start, keys)
            return
        assert self.ready is not None
        # what torch.cuda.stream() and wait_stream do, without a new event or context object per call
        main = torch.cuda.current_stream(k.device)
        self.ready.record(main)
        self.stream.wait_event(self.ready)
        torch.cuda.set_stream(self.stream)
        try:
            self._observe(layer, q, k, start, keys)
        finally:
            torch.cuda.set_stream(main)
        for t in (q, k) if keys is None else (q, k, keys):
            t.record_stream(self.stream)  # the prefill may free them before the side stream is done

    def _start(self, k: torch.Tensor) -> None:
        s, p = self.shape, self.params
        self.sketch = gaussian_sketch(k.shape[-1], p.sketch_size, k.device)
        self.leverage = torch.zeros(s.num_layers, s.num_kv_heads, s.prompt_len, device=k.device)
        self.mass = torch.zeros_like(self.leverage)
        self.mass_rows = list(self.mass.unbind(0))
        d = k.shape[-1]
        if k.is_cuda and self.use_kernels and d >= 16 and d & (d - 1) == 0:  # the kernels' head dims
            self.fused = self.fused_scoring()
            if self.use_side_stream:
                self.stream = torch.cuda.Stream(k.device)
                self.ready = torch.cuda.Event()

    def fused_scoring(self) -> FusedScoring:
        """The Triton path for this prompt (on CPU: the kernels under the interpreter, for tests)."""
        assert self.sketch is not None
        n = self.shape.prompt_len
        return FusedScoring(
            self.sketch, block_bounds(n, self.params.leverage_block), self.mass_streams[0].bounds,
            self.leverage_method, self.mass_query_split,
        )  # fmt: skip

    def _plan_groups(self, k_pre_rope: torch.Tensor) -> None:
        s = self.shape
        t, h, d = k_pre_rope.shape
        self.group = layers_per_leverage_launch(
            s.num_layers, t, h, d, k_pre_rope.element_size(), self.params.sketch_size, self.group_bytes
        )
        num_groups = -(-s.num_layers // self.group)
        self.leverage_streams = [
            BlockStream(s.prompt_len, self.params.leverage_block) for _ in range(num_groups)
        ]

    def _observe(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, start: int, group_keys: torch.Tensor | None
    ) -> None:
        """The layer's attention mass, then (group_keys [T, G, H, D]: its group is complete) the
        leverage of the group's keys."""
        assert self.leverage is not None and self.mass is not None and self.sketch is not None
        if group_keys is not None:
            self._leverage(layer - layer % self.group, group_keys, start)
        scale = k.shape[-1] ** -0.5 * self.params.mass_sharpness
        fused = self.fused
        mass = self.mass_rows[layer]
        if fused is not None and fused.mass_fits:
            span = self.mass_streams[layer].push_span(start, q, k)
            if span is not None:
                fused.mass(mass, span, scale)
        else:
            for lo, (qb, kb) in self.mass_streams[layer].push(start, q, k):
                mass[:, lo : lo + qb.shape[0]] = block_attention_mass(qb, kb, scale)

    def _leverage(self, first: int, group_keys: torch.Tensor, start: int) -> None:
        """group_keys [T, G, H, D]: layers first..first+G-1 scored as G x H heads at once."""
        assert self.leverage is not None and self.sketch is not None
        t, g, h, d = group_keys.shape
        keys = group_keys.view(t, g * h, d)
        leverage = self.leverage[first : first + g].view(g * h, -1)  # [G x H, n]
        stream = self.leverage_streams[first // self.group]
        if self.fused is not None:
            span = stream.push_span(start, keys)
            if span is not None:
                self.fused.leverage(leverage, span, self.params.sketch_size)
            return
        for lo, (block,) in stream.push(start, keys):
            o = sketched_leverage(block.transpose(0, 1), self.sketch)  # [G x H, b]
            leverage[:, lo : lo + o.shape[1]] = o / o.mean(dim=1, keepdim=True).clamp(min=1e-12)

    def scores(self) -> torch.Tensor:
        """z(a) + λ·z(o) (+ μ·z(query votes)); may be called again after `params` changed (the
        benchmark scores several retentions from one prefill)."""
        assert self.leverage is not None and self.mass is not None, "no prefill chunk was observed"
        if self.stream is not None:
            torch.cuda.current_stream(self.leverage.device).wait_stream(self.stream)
        p = self.params
        mass = self.mass
        if p.value_norm:
            mass = mass * self.value_norms()
        if p.mass_smoothing > 1:
            mass = smooth_positions(mass, p.mass_smoothing)
        out = standardize_per_layer(mass) + p.blend_weight * standardize_per_layer(self.leverage)
        if self.query is not None and p.query_weight > 0:
            out = out + p.query_weight * standardize_per_layer(self.query.scores().to(out.device))
        return out

    def value_norms(self) -> torch.Tensor:
        """‖v‖ [L, H, n] of every prompt token, read back from the pages (one layer at a time)."""
        if self.norms is None:
            layers = range(self.shape.num_layers)
            self.norms = torch.stack([self.cached_kv(layer)[1].float().norm(dim=-1) for layer in layers])
        return self.norms


class FusedScoring:
    """The compactor's two statistics through the Triton kernels, one launch per completed span of
    blocks (block edges live on the device once, so a launch copies nothing from the host)."""

    def __init__(
        self,
        sketch: torch.Tensor,
        leverage_bounds: list[int],
        mass_bounds: list[int],
        leverage_method: str | None = None,
        mass_query_split: int = 1,
    ) -> None:
        from kvferry import kernels
        from kvferry.kernels.attention_mass import MAX_BLOCK
        from kvferry.kernels.leverage_scores import LeverageWorkspace

        self.kernels = kernels
        self.leverage_method = leverage_method  # None: kernels.leverage_scores' default
        self.mass_query_split = mass_query_split  # 2: the mass rows hold zeros, and the kernel adds into them
        # scratch buffers reused by every leverage launch of this prompt (all on the scorer's stream)
        self.leverage_workspace = LeverageWorkspace()
        device = sketch.device
        self.sketch = kernels.padded_sketch(sketch)  # [D, KP]
        self.leverage_bounds = torch.tensor(leverage_bounds, dtype=torch.int32, device=device)
        self.mass_bounds = torch.tensor(mass_bounds, dtype=torch.int32, device=device)
        self.max_leverage_block = max(b - a for a, b in zip(leverage_bounds, leverage_bounds[1:]))
        self.max_mass_block = max(b - a for a, b in zip(mass_bounds, mass_bounds[1:]))
        self.mass_fits = self.max_mass_block <= MAX_BLOCK  # else: the PyTorch reference for the mass

    def leverage(self, out: torch.Tensor, span: tuple, sketch_size: int) -> None:
        """out [H, n]: fill the span's tokens with their block-normalised leverage."""
        lo, (keys,), first, last = span
        self.kernels.leverage_scores(
            keys, self.leverage_bounds, self.sketch, sketch_size, out, offset=lo,
            max_block=self.max_leverage_block, method=self.leverage_method,
            workspace=self.leverage_workspace, blocks=(first, last), out_col=lo,
        )  # fmt: skip

    def mass(self, out: torch.Tensor, span: tuple, scale: float) -> None:
        """out [H, n]: fill the span's tokens with their non-causal block attention mass."""
        lo, (q, k), first, last = span
        self.kernels.attention_mass(
            q, k, self.mass_bounds[first : last + 1], self.max_mass_block, scale,
            out[:, lo : lo + q.shape[0]], offset=lo, query_split=self.mass_query_split,
        )  # fmt: skip
