"""Engine settings: one typed object, built once by the caller (the offline API or a service)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvferry.engine.errors import require

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str | None = None  # HF folder or .gguf file; None = the bundled SmolLM2-135M-Instruct
    device: str = "auto"  # "auto" = cuda if available, else cpu
    dtype: str = "auto"  # "auto" = bfloat16 on CUDA, float32 on CPU
    page_size: int = 16  # tokens per page of one (layer, kv-head)
    prefill_chunk: int | None = None  # prompt tokens per prefill step; None = 2048 on CUDA, 512 on CPU
    max_model_len: int | None = None  # prompt + output positions; None = the model's own limit
    kv_cache_bytes: int | None = None  # KV pool size; None = 2 GiB on CPU, 90% of free memory on CUDA
    max_num_seqs: int = 64  # sequences decoded together at most
    # the prompt with the fewest tokens left prefills first; the oldest after being passed over this
    # many times in a row (engine/scheduler.py); 0 = first come, first served
    max_prefill_bypass: int = 16
    load_format: str = "auto"  # "auto" reads weights; "dummy" = random weights from config.json (speed work)
    enforce_eager: bool = False  # True: never replay decode steps from CUDA graphs (engine/cuda_graphs.py)
    # CUDA prefill attention: "auto" = cuDNN through kernels/prefill_dense.py where it applies (chunks
    # of >= 256 tokens over 1024-aligned prefixes, bf16/fp16), else the Triton kernel; "triton" = always Triton
    prefill_attention: str = "auto"
    # CUDA: RMSNorm, RoPE and the SwiGLU gate as one-pass Triton kernels (kernels/rms_norm.py, rotary.py,
    # silu_mul.py; an 8K prefill of the 8B shape 18% faster); False = the eager PyTorch layers
    layer_kernels: bool = True
    # q/k/v in one matmul, and the SwiGLU gate and up projections in one (engine/layers/fused_projections.py;
    # three kernels fewer per layer and decode step); False = one matmul per projection
    fused_projections: bool = True
    # The cache of compressed contexts (engine/context_cache.py). Device tier: bytes of the KV pool it
    # may hold, None = a quarter of the pool, 0 = contexts are still compressed on their own but never
    # kept; host tier (pinned memory on CUDA): None = as much as the device tier, 0 = none.
    context_cache_bytes: int | None = None
    context_cache_host_bytes: int | None = None
    cache_context: bool = False  # a request's cache_context when it does not say (an operator default)

    def __post_init__(self) -> None:
        require(self.page_size >= 1, "page_size", f"must be >= 1, got {self.page_size}")
        require(
            self.prefill_chunk is None or self.prefill_chunk >= 1,
            "prefill_chunk",
            f"must be >= 1, got {self.prefill_chunk}",
        )
        require(self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        require(
            self.max_prefill_bypass >= 0, "max_prefill_bypass", f"must be >= 0, got {self.max_prefill_bypass}"
        )
        require(self.load_format in ("auto", "dummy"), "load_format", "must be auto or dummy")
        require(self.prefill_attention in ("auto", "triton"), "prefill_attention", "must be auto or triton")
        require(self.dtype in ("auto", *_DTYPES), "dtype", f"must be auto or one of {sorted(_DTYPES)}")
        require(
            self.max_model_len is None or self.max_model_len >= 2, "max_model_len", "must be >= 2 when given"
        )
        for name in ("context_cache_bytes", "context_cache_host_bytes"):
            value = getattr(self, name)
            require(value is None or value >= 0, name, f"must be >= 0 when given, got {value}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def prefill_chunk_tokens(self) -> int:
        """On a GPU a 512-token chunk leaves the matrix units idle: an 8K prefill of the 8B shape took
        3.1 s in the H100 serving run with 512 and about 0.6 s with 2048 (docs/benchmarks/serving.md)."""
        if self.prefill_chunk is not None:
            return self.prefill_chunk
        return 2048 if self.torch_device().type == "cuda" else 512

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return _DTYPES[self.dtype]
