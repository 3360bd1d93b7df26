"""Triton kernels for the GPU engine; each has a PyTorch reference in engine/layers/paged_attention.py.

Importing this package needs triton. Tests run the kernels on CPU with TRITON_INTERPRET=1 set
before this import.
"""

from kernels.decode_attention import decode_attention
from kernels.prefill_attention import prefill_attention
from kernels.store_kv import store_kv

__all__ = ["decode_attention", "prefill_attention", "store_kv"]
