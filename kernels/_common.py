"""Small helpers shared by the kernel launchers (no Triton code here)."""

from __future__ import annotations

import functools

import torch

LOG2E = 1.4426950408889634


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small stand-in for the CPU interpreter."""
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def upcast_dots(t: torch.Tensor) -> bool:
    """Whether kernels must run their dot products in fp32: Triton's CPU interpreter multiplies
    bf16 blocks wrongly (3.9.0), so off-GPU bf16 operands are upcast (same algorithm, fp32 dots)."""
    return t.device.type != "cuda" and t.dtype == torch.bfloat16


def input_precision(t: torch.Tensor) -> str:
    """fp32 dot products in full precision (tests, upcast bf16); bf16/fp16 products are exact in tf32."""
    return "ieee" if t.dtype == torch.float32 or upcast_dots(t) else "tf32"


def check_pool(pool_kv: torch.Tensor) -> tuple[int, int]:
    """pool_kv [num_pages, 2, P, D] contiguous -> (P, D)."""
    assert pool_kv.dim() == 4 and pool_kv.shape[1] == 2, pool_kv.shape
    assert pool_kv.is_contiguous(), "the KV pool must be contiguous"
    page_size, head_dim = pool_kv.shape[2], pool_kv.shape[3]
    assert head_dim == next_pow2(head_dim) and head_dim >= 16, f"head_dim {head_dim}: a power of 2 >= 16"
    return page_size, head_dim
