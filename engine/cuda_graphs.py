"""Decode steps replayed from CUDA graphs, one graph per bucket batch size.

A decode step of B sequences runs the graph of the smallest bucket N >= B (1, 2, 4, 8, ... up to
max_num_seqs), its inputs padded to N rows in static buffers (engine/decode_buffers.py). A graph is
captured the first time its bucket is needed. Batches larger than the largest bucket, models that
synchronise with the host inside their forward (routed experts), CPU engines and
`EngineConfig(enforce_eager=True)` run eagerly (`DecodeBatch`).

`DecodeGraphRunner(..., use_graphs=False)` runs the very callable a graph would capture, eagerly:
that is how the padding and buffer logic is tested on CPU.
"""

from __future__ import annotations

import gc
import time

import torch

from kvferry.engine.config import EngineConfig
from kvferry.engine.decode_buffers import DecodeBuffers
from kvferry.engine.forward_batch import PaddedDecodeBatch
from kvferry.engine.kv_pool import KVPool
from kvferry.engine.models import CausalLM
from kvferry.engine.page_table import grow_decode_batch
from kvferry.engine.sequence import Sequence

MAX_GRAPH_BATCH = 256  # larger decode batches run eagerly (their launch overhead is amortised anyway)


def graph_buckets(max_num_seqs: int, max_graph_batch: int = MAX_GRAPH_BATCH) -> list[int]:
    """Powers of two below min(max_num_seqs, max_graph_batch), then that bound itself."""
    top = min(max_num_seqs, max_graph_batch)
    buckets = [1 << i for i in range(top.bit_length()) if 1 << i < top]
    return [*buckets, top]


class DecodeGraphRunner:
    def __init__(
        self,
        model: CausalLM,
        pool: KVPool,
        num_layers: int,
        num_kv_heads: int,
        max_model_len: int,
        buckets: list[int],
        use_graphs: bool = True,
    ) -> None:
        self.model = model
        self.pool = pool
        self.buckets = sorted(set(buckets))
        self.device = pool.kv.device
        self.use_graphs = use_graphs
        assert not use_graphs or self.device.type == "cuda", "CUDA graphs need a CUDA device"
        max_pages = -(-max_model_len // pool.page_size)
        self.buffers = DecodeBuffers(
            self.buckets[-1], num_layers, num_kv_heads, max_pages, pool.page_size, self.device
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.graph_logits: dict[int, torch.Tensor] = {}  # [N, V] float32, written by each replay
        self.memory_pool: tuple[int, int] | None = None  # shared by every bucket's graph
        self.replays = 0

    def bucket_for(self, batch_size: int) -> int | None:
        """The smallest bucket that holds `batch_size` rows, None when none does (run eagerly)."""
        return next((n for n in self.buckets if n >= batch_size), None)

    def forward(self, n: int) -> torch.Tensor:
        """The captured callable: one decode step over the first n rows of the static buffers -> logits [n, V]."""
        buf = self.buffers
        batch = PaddedDecodeBatch(self.pool.kv, buf.page_tables[:n], buf.lens(n), buf.new_pages(n))
        hidden = self.model(buf.input_ids(n), buf.positions(n), batch)
        return self.model.logits(hidden)

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """One decode step of `seqs` -> logits [B, V]; allocates the pages their new tokens open.

        The logits are a view of the graph's output buffer: read them before the next step."""
        n = self.bucket_for(len(seqs))
        assert n is not None, f"batch of {len(seqs)} is larger than the largest bucket {self.buckets[-1]}"
        if self.use_graphs and n not in self.graphs:
            self._capture(n)
        kvs = [s.kv for s in seqs]
        lens = torch.stack([kv.head_lens for kv in kvs])  # type: ignore[union-attr]  # [B, L, H]
        new_pages = grow_decode_batch(kvs, lens)  # type: ignore[arg-type]
        self.buffers.fill(seqs, lens, new_pages, n)
        if self.use_graphs:
            self.graphs[n].replay()
            logits = self.graph_logits[n]
            self.replays += 1
        else:
            logits = self.forward(n)
        for s in seqs:
            s.kv.head_lens += 1  # type: ignore[union-attr]
        return logits[: len(seqs)]

    def capture_all(self) -> float:
        """Capture every bucket now (a service does it before it reports SERVING, so no capture runs
        while requests are served); seconds taken."""
        start = time.perf_counter()
        if self.use_graphs:
            for n in self.buckets:
                if n not in self.graphs:
                    self._capture(n)
        return time.perf_counter() - start

    def _capture(self, n: int) -> None:
        with torch.cuda.device(self.device):  # the capture stream must be on the pool's GPU
            self._capture_on_device(n)

    def _capture_on_device(self, n: int) -> None:
        buf = self.buffers
        buf.set_padding(n)  # the warm-up run below stores nothing and reads nothing
        self.forward(n)  # compiles this bucket's kernels outside the capture
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a service's other threads may use CUDA while the engine thread captures.
        # No garbage collection inside the capture: a collected object that holds CUDA resources
        # (another engine's graphs, events) would free them there and invalidate the capture.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self.memory_pool, capture_error_mode="thread_local"):
                logits = self.forward(n)
        finally:
            if gc_was_enabled:
                gc.enable()
        self.memory_pool = graph.pool()
        self.graphs[n] = graph
        self.graph_logits[n] = logits
        buf.invalidate_rows()  # the warm-up wrote padding into rows 0..n-1 of the page tables


def make_decode_graph_runner(
    config: EngineConfig,
    model: CausalLM,
    pool: KVPool,
    num_layers: int,
    num_kv_heads: int,
    max_model_len: int,
) -> DecodeGraphRunner | None:
    """The engine's graph runner, or None where decode runs eagerly (CPU, enforce_eager, MoE models)."""
    if config.enforce_eager or pool.kv.device.type != "cuda" or not model.supports_cuda_graphs:
        return None
    buckets = graph_buckets(config.max_num_seqs)
    return DecodeGraphRunner(model, pool, num_layers, num_kv_heads, max_model_len, buckets)
