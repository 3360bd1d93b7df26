"""Triton kernels for the GPU engine; each has a PyTorch reference (attention: engine/layers/
paged_attention.py; scoring and select-and-pack: engine/compression/).

Importing this package needs triton. Tests run the kernels on CPU with TRITON_INTERPRET=1 set
before this import.
"""

if __name__ == "kernels":  # this folder found as a top-level package: the repository root is on sys.path
    raise ImportError(
        "kvferry's kernels/ folder was imported as the top-level package `kernels`, whose name belongs to "
        "the `kernels` package transformers needs: the repository root is on sys.path. Run Python with "
        "-P (or from another directory); kvferry's kernels are `kvferry.kernels`."
    )


from kvferry.kernels.attention_mass import attention_mass
from kvferry.kernels.decode_attention import decode_attention, decode_attention_split, use_balanced
from kvferry.kernels.decode_balanced import (
    DecodePlan,
    balanced_block_n,
    decode_attention_balanced,
    plan_decode,
)
from kvferry.kernels.leverage_scores import leverage_scores, padded_sketch
from kvferry.kernels.pack_kept import pack_kept, scatter_pages
from kvferry.kernels.prefill_attention import prefill_attention
from kvferry.kernels.rms_norm import rms_norm
from kvferry.kernels.rotary import rotary
from kvferry.kernels.silu_mul import silu_mul
from kvferry.kernels.store_kv import store_kv

__all__ = [
    "DecodePlan",
    "attention_mass",
    "balanced_block_n",
    "decode_attention",
    "decode_attention_balanced",
    "decode_attention_split",
    "leverage_scores",
    "pack_kept",
    "padded_sketch",
    "plan_decode",
    "prefill_attention",
    "rms_norm",
    "rotary",
    "scatter_pages",
    "silu_mul",
    "store_kv",
    "use_balanced",
]
